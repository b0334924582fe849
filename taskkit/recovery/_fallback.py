"""``fallback`` and ``safe_execute``: turn a failure into a value."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast, overload

from taskkit._utils import exception_tuple, is_control_flow, keep_identity, qualified_name
from taskkit.errors import ConfigurationError

__all__ = ["fallback", "safe_execute"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

logger = logging.getLogger("taskkit.recovery")

ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]


def fallback(
    func_or_value: Any, exceptions: ExceptionTypes = (Exception,)
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """On one of ``exceptions``, return a fallback instead of raising.

    ``func_or_value`` is either a value, returned as it is, or a callable. A callable is called
    with the original arguments when its signature accepts them (``fallback(cached_price)`` for
    ``price(sku)``), and with none otherwise (``fallback(get_default_config)``); the seed uses
    both forms. An ``async def`` fallback is awaited when the decorated function is async.
    The error is logged once, at WARNING, with its traceback.

    Decision: the signature check is made per call against the actual arguments, so a method
    (whose arguments include ``self``) can fall back to a plain function of no arguments.

    Example::

        @fallback(get_default_config)
        @retry(max_attempts=3, delay=0.5, exceptions=(IOError, OSError))
        def load_config(path: str) -> dict:
            with open(path) as f:
                return json.load(f)
    """
    caught = exception_tuple("exceptions", exceptions)
    alternative = _Alternative(func_or_value)

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        name = qualified_name(fn)
        if inspect.iscoroutinefunction(fn):
            coro_fn = cast(Callable[..., Coroutine[Any, Any, Any]], fn)

            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await coro_fn(*args, **kwargs)
                except caught as exc:
                    if is_control_flow(exc):
                        raise
                    _log_fallback(name, exc)
                    value = alternative.produce(args, kwargs)
                    if inspect.isawaitable(value):
                        return await value
                    return value

            return cast(Callable[P, R], keep_identity(async_wrapper, fn))
        if alternative.is_async:
            raise ConfigurationError(
                f"fallback {alternative.target!r} is async but {name} is not: it cannot await it"
            )

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except caught as exc:
                if is_control_flow(exc):
                    raise
                _log_fallback(name, exc)
                return alternative.produce(args, kwargs)

        return cast(Callable[P, R], keep_identity(wrapper, fn))

    return decorate


class _Alternative:
    def __init__(self, target: Any) -> None:
        self.target = target
        self.is_async = inspect.iscoroutinefunction(target)
        self.signature: inspect.Signature | None = None
        if callable(target):
            try:
                self.signature = inspect.signature(target)
            except (TypeError, ValueError):  # no signature to read: call it with nothing
                self.signature = None

    def produce(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        target = self.target
        if not callable(target):
            return target
        if self.signature is not None and (args or kwargs):
            try:
                self.signature.bind(*args, **kwargs)
            except TypeError:
                return target()
            return target(*args, **kwargs)
        return target()


@overload
def safe_execute(
    func: Callable[..., Coroutine[Any, Any, R]],
    *args: Any,
    default: T = ...,
    exceptions: ExceptionTypes = ...,
    **kwargs: Any,
) -> Coroutine[Any, Any, R | T]: ...


@overload
def safe_execute(
    func: Callable[..., R],
    *args: Any,
    default: T = ...,
    exceptions: ExceptionTypes = ...,
    **kwargs: Any,
) -> R | T: ...


def safe_execute(
    func: Callable[..., Any],
    *args: Any,
    default: Any = None,
    exceptions: ExceptionTypes = (Exception,),
    **kwargs: Any,
) -> Any:
    """Return ``func(*args, **kwargs)``, or ``default`` if it raises one of ``exceptions``.

    The error is logged once, at WARNING with its traceback, so a swallowed error is still
    seen. For an ``async def`` function it returns an awaitable that does the same. Keyword
    arguments named ``default`` and ``exceptions`` belong to ``safe_execute``, not ``func``.

    Example::

        df = safe_execute(load_dataset, primary_path, default=None)
        if df is None:
            df = load_dataset(backup_path)
    """
    caught = exception_tuple("exceptions", exceptions)
    if inspect.iscoroutinefunction(func):
        return _safe_execute_async(func, args, kwargs, default, caught)
    try:
        return func(*args, **kwargs)
    except caught as exc:
        if is_control_flow(exc):
            raise
        _log_swallowed(func, exc)
        return default


async def _safe_execute_async(
    func: Callable[..., Coroutine[Any, Any, Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    default: Any,
    caught: tuple[type[BaseException], ...],
) -> Any:
    try:
        return await func(*args, **kwargs)
    except caught as exc:
        if is_control_flow(exc):
            raise
        _log_swallowed(func, exc)
        return default


def _log_swallowed(func: Callable[..., Any], exc: BaseException) -> None:
    logger.warning(
        "taskkit.safe_execute: %s raised %s: %s; returning the default",
        qualified_name(func),
        type(exc).__name__,
        exc,
        exc_info=exc,
    )


def _log_fallback(name: str, exc: BaseException) -> None:
    logger.warning(
        "taskkit.fallback: %s raised %s: %s; using the fallback",
        name,
        type(exc).__name__,
        exc,
        exc_info=exc,
    )
