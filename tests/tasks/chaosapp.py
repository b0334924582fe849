"""The Celery app of the embedded-default chaos test (``tests/tasks/test_embedded_chaos.py``).

Built by ``create_app`` from the environment alone: with ``TASKKIT_HOME`` set and no broker,
result backend or database URL, every worker subprocess and the test process agree on the
embedded default (SQLite broker, results and database under that home).

What the tasks did is kept in a SQLite file of the test's own, ``$TASKKIT_HOME/chaos.db``,
written by the pool processes and read by the test:

- ``executions``: append-only, one row per event (``start``/``end`` of a ``work`` task or a
  batch chunk, ``start`` of a batch item, ``epoch`` of a training run), with the process and the
  wall-clock time, so the test can tell which executions a kill interrupted;
- ``effects``: the side effect of a task or item, under its key. taskkit runs a task at least
  once, not exactly once: a task killed after it wrote its effect but before its result was
  stored runs again and writes again (``work`` writes halfway through its run, so a kill often
  lands after the write; a batch item runs again when its chunk dies before the ledger's next
  flush). What keeps the second row out is the task's own idempotent write, as docs/batch.md
  tells users to make it ("idempotent per key: an upsert, a unique key"): here, with no unique
  key, an insert guarded by ``NOT EXISTS`` in one ``BEGIN IMMEDIATE`` transaction, so that a
  check and an insert of two executions cannot interleave. The table has no unique key on
  purpose: a write that got past the guard shows as a second row, not as a constraint error;
- ``attempts``: append-only, one row per effect write a task attempted (committed with the
  effect, in the same transaction), with ``landed`` 1 if it inserted the effect and 0 if the
  guard found it there already, so the test sees how often a re-run tried to write it again.

``items``: every item whose id is a multiple of 100 raises ``ValueError`` (a permanent error, so
the item is dead-lettered at once); the others sleep a few milliseconds and write their effect.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from taskkit.config import get_settings
from taskkit.tasks import BatchTask, ResilientTask, TrainingTask, create_app
from workers.training import run_training

app = create_app("chaos")

#: The batch items that fail for good (``ValueError``): ids divisible by this.
DEAD_EVERY = 100

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS executions (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "kind TEXT NOT NULL, key TEXT NOT NULL, event TEXT NOT NULL, pid INTEGER NOT NULL, "
    "at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS effects (kind TEXT NOT NULL, key TEXT NOT NULL, at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS attempts (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "kind TEXT NOT NULL, key TEXT NOT NULL, landed INTEGER NOT NULL, pid INTEGER NOT NULL, "
    "at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS executions_key ON executions (kind, key)",
    "CREATE INDEX IF NOT EXISTS effects_key ON effects (kind, key)",
)

#: This process's connection to the log (a forked pool process opens its own).
_connections: dict[int, sqlite3.Connection] = {}


def log_path() -> Path:
    return Path(get_settings().home) / "chaos.db"


def connect() -> sqlite3.Connection:
    """This process's connection to ``chaos.db`` (autocommit; WAL; waits on a busy file)."""
    pid = os.getpid()
    connection = _connections.get(pid)
    if connection is None:
        connection = sqlite3.connect(log_path(), timeout=60, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        for statement in _SCHEMA:
            connection.execute(statement)
        _connections[pid] = connection
    return connection


def disconnect() -> None:
    """Close this process's connection to ``chaos.db``, if it has one."""
    connection = _connections.pop(os.getpid(), None)
    if connection is not None:
        connection.close()


def note(kind: str, key: str, event: str) -> None:
    connect().execute(
        "INSERT INTO executions (kind, key, event, pid, at) VALUES (?, ?, ?, ?, ?)",
        (kind, key, event, os.getpid(), time.time()),
    )


def record_effect(kind: str, key: str) -> bool:
    """Write the side effect of ``key`` unless it is already there, and note the attempt, in
    one transaction; True if the effect was written now."""
    connection = connect()
    now = time.time()
    connection.execute("BEGIN IMMEDIATE")
    try:
        landed = connection.execute(
            "INSERT INTO effects (kind, key, at) SELECT ?, ?, ? "
            "WHERE NOT EXISTS (SELECT 1 FROM effects WHERE kind = ? AND key = ?)",
            (kind, key, now, kind, key),
        ).rowcount
        connection.execute(
            "INSERT INTO attempts (kind, key, landed, pid, at) VALUES (?, ?, ?, ?, ?)",
            (kind, key, landed, os.getpid(), now),
        )
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    return landed == 1


# -- the tasks --------------------------------------------------------------------------------


@app.task(base=ResilientTask, bind=True, name="chaos.work")
def work(self: ResilientTask, number: int) -> int:
    """A plain task: 10-100 ms of work, its side effect under its task id, 10-100 ms more."""
    key = str(self.request.id)
    note("task", key, "start")
    time.sleep(random.uniform(0.01, 0.1))
    record_effect("task", key)
    time.sleep(random.uniform(0.01, 0.1))
    note("task", key, "end")
    return number


class LoggedBatch(BatchTask):
    """A BatchTask that notes the start and end of every chunk delivery it runs."""

    @contextlib.contextmanager
    def setup_chunk(self, items: Sequence[Any]) -> Iterator[None]:
        key = str(self.request.id)
        note("chunk", key, "start")
        yield
        note("chunk", key, "end")


@app.task(
    base=LoggedBatch,
    bind=True,
    name="chaos.items",
    batch_size=50,
    ledger_flush_every=50,
    item_max_attempts=2,
    item_delay=0.01,
    item_max_delay=0.05,
)
def items(self: BatchTask, item: dict[str, Any]) -> None:
    key = str(item["id"])
    note("item", key, "start")
    if int(item["id"]) % DEAD_EVERY == 0:
        raise ValueError(f"item {key}: invalid input (fails on every attempt)")
    time.sleep(0.003)
    record_effect("item", key)


@app.task(base=TrainingTask, bind=True, name="chaos.train")
def train(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    """The example training body; every epoch it starts is noted under the run id."""

    def on_epoch(epoch: int) -> None:
        note("epoch", str(model_run_id), str(epoch))

    return run_training(self, config, on_epoch=on_epoch)
