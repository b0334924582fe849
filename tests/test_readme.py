"""README.md stays a short front door: its links resolve and it says nothing stale.

Its quickstart is executed by tests/test_quickstart.py; the runnable examples that used to live
here are on the docs pages and run by tests/test_docs.py.
"""

from __future__ import annotations

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_the_readme_is_short():
    assert len(README.splitlines()) <= 160


def test_every_relative_link_resolves():
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README)
    assert links, "the README links to the docs"
    missing = [link for link in links if not (REPO / link).exists()]
    assert missing == []


def test_the_two_commands_and_the_quickstart_steps_are_there():
    for text in (
        "make demo",
        "make test",
        "pip install -e",
        "create_app(",
        "ResilientTask",
        "TASKKIT_APP",
        "taskkit db upgrade",
        "taskkit runs show",
        "taskkit resume",
        "taskkit dlq replay",
        "make docs",
    ):
        assert text in README, f"README.md does not mention {text}"


def test_nothing_stale():
    assert "follow (see" not in README  # "the dead-letter queue and batch tasks follow"
    assert "taskkit/cli.py" not in README
