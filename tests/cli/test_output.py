"""What the CLI prints carries no terminal control sequence from the data it shows (run names,
errors, tracebacks, payloads): each control character is shown as a visible escape."""

from __future__ import annotations

from collections.abc import Callable

from typer.testing import CliRunner

from taskkit.cli import app
from taskkit.cli._common import printable
from taskkit.deadletter import DeadLetterStore
from tests._support.letters import letter_entry

CLEAR = "\x1b[2J"


def _clean(text: str) -> None:
    controls = [c for c in text if (ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F]
    assert not controls, f"control characters printed: {controls!r}"


def test_printable_shows_control_characters_as_escapes():
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("bell\x07 del\x7f csi\x9b") == "bell\\x07 del\\x7f csi\\x9b"
    assert printable("line\n\ttab") == "line\n\ttab"
    assert printable("plain ünïcode ✓") == "plain ünïcode ✓"


def test_runs_list_and_show_escape_names_and_errors(
    runner: CliRunner, make_run: Callable[..., int]
):
    run_id = make_run(f"{CLEAR}x", "failed", error=f"boom{CLEAR}\x07\x9b31m")

    listed = runner.invoke(app, ["runs", "list"])
    shown = runner.invoke(app, ["runs", "show", str(run_id)])

    for result in (listed, shown):
        assert result.exit_code == 0, result.output
        _clean(result.output)
    assert "\\x1b[2Jx" in listed.stdout
    assert "boom\\x1b[2J\\x07\\x9b31m" in shown.stdout


def test_dlq_list_and_show_escape_errors_tracebacks_and_payloads(runner: CliRunner, database: str):
    store = DeadLetterStore(database)
    entry = letter_entry(
        f"task{CLEAR}", {"id": f"a{CLEAR}"}, key=f"k{CLEAR}", error=KeyError(f"bad{CLEAR}")
    )
    store.record([entry])
    (letter,) = store.list()

    env = {"COLUMNS": "200"}
    listed = runner.invoke(app, ["dlq", "list"], env=env)
    shown = runner.invoke(app, ["dlq", "show", str(letter.id)], env=env)

    for result in (listed, shown):
        assert result.exit_code == 0, result.output
        _clean(result.output)
    assert "\\x1b[2J" in listed.stdout
    assert "bad\\x1b[2J" in shown.stdout
