"""Bulk inserts on PostgreSQL: ``safe_bulk_insert`` against a plain insert and a naive fallback.

All contestants insert the same 100,000 ``Prediction`` rows (small JSON input, a float
prediction, unique item keys) into a schema created for this run and migrated to head; the
table is truncated before every insert. The plain insert gets the 99,990 good rows only (it
has no way to survive a bad one); the others get all 100,000, of which 10 are bad (5 NULL
predictions, 5 duplicate item keys), and every run is checked: exactly those 10 fail and
99,990 rows are in the table. PostgreSQL is required: without it this section fails.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, create_engine, event, insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from benchmarks._harness import commit, machine, replace_section, say, table
from taskkit.db import safe_bulk_insert
from taskkit.db._bulk import COPY_ROWS, COPY_ROWS_MAX
from taskkit.db.migrate import upgrade
from taskkit.db.models import ModelRun, Prediction
from taskkit.db.session import create_engine_for

POSTGRES_URL = os.environ.get(
    "TASKKIT_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"

ROWS = 100_000
#: Rows per ``execute`` of the plain insert: SQLAlchemy's own insertmanyvalues page size.
CLEAN_CHUNK = 1000
#: Spread over the input, each in a batch of its own (of 100 and of 1000).
NULL_ROWS = tuple(4_321 + 20_000 * k for k in range(5))
#: Each repeats the item key of the row just before it (same batch), so this row is the one
#: that fails, whichever way it is inserted.
DUPLICATE_ROWS = tuple(14_321 + 20_000 * k for k in range(5))
BAD_ROWS = frozenset(NULL_ROWS + DUPLICATE_ROWS)
GOOD_ROWS = ROWS - len(BAD_ROWS)

#: safe_bulk_insert's default batch size: (b) uses it, and (c) the same, to be comparable.
DEFAULT_BATCH: int = inspect.signature(safe_bulk_insert).parameters["batch_size"].default

#: Every contestant inserts once per round, round-robin, and keeps its best round.
ROUNDS = 3


# -- the data -----------------------------------------------------------------------------------


def make_rows(run_id: int) -> list[dict[str, Any]]:
    rng = random.Random(20261129)
    rows = [
        {
            "model_run_id": run_id,
            "item_key": f"item-{i:06d}",
            "input_data": {"f": [round(rng.uniform(-5, 5), 4) for _ in range(4)]},
            "prediction": round(rng.random(), 6),
            "confidence": round(rng.random(), 4),
        }
        for i in range(ROWS)
    ]
    for i in NULL_ROWS:
        rows[i]["prediction"] = None  # NOT NULL violation
    for i in DUPLICATE_ROWS:
        rows[i]["item_key"] = rows[i - 1]["item_key"]  # unique (model_run_id, item_key) violation
    return rows


# -- the contestants ----------------------------------------------------------------------------

#: (landed, failed records)
Outcome = tuple[int, list[Any]]


def clean_insert(db: Session, rows: list[dict[str, Any]]) -> Outcome:
    """What a user writes without any safety: chunks of 1000 per execute, one commit."""
    statement = insert(Prediction)
    for start in range(0, len(rows), CLEAN_CHUNK):
        db.execute(statement, rows[start : start + CLEAN_CHUNK])
    db.commit()
    return len(rows), []


def clean_core_insert(db: Session, rows: list[dict[str, Any]]) -> Outcome:
    """The same without the ORM: Core inserts on the session's connection."""
    connection = db.connection()
    statement = Prediction.__table__.insert()
    for start in range(0, len(rows), CLEAN_CHUNK):
        connection.execute(statement, rows[start : start + CLEAN_CHUNK])
    db.commit()
    return len(rows), []


def plain_copy(db: Session, rows: list[dict[str, Any]]) -> Outcome:
    """The ceiling: one psycopg ``COPY`` of all the rows, no savepoint, no defaults, no safety."""
    from psycopg.types.json import Jsonb

    columns = ("model_run_id", "item_key", "input_data", "prediction", "confidence", "created_at")
    now = datetime.now(UTC)
    driver = db.connection().connection.driver_connection
    with (
        driver.cursor() as cursor,
        cursor.copy(f"COPY predictions ({', '.join(columns)}) FROM STDIN") as copy,
    ):
        for row in rows:
            copy.write_row(
                (
                    row["model_run_id"],
                    row["item_key"],
                    Jsonb(row["input_data"]),
                    Jsonb(row["prediction"]),
                    row["confidence"],
                    now,
                )
            )
    db.commit()
    return len(rows), []


def safe(batch_size: int | None) -> Callable[[Session, list[dict[str, Any]]], Outcome]:
    """``safe_bulk_insert``; ``None``: with its default batch size."""
    options = {} if batch_size is None else {"batch_size": batch_size}

    def insert_safely(db: Session, rows: list[dict[str, Any]]) -> Outcome:
        successful, failed = safe_bulk_insert(db, Prediction, rows, **options)
        return len(successful), [record for record, _ in failed]

    return insert_safely


def naive_fallback(batch_size: int) -> Callable[[Session, list[dict[str, Any]]], Outcome]:
    """Batches in savepoints; a batch that fails is retried row by row, each in a savepoint.

    Core inserts and savepoints on the session's connection, as ``safe_bulk_insert`` uses, so
    the comparison is between the two ways of handling a failed batch.
    """

    def insert_naively(db: Session, rows: list[dict[str, Any]]) -> Outcome:
        connection = db.connection()
        statement = Prediction.__table__.insert()
        landed = 0
        failed: list[Any] = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            try:
                with connection.begin_nested():
                    connection.execute(statement, batch)
                landed += len(batch)
            except (IntegrityError, DataError):
                for row in batch:
                    try:
                        with connection.begin_nested():
                            connection.execute(statement, [row])
                        landed += 1
                    except (IntegrityError, DataError):
                        failed.append(row)
        db.commit()
        return landed, failed

    return insert_naively


# (key, label, batch size, function)
CONTESTANTS: list[tuple[str, str, str, Callable[[Session, list[dict[str, Any]]], Outcome]]] = [
    ("a", "plain `execute(insert(Prediction), chunk)`, good rows only", "1000", clean_insert),
    (
        "a'",
        "plain Core `connection.execute(table.insert(), chunk)`, good rows",
        "1000",
        clean_core_insert,
    ),
    ("e", "plain psycopg `COPY` of the good rows (no safety)", "all", plain_copy),
    ("b", "**taskkit `safe_bulk_insert`** (default batch_size)", str(DEFAULT_BATCH), safe(None)),
    (
        "c",
        "naive fallback: failed batch retried row by row",
        str(DEFAULT_BATCH),
        naive_fallback(DEFAULT_BATCH),
    ),
    ("b'", "**taskkit `safe_bulk_insert`**, batch_size=1000", "1000", safe(1000)),
    ("d", "naive fallback, batch_size=1000", "1000", naive_fallback(1000)),
]


# -- the database -------------------------------------------------------------------------------


def _with_search_path(url: str, schema: str) -> str:
    updated = make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
    return updated.render_as_string(hide_password=False)


def _check_reachable(admin: Engine) -> None:
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except OperationalError as exc:
        shown = make_url(POSTGRES_URL).render_as_string(hide_password=True)
        raise RuntimeError(
            f"bench_db needs PostgreSQL, and {shown} is not reachable "
            f"({str(exc.orig).strip().splitlines()[0]}). Start it with: {PG_START} "
            "(or point TASKKIT_BENCH_POSTGRES_URL at another server)."
        ) from exc


@contextmanager
def bench_schema() -> Iterator[Engine]:
    """An engine whose connections live in a schema of this run, migrated; dropped after."""
    admin = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        _check_reachable(admin)
        schema = f"taskkit_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with admin.begin() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
        try:
            engine = create_engine_for(_with_search_path(POSTGRES_URL, schema))
            try:
                upgrade(engine)
                yield engine
            finally:
                engine.dispose()
        finally:
            with admin.begin() as connection:
                connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        admin.dispose()


def _truncate(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql("TRUNCATE predictions RESTART IDENTITY")


@contextmanager
def _counting(engine: Engine) -> Iterator[list[int]]:
    """Counts cursor calls (``execute``/``executemany``: a network round trip each)."""
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield calls
    finally:
        event.remove(engine, "before_cursor_execute", count)


def _insert(
    engine: Engine,
    fn: Callable[[Session, list[dict[str, Any]]], Outcome],
    rows: list[dict[str, Any]],
    expected_failed: set[int],
) -> float:
    """One timed insert into the empty table, checked; returns its seconds."""
    _truncate(engine)
    gc.collect()
    gc.disable()
    try:
        with Session(engine) as db:
            started = time.perf_counter()
            landed, failed = fn(db, rows)
            elapsed = time.perf_counter() - started
    finally:
        gc.enable()
    with engine.connect() as connection:
        in_table = connection.exec_driver_sql("SELECT count(*) FROM predictions").scalar()
    failed_ids = {id(record) for record in failed}
    if landed != GOOD_ROWS or in_table != GOOD_ROWS or failed_ids != expected_failed:
        raise AssertionError(
            f"{fn.__qualname__}: {landed} reported landed, {in_table} in the table, "
            f"{len(failed)} failed ({len(failed_ids & expected_failed)} of them bad rows); "
            f"expected {GOOD_ROWS} landed and exactly the {len(BAD_ROWS)} bad rows failed"
        )
    return elapsed


def measure(engine: Engine) -> tuple[dict[str, float], dict[str, int]]:
    with Session(engine) as db:
        run = ModelRun(name="bench", model_type="bench", config={})
        db.add(run)
        db.commit()
        run_id = run.id
    rows = make_rows(run_id)
    good = [row for i, row in enumerate(rows) if i not in BAD_ROWS]
    bad_ids = {id(rows[i]) for i in BAD_ROWS}
    inputs = {
        key: (good, set()) if key in ("a", "a'", "e") else (rows, bad_ids)
        for key, *_ in CONTESTANTS
    }
    best: dict[str, float] = {}
    calls: dict[str, int] = {}
    for round_number in range(1, ROUNDS + 1):
        say(f"  round {round_number}/{ROUNDS}")
        for key, _, _, fn in CONTESTANTS:
            if round_number == 1:  # counting costs a few microseconds per round trip
                with _counting(engine) as counted:
                    seconds = _insert(engine, fn, *inputs[key])
                calls[key] = counted[0]
            else:
                seconds = _insert(engine, fn, *inputs[key])
            best[key] = min(best.get(key, float("inf")), seconds)
    _truncate(engine)
    return best, calls


def run() -> str:
    started = time.perf_counter()
    # psycopg logs a WARNING ("error ignored terminating <psycopg.Pipeline [INERROR]>") for
    # some failing batches; keep them off the terminal while measuring.
    logging.disable(logging.WARNING)
    try:
        with bench_schema() as engine:
            best, calls = measure(engine)
    finally:
        logging.disable(logging.NOTSET)
    took = time.perf_counter() - started
    say(f"  bench_db took {took:.0f} s")
    rate = {key: GOOD_ROWS / seconds for key, seconds in best.items()}
    rows = [
        [
            f"({key}) {label}",
            batch,
            f"{best[key]:.2f}",
            f"{rate[key]:,.0f}",
            f"{calls[key]:,}",
            f"{rate[key] / rate['a']:.2f}x",
        ]
        for key, label, batch, _ in CONTESTANTS
    ]
    main_table = table(
        [
            "contestant",
            "batch",
            "best time, s",
            "rows landed/s",
            "round trips",
            "speed vs (a)",
        ],
        rows,
    )

    def ratio(name: str, num: str, den: str, target: float) -> list[str]:
        value = rate[num] / rate[den]
        return [name, f"**{value:.2f}**", f">= {target:g}", "yes" if value >= target else "**no**"]

    ratio_table = table(
        ["ratio (rows/s over rows/s)", "measured", "target", "met"],
        [
            ratio("b / a: safe vs plain insert (issue 18)", "b", "a", 1.5),
            ratio("b / a': safe vs plain Core insert", "b", "a'", 0.5),
            ratio("b / c: safe vs naive fallback", "b", "c", 10),
            ratio("b' / a: safe vs plain insert, batch 1000", "b'", "a", 1.5),
            ratio("b / e: safe vs a bare COPY", "b", "e", 0.5),
            ratio("b' / d: safe vs naive fallback, batch 1000", "b'", "d", 10),
        ],
    )
    return f"""## Bulk insert on PostgreSQL: `safe_bulk_insert`

{ROWS:,} `Prediction` rows (JSON input of 4 floats, a float prediction, unique item keys)
into an empty table (truncated before every insert) in a schema of this run on the local
PostgreSQL server. (a) and (a') get the {GOOD_ROWS:,} good rows only (they cannot survive a
bad one): (a) is what the SQLAlchemy 2 docs show, an ORM-enabled `insert()`, (a') the same
through Core, which is what `safe_bulk_insert` and the naive fallbacks use for dicts. Every
other contestant gets all
{ROWS:,}, {len(BAD_ROWS)} of them bad (5 NULL predictions, 5 duplicate item keys, spread over the
input, each in a different batch), and every run is checked to fail exactly those {len(BAD_ROWS)}
and leave {GOOD_ROWS:,} rows in the table. Each time is the best of {ROUNDS} round-robin rounds
(GC off while timing) and includes the commit; rows/s counts the {GOOD_ROWS:,} rows landed.
Round trips are the cursor calls through SQLAlchemy (`execute`/`executemany`: psycopg
pipelines the rows of an `executemany` into one round trip), savepoints included; a COPY is
not one of them (it is a statement on psycopg's cursor, one per chunk). On PostgreSQL
`safe_bulk_insert` sends dicts by COPY, each COPY a quarter of the rows copied since the last
COPY that failed (at least {COPY_ROWS:,} or batch_size, at most {COPY_ROWS_MAX:,}), so (b) and
(b') differ only in the batches bisection would use. Targets (issue 18): (b) at least
1.5x as fast as (a); (e), a bare COPY with no savepoint, no defaults and no safety, is the
ceiling. Measured with `.venv/bin/python -m benchmarks.bench_db` on {machine()}, commit
{commit()}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, with other work sharing the 2 cores (times
vary by up to 1.5x between runs; the ratios are from one run).

{main_table}

{ratio_table}

What the numbers show: (b) pays for what (e) skips: a savepoint and a release per COPY, the
end of each COPY (the client waits there while the server inserts the rows it still holds),
the column types' conversions and the defaults per row, a scan of each batch for rows known
to fail, and for each bad row one single-row INSERT in a savepoint of its own, which gives it
the database's message exactly as an INSERT does, with the COPY split around it. The bad rows
here are all known before they are sent (a NULL for a NOT NULL column, a key repeated within
its batch), so no COPY fails, and COPYs grow with the clean run (26 COPYs here, against 50 of
{COPY_ROWS:,} before). A row only the database can reject (a key already in the table) fails
its COPY, and the rows before it in that COPY are copied again; sizing COPYs by the clean run
bounds that at a quarter of the rows copied since the last failure (docs/db.md has the
measurement with 10 such rows). Before the scan (commit df914b3), (b) ran at 1.22x to 1.28x of
(a) in two whole `make bench` runs; with it and COPYs of {COPY_ROWS:,}, at 1.12x to 1.58x in
single runs (the last on this machine, whose (a) takes 1.9 to 2.2 s).
The naive fallbacks (c) and (d) keep INSERT batches in savepoints and re-insert a failed batch
row by row, so they cost little more than the plain insert (a); the 10x target against them
is out of reach by construction: (b) / (c) is bounded by what a bare COPY does against (c),
{rate["e"] / rate["c"]:.1f}x here ({rate["e"] / rate["d"]:.1f}x against (d)).
Logging is off while measuring (the naive contestants make psycopg log a warning per failed
pipelined batch; `safe_bulk_insert` filters that warning out itself).
"""


def main() -> None:
    """``python -m benchmarks.bench_db``: run this section alone and replace it in
    docs/benchmarks.md."""
    replace_section(run())


if __name__ == "__main__":
    main()
