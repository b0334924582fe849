"""Many dead letters and runs, written in bulk (COPY on PostgreSQL, executemany on SQLite), and
the statements a command runs, captured so that a test can ask the database for their plans."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from taskkit.db.session import create_engine_for
from tests.conftest import _migrate, pg_schema

#: Letters and runs the plan tests hold: enough that, without its index, each query's cheapest
#: plan reads the whole table (checked by ``test_without_the_indexes_postgresql_reads_the_table``).
LETTERS = 60_000
BATCH_SIZE = 100
TASKS = 12
RUNS = 30_000
START = datetime(2026, 1, 1, tzinfo=UTC)

LETTER_COLUMNS = (
    "task_name, batch_id, item_key, task_id, payload, error_type, error_message, attempts, "
    "first_failed_at, last_failed_at, status, replays, traceback"
)
#: A dead letter keeps the traceback of its last failure: a few frames, ~700 bytes.
TRACEBACK = (
    "Traceback (most recent call last):\n"
    + "".join(
        f'  File "/srv/app/jobs/step_{n}.py", line {10 * n + 7}, in step_{n}\n'
        f"    result = step_{n + 1}(item, context)\n"
        for n in range(8)
    )
    + "KeyError: 'price'\n"
)
RUN_COLUMNS = "uid, name, model_type, config, status, usage_count, created_at, updated_at, version"
RUN_STATUSES = ("completed", "completed", "completed", "failed", "running", "queued")


def letter_rows(count: int) -> Iterator[tuple[Any, ...]]:
    """``count`` letters: batches of BATCH_SIZE items across TASKS tasks, one in ten replayed,
    failures a second apart (ids and failure times in the same order), each with a traceback
    as a real failure leaves one."""
    for n in range(count):
        batch = n // BATCH_SIZE
        moment = START + timedelta(seconds=n)
        yield (
            f"jobs.task_{batch % TASKS}",
            f"batch-{batch:07d}",
            f"item-{n:08d}",
            f"task-{n}",
            json.dumps({"n": n}),
            "KeyError" if n % 3 else "ValueError",
            f"missing key {n}",
            3,
            moment,
            moment,
            "replayed" if n % 10 == 0 else "dead",
            1 if n % 10 == 0 else 0,
            TRACEBACK,
        )


def run_rows(count: int) -> Iterator[tuple[Any, ...]]:
    """``count`` training runs, statuses mixed (half completed), created a second apart."""
    for n in range(count):
        moment = START + timedelta(seconds=n)
        status = RUN_STATUSES[n % len(RUN_STATUSES)]
        yield (f"{n:032x}", f"run-{n % 50}", "sgd", "{}", status, 0, moment, moment, 1)


def fill(engine: Engine, table: str, columns: str, rows: Iterator[tuple[Any, ...]]) -> None:
    """Write ``rows`` into an emptied ``table``: one COPY on PostgreSQL, one executemany on
    SQLite."""
    raw = engine.raw_connection()
    try:
        if engine.dialect.name == "postgresql":
            cursor = raw.driver_connection.cursor()  # type: ignore[union-attr]
            # Truncated in the same transaction, the rows can be written frozen: their pages
            # are all-visible at once (what an index-only scan needs) even while another
            # session's open transaction keeps VACUUM from marking them so.
            cursor.execute(f"TRUNCATE {table} CASCADE")
            with cursor.copy(f"COPY {table} ({columns}) FROM STDIN WITH (FREEZE)") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            names = [c.strip() for c in columns.split(",")]
            cursor = raw.cursor()
            marks = ", ".join("?" for _ in names)
            cursor.executemany(
                f"INSERT INTO {table} ({', '.join(names)}) VALUES ({marks})",
                (tuple(_sqlite_value(v) for v in row) for row in rows),
            )
        raw.commit()
    finally:
        raw.close()


def _sqlite_value(value: Any) -> Any:
    # as SQLAlchemy's SQLite DateTime stores it: naive UTC text with microseconds
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def analyze(engine: Engine) -> None:
    """Fresh statistics (and, on PostgreSQL, the visibility map an index-only scan needs)."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE dead_letters"))
            connection.execute(text("VACUUM ANALYZE model_runs"))
    else:
        with engine.begin() as connection:
            connection.execute(text("ANALYZE"))


@contextlib.contextmanager
def captured() -> Iterator[list[tuple[str, Any]]]:
    """Every statement any engine sends while the block runs, with its parameters."""
    statements: list[tuple[str, Any]] = []

    def keep(conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> None:
        statements.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", keep)
    try:
        yield statements
    finally:
        event.remove(Engine, "before_cursor_execute", keep)


def _filled(url: str) -> str:
    engine = create_engine_for(url)
    try:
        fill(engine, "dead_letters", LETTER_COLUMNS, letter_rows(LETTERS))
        fill(engine, "model_runs", RUN_COLUMNS, run_rows(RUNS))
        analyze(engine)
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def big_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A database of its own (SQLite file, or PostgreSQL schema) holding LETTERS letters and
    RUNS runs, analyzed."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('scale') / 'taskkit.db'}"
        _migrate(url)
        yield _filled(url)
        return
    postgres_url = request.getfixturevalue("postgres_url")
    with pg_schema(postgres_url, prefix="taskkit_scale") as url:
        _migrate(url)
        yield _filled(url)
