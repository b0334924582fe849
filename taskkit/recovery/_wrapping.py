"""What every taskkit decorator does to keep the wrapped function recognisable."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any, cast

from taskkit.errors import ConfigurationError

__all__ = ["check_int", "check_seconds", "exception_tuple", "keep_identity", "qualified_name"]


def keep_identity(wrapper: Callable[..., Any], fn: Callable[..., Any], **attributes: Any) -> Any:
    """Give ``wrapper`` the name, docstring, ``__wrapped__`` and signature of ``fn``.

    ``inspect.signature`` follows ``__wrapped__``, but Celery's argument check
    (``inspect.getfullargspec``) does not; both honour ``__signature__``, so it is set too.
    """
    functools.update_wrapper(wrapper, fn)
    # Builtins and C functions may have no signature to copy.
    with contextlib.suppress(TypeError, ValueError):
        wrapper.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    for name, value in attributes.items():
        setattr(wrapper, name, value)
    return wrapper


def qualified_name(fn: object) -> str:
    """A readable name for logs and errors."""
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def exception_tuple(option: str, value: object) -> tuple[type[BaseException], ...]:
    """``value`` as a tuple of exception classes, or a ``ConfigurationError`` naming ``option``."""
    items = value if isinstance(value, tuple) else (value,)
    if not items or not all(isinstance(e, type) and issubclass(e, BaseException) for e in items):
        raise ConfigurationError(
            f"{option} must be an exception class or a tuple of them, got {value!r}"
        )
    return cast(tuple[type[BaseException], ...], items)


def check_int(option: str, value: object, minimum: int) -> None:
    """Raise a ``ConfigurationError`` naming ``option`` unless ``value`` is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{option} must be an integer >= {minimum}, got {value!r}")


def check_seconds(option: str, value: object) -> None:
    """Raise a ``ConfigurationError`` naming ``option`` unless ``value`` is a number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{option} must be a number of seconds > 0, got {value!r}")
