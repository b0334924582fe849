"""Exclusive task leases: one live owner per key, a heartbeat, and a fencing token.

A lease says "task T is working on key K (a run id) on host H, process P". A second copy of
the work (a redelivered message, a resubmitted run) looks at the lease before it starts:

- no lease, or an expired one: it takes the lease and runs (an expired one is a takeover:
  ``Lease.previous_owner`` names the owner that let it lapse);
- a lease whose owner is provably dead (same host, process gone): it takes over at once;
- a lease whose owner is alive: it does not run (see ``ResilientTask`` for what happens then).

The owner's heartbeat renews the lease every third of its ``ttl``; if the owner dies, the lease
expires ``ttl`` seconds after its last heartbeat. Every acquisition gets a fencing token larger
than all before it for that key, so a writer can refuse work stamped with an older token, and
an owner that finds its lease taken over (``lost``) stops at its next progress report. An owner
whose Redis renewals have failed for ``ttl`` seconds (since the last one that succeeded, on the
monotonic clock) fences itself: the lease may have lapsed and been taken, so ``check()`` raises
``LeaseLost`` before any further write (a file lease never lapses by itself). A
takeover is one WARNING log record (``taskkit_event="takeover"``). Hooks
registered with ``Lease.on_beat`` run after each successful renewal (``TrainingTask`` records
the run's heartbeat in the database there).

Two stores behind one small interface:

- ``RedisLeaseStore``: for a fleet (keys ``taskkit:lease:<key>``, ``taskkit:fence:<key>`` and
  ``taskkit:held:<key>``, the last holder until it releases, which tells a lease that lapsed
  from one that was given up; updated by Lua scripts so each step is atomic);
- ``FileLeaseStore``: for the embedded default on one host: an ``flock`` on a file per key. The
  kernel releases it the moment the owner dies, so takeover is immediate; the file keeps the
  holder until it releases.

Example::

    store = RedisLeaseStore.from_url("redis://127.0.0.1:6379/0")
    lease = store.acquire("run-42", owner=LeaseOwner.here(task_id="abc"), ttl=15)
    if lease is not None:
        with lease.kept_alive():
            train()            # lease.check() raises LeaseLost if another worker took over
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import redis

from taskkit._utils import mask_password
from taskkit.errors import ConfigurationError, LeaseLost

__all__ = [
    "FileLeaseStore",
    "Lease",
    "LeaseOwner",
    "LeaseStore",
    "RedisLeaseStore",
    "lease_store_from_url",
]

logger = logging.getLogger("taskkit.tasks")

HOSTNAME = socket.gethostname()


@dataclass(frozen=True)
class LeaseOwner:
    """Who holds a lease: the task id, host and process."""

    task_id: str
    host: str
    pid: int

    @classmethod
    def here(cls, task_id: str) -> LeaseOwner:
        """This process, running ``task_id``."""
        return cls(task_id=task_id, host=HOSTNAME, pid=os.getpid())

    def is_provably_dead(self) -> bool:
        """True only when the owner ran on this host and its process is gone."""
        if self.host != HOSTNAME:
            return False
        if self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def describe(self) -> str:
        return f"task {self.task_id} on {self.host} pid {self.pid}"


class LeaseStore(Protocol):
    """Where leases live. ``acquire`` returns None when a live owner holds the key."""

    def acquire(self, key: str, owner: LeaseOwner, ttl: float) -> Lease | None: ...

    def holder(self, key: str) -> LeaseOwner | None: ...


class Lease:
    """A held lease: its ``key``, fencing ``token`` and the heartbeat that keeps it."""

    def __init__(
        self,
        key: str,
        token: int,
        owner: LeaseOwner,
        ttl: float,
        renew: _Renew,
        release: _Release,
        previous_owner: LeaseOwner | None = None,
        *,
        expires: bool = False,
        clock: Callable[[], float] = time.monotonic,
        renewed_at: float | None = None,
    ) -> None:
        self.key = key
        #: Larger than the token of every earlier holder of this key.
        self.token = token
        self.owner = owner
        self.ttl = ttl
        #: Set once a heartbeat finds the lease gone or taken over.
        self.lost = False
        #: The owner this lease was taken over from (it died, or let the lease lapse without
        #: releasing it); None when the key was free.
        self.previous_owner = previous_owner
        self._renew = renew
        self._release = release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._released = False
        self._beat_hooks: tuple[Callable[[Lease], object], ...] = ()
        #: Whether the lease lapses by itself ``ttl`` seconds after its last renewal (a Redis
        #: lease); a file lease lives as long as its process.
        self.expires = expires
        self._clock = clock
        #: When the last successful renewal (or the acquisition) was *sent*, on ``clock``: the
        #: store extended the lease no earlier than that.
        self._renewed_at = clock() if renewed_at is None else renewed_at
        self._lost_lock = threading.Lock()

    def check(self) -> None:
        """Raise ``LeaseLost`` if the lease was taken over, or (a lease that ``expires``) if no
        renewal succeeded for ``ttl`` seconds: the store may have let it lapse and another
        worker taken it, so the holder fences itself before it writes. Cheap (no round trip).

        Example::

            lease.check()   # before every write made under the lease
        """
        if not self.lost and self.expired():
            self._lose(f"no renewal succeeded for {self.ttl:g} s")
        if self.lost:
            raise LeaseLost(self.key, self.token)

    def expired(self) -> bool:
        """Whether ``ttl`` seconds passed since the last successful renewal (never for a lease
        that does not ``expires``)."""
        return self.expires and self._clock() - self._renewed_at >= self.ttl

    def lose(self, why: str) -> None:
        """Consider the lease lost (``why``: one log line): a write refused because a newer
        holder fenced it out. The heartbeat stops; ``check`` raises ``LeaseLost`` from now on."""
        self._lose(why)

    def _lose(self, why: str | None) -> None:
        with self._lost_lock:
            if self.lost:
                return
            self.lost = True
        if why:
            logger.error("taskkit: lease %r (token %d) was lost: %s", self.key, self.token, why)
        else:
            logger.error("taskkit: lease %r (token %d) was lost", self.key, self.token)
        self._stop.set()

    def renew(self) -> bool:
        """Extend the lease by ``ttl``; False (and ``lost``) when it is no longer ours."""
        if self.lost:
            return False
        if self.expired():
            self._lose(f"no renewal succeeded for {self.ttl:g} s")
            return False
        sent = self._clock()
        if not self._renew(self):
            self._lose(None)
            return False
        self._renewed_at = sent
        self._run_beat_hooks()
        return True

    def on_beat(self, hook: Callable[[Lease], object]) -> None:
        """Call ``hook(lease)`` after each successful renewal (on the heartbeat thread; every
        third of ``ttl``), also on a ``FileLeaseStore``, whose renewal itself does nothing.

        A hook that raises is logged as a warning and the lease carries on: a hook (a
        database write) must never cost the lease. Keep hooks short; the next renewal waits
        for them.

        Example::

            lease.on_beat(lambda lease: print("still mine:", lease.key))
        """
        self._beat_hooks = (*self._beat_hooks, hook)

    def _run_beat_hooks(self) -> None:
        for hook in self._beat_hooks:
            try:
                hook(self)
            except Exception as exc:
                logger.warning(
                    "taskkit: lease %r beat hook %s failed: %s",
                    self.key,
                    getattr(hook, "__qualname__", hook),
                    mask_password(str(exc)),  # a database error may quote its URL
                )

    def release(self) -> None:
        """Stop the heartbeat and give the lease up (only if it is still ours). Idempotent:
        a lease handed over early is not released twice (a file lease would close a
        descriptor number the process may have reused)."""
        if self._released:
            return
        self._released = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if not self.lost:
            try:
                self._release(self)
            except Exception:  # the lease expires by itself; a failed release loses nothing
                logger.warning("taskkit: could not release lease %r", self.key, exc_info=True)

    def start_heartbeat(self) -> None:
        """Renew every third of ``ttl`` on a daemon thread until ``release``."""
        self._thread = threading.Thread(
            target=self._beat, name=f"taskkit-lease-{self.key}", daemon=True
        )
        self._thread.start()

    @contextlib.contextmanager
    def kept_alive(self) -> Iterator[Lease]:
        """Heartbeat for the ``with`` block, then release."""
        self.start_heartbeat()
        try:
            yield self
        finally:
            self.release()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    return
            except Exception:  # a store blip: the next beat tries again before the ttl ends
                logger.warning("taskkit: lease %r heartbeat failed", self.key, exc_info=True)
                if self.expired():  # past the ttl: the store may have given it to another
                    self._lose(f"no renewal succeeded for {self.ttl:g} s")
                    return


class _Renew(Protocol):
    def __call__(self, lease: Lease, /) -> bool: ...


class _Release(Protocol):
    def __call__(self, lease: Lease, /) -> None: ...


#: Seconds the last holder of a key is remembered (``taskkit:held:<key>``) after it stops
#: renewing: a takeover later than that is reported without the previous owner.
HELD_TTL = 7 * 24 * 3600

# KEYS[1] lease, KEYS[2] fencing counter, KEYS[3] last holder; ARGV[1] owner json (without
# token), ARGV[2] ttl ms, ARGV[3] the value to replace (a dead owner's), or "" to acquire only a
# free key, ARGV[4] seconds the holder is remembered. Returns {token, value, previous holder's
# value or ""} (a previous holder: one that died or let the lease lapse without releasing it).
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[3] then return {0, current, ''} end
local previous = current or redis.call('GET', KEYS[3]) or ''
local token = redis.call('INCR', KEYS[2])
local value = tostring(token) .. '|' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
redis.call('SET', KEYS[3], value, 'EX', ARGV[4])
return {token, value, previous}
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS[1] lease, KEYS[2] last holder; ARGV[1] the holder's value.
_RELEASE = """
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _log_takeover(key: str, owner: LeaseOwner, previous: LeaseOwner, why: str, token: int) -> None:
    """The one log record of a takeover (the task emits ``LeaseTakenOver``)."""
    logger.warning(
        "taskkit: lease %r: %s; taken over by task %s (fencing token %d)",
        key,
        why,
        owner.task_id,
        token,
        extra={
            "taskkit_event": "takeover",
            "attempt": None,
            "layer": None,
            "task_id": owner.task_id,
        },
    )


def _parse_value(value: bytes | str) -> tuple[int, LeaseOwner]:
    text = value.decode() if isinstance(value, bytes) else value
    token, _, body = text.partition("|")
    return int(token), LeaseOwner(**json.loads(body))


class RedisLeaseStore:
    """Leases in Redis, shared by every worker of a fleet."""

    def __init__(self, client: redis.Redis, *, prefix: str = "taskkit") -> None:
        self.client = client
        self.prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._renew_script = client.register_script(_RENEW)
        self._release_script = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> RedisLeaseStore:
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5), **kwargs)  # type: ignore[arg-type]

    def _keys(self, key: str) -> list[str]:
        return [
            f"{self.prefix}:lease:{key}",
            f"{self.prefix}:fence:{key}",
            f"{self.prefix}:held:{key}",
        ]

    def acquire(self, key: str, owner: LeaseOwner, ttl: float) -> Lease | None:
        keys = self._keys(key)
        body = json.dumps(asdict(owner), sort_keys=True)
        sent = time.monotonic()
        token, value, previous = self._acquire(
            keys=keys, args=[body, int(ttl * 1000), "", HELD_TTL]
        )
        why = "its owner {} let it lapse"
        if not token:
            _, holder = _parse_value(value)
            if not holder.is_provably_dead():
                return None
            token, value, previous = self._acquire(
                keys=keys, args=[body, int(ttl * 1000), value, HELD_TTL]
            )
            if not token:  # someone else took it over first
                return None
            why = "its owner {} is dead"
        held = value.decode() if isinstance(value, bytes) else value
        previous_owner = _parse_value(previous)[1] if previous else None
        if previous_owner is not None:
            _log_takeover(key, owner, previous_owner, why.format(previous_owner.describe()), token)

        def renew(lease: Lease) -> bool:
            return bool(self._renew_script(keys=keys[:1], args=[held, int(lease.ttl * 1000)]))

        def release(lease: Lease) -> None:
            self._release_script(keys=[keys[0], keys[2]], args=[held])

        return Lease(
            key,
            int(token),
            owner,
            ttl,
            renew,
            release,
            previous_owner,
            expires=True,
            renewed_at=sent,
        )

    def holder(self, key: str) -> LeaseOwner | None:
        value = self.client.get(self._keys(key)[0])
        return None if value is None else _parse_value(value)[1]


class FileLeaseStore:
    """Leases as ``flock``-ed files under one directory: for a single host (the embedded default).

    The kernel drops an ``flock`` when its process dies, so a dead owner's lease is free at
    once and ``ttl`` is only kept for the interface. The fencing token is a counter in the file,
    incremented under the lock.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key: str) -> Path:
        # Keys are user data (run ids): hash them instead of trusting them as file names.
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.directory / f"{digest}.lease"

    def acquire(self, key: str, owner: LeaseOwner, ttl: float) -> Lease | None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        raw = os.pread(fd, 4096, 0).decode(errors="replace")
        previous: LeaseOwner | None = None
        try:
            found = json.loads(raw) if raw.strip() else {}
            token = int(found["token"]) + 1 if found else 1
            if "task_id" in found:  # the holder never released it: it died
                previous = LeaseOwner(found["task_id"], found["host"], int(found["pid"]))
        except (ValueError, KeyError, TypeError):
            token = 1
        record = json.dumps({"token": token, **asdict(owner)}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        if previous is not None:
            _log_takeover(key, owner, previous, f"its owner {previous.describe()} died", token)

        def renew(lease: Lease) -> bool:
            return True  # the lock lives as long as this process holds the descriptor

        def release(lease: Lease) -> None:
            with contextlib.suppress(OSError):
                # Only the token stays: the next holder sees the key was given up, not lost.
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"token": token}).encode(), 0)
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

        return Lease(key, token, owner, ttl, renew, release, previous)

    def holder(self, key: str) -> LeaseOwner | None:
        path = self._path(key)
        if not path.exists():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                data = json.loads(os.pread(fd, 4096, 0) or b"{}")
                data.pop("token", None)
                return LeaseOwner(**data)
            return None  # nobody holds the lock
        finally:
            os.close(fd)


def lease_store_from_url(url: str) -> LeaseStore:
    """``redis://...`` (also ``rediss://``) or ``file:///directory``."""
    scheme = url.split("://", 1)[0]
    if scheme in {"redis", "rediss", "redis+socket"}:
        return RedisLeaseStore.from_url(url)
    if scheme == "file":
        return FileLeaseStore(Path(unquote(urlsplit(url).path)))
    raise ConfigurationError(
        f"TASKKIT_LEASE_URL: unsupported scheme {scheme!r} (expected redis://, rediss:// or "
        "file:///directory)"
    )
