"""What ``taskkit`` costs to start: no heavy import to build the command tree, ``--version``,
help that shows no value for flags, command modules that do not import each other."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import taskkit
from taskkit.cli import app

CLI = Path(__file__).resolve().parents[2] / "taskkit" / "cli"
COMMAND_MODULES = ("db", "runs", "dlq", "train", "serve")
#: Imported only by the commands that need them (``taskkit --help`` does without them).
HEAVY = (
    "sqlalchemy",
    "alembic",
    "celery",
    "kombu",
    "pandas",
    "numpy",
    "sklearn",
    "yaml",
    "pydantic_settings",
    "taskkit.config",
    "taskkit.db",
    "taskkit.tasks",
    "taskkit.deadletter",
    "taskkit.checkpoint",
    "workers",
    "fastapi",
    "uvicorn",
    "httpx",
    "taskkit.api",
)


def test_importing_the_cli_imports_nothing_heavy():
    code = (
        "import sys, taskkit.cli\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted({h for h in heavy for m in sys.modules if m == h or m.startswith(h + '.')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"


def test_the_check_sees_a_heavy_import():
    code = "import sys, taskkit.cli, taskkit.db\nprint('sqlalchemy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_version_prints_the_package_version():
    result = CliRunner().invoke(app, ["--version"])

    assert result.exit_code == 0, result.output
    assert result.stdout == f"taskkit {taskkit.__version__}\n"


def _commands(command: object, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    found = [(path, command)]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        found += _commands(sub, (*path, name))
    return found


ALL_COMMANDS = _commands(typer.main.get_command(app))


def test_every_command_is_checked():
    assert {" ".join(path) for path, _ in ALL_COMMANDS} >= {
        "",
        "train",
        "resume",
        "db upgrade",
        "db current",
        "runs list",
        "runs show",
        "dlq list",
        "dlq replay",
        "dlq purge",
        "dlq depth",
        "serve",
    }


@pytest.mark.parametrize(
    ("path", "command"), ALL_COMMANDS, ids=[" ".join(p) or "taskkit" for p, _ in ALL_COMMANDS]
)
def test_help_shows_no_value_for_flags(path: tuple[str, ...], command: object):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    flags = [
        name
        for param in getattr(command, "params", [])
        if getattr(param, "is_flag", False)
        for name in param.opts
    ]
    for flag in [*flags, "--help"]:
        assert re.search(rf"{re.escape(flag)}\s+\S", result.stdout), (flag, result.stdout)
        assert not re.search(rf"{re.escape(flag)}\s+<", result.stdout), (flag, result.stdout)
    assert re.search(r"--help\s+Show this message and exit", result.stdout)
    assert "<bool>" not in result.stdout
    assert "BOOLEAN" not in result.stdout


def test_options_that_take_a_value_still_show_it():
    result = CliRunner().invoke(app, ["runs", "show", "--help"], env={"COLUMNS": "200"})

    assert re.search(r"--interval\s+<float range>", result.stdout)
    assert re.search(r"--url\s+<str>", result.stdout)
    assert re.search(r"--watch\s+Follow the run live", result.stdout)


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", [*COMMAND_MODULES, "_common", "_launch", "_runview"])
def test_no_cli_module_imports_a_command_module(module: str):
    """A reader of cli/dlq.py never needs to open cli/runs.py: what two commands share lives in
    cli/_common.py (or _launch, _runview), never in another command's module."""
    imported = _imported_modules(CLI / f"{module}.py")
    siblings = {f"taskkit.cli.{name}" for name in COMMAND_MODULES} - {f"taskkit.cli.{module}"}
    assert imported & siblings == set()
