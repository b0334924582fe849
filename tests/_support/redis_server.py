"""A redis-server of a test's (or a benchmark's) own: no persistence, started and waited for.

Example::

    process = start_redis_server(16390, tmp_path)
    ...
    process.kill()
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import time
from collections.abc import Sequence

import redis


def start_redis_server(
    port: int,
    directory: str | pathlib.Path,
    *,
    bind: Sequence[str] = ("127.0.0.1",),
    options: Sequence[str] = (),
    timeout: float = 10,
) -> subprocess.Popen[bytes]:
    """``redis-server`` on ``port``, bound to ``bind``, keeping nothing on disk, once it
    answers ``PING``; ``RuntimeError`` (the server killed) when it is not installed, exits, or
    does not answer within ``timeout`` seconds."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", " ".join(bind), "--save", "",
         "--appendonly", "no", "--dir", str(directory), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return process
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    process.kill()
                    process.wait(10)
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.05)
    finally:
        client.close()
