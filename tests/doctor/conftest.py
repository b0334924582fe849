"""Fixtures of the doctor tests: a clean project folder (no ``TASKKIT_*`` variables, the working
directory a fresh project on ``sys.path``), app modules written into it, Redis servers of the
tests' own on ports 6401-6409."""

from __future__ import annotations

import os
import subprocess
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from taskkit.config import reset_settings
from tests._support.redis_server import start_redis_server

#: Ports of the Redis servers these tests start (others' tests use other ranges).
PORTS = range(6401, 6410)


class OwnRedis:
    """A redis-server on one of this folder's ports, which the test may stop."""

    def __init__(self, port: int, folder: Path) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        try:
            self.process: subprocess.Popen[bytes] | None = start_redis_server(port, folder)
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[[int], OwnRedis]]:
    """``own_redis(port)`` starts a Redis of the test's own on ``port`` (6401-6409)."""
    started: list[OwnRedis] = []

    def start(port: int) -> OwnRedis:
        assert port in PORTS
        folder = tmp_path / f"redis-{port}"
        folder.mkdir()
        server = OwnRedis(port, folder)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh project folder as the working directory (and on ``sys.path``), with no
    ``TASKKIT_*`` variable set and ``TASKKIT_HOME`` inside it."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "pyproject.toml").write_text("[project]\nname = 'p'\n")
    for name in list(os.environ):
        if name.startswith("TASKKIT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    reset_settings()
    yield folder
    reset_settings()


@pytest.fixture
def write_module(project: Path) -> Callable[[str, str], str]:
    """``write_module(stem, source)`` writes ``<stem>_<random>.py`` into the project and returns
    its module name; ``{self}`` in the source is the module's own name, ``{name:<stem>}`` the
    name of a module written before with that stem."""
    names: dict[str, str] = {}

    def write(stem: str, source: str) -> str:
        name = f"{stem}_{uuid.uuid4().hex[:8]}"
        names[stem] = name
        text = textwrap.dedent(source).replace("{self}", name)
        for known, module in names.items():
            text = text.replace("{name:" + known + "}", module)
        (project / f"{name}.py").write_text(text)
        return name

    return write
