"""The SQLite file behind ``taskkit+sqlite://``: connection settings, tables and statements.

Three tables:

- ``messages``: only unacknowledged messages. A row is free when ``receipt`` is NULL or its
  ``visible_at`` has passed (its taker died or gave up); acknowledging deletes it. Ready rows
  come out by ``priority`` (highest first, as in AMQP), then ``id``: a requeued row keeps its id
  and so goes back to the front of its queue; a row put at the front (``PUT_FRONT``, a retry
  after a lost pool process) gets an id below every other row's, down to negative ids.
- ``bindings``: exchange -> queue bindings, shared by every process (fanout, topic).
- ``queues``: the declared queues' ``x-message-ttl`` and ``x-expires`` arguments, so the
  short-lived reply and event queues of ``celery inspect`` and Flower expire instead of
  filling the file.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from taskkit._utils import sqlite_wal

#: Milliseconds a statement waits for another process's write lock before failing.
BUSY_TIMEOUT_MS = 30_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    payload TEXT NOT NULL,
    visible_at REAL NOT NULL DEFAULT 0,
    receipt TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, priority DESC, id);
CREATE INDEX IF NOT EXISTS messages_expiring ON messages (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS bindings (
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    pattern TEXT,
    queue TEXT NOT NULL,
    PRIMARY KEY (exchange, routing_key, queue)
);
CREATE INDEX IF NOT EXISTS bindings_queue ON bindings (queue);
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY,
    message_ttl REAL,
    expires REAL,
    last_seen REAL NOT NULL
);
"""

# A row is ready when nobody holds it (or its holder's time ran out) and it has not expired.
_READY = "queue = ? AND visible_at <= ? AND (expires_at IS NULL OR expires_at > ?)"
_FIRST = f"SELECT id FROM messages WHERE {_READY} ORDER BY priority DESC, id LIMIT 1"

PEEK = _FIRST
CLAIM = (
    "UPDATE messages SET visible_at = ?, receipt = ?, deliveries = deliveries + 1 "
    f"WHERE id = ({_FIRST}) RETURNING id, payload, deliveries"
)
TAKE = f"DELETE FROM messages WHERE id = ({_FIRST}) RETURNING id, payload, deliveries"
ACK = "DELETE FROM messages WHERE id = ? AND receipt = ?"
REQUEUE = "UPDATE messages SET visible_at = 0, receipt = NULL WHERE id = ? AND receipt = ?"
# The message's own expiration wins; else the queue's x-message-ttl, if it was declared with one.
_EXPIRES = "COALESCE(?, ? + (SELECT message_ttl FROM queues WHERE name = {queue}))"
PUT = (
    "INSERT INTO messages (queue, priority, payload, expires_at) "
    f"VALUES (?, ?, ?, {_EXPIRES.format(queue='?')})"
)
# Ahead of every row of the table: ready rows come out by priority, then id.
_FRONT_ID = "(SELECT COALESCE(min(id), 1) - 1 FROM messages)"
PUT_FRONT = (
    "INSERT INTO messages (id, queue, priority, payload, expires_at) "
    f"VALUES ({_FRONT_ID}, ?, ?, ?, {_EXPIRES.format(queue='?')})"
)
# In place of a held row (its id and receipt): the copy keeps the row's expiry.
REPLACE_FRONT = (
    "INSERT INTO messages (id, queue, priority, payload, expires_at) "
    f"SELECT {_FRONT_ID}, ?, ?, ?, expires_at FROM messages WHERE id = ? AND receipt = ?"
)
PUT_FANOUT = (
    "INSERT INTO messages (queue, priority, payload, expires_at) "
    f"SELECT b.queue, ?, ?, {_EXPIRES.format(queue='b.queue')} "
    "FROM bindings AS b WHERE b.exchange = ?"
)
SIZE = f"SELECT count(*) FROM messages WHERE {_READY}"
PURGE = f"DELETE FROM messages WHERE {_READY}"
BIND = "INSERT OR IGNORE INTO bindings (exchange, routing_key, pattern, queue) VALUES (?, ?, ?, ?)"
TABLE = "SELECT routing_key, pattern, queue FROM bindings WHERE exchange = ?"
UNBIND = "DELETE FROM bindings WHERE queue = ? AND exchange = ? AND routing_key = ?"
DECLARE = (
    "INSERT INTO queues (name, message_ttl, expires, last_seen) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET message_ttl = excluded.message_ttl, "
    "expires = excluded.expires, last_seen = excluded.last_seen"
)
HAS_QUEUE = (
    "SELECT 1 FROM queues WHERE name = ? UNION ALL SELECT 1 FROM bindings WHERE queue = ? LIMIT 1"
)
DROP_EXPIRED = "DELETE FROM messages WHERE expires_at IS NOT NULL AND expires_at <= ?"
STALE_QUEUES = (
    "SELECT name FROM queues WHERE expires IS NOT NULL AND last_seen + max(expires, ?) <= ?"
)


def connect(path: Path, timeout: float = BUSY_TIMEOUT_MS / 1000) -> sqlite3.Connection:
    """Open ``path`` (creating the file and tables) in autocommit mode, WAL, synchronous=NORMAL.

    ``timeout``: seconds a statement waits for another process's write lock.

    Autocommit: every statement is its own transaction unless the caller says ``BEGIN
    IMMEDIATE``. WAL with ``synchronous=NORMAL`` survives the kill of any process; a power
    loss may lose the last commits (not corrupt the file).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path,
        timeout=timeout,
        isolation_level=None,
        check_same_thread=False,  # the channel serialises its use with a lock
    )
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    sqlite_wal(conn, timeout)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.executescript(SCHEMA)
    return conn
