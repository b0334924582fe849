"""Which of a ``BatchTask`` chunk's ledger writes wait for the WAL flush (issue 18), in process on
SQLite and PostgreSQL: on PostgreSQL the claim and the mid-chunk flushes commit without it
(``synchronous_commit = off``), the chunk's last write is durable and its dead items with it;
elsewhere every write is as before. The kill tests of ``test_batch_worker.py`` hold the bound
on items run again (``ledger_flush_every + batch_size`` per interrupted chunk) on this ledger."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event

from taskkit.config import Settings
from taskkit.deadletter import DeadLetterStore, ItemLedger
from taskkit.deadletter._ledger import _KEPT, statement_hooks
from taskkit.tasks import BatchTask, create_app

app = create_app(
    "tkledgerwrites",
    settings=Settings(broker_url="memory://", result_backend="cache+memory://"),
    task_always_eager=True,
)
BROKEN = {7, 23}


@app.task(
    base=BatchTask,
    bind=True,
    shared=False,
    name="tkledgerwrites.items",
    item_delay=0,
    item_max_attempts=1,
    batch_size=10,
    ledger_flush_every=10,
)
def items_task(self: BatchTask, item: int) -> None:
    if item in BROKEN:
        raise RuntimeError(f"item {item} is broken")


@pytest.fixture
def transactions(db_url: str, engine: Engine) -> Iterator[list[str]]:
    """Each write of the chunk's ledger row, in order (one statement each on PostgreSQL)."""
    app.conf.taskkit_database_url = db_url
    sent: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith(("INSERT INTO batch_chunks", "UPDATE batch_chunks")):
            sent.append(statement)

    def raw(sent_on: Engine, statement: str) -> None:  # the ledger's raw psycopg path
        if sent_on is engine:
            note(None, None, statement)

    event.listen(engine, "before_cursor_execute", note)
    statement_hooks.append(raw)
    yield sent
    statement_hooks.remove(raw)
    event.remove(engine, "before_cursor_execute", note)


def test_a_chunk_waits_for_the_wal_flush_once_at_its_end(
    transactions: list[str], engine: Engine
) -> None:
    batch = uuid.uuid4().hex
    items = list(range(30))
    summary = items_task(items, batch_id=batch)
    written = list(transactions)

    assert (summary["successful"], summary["failed_ids"]) == (28, [7, 23])
    statuses = ItemLedger(batch, engine).statuses([str(i) for i in items])
    assert statuses == {str(i): "dead" if i in BROKEN else "done" for i in items}
    letters = DeadLetterStore(engine=engine).list(batch_id=batch)
    assert sorted(str(letter.item_key) for letter in letters) == ["23", "7"]
    if engine.dialect.name == "postgresql":
        # The claim; one flush, of the 19 items done after 20 ran (9 after 10: below 10); the
        # durable end, with the last 9 done items and the 2 dead ones.
        # Each statement its own transaction; those skipping the WAL flush say so themselves.
        asynchronous = ["'synchronous_commit', 'off'" in statement for statement in written]
        assert asynchronous == [True, True, False]

    again = items_task(items, batch_id=batch)  # a redelivery skips every finished item
    assert (again["skipped"], again["failed_ids"]) == (30, [7, 23])
    assert len(DeadLetterStore(engine=engine).list(batch_id=batch)) == 2  # dead-lettered once


#: Whether the chunk's claim was still unanswered when its first item ran (``observed_task``).
claim_unanswered: list[bool] = []


@app.task(
    base=BatchTask,
    bind=True,
    shared=False,
    name="tkledgerwrites.observed",
    item_delay=0,
    batch_size=10,
    ledger_flush_every=10,
)
def observed_task(self: BatchTask, item: int) -> None:
    if item == 0:
        raw = _KEPT.raw
        claim_unanswered.append(raw is not None and raw.pending is not None)


def test_a_first_delivery_runs_its_first_item_during_its_claims_round_trip(
    pg_schema_url: str, pg_engine: Engine
) -> None:
    """The chunk's position is looked up before its keys are computed, found empty, and the
    claim is sent without waiting (``ItemLedger.probe``); a redelivery waits and skips."""
    app.conf.taskkit_database_url = pg_schema_url
    sent: list[str] = []

    def note(sent_on: Engine, statement: str) -> None:
        if sent_on is pg_engine:
            sent.append(" ".join(statement.split()[:2]))

    statement_hooks.append(note)
    try:
        batch = uuid.uuid4().hex
        claim_unanswered.clear()
        summary = observed_task(list(range(25)), batch_id=batch, offset=50)
        first = list(sent)
        again = observed_task(list(range(25)), batch_id=batch, offset=50)
    finally:
        statement_hooks.remove(note)
    assert summary["successful"] == 25
    assert claim_unanswered == [True]  # and the redelivery ran no item
    assert first == [
        "SELECT chunk",  # the probe, sent before the keys were computed
        "INSERT INTO",  # the claim, its answer read by the first flush
        "UPDATE batch_chunks",  # flushes after 10 and 20 items, sent without waiting
        "UPDATE batch_chunks",
        "UPDATE batch_chunks",  # the durable end, settled after the summary was built
    ]
    assert again["skipped"] == 25
    assert ItemLedger(batch, pg_engine).statuses(["0", "24"]) == {"0": "done", "24": "done"}
