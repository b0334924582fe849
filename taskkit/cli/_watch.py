"""``--watch`` for ``taskkit tasks show`` and ``taskkit batches show``: read, draw, wait, until
the thing watched ends or the time runs out.

A terminal gets a live view (rich ``Live``, redrawn after each read); any other output (a log,
a pipe) one line per change, then the full view at the end. The first read's errors are the
command's; a later read that fails is shown as a note and the next interval reads again (a
short outage does not end the watch). Ctrl-C leaves a clean screen: ``Live`` restores the
cursor, the command says the work goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text

__all__ = ["Watched", "watch"]

View = TypeVar("View")

#: The loop's clock and sleep; tests replace them (read at each call).
_clock: Callable[[], float] = time.monotonic
_sleep: Callable[[float], None] = time.sleep


@dataclass(frozen=True)
class Watched(Generic[View]):
    """How a watch ended: the last view, and whether the time ran out first."""

    view: View
    timed_out: bool


def watch(
    read: Callable[[], View],
    *,
    panel: Callable[[View], RenderableType],
    line: Callable[[View], str],
    ended: Callable[[View], bool],
    failed_read: Callable[[View, BaseException], View] | None,
    console: Console,
    interval: float,
    timeout: float | None,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> Watched[View]:
    """Show ``read()`` every ``interval`` seconds until ``ended(view)``, or until ``timeout``
    seconds have passed (None: no limit).

    ``failed_read(last, error)`` turns a failed read after the first into the view to show (a
    note on the last one); None re-raises.
    """
    clock = clock or _clock
    sleep = sleep or _sleep
    start = clock()

    def loop(show: Callable[[View], None]) -> Watched[View]:
        view: View | None = None
        while True:
            began = clock()
            try:
                view = read()
            except Exception as exc:
                if view is None or failed_read is None:
                    raise
                view = failed_read(view, exc)
            show(view)
            if ended(view):
                return Watched(view, False)
            if timeout is not None and clock() - start >= timeout:
                return Watched(view, True)
            wait = max(0.0, interval - (clock() - began))
            if timeout is not None:
                wait = min(wait, max(0.0, timeout - (clock() - start)))
            sleep(wait)

    if console.is_terminal:
        with Live(Text("reading..."), console=console, auto_refresh=False) as live:
            return loop(lambda view: live.update(panel(view), refresh=True))
    last = [""]

    def print_line(view: View) -> None:
        text = line(view)
        if text != last[0]:
            last[0] = text
            console.print(text, markup=False, highlight=False)

    watched = loop(print_line)
    console.print(panel(watched.view))
    return watched
