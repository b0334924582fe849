"""The kombu transport: a channel that claims rows with a lease, and its QoS."""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.exceptions import ConnectionError as KombuConnectionError
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments  # type: ignore[attr-defined]
from kombu.transport.virtual.exchange import TopicExchange

from taskkit.broker import _schema as schema

logger = logging.getLogger("taskkit.broker")

#: Seconds a delivered message stays invisible unless its worker extends it (as Redis's default).
DEFAULT_VISIBILITY_TIMEOUT = 3600.0
#: Longest sleep between polls of empty queues; polls start at MIN_POLL after each message.
POLLING_INTERVAL = 0.1
MIN_POLL = 0.005
#: Seconds between cleanups of expired messages and expired queues (per channel).
JANITOR_INTERVAL = 2.0
#: A queue with ``x-expires`` goes only after this long unused, at least: a consumer that polls
#: late (a blocked worker) must not lose its queue.
MIN_QUEUE_EXPIRY = 60.0
#: Rows per statement when extending or requeueing many held messages.
CHUNK = 400
#: Seconds ``ensure_connection`` waits for the file's write lock before calling it unusable.
PROBE_TIMEOUT = 1.0
#: Oldest SQLite with ``RETURNING``, which taking a message needs.
MIN_SQLITE = (3, 35)

#: Connections opened in a parent process: never used nor closed in a forked child.
_inherited: list[sqlite3.Connection] = []


def database_path(hostname: str) -> Path:
    """The file named by the ``sqlite:///path`` part of ``taskkit+sqlite:///path``."""
    if not hostname.startswith("sqlite:///"):
        raise ValueError(
            "taskkit broker URL must be taskkit+sqlite:///<path to a file>, "
            "e.g. taskkit+sqlite:////var/lib/app/queue.db"
        )
    path = hostname[len("sqlite:///") :].split("?", 1)[0]
    if not path:
        raise ValueError("taskkit broker URL names no file: taskkit+sqlite:///<path to a file>")
    return Path(path)


def _split_tag(tag: str) -> tuple[int, str]:
    row, _, receipt = tag.partition(".")
    return int(row), receipt


class QoS(virtual.QoS):
    """Acknowledge = delete the row; reject with requeue = free it at the front of its queue."""

    channel: Channel

    def ack(self, delivery_tag: str) -> None:
        self.channel._ack(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.channel._requeue([delivery_tag])
        else:
            self.channel._ack(delivery_tag)
        super().ack(delivery_tag)

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:  # type: ignore[override]
        """Free every held message at once (worker shutdown, ``basic_recover``)."""
        state: Any = self  # the stubs leave out QoS's private state
        state._flush()
        tags = list(state._delivered)
        state._delivered.clear()
        # Tags acknowledged by another thread since the flush are gone from the table: no-op.
        self.channel._requeue(tags)
        return []


class Channel(virtual.Channel):
    """A kombu virtual channel over the SQLite file of ``taskkit+sqlite:///<path>``.

    Transport options: ``visibility_timeout`` (seconds a taken message stays invisible,
    3600 unless set; taskkit sets ``TASKKIT_VISIBILITY_TIMEOUT``), ``polling_interval``
    (longest idle sleep, 0.1 s) and ``clock`` (a ``time.time`` stand-in, for tests).

    Example::

        with Connection("taskkit+sqlite:////tmp/queue.db") as conn:
            message = SimpleQueue(conn, "jobs").get(timeout=1)  # taken: invisible to others
            message.ack()  # deleted
    """

    QoS = QoS
    supports_fanout = True
    do_restore = True
    connection: Transport

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        client: Any = connection.client
        options = client.transport_options or {}
        self.visibility_timeout = float(
            options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT)
        )
        self.clock: Callable[[], float] = options.get("clock", time.time)
        self.path = database_path(client.hostname or "")
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._no_ack_queues: set[str] = set()
        #: Delivery tags whose row ``_put_front`` replaced: their acknowledgement has nothing left
        #: to delete (and is no late acknowledgement to warn about).
        self._replaced: set[str] = set()
        self._janitor_due = 0.0
        super().__init__(connection, **kwargs)

    # -- the connection ------------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            if self._conn is not None:
                _inherited.append(self._conn)  # the parent's: closing it here would hurt it
            self._conn = schema.connect(self.path)
            self._pid = os.getpid()
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction (the write lock first: no upgrade deadlock)."""
        with self._lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                # Inside the try: a failed COMMIT must not leave the connection in a transaction.
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self.conn.execute(sql, tuple(params))

    # -- consuming -----------------------------------------------------------------------------

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str | None, **kwargs: Any
    ) -> Any:
        # Nobody will acknowledge these (pidbox, reply and event queues): delete on delivery.
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        try:
            raw = self._take(queue, remove=no_ack)
        except Empty:
            return None
        message: Any = self.Message(raw, channel=self)
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        return self._take(queue, remove=queue in self._no_ack_queues)

    def _take(self, queue: str, *, remove: bool) -> dict[str, Any]:
        """The first ready message of ``queue``: deleted (no ack wanted) or claimed with a lease.

        A row that is not a kombu message (the file is writable by anyone who can write the
        folder) is deleted with one warning naming its id and queue, and the next row is taken:
        raising it would stop the worker, and the row would stop it again after every
        visibility timeout. Deleted, not quarantined: nothing could ever consume it.
        """
        now = self.clock()
        if now >= self._janitor_due:
            self._janitor(now)
        while True:
            payload = self._take_one(queue, now, remove=remove)
            if payload is not None:
                return payload

    def _take_one(self, queue: str, now: float, *, remove: bool) -> dict[str, Any] | None:
        # A plain read first: an idle poll never takes the write lock.
        if self._execute(schema.PEEK, (queue, now, now)).fetchone() is None:
            raise Empty()
        receipt = secrets.token_hex(8)
        with self._write() as conn:
            if remove:
                row = conn.execute(schema.TAKE, (queue, now, now)).fetchone()
            else:
                row = conn.execute(
                    schema.CLAIM, (now + self.visibility_timeout, receipt, queue, now, now)
                ).fetchone()
        if row is None:  # another consumer took it between the read and the write
            raise Empty()
        row_id, text, deliveries = row
        try:
            payload = json.loads(text)
            properties = payload.setdefault("properties", {})
            properties["delivery_tag"] = f"{row_id}.{receipt}"
            if deliveries > 1:
                payload["redelivered"] = True
                properties.setdefault("delivery_info", {})["redelivered"] = True
            for key in ("delivery_info", "headers"):
                if not isinstance(properties.get(key, {}), dict):
                    raise TypeError(key)
            if not isinstance(payload.get("headers", {}), dict | None):
                raise TypeError("headers")
            self.Message(payload, channel=self)  # what kombu does next: the body's encoding
        except Exception as exc:  # any shape json.loads accepts, or a body that does not decode
            self._execute("DELETE FROM messages WHERE id = ?", (row_id,))
            logger.warning(
                "taskkit broker: deleted message %s of queue %r: not a kombu message (%s)",
                row_id,
                queue,
                type(exc).__name__,
            )
            return None
        result: dict[str, Any] = payload
        return result

    def _ack(self, delivery_tag: str) -> None:
        if delivery_tag in self._replaced:
            self._replaced.discard(delivery_tag)  # deleted already, with its copy's insert
            self._wake_poller()
            return
        row_id, receipt = _split_tag(delivery_tag)
        if self._execute(schema.ACK, (row_id, receipt)).rowcount == 0:
            logger.warning(
                "taskkit broker: message %s was acknowledged after its visibility timeout "
                "passed; it may have been delivered again to another worker",
                row_id,
            )
        self._wake_poller()

    def _requeue(self, delivery_tags: Iterable[str]) -> int:
        """Free held messages at the front of their queues (they keep their ids)."""
        tags = list(delivery_tags)
        self._replaced.difference_update(tags)  # their rows are gone: nothing to free
        rows = [_split_tag(tag) for tag in tags]
        if not rows:
            return 0
        with self._write() as conn:
            count = conn.executemany(schema.REQUEUE, rows).rowcount
        self._wake_poller()
        return count

    def _wake_poller(self) -> None:
        transport = self.connection
        if transport is not None:  # None once the channel is closed
            transport.activity()

    def extend_visibility(self, delivery_tags: Iterable[str]) -> int:
        """Keep the given held messages invisible for another ``visibility_timeout`` seconds.

        One statement per 400 tags; a tag whose message was acknowledged (or taken over by
        another worker after its time ran out) is skipped. Returns how many were extended.

        Example::

            channel.extend_visibility(list(channel.qos._delivered))
        """
        rows = [_split_tag(tag) for tag in delivery_tags]
        now = self.clock()
        # The worker's keeper thread calls this while its consumer may be too busy to poll (a
        # solo pool running a long task): keep its expiring queues (pidbox) alive from here.
        self._touch_queues(now)
        until = now + self.visibility_timeout
        extended = 0
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start : start + CHUNK]
            values = ", ".join("(?, ?)" for _ in chunk)
            params: list[Any] = [until]
            for row_id, receipt in chunk:
                params += [row_id, receipt]
            extended += self._execute(
                f"UPDATE messages SET visible_at = ? WHERE (id, receipt) IN (VALUES {values})",
                params,
            ).rowcount
        return extended

    # -- publishing ----------------------------------------------------------------------------

    def _expiration(self, message: dict[str, Any], now: float) -> float | None:
        expiration = (message.get("properties") or {}).get("expiration")
        if expiration in (None, ""):
            return None
        try:
            return now + float(expiration) / 1000
        except (TypeError, ValueError):
            return None

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        now = self.clock()
        self._execute(
            schema.PUT,
            (
                queue,
                self._get_message_priority(message),
                json.dumps(message),
                self._expiration(message, now),
                now,
                queue,
            ),
        )

    def _put_front(self, queue: str, message: Any, replaces: str | None = None) -> bool:
        """Put ``message`` at the front of ``queue``: the next message a consumer of the queue
        takes (among messages of its priority), whatever was waiting.

        ``replaces``: the delivery tag of a message this channel holds, deleted in the same
        transaction (the copy keeps its expiry), so that exactly one of the two exists at any
        moment; its acknowledgement afterwards deletes nothing and warns of nothing. False,
        and nothing written, when that message is no longer held under this tag (acknowledged,
        or taken by another worker after its visibility timeout passed).

        Used by ``taskkit.tasks._requeue.requeue_at_front`` (a retry after a lost pool process).

        Example::

            channel._put_front("celery", payload, replaces=message.delivery_tag)
        """
        priority = self._get_message_priority(message)
        body = json.dumps(message)
        if replaces is None:
            now = self.clock()
            expires = self._expiration(message, now)
            with self._write() as conn:
                conn.execute(schema.PUT_FRONT, (queue, priority, body, expires, now, queue))
            self._wake_poller()
            return True
        row_id, receipt = _split_tag(replaces)
        with self._write() as conn:
            copied = conn.execute(schema.REPLACE_FRONT, (queue, priority, body, row_id, receipt))
            written = copied.rowcount > 0
            if written:
                conn.execute(schema.ACK, (row_id, receipt))
        if written:  # committed
            self._replaced.add(replaces)
            self._wake_poller()
        return written

    def _put_fanout(self, exchange: str, message: Any, routing_key: str, **kwargs: Any) -> None:
        now = self.clock()
        self._execute(
            schema.PUT_FANOUT,
            (
                self._get_message_priority(message),
                json.dumps(message),
                self._expiration(message, now),
                now,
                exchange,
            ),
        )

    # -- queues and bindings, shared by every process -----------------------------------------

    def prepare_queue_arguments(
        self, arguments: dict[str, Any] | None, **kwargs: Any
    ) -> dict[str, Any]:
        # As for RabbitMQ: Queue(expires=, message_ttl=) become x-expires and x-message-ttl,
        # which _new_queue records so that reply and event queues expire.
        result: dict[str, Any] = to_rabbitmq_queue_arguments(arguments or {}, **kwargs)
        return result

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        arguments = kwargs.get("arguments") or {}
        ttl, expires = arguments.get("x-message-ttl"), arguments.get("x-expires")
        self._execute(
            schema.DECLARE,
            (
                queue,
                None if ttl is None else float(ttl) / 1000,
                None if expires is None else float(expires) / 1000,
                self.clock(),
            ),
        )

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return self._execute(schema.HAS_QUEUE, (queue, queue)).fetchone() is not None

    def _queue_bind(self, exchange: str, routing_key: str, pattern: Any, queue: str) -> None:
        self._execute(schema.BIND, (exchange, routing_key or "", pattern, queue))

    def get_table(self, exchange: str) -> list[tuple[str, str, str]]:
        # A topic pattern is computed again from its routing key: a regex read from the file
        # would go into kombu's regex cache as another process (or anyone) wrote it.
        kind = self.typeof(exchange)
        if isinstance(kind, TopicExchange):
            return [
                (key, kind.key_to_pattern(key), queue)
                for key, _, queue in self._execute(schema.TABLE, (exchange,))
            ]
        return [
            (key, pattern, queue)
            for key, pattern, queue in self._execute(schema.TABLE, (exchange,))
        ]

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        exchange, routing_key = [*args, "", ""][:2]
        with self._write() as conn:
            conn.execute(schema.UNBIND, (queue, exchange, routing_key or ""))
            conn.execute("DELETE FROM messages WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM queues WHERE name = ?", (queue,))

    def _size(self, queue: str) -> int:
        now = self.clock()
        count: int = self._execute(schema.SIZE, (queue, now, now)).fetchone()[0]
        return count

    def _purge(self, queue: str) -> int:
        """Delete the ready messages of ``queue``; messages held by live workers stay."""
        now = self.clock()
        return self._execute(schema.PURGE, (queue, now, now)).rowcount

    def _janitor(self, now: float) -> None:
        """Drop expired messages and unused expiring queues; mark ours as used."""
        self._janitor_due = now + JANITOR_INTERVAL
        with self._write() as conn:
            self._touch_queues(now, conn)
            conn.execute(schema.DROP_EXPIRED, (now,))
            stale = [name for (name,) in conn.execute(schema.STALE_QUEUES, (MIN_QUEUE_EXPIRY, now))]
            for name in stale:
                conn.execute("DELETE FROM bindings WHERE queue = ?", (name,))
                conn.execute("DELETE FROM messages WHERE queue = ?", (name,))
                conn.execute("DELETE FROM queues WHERE name = ?", (name,))

    def _touch_queues(self, now: float, conn: sqlite3.Connection | None = None) -> None:
        """Mark as used the queues every channel of this connection consumes from."""
        transport = self.connection
        channels = list(transport.channels or []) if transport is not None else [self]
        mine = sorted({q for channel in channels for q in list(channel._active_queues)})
        if not mine:
            return
        rows = [(now, q) for q in mine]
        sql = "UPDATE queues SET last_seen = ? WHERE name = ?"
        if conn is not None:
            conn.executemany(sql, rows)
            return
        with self._write() as c:
            c.executemany(sql, rows)

    def close(self) -> None:
        super().close()
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


class Transport(virtual.Transport):
    """kombu transport for ``taskkit+sqlite:///<path>``: SQLite, redelivery after a timeout.

    Polling: after each message the next poll comes at once; an empty poll sleeps 5 ms, then
    twice as long each time up to ``polling_interval`` (0.1 s). An acknowledgement from another
    thread (a prefork result handler) wakes the poller, so a free pool slot is filled at once.

    Example::

        import taskkit.broker  # registers the alias

        app = Celery("jobs", broker="taskkit+sqlite:////var/lib/jobs/queue.db")
        app.conf.broker_transport_options = {"visibility_timeout": 30}
    """

    Channel = Channel
    can_parse_url = True
    default_port = 0
    # Not kombu's "sql": Celery turns every event dispatcher off on that driver type
    # (EventDispatcher.DISABLED_TRANSPORTS), and this transport routes topic and fanout events.
    driver_type = "sqlite"
    driver_name = "sqlite"
    polling_interval = POLLING_INTERVAL
    connection_errors = (
        *virtual.Transport.connection_errors,
        KombuConnectionError,
        sqlite3.OperationalError,
    )
    channel_errors = (*virtual.Transport.channel_errors, sqlite3.DatabaseError)
    implements = virtual.Transport.implements.extend(
        asynchronous=False,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise RuntimeError(
                f"taskkit+sqlite needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer "
                f"(RETURNING); this Python has SQLite {sqlite3.sqlite_version}"
            )
        super().__init__(client, **kwargs)
        self._wake = threading.Event()
        database_path(client.hostname or "")  # a bad URL fails here, in one line

    def establish_connection(self) -> Any:
        """Open the file (creating its folder) and take its write lock once, then let it go.

        So ``ensure_connection`` (``check_reachable``, ``/health/ready``) fails on an unusable
        path or a file locked for longer than ``PROBE_TIMEOUT``, as a kombu connection error,
        instead of the first publish failing.
        """
        client: Any = self.client
        path = database_path(client.hostname or "")
        try:
            probe = schema.connect(path, timeout=PROBE_TIMEOUT)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
            finally:
                probe.close()
        except (OSError, sqlite3.Error) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise KombuConnectionError(f"taskkit broker file {path}: {reason}") from exc
        return super().establish_connection()

    def activity(self) -> None:
        """Wake the poller: a message moved, so the next poll may find work."""
        self._wake.set()

    def drain_events(self, connection: Any, timeout: float | None = None, **_: Any) -> None:
        start = time.monotonic()
        nap = MIN_POLL
        cycle: Any = self.cycle
        while True:
            try:
                cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                waited = time.monotonic() - start
                if timeout is not None and waited >= timeout:
                    raise TimeoutError() from None
                pause = min(nap, self.polling_interval)
                if timeout is not None:
                    pause = min(pause, timeout - waited)
                if self._wake.wait(pause):
                    self._wake.clear()
                nap *= 2

    def driver_version(self) -> str:
        return sqlite3.sqlite_version
