"""The ``--watch`` loop of ``tasks show`` and ``batches show`` (``taskkit.cli._watch``): pure
logic with a fake clock; a terminal gets a live view that Ctrl-C leaves clean."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.text import Text

from taskkit.cli._watch import watch
from tests.conftest import FakeClock


def run(values: list[object], *, timeout: float | None, terminal: bool = False, clock=None):
    clock = clock or FakeClock()
    source = iter(values)
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=60)

    def read() -> object:
        value = next(source)
        if isinstance(value, BaseException):
            raise value
        return value

    watched = watch(
        read,
        panel=lambda v: Text(f"panel {v}"),
        line=lambda v: f"line {v}",
        ended=lambda v: v == "end",
        failed_read=lambda last, exc: f"{last} ({exc})",
        console=console,
        interval=1.0,
        timeout=timeout,
        clock=clock,
        sleep=clock.sleep,
    )
    return watched, buffer.getvalue(), clock


def test_watch_reads_until_the_end_one_line_per_change_then_the_panel():
    watched, printed, clock = run(["a", "a", "b", "end"], timeout=None)

    assert (watched.view, watched.timed_out) == ("end", False)
    assert printed.splitlines() == ["line a", "line b", "line end", "panel end"]
    assert clock.sleeps == [1.0, 1.0, 1.0]


def test_watch_stops_at_the_timeout_without_sleeping_past_it():
    watched, printed, clock = run(["a"] * 10, timeout=2.5)

    assert (watched.view, watched.timed_out) == ("a", True)
    assert clock.sleeps == [1.0, 1.0, 0.5]
    assert printed.splitlines() == ["line a", "panel a"]


def test_a_failed_read_after_the_first_is_a_note_and_the_watch_goes_on():
    watched, printed, _ = run(["a", ConnectionError("down"), "end"], timeout=None)

    assert watched.view == "end"
    assert "line a (down)" in printed.splitlines()


def test_the_first_read_failing_is_the_commands_error():
    with pytest.raises(ConnectionError):
        run([ConnectionError("down")], timeout=None)


def test_ctrl_c_in_a_live_view_restores_the_terminal():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=60)
    reads = iter(["a", KeyboardInterrupt()])

    def read() -> object:
        value = next(reads)
        if isinstance(value, BaseException):
            raise value
        return value

    clock = FakeClock()
    with pytest.raises(KeyboardInterrupt):
        watch(
            read,
            panel=lambda v: Text(f"panel {v}"),
            line=lambda v: f"line {v}",
            ended=lambda v: False,
            failed_read=None,
            console=console,
            interval=1.0,
            timeout=None,
            clock=clock,
            sleep=clock.sleep,
        )

    printed = buffer.getvalue()
    assert "panel a" in printed
    assert printed.rstrip("\n").endswith("\x1b[?25h")  # the cursor is shown again
