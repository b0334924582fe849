"""``taskkit serve``: it refuses a non-loopback address without a token (one line, exit 2), and
it serves the service (``/health/live``) from a real uvicorn process until it is stopped."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from taskkit.cli.serve import is_loopback
from tests._support.commands import TASKKIT, clean_env, taskkit
from tests._support.workers import REPO, wait_for


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.com"])
def test_a_non_loopback_host_without_a_token_is_refused(host: str, tmp_path: Path):
    done = taskkit("serve", "--host", host, cwd=tmp_path, env=clean_env(TASKKIT_HOME=str(tmp_path)))

    assert done.returncode == 2
    assert done.stderr == (
        f"error: refusing to listen on {host} without TASKKIT_API_TOKEN: set a token, or "
        "listen on 127.0.0.1\n"
    )
    assert done.stdout == ""


def test_an_app_that_does_not_import_is_one_line(tmp_path: Path):
    done = taskkit(
        "serve", "--app", "nowhere.app", cwd=tmp_path, env=clean_env(TASKKIT_HOME=str(tmp_path))
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: cannot import the app module 'nowhere.app'")
    assert done.stderr.count("\n") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("host", "env"),
    [("127.0.0.1", {}), ("0.0.0.0", {"TASKKIT_API_TOKEN": "serve-test-token"})],
)
def test_serve_answers_until_stopped(host: str, env: dict[str, str], tmp_path: Path):
    port = free_port()
    process = subprocess.Popen(
        [str(TASKKIT), "serve", "--host", host, "--port", str(port), "--log-level", "warning"],
        cwd=REPO,
        env=clean_env(TASKKIT_HOME=str(tmp_path), **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def live() -> bool:
            assert process.poll() is None, process.communicate()[0]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).is_success
            except httpx.HTTPError:
                return False

        wait_for(live, 60, "taskkit serve to answer", step=0.2)
        answer = httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=5).json()
        assert answer == {"status": "alive"}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 0
