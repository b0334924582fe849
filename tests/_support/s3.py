"""A real S3-protocol server for tests: moto's standalone server as a subprocess on 127.0.0.1.

``MotoServer`` starts ``moto_server`` on a free port of 9830-9839 and kills it (SIGKILL, its
process group) at teardown; ``Proxy`` is a TCP forwarder subprocess in front of it that a test
kills to cut every connection at once. moto keeps objects in memory, so killing moto itself
would also lose the checkpoints written before; killing the proxy is what a client sees when
the server dies mid-upload (its connections reset, new ones refused), while what the server
had completed survives to be checked. ``Proxy(die_after=n)`` SIGKILLs itself once ``n`` bytes
went from client to server: mid-upload, deterministically.

Run as ``python -m tests._support.s3 proxy LISTEN TARGET [DIE_AFTER]``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PORTS = range(9830, 9840)
KEY = "testing"
REGION = "us-east-1"
ROOT = Path(__file__).resolve().parents[2]


def _free_port(taken: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    for port in PORTS:
        if port in taken:
            continue
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 9830-9839 for the S3 test server")


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


class MotoServer:
    """``moto_server`` on 127.0.0.1; ``url`` is its endpoint. A context manager."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        moto = Path(sys.executable).with_name("moto_server")
        self.process = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            _wait_listening(self.port, self.process)
        except BaseException:
            _kill(self.process)
            raise

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=KEY,
            aws_secret_access_key=KEY,
            region_name=REGION,
        )

    def options(self, url: str | None = None) -> dict[str, Any]:
        """s3fs ``storage_options`` reaching this server (or ``url``, a proxy in front)."""
        return {
            "key": KEY,
            "secret": KEY,
            "client_kwargs": {"endpoint_url": url or self.url, "region_name": REGION},
        }

    def close(self) -> None:
        _kill(self.process)

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Proxy:
    """A TCP forwarder subprocess on a port of its own, to ``target``; ``kill()`` cuts it."""

    def __init__(self, target: int, *, port: int | None = None, die_after: int = 0) -> None:
        self.target = target
        self.port = port or _free_port({target})
        self.url = f"http://127.0.0.1:{self.port}"
        self.die_after = die_after
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests._support.s3",
                "proxy",
                str(self.port),
                str(self.target),
                str(self.die_after),
            ],
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            _wait_listening(self.port, process)
        except BaseException:
            _kill(process)
            raise
        return process

    def kill(self) -> None:
        _kill(self.process)

    def restart(self, *, die_after: int = 0) -> None:
        """Kill it (if alive) and start a plain one on the same port."""
        self.kill()
        self.die_after = die_after
        self.process = self._start()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def _serve_proxy(port: int, target: int, die_after: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    sent = 0
    lock = threading.Lock()

    def pipe(src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        nonlocal sent
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
                if upstream and die_after:
                    with lock:
                        sent += len(data)
                        if sent >= die_after:
                            os.kill(os.getpid(), signal.SIGKILL)  # the server "dies"
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    while True:
        client, _ = listener.accept()
        try:
            server = socket.create_connection(("127.0.0.1", target))
        except OSError:
            client.close()  # the server is down: so is this connection
            continue
        threading.Thread(target=pipe, args=(client, server, True), daemon=True).start()
        threading.Thread(target=pipe, args=(server, client, False), daemon=True).start()


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "proxy":
        _serve_proxy(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4] or 0))


def new_bucket(server: MotoServer) -> str:
    """A fresh bucket on ``server``, named for the test that asks."""
    import uuid

    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=name)
    return name
