"""``taskkit serve`` with ``TASKKIT_LOG_FORMAT=json``: uvicorn's records (the access log too) are
one JSON object per line, as a worker's are."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import httpx

from tests._support.commands import TASKKIT, clean_env
from tests._support.workers import REPO, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_logs_json_lines(tmp_path: Path):
    port = _free_port()
    process = subprocess.Popen(
        [str(TASKKIT), "serve", "--port", str(port), "--log-level", "info"],
        cwd=REPO,
        env=clean_env(TASKKIT_HOME=str(tmp_path), TASKKIT_LOG_FORMAT="json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def live() -> bool:
            assert process.poll() is None
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).is_success
            except httpx.HTTPError:
                return False

        wait_for(live, 60, "taskkit serve to answer", step=0.2)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate(timeout=10)
    lines = [line for line in output.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    assert any("/health/live" in r["message"] and "200" in r["message"] for r in access)
    assert any(r["logger"] == "uvicorn.error" for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
