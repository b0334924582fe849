"""``taskkit batches show``: a batch's row and item ledger (real SQLite and PostgreSQL), done,
dead, pending, rate over the recent window and ETA."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, update
from typer.testing import CliRunner, Result

from taskkit.cli import app
from taskkit.db.models import Batch, BatchChunk
from taskkit.db.session import session_scope
from taskkit.deadletter import DeadLetterEntry, DeadLetterStore, ItemLedger, batch_report

TASK = "jobs.score_items"


def show(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(app, ["batches", "show", *args], env={"COLUMNS": "120"})


def make_batch(
    database: str,
    engine: Engine,
    batch_id: str,
    *,
    total: int | None,
    done: int,
    dead: int,
    claimed: int,
    ago: timedelta,
) -> None:
    """A batch row (``total`` None: none) and ledger rows, the finished ones ``ago`` old."""
    if total is not None:
        with session_scope(database) as session:
            session.add(Batch(id=batch_id, task_name=TASK, total=total, chunks=2))
    ledger = ItemLedger(batch_id, engine)
    keys = [f"k{i}" for i in range(done + dead + claimed)]
    # Two chunks: the finished items' (aged below) and the claimed ones' (changed now).
    ledger.claim(keys[: done + dead])
    if claimed:
        ItemLedger(batch_id, engine).claim(keys[done + dead :])
    dead_entries = [
        DeadLetterEntry(
            task_name=TASK,
            payload={"i": key},
            error_type="KeyError",
            error_message="k",
            batch_id=batch_id,
            item_key=key,
        )
        for key in keys[done : done + dead]
    ]
    ledger.finish(done=keys[:done], dead=dead_entries, store=DeadLetterStore(database, queue=""))
    with engine.begin() as connection:
        connection.execute(
            update(BatchChunk)
            .where(BatchChunk.batch_id == batch_id, BatchChunk.chunk == ledger._chunk)
            .values(updated_at=datetime.now(UTC) - ago)
        )


def test_batches_show_counts_rate_and_eta(runner: CliRunner, database: str, engine: Engine):
    make_batch(
        database, engine, "b-42", total=100, done=24, dead=6, claimed=20, ago=timedelta(seconds=10)
    )

    table = show(runner, "b-42")
    as_json = show(runner, "b-42", "--json")

    assert as_json.exit_code == 0, as_json.output
    record = json.loads(as_json.stdout)
    assert {k: record[k] for k in ("task_name", "total", "chunks", "done", "dead", "claimed")} == {
        "task_name": TASK, "total": 100, "chunks": 2, "done": 24, "dead": 6, "claimed": 20,
    }  # fmt: skip
    assert (record["pending"], record["finished"], record["percent"]) == (70, 30, 30.0)
    assert record["rate"] == 0.5  # 30 items finished in the last 60 s
    assert record["eta_seconds"] == 140.0  # 70 pending at 0.5 items/s
    assert record["complete"] is False
    assert table.exit_code == 0, table.output
    text = table.stdout
    assert "30%  30/100" in text
    assert "━" in text
    assert "see: taskkit dlq list --batch b-42" in text
    assert "0.5 items/s over the last 60 s" in text
    assert "2 min 20 s" in text


def test_batches_show_window_leaves_older_work_out_of_the_rate(
    runner: CliRunner, database: str, engine: Engine
):
    make_batch(
        database, engine, "b-old", total=10, done=4, dead=0, claimed=2, ago=timedelta(minutes=5)
    )

    record = json.loads(show(runner, "b-old", "--json").stdout)
    wider = json.loads(show(runner, "b-old", "--json", "--window", "600").stdout)

    assert (record["rate"], record["eta_seconds"]) == (0.0, None)
    assert wider["rate"] == round(4 / 600, 3)
    assert "eta" in show(runner, "b-old").stdout


def test_batches_show_watch_of_a_finished_batch_ends_at_once(
    runner: CliRunner, database: str, engine: Engine
):
    make_batch(database, engine, "b-done", total=5, done=4, dead=1, claimed=0, ago=timedelta(0))

    result = show(runner, "b-done", "--watch", "--interval", "0.05")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("batch b-done: 5/5 (done 4, dead 1)")
    assert "eta done" in result.stdout.splitlines()[0]


def test_batches_show_watch_stops_at_the_timeout(runner: CliRunner, database: str, engine: Engine):
    make_batch(database, engine, "b-slow", total=5, done=1, dead=0, claimed=4, ago=timedelta(0))

    result = show(runner, "b-slow", "--watch", "--interval", "0.05", "--timeout", "0.2")

    assert result.exit_code == 7, result.output
    assert result.stderr.startswith("error: batch b-slow is not finished after 0.2 s (1/5)")


def test_batches_show_of_a_batch_without_a_row_reads_its_ledger(
    runner: CliRunner, database: str, engine: Engine
):
    make_batch(
        database, engine, "task-id-1", total=None, done=3, dead=0, claimed=1, ago=timedelta(0)
    )

    record = json.loads(show(runner, "task-id-1", "--json").stdout)

    assert (record["total"], record["done"], record["pending"], record["eta_seconds"]) == (
        None, 3, None, None,
    )  # fmt: skip
    assert "total unknown" in show(runner, "task-id-1").stdout


def test_batches_show_of_an_unknown_batch_exits_3(runner: CliRunner, database: str):
    result = show(runner, "nope")

    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("error: no batch 'nope' in ")
    assert batch_report("nope", database) is None
