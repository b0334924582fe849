"""Two "hosts" on this machine: Linux network namespaces, each linked to the root namespace by
a veth pair on a /30 of its own (10.251.0.0/16), with the services they need reachable over
those links only.

- ``Hosts.create(2)``: namespaces ``tk-<pid>-a`` and ``tk-<pid>-b`` (lo up), veths
  ``tk<pid>a``/``tk<pid>ap``; root side ``10.251.<n>.1`` (A) and ``.5`` (B), host side ``.2``
  and ``.6``. A namespace has no default route: it reaches its /30 and nothing else.
- ``RedisOnLinks``: a redis-server of the test's own bound to 127.0.0.1 and the root-side
  addresses (the shared Redis listens on 127.0.0.1 only, which a namespace cannot reach).
- ``Forwarder``: a TCP forwarder (threads of this process) listening on the root-side
  addresses and forwarding to 127.0.0.1:<port> (PostgreSQL, the S3 server).
- ``Host.partition()`` / ``heal()``: the root-side veth down / up; the host's processes keep
  running, their packets go nowhere.
- ``NamespacedWorker``: ``ip netns exec <ns> python -m celery ... worker`` (a WorkerProcess).

Everything is removed by ``Hosts.destroy`` (processes by PID, veths, namespaces); ``sweep``
removes what a crashed run left (names ``tk-<pid>-*`` whose pid is gone).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pathlib
import re
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field

from tests._support.redis_server import start_redis_server
from tests._support.workers import WorkerProcess

NETWORK = ipaddress.ip_network("10.251.0.0/16")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip``, not permitted), or None."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"tk-{os.getpid()}-probe"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    ip("netns", "delete", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep() -> list[str]:
    """Delete the namespaces and veths of test runs whose process is gone; returns their names."""
    removed: list[str] = []
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        found = re.fullmatch(r"tk-(\d+)-\w+", name)
        if found and not _alive(int(found.group(1))):
            ip("netns", "delete", name, check=False)
            removed.append(name)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        found = re.match(r"\d+: (tk(\d+)[a-z])(?:@\S+)?:", line)
        if found and not _alive(int(found.group(2))):
            ip("link", "delete", found.group(1), check=False)
            removed.append(found.group(1))
    return removed


def _used_subnets() -> set[int]:
    used = set()
    for address in re.findall(r"inet (10\.251\.(\d+)\.\d+)", ip("-o", "addr", check=False).stdout):
        used.add(int(address[1]))
    return used


@dataclass
class Host:
    """One simulated host: a namespace and its link to the root namespace."""

    label: str  # "a", "b"
    netns: str
    veth: str  # root side
    root_ip: str  # the root namespace's address on this link (services listen there)
    host_ip: str

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]

    def partition(self) -> None:
        """Cut the host off: its link goes down, its processes keep running."""
        ip("link", "set", self.veth, "down")

    def heal(self) -> None:
        ip("link", "set", self.veth, "up")

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.exec_prefix(), *command], check=False, capture_output=True, text=True, timeout=30
        )


@dataclass
class Hosts:
    hosts: list[Host]
    cleanups: list[object] = field(default_factory=list)

    @classmethod
    def create(cls, count: int = 2) -> Hosts:
        sweep()
        pid = os.getpid()
        free = [n for n in range(1, 255) if n not in _used_subnets()]
        third = free[pid % len(free)]
        made = cls([])
        try:
            for index in range(count):
                label = "ab"[index] if count <= 2 else chr(ord("a") + index)
                base = ipaddress.ip_address(f"10.251.{third}.{4 * index}")
                host = Host(
                    label,
                    f"tk-{pid}-{label}",
                    f"tk{pid}{label}",
                    str(base + 1),
                    str(base + 2),
                )
                ip("netns", "add", host.netns)
                made.hosts.append(host)
                ip("link", "add", host.veth, "type", "veth", "peer", "name", host.veth + "p")
                ip("link", "set", host.veth + "p", "netns", host.netns)
                ip("addr", "add", f"{host.root_ip}/30", "dev", host.veth)
                ip("link", "set", host.veth, "up")
                for args in (
                    ("addr", "add", f"{host.host_ip}/30", "dev", host.veth + "p"),
                    ("link", "set", host.veth + "p", "up"),
                    ("link", "set", "lo", "up"),
                ):
                    ip("-n", host.netns, *args)
        except BaseException:
            made.destroy()
            raise
        return made

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def root_ips(self) -> list[str]:
        return [host.root_ip for host in self.hosts]

    def destroy(self) -> None:
        for host in self.hosts:
            ip("link", "delete", host.veth, check=False)
            ip("netns", "delete", host.netns, check=False)
        self.hosts = []


def free_port(addresses: list[str]) -> int:
    """A TCP port free on every one of ``addresses``."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((addresses[0], 0))
            port = int(first.getsockname()[1])
            ok = True
            for address in addresses[1:]:
                with socket.socket() as other:
                    try:
                        other.bind((address, port))
                    except OSError:
                        ok = False
                        break
            if ok:
                return port
    raise RuntimeError(f"no port free on all of {addresses}")


class RedisOnLinks:
    """A redis-server of the test's own on 127.0.0.1 and the hosts' root-side addresses."""

    def __init__(self, addresses: list[str], directory: pathlib.Path) -> None:
        self.addresses = ["127.0.0.1", *addresses]
        self.port = free_port(self.addresses)
        self.process = start_redis_server(
            self.port, directory, bind=self.addresses, options=("--protected-mode", "no")
        )

    def url(self, address: str = "127.0.0.1", db: int = 0) -> str:
        return f"redis://{address}:{self.port}/{db}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


class Forwarder:
    """Forward TCP connections from ``addresses``:<port> to ``target`` (threads, this process)."""

    def __init__(self, addresses: list[str], target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port(addresses)
        self._closed = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listeners = []
        for address in addresses:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((address, self.port))
            listener.listen(64)
            self._listeners.append(listener)
            threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self._track(client)
            self._track(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for sock in [*self._listeners, *self._sockets]:
                with contextlib.suppress(OSError):
                    sock.close()


class NamespacedWorker(WorkerProcess):
    """``ip netns exec <ns> python -m celery -A <app> worker`` (``ip netns exec`` execs, so the
    PID is the worker's); stopped and killed as a WorkerProcess is."""

    def __init__(
        self,
        host: Host,
        name: str,
        log_dir: pathlib.Path,
        *,
        app: str,
        queue: str,
        concurrency: int = 1,
        pool: str = "prefork",
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            name,
            log_dir,
            app=app,
            queue=queue,
            pool=pool,
            concurrency=concurrency,
            env=env,
            prefix=host.exec_prefix(),
            hostname=f"{name}@{host.netns}",
        )
