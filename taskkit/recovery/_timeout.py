"""``timeout``: stop waiting for a call after a number of seconds."""

from __future__ import annotations

import asyncio
import inspect
import signal
import threading
from collections.abc import Callable, Coroutine
from time import monotonic as _monotonic
from types import FrameType
from typing import Any, ParamSpec, TypeVar, cast

from taskkit._utils import check_seconds, keep_identity, qualified_name
from taskkit.errors import TimeoutExceeded

__all__ = ["timeout"]

P = ParamSpec("P")
R = TypeVar("R")

_HAS_ITIMER = hasattr(signal, "setitimer") and hasattr(signal, "SIGALRM")
# A timer that is due (or overdue) is re-armed this far ahead so that it still fires.
_DUE_NOW = 1e-6


def timeout(seconds: float) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Raise ``TimeoutExceeded`` (a ``TaskkitError`` and a built-in ``TimeoutError``) when the
    decorated call runs longer than ``seconds`` (a float).

    How the call is stopped depends on where it runs:

    - ``async def``: the awaitable is cancelled (``asyncio.timeout``), so the work really stops
      at its next ``await``.
    - sync code in the main thread on Unix: a real interrupt. ``SIGALRM`` from ``setitimer``
      raises inside the call, even in ``time.sleep`` or a blocking socket read. Timeouts nest:
      the previous handler and timer are saved and restored, and an outer limit that is shorter
      than an inner one still fires on time.
    - sync code in any other thread (or where there is no ``SIGALRM``): Python cannot interrupt
      another thread, so the call runs in a helper daemon thread and the caller stops waiting
      and raises after ``seconds``. Caveat: the call itself keeps running in the background
      until it returns, and its result or error is dropped. Use it for reads, not for work
      whose side effects must not happen late.

    Decision: the signal path only applies when the process has no other use for ``SIGALRM``;
    a handler installed by someone else is saved, chained and restored, never lost.

    Example::

        @timeout(seconds=2.5)
        def load(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()
    """
    check_seconds("timeout(seconds=...)", seconds)
    limit = float(seconds)

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        what = qualified_name(fn)
        if inspect.iscoroutinefunction(fn):
            coro_fn = cast(Callable[..., Coroutine[Any, Any, Any]], fn)

            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    async with asyncio.timeout(limit):
                        return await coro_fn(*args, **kwargs)
                except TimeoutError as exc:
                    if isinstance(exc, TimeoutExceeded):
                        raise
                    raise TimeoutExceeded(limit, what) from exc

            return cast(Callable[P, R], keep_identity(async_wrapper, fn))

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _HAS_ITIMER and threading.current_thread() is threading.main_thread():
                with _AlarmTimer(limit, what):
                    return fn(*args, **kwargs)
            return _run_in_helper_thread(limit, what, fn, args, kwargs)

        return cast(Callable[P, R], keep_identity(wrapper, fn))

    return decorate


class _AlarmTimer:
    """One level of nested SIGALRM timeouts."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self._delegated = False

    def __enter__(self) -> None:
        self._previous_handler = signal.getsignal(signal.SIGALRM)
        previous_delay, self._previous_interval = signal.setitimer(signal.ITIMER_REAL, 0)
        self._previous_delay = previous_delay
        self._entered = _monotonic()
        self._deadline = self._entered + self.seconds
        signal.signal(signal.SIGALRM, self._on_alarm)
        # An outer timer that is due sooner keeps its own time; our handler hands it over.
        first = min(self.seconds, previous_delay) if previous_delay > 0 else self.seconds
        signal.setitimer(signal.ITIMER_REAL, first)

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if _monotonic() >= self._deadline - _DUE_NOW:
            raise TimeoutExceeded(self.seconds, self.what)
        # The outer timer fired first: pass the signal on to whoever owned it.
        self._delegated = True
        previous = self._previous_handler
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # the default action of SIGALRM ends the process
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGALRM)

    def __exit__(self, *exc_info: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous_handler)
        if self._previous_delay > 0:
            if self._delegated:
                # The outer one-shot timer already fired; only a repeating one comes back.
                if self._previous_interval > 0:
                    signal.setitimer(
                        signal.ITIMER_REAL, self._previous_interval, self._previous_interval
                    )
                return
            left = self._previous_delay - (_monotonic() - self._entered)
            signal.setitimer(signal.ITIMER_REAL, max(left, _DUE_NOW), self._previous_interval)


def _run_in_helper_thread(
    limit: float,
    what: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    outcome: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            outcome.append((True, fn(*args, **kwargs)))
        except BaseException as exc:
            outcome.append((False, exc))

    helper = threading.Thread(target=target, name=f"taskkit-timeout:{what}", daemon=True)
    helper.start()
    helper.join(limit)
    if not outcome:
        raise TimeoutExceeded(limit, what)
    ok, value = outcome[0]
    if ok:
        return value
    raise value
