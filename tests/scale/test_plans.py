"""At any size, the dead-letter and run commands read an index, never the whole table: the
plan of each statement they send (captured as they run, then EXPLAINed with the same
parameters) on PostgreSQL (no Seq Scan on the table) and SQLite (EXPLAIN QUERY PLAN names an
index; no full ``SCAN`` of the table).

The tables hold enough rows, analyzed, that PostgreSQL reads the whole table for these
queries when the indexes of migration 0009 are missing (the last test drops them to show it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from taskkit.cli import app as cli
from taskkit.db.runs import list_runs
from taskkit.db.session import create_engine_for
from taskkit.deadletter import DeadLetterStore, SentReplay
from tests.scale.conftest import BATCH_SIZE, LETTERS, captured

pytestmark = pytest.mark.usefixtures("big_url")

#: A batch in the middle of the table.
BATCH = f"batch-{LETTERS // BATCH_SIZE // 2:07d}"


def _reads(statement: str, table: str) -> bool:
    return re.search(rf"\bFROM {table}\b", statement) is not None or (
        re.search(rf"\bUPDATE {table}\b", statement) is not None
    )


def plans(url: str, action: Callable[[], Any], table: str) -> list[tuple[str, str]]:
    """``(statement, plan)`` for every statement on ``table`` that ``action`` sends."""
    with captured() as statements:
        action()
    wanted = [(s, p) for s, p in statements if _reads(s, table)]
    assert wanted, f"no statement on {table} was sent"
    engine = create_engine_for(url)
    try:
        return [(statement, explain(engine, statement, params)) for statement, params in wanted]
    finally:
        engine.dispose()


def explain(engine: Engine, statement: str, params: Any) -> str:
    prefix = "EXPLAIN " if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(prefix + statement, params)
        rows = cursor.fetchall()
        raw.rollback()
    finally:
        raw.close()
    if engine.dialect.name == "postgresql":
        return "\n".join(row[0] for row in rows)
    return "\n".join(str(row[-1]) for row in rows)


def assert_indexed(url: str, found: list[tuple[str, str]], table: str) -> None:
    for statement, plan in found:
        where = f"{statement}\n--- plan ---\n{plan}"
        if url.startswith("postgresql"):
            assert f"Seq Scan on {table}" not in plan, where
            assert "Index" in plan, where
        else:
            # SQLite: "SEARCH t USING INDEX ..." / "SCAN t USING COVERING INDEX ...", never a
            # plain "SCAN t" of the table, except a read of the table (its rowid b-tree) in
            # key order that stops at the LIMIT: ORDER BY t.id with no sort of its own
            lines = [line for line in plan.splitlines() if re.search(rf"\b{table}\b", line)]
            assert lines, where
            for line in lines:
                in_key_order = (
                    re.search(rf"ORDER BY {table}\.id DESC\s+LIMIT", statement) is not None
                    and "TEMP B-TREE" not in plan
                )
                assert "INDEX" in line or "INTEGER PRIMARY KEY" in line or in_key_order, where


def cli_ok(url: str, *args: str) -> Callable[[], None]:
    def run() -> None:
        result = CliRunner().invoke(cli, [*args, "--url", url])
        assert result.exit_code == 0, result.output

    return run


def test_dlq_list_first_page_reads_an_index(big_url: str):
    found = plans(big_url, cli_ok(big_url, "dlq", "list", "--json"), "dead_letters")
    assert len(found) == 2  # the page, and the count of what it did not show
    assert_indexed(big_url, found, "dead_letters")


def test_dlq_list_of_a_batch_reads_an_index(big_url: str):
    found = plans(big_url, cli_ok(big_url, "dlq", "list", "--batch", BATCH), "dead_letters")
    assert_indexed(big_url, found, "dead_letters")


def test_dlq_depth_reads_an_index(big_url: str):
    found = plans(big_url, cli_ok(big_url, "dlq", "depth", "--json"), "dead_letters")
    assert_indexed(big_url, found, "dead_letters")


def test_http_dead_letters_page_reads_an_index(big_url: str):
    store = DeadLetterStore(big_url)
    found = plans(
        big_url,
        lambda: store.list(limit=101, newest_first=True, before_id=LETTERS // 2),
        "dead_letters",
    )
    assert_indexed(big_url, found, "dead_letters")


def test_replay_of_one_batch_selects_and_marks_through_indexes(big_url: str):
    store = DeadLetterStore(big_url)

    def replay_selection() -> None:
        # what replay_dead_letters(batch_id=...) runs: select the batch's waiting letters,
        # locked, then mark them in the same transaction (rolled back here: nothing is sent)
        with store.letters_for_replay(batch_id=BATCH) as (session, letters):
            assert len(letters) == BATCH_SIZE - BATCH_SIZE // 10
            store.mark_replayed(
                [SentReplay("jobs.x", "t-1", BATCH, [letter.id for letter in letters])], session
            )
            session.rollback()

    found = plans(big_url, replay_selection, "dead_letters")
    assert len(found) == 2
    assert_indexed(big_url, found, "dead_letters")


def test_runs_list_first_page_reads_an_index(big_url: str):
    found = plans(big_url, cli_ok(big_url, "runs", "list", "--json"), "model_runs")
    assert_indexed(big_url, found, "model_runs")
    found = plans(big_url, lambda: list_runs(big_url, status="failed", limit=20), "model_runs")
    assert_indexed(big_url, found, "model_runs")


def _cost(plan: str) -> float:
    found = re.search(r"cost=[\d.]+\.\.([\d.]+)", plan)
    assert found, plan
    return float(found.group(1))


def test_without_the_new_indexes_postgresql_reads_far_more(big_url: str):
    """The proof has teeth: a batch's letters are planned through migration 0009's index,
    and with it dropped (inside a transaction that is rolled back) the same statement is
    planned to cost at least ten times as much (a read of a whole index or table).
    ``dlq list`` without its index reads ``ix_dead_letters_last_failed_at`` backwards and
    filters the status: one page then costs a read of every newer letter of another status."""
    if not big_url.startswith("postgresql"):
        pytest.skip("SQLite's planner takes no row counts into its choice here")
    store = DeadLetterStore(big_url)
    with captured() as statements:
        with store.letters_for_replay(batch_id=BATCH) as (session, _letters):
            session.rollback()
        list_runs(big_url, status="failed", limit=20)
    wanted = {
        "ix_dead_letters_batch_id_status_id": [
            (s, p) for s, p in statements if "dead_letters.batch_id =" in s
        ],
    }
    assert all(len(found) == 1 for found in wanted.values()), [s for s, _ in statements]
    engine = create_engine_for(big_url)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for index, [(statement, params)] in wanted.items():
            cursor.execute("EXPLAIN " + statement, params)
            plan = "\n".join(row[0] for row in cursor.fetchall())
            assert index in plan, f"{statement}\n{plan}"
            cursor.execute(f"DROP INDEX {index}")
            cursor.execute("EXPLAIN " + statement, params)
            without = "\n".join(row[0] for row in cursor.fetchall())
            assert _cost(without) > 10 * _cost(plan), (
                f"{statement}\n{plan}\n--- without ---\n{without}"
            )
    finally:
        raw.rollback()
        raw.close()
        engine.dispose()
