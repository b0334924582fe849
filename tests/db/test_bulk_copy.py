"""safe_bulk_insert's COPY path on PostgreSQL: the same rows, failures and messages."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, ForeignKey, String, Text, event, func, select, text
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

from taskkit.db import safe_bulk_insert
from taskkit.db._bulk import COPY_ROWS
from taskkit.db._types import Json, UTCDateTime
from taskkit.db.models import ModelRun, Prediction
from taskkit.db.session import get_engine, get_sessionmaker
from tests.conftest import empty_tables


class Inserts:
    """Counts INSERT statements sent through SQLAlchemy (a COPY is not one)."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        self.engine = engine

    def __enter__(self) -> Inserts:
        event.listen(self.engine, "before_cursor_execute", self)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self)

    def __call__(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            self.count += 1


def new_run(db: Session) -> int:
    run = ModelRun(name="scorer", model_type="sgd", config={})
    db.add(run)
    db.commit()
    return run.id


def rows(run_id: int, n: int) -> list[dict[str, Any]]:
    return [
        {
            "model_run_id": run_id,
            "item_key": f"item-{i:05d}",
            "input_data": {"f": [i, i / 2]},
            "prediction": i % 3,
            "confidence": 0.5,
        }
        for i in range(n)
    ]


def test_bad_rows_fail_exactly_with_postgresqls_message(
    pg_db: Session, pg_engine: Engine, pg_schema_url: str
):
    run_id = new_run(pg_db)
    records = rows(run_id, 3 * COPY_ROWS + 123)  # several COPY chunks, the last one short
    null_rows = [0, 17, COPY_ROWS - 1, COPY_ROWS + 5]
    duplicate_rows = [2, 2 * COPY_ROWS + 7, 3 * COPY_ROWS + 122]
    for i in null_rows:
        records[i]["prediction"] = None  # NOT NULL violation
    for i in duplicate_rows:
        records[i]["item_key"] = records[i - 1]["item_key"]  # unique (run, item_key)
    records[COPY_ROWS + 6]["item_key"] = "k" * 300  # value too long for varchar(255)
    records[2 * COPY_ROWS]["input_data"] = {1, 2}  # a set is not JSON: cannot be sent
    bad = [*null_rows, *duplicate_rows, COPY_ROWS + 6, 2 * COPY_ROWS]

    with Inserts(pg_engine) as inserts:
        successful, failed = safe_bulk_insert(pg_db, Prediction, records)

    assert sorted(id(record) for record, _ in failed) == sorted(id(records[i]) for i in bad)
    assert [id(r) for r in successful] == [
        id(r) for i, r in enumerate(records) if i not in bad
    ]  # every good row, in input order
    # COPY carried every good row; each bad one was sent once more alone, as an INSERT.
    assert inserts.count == len(bad)
    errors = {id(record): error for record, error in failed}
    for i in null_rows:
        assert errors[id(records[i])].startswith(
            'null value in column "prediction" of relation "predictions" violates not-null '
            "constraint DETAIL: Failing row contains ("
        )
    for i in duplicate_rows:
        key = records[i]["item_key"]
        assert errors[id(records[i])] == (
            "duplicate key value violates unique constraint "
            '"uq_predictions_model_run_id_item_key" '
            f"DETAIL: Key (model_run_id, item_key)=({run_id}, {key}) already exists."
        )
    assert errors[id(records[COPY_ROWS + 6])] == ("value too long for type character varying(255)")
    assert "not JSON serializable" in errors[id(records[2 * COPY_ROWS])]
    assert not [e for e in errors.values() if "COPY" in e]  # the INSERT's message, as before
    with get_sessionmaker(pg_schema_url)() as fresh:
        stored = list(fresh.scalars(select(Prediction.item_key).order_by(Prediction.id)))
    assert stored == [r["item_key"] for r in successful]


def test_the_messages_are_the_ones_the_insert_path_gives(pg_db: Session, pg_engine: Engine):
    run_id = new_run(pg_db)
    records = rows(run_id, 50)
    records[10]["item_key"] = records[9]["item_key"]
    records[20]["item_key"] = "k" * 300
    _, by_copy = safe_bulk_insert(pg_db, Prediction, records)
    pg_db.execute(text("TRUNCATE predictions"))
    pg_db.commit()
    # Instances always take the INSERT path (an ORM flush), as dicts did before COPY.
    _, by_insert = safe_bulk_insert(pg_db, Prediction, [Prediction(**r) for r in records])
    assert [error for _, error in by_copy] == [error for _, error in by_insert]
    assert len(by_copy) == 2


class _Things(DeclarativeBase):
    pass


def _label(context: Any) -> str:
    return "label of " + context.get_current_parameters()["name_text"]


class Thing(_Things):
    """Every kind of column the COPY path has to get right."""

    __tablename__ = "taskkit_test_copy_things"
    id: Mapped[int] = mapped_column(primary_key=True)  # serial: the server's
    name: Mapped[str] = mapped_column("name_text", String(80), unique=True)  # renamed
    payload: Mapped[Any] = mapped_column(Json, nullable=True)
    tags: Mapped[Any] = mapped_column(Json, default=list)  # a callable default
    status: Mapped[str] = mapped_column(String(20), default="new")  # a scalar default
    label: Mapped[str] = mapped_column(String(120), default=_label)  # context-sensitive
    seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    note: Mapped[str] = mapped_column(Text, server_default="from the server")


@pytest.fixture
def things(pg_engine: Engine, pg_db: Session):
    _Things.metadata.create_all(pg_engine)
    yield
    pg_db.close()  # its transaction would hold a lock on the table
    _Things.metadata.drop_all(pg_engine)


PAYLOADS: list[Any] = [
    {"nested": {"list": [1, 2.5, None, True], "empty": {}}, "text": "tab\there\nnew line"},
    ["back\\slash", "\\N", "quote \" and ' and é ☃", ""],
    "a JSON string",
    42,
    None,  # SQL NULL (none_as_null)
]


def test_json_and_defaults_round_trip(pg_db: Session, pg_engine: Engine, things: None):
    naive = datetime(2026, 1, 2, 3, 4, 5)
    records: list[dict[str, Any]] = [
        {"name": f"thing {i}\twith a tab", "payload": payload, "seen_at": naive}
        for i, payload in enumerate(PAYLOADS)
    ]
    records.append(
        {"name": "all given", "payload": {}, "tags": ["x"], "status": "old", "label": "mine"}
        | {"note": "mine", "seen_at": None}
    )
    with Inserts(pg_engine) as inserts:
        successful, failed = safe_bulk_insert(pg_db, Thing, records)
    assert (len(successful), failed, inserts.count) == (len(records), [], 0)

    stored = pg_db.scalars(select(Thing).order_by(Thing.id)).all()
    assert [t.payload for t in stored] == [*PAYLOADS, {}]
    assert pg_db.scalar(select(func.count()).where(Thing.payload.is_(None))) == 1  # SQL NULL
    first = stored[0]
    assert (first.name, first.tags, first.status, first.label, first.note) == (
        "thing 0\twith a tab",
        [],
        "new",
        "label of thing 0\twith a tab",
        "from the server",
    )
    assert first.seen_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    last = stored[-1]
    assert (last.tags, last.status, last.label, last.note, last.seen_at) == (
        ["x"],
        "old",
        "mine",
        "mine",
        None,
    )


def test_records_with_different_columns_each_get_their_defaults(
    pg_db: Session, pg_engine: Engine, things: None
):
    records = [{"name": "a"}, {"name": "b", "status": "given"}, {"name": "c"}, {"name": "a"}]
    with Inserts(pg_engine) as inserts:
        successful, failed = safe_bulk_insert(pg_db, Thing, records)
    assert successful == records[:3]
    assert [r for r, _ in failed] == [records[3]]
    assert inserts.count == 1
    assert [(t.name, t.status) for t in pg_db.scalars(select(Thing).order_by(Thing.id))] == [
        ("a", "new"),
        ("b", "given"),
        ("c", "new"),
    ]


def test_a_foreign_key_violation_names_no_row_and_is_bisected(pg_db: Session, pg_engine: Engine):
    run_id = new_run(pg_db)
    records = rows(run_id, 300)
    records[123]["model_run_id"] = run_id + 1000  # checked at the end of the COPY
    with Inserts(pg_engine) as inserts:
        successful, failed = safe_bulk_insert(pg_db, Prediction, records, batch_size=100)
    assert len(successful) == 299
    assert [r for r, _ in failed] == [records[123]]
    assert "foreign key constraint" in failed[0][1]
    assert 3 < inserts.count <= 3 + 2 * 7  # the batches of 100, then bisection of one


class _Killer(DeclarativeBase):
    pass


class KillingText(TypeDecorator[str]):
    """Terminates the session's backend when it binds the value "kill" (mid-COPY)."""

    impl = String(50)
    cache_ok = True
    admin: Engine | None = None
    pid = 0

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value == "kill" and KillingText.admin is not None:
            with KillingText.admin.connect() as admin:
                admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": KillingText.pid})
        return value


class Fragile(_Killer):
    __tablename__ = "taskkit_test_copy_fragile"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[str] = mapped_column(KillingText())


def test_a_connection_lost_mid_copy_is_not_a_bad_record_and_nothing_is_committed(
    pg_db: Session, pg_engine: Engine, pg_schema_url: str
):
    _Killer.metadata.create_all(pg_engine)
    try:
        KillingText.admin = pg_engine
        KillingText.pid = pg_db.execute(text("SELECT pg_backend_pid()")).scalar_one()
        records = [{"value": f"v{i}"} for i in range(COPY_ROWS + 500)]
        records[COPY_ROWS + 100]["value"] = "kill"  # the second COPY; the first went in
        with pytest.raises(OperationalError):
            safe_bulk_insert(pg_db, Fragile, records)
        pg_db.rollback()
        with get_sessionmaker(pg_schema_url)() as fresh:
            assert fresh.scalar(select(func.count()).select_from(Fragile)) == 0
    finally:
        KillingText.admin = None
        _Killer.metadata.drop_all(pg_engine)


class _Expr(DeclarativeBase):
    pass


class Stamped(_Expr):
    __tablename__ = "taskkit_test_copy_stamped"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey(ModelRun.id), nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=func.now())


def test_a_sql_expression_default_takes_the_insert_path(pg_db: Session, pg_engine: Engine):
    _Expr.metadata.create_all(pg_engine, tables=[Stamped.__table__])
    try:
        with Inserts(pg_engine) as inserts:
            successful, failed = safe_bulk_insert(pg_db, Stamped, [{"run_id": None}] * 5)
        assert (len(successful), failed, inserts.count) == (5, [], 1)
        assert pg_db.scalar(select(func.count()).where(Stamped.at.is_not(None))) == 5
    finally:
        pg_db.rollback()
        _Expr.metadata.drop_all(pg_engine, tables=[Stamped.__table__])


def test_sqlite_keeps_the_insert_path(sqlite_url: str):
    engine = get_engine(sqlite_url)
    try:
        with Session(engine) as db:
            run_id = new_run(db)
            records = rows(run_id, 1000)
            records[500]["prediction"] = None
            with Inserts(engine) as inserts:
                successful, failed = safe_bulk_insert(db, Prediction, records, batch_size=100)
        assert (len(successful), [r for r, _ in failed]) == (999, [records[500]])
        assert inserts.count >= 10  # a bulk INSERT per batch of 100, then bisection
        assert "NOT NULL constraint failed: predictions.prediction" in failed[0][1]
    finally:
        empty_tables(engine)


@pytest.fixture
def copied(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of rows of each COPY that ``safe_bulk_insert`` sends, in order."""
    from taskkit.db import _copy

    sizes: list[int] = []
    real_copy = _copy.Copier.copy

    def counting(self: Any, rows: Any) -> None:
        sizes.append(len(rows))
        real_copy(self, rows)

    monkeypatch.setattr(_copy.Copier, "copy", counting)
    return sizes


def test_rows_known_to_fail_are_sent_alone_without_a_failed_copy(pg_db: Session, copied: list[int]):
    """A row that gives None to a NOT NULL column, or repeats an earlier row's unique key in
    its chunk, is split off before the chunk's COPY: the rows around it are copied once each
    (no COPY fails on it, none is copied again), and it fails alone with PostgreSQL's message,
    in its place in the input order."""
    run_id = new_run(pg_db)
    records = rows(run_id, 1000)
    nulls, repeated = (0, 500, 501, 999), 250
    for i in nulls:
        records[i]["prediction"] = None
    records[repeated]["item_key"] = records[repeated - 1]["item_key"]
    # NULLs never repeat a unique key: both of these land.
    records[600]["item_key"] = records[601]["item_key"] = None

    successful, failed = safe_bulk_insert(pg_db, Prediction, records)

    assert copied == [249, 249, 497]  # 1-249, 251-499 and 502-998: nothing copied twice
    bad = sorted((*nulls, repeated))
    assert [id(record) for record, _ in failed] == [id(records[i]) for i in bad]
    errors = {id(record): error for record, error in failed}
    for i in nulls:
        assert errors[id(records[i])].startswith(
            'null value in column "prediction" of relation "predictions"'
        )
    assert errors[id(records[repeated])].startswith(
        'duplicate key value violates unique constraint "uq_predictions_model_run_id_item_key"'
    )
    assert [id(r) for r in successful] == [id(r) for i, r in enumerate(records) if i not in bad]


def test_copies_grow_with_the_clean_run_and_shrink_after_a_failure(
    pg_db: Session, copied: list[int]
):
    """A COPY holds a quarter of the rows copied since the last COPY that failed (at least
    COPY_ROWS, at most COPY_ROWS_MAX, and what is left of the records batched with it); a COPY
    that fails on a row no scan could see (a key already in the table) starts the count again,
    so the rows before that row are copied again in COPYs of COPY_ROWS."""
    from taskkit.db._bulk import COPY_ROWS_MAX

    assert (COPY_ROWS, COPY_ROWS_MAX) == (2000, 16000)  # the numbers below
    run_id = new_run(pg_db)
    clean = rows(run_id, 2 * COPY_ROWS_MAX)
    successful, failed = safe_bulk_insert(pg_db, Prediction, clean)
    assert (len(successful), failed) == (len(clean), [])
    # Records go to the COPYs 16,000 at a time: 10,000 in five COPYs of 2,000, then a quarter
    # of the rows copied so far (2,500 and 3,125), the 375 left; 4,000, 5,000, 6,250, 750.
    assert copied == [*[2000] * 5, 2500, 3125, 375, 4000, 5000, 6250, 750]

    copied.clear()
    records = rows(run_id, 10 * COPY_ROWS)
    for record in records:
        record["item_key"] = "new-" + record["item_key"]
    bad = 11_000  # in the sixth COPY (rows 10,000 to 12,499)
    records[bad]["item_key"] = clean[0]["item_key"]  # stored by the first call
    successful, failed = safe_bulk_insert(pg_db, Prediction, records)
    assert [id(record) for record, _ in failed] == [id(records[bad])]
    assert failed[0][1].startswith("duplicate key value violates unique constraint")
    assert len(successful) == len(records) - 1
    assert copied == [
        *[2000] * 5,  # rows 0 to 9,999
        2500,  # 10,000 to 12,499: fails on row 11,000
        1000,  # 10,000 to 10,999 again (the bad row then goes alone, as an INSERT)
        1499,  # 11,001 to 12,499
        2000,  # 12,500 to 14,499: a quarter of the 2,499 copied since the failure is less
        1500,  # 14,500 to 15,999, the rest of the first 16,000 records
        2000,  # the last 4,000
        2000,
    ]


def test_a_foreign_key_violation_in_a_grown_copy_is_bisected_in_a_small_one(
    pg_db: Session, pg_engine: Engine, copied: list[int]
):
    """A failure that names no row, in a COPY grown past COPY_ROWS, sends that COPY's rows
    again as COPYs of COPY_ROWS; only the one that fails is bisected by INSERTs."""
    run_id = new_run(pg_db)
    records = rows(run_id, 7 * COPY_ROWS)
    bad = 11_000  # in the sixth COPY (rows 10,000 to 12,499)
    records[bad]["model_run_id"] = run_id + 1000  # checked at the end of the COPY
    with Inserts(pg_engine) as inserts:
        successful, failed = safe_bulk_insert(pg_db, Prediction, records, batch_size=100)
    assert [id(record) for record, _ in failed] == [id(records[bad])]
    assert "foreign key constraint" in failed[0][1]
    assert len(successful) == len(records) - 1
    assert copied == [
        *[2000] * 5,  # rows 0 to 9,999
        2500,  # 10,000 to 12,499: fails, naming no row
        2000,  # 10,000 to 11,999: fails again, and is bisected by INSERTs
        500,  # 12,000 to 12,499
        1500,  # 12,500 to 13,999
    ]
    assert COPY_ROWS // 100 < inserts.count <= COPY_ROWS // 100 + 2 * 7


def test_rows_repeating_a_unique_key_in_their_chunk_are_found():
    """The scan that splits rows off a COPY: a later row repeating an earlier one's values for
    a unique key (NULLs never repeat; a row without the key's columns, or with a value Python
    cannot hash, is left to the database), whether or not the chunk has any repeat."""
    from taskkit.db._bulk import _repeated_in_unique

    unique = [["id"], ["run", "key"]]
    clean = [{"run": 1, "key": f"k{i}"} for i in range(5)]
    assert _repeated_in_unique(clean, unique) == []
    chunk = [
        {"run": 1, "key": "a"},
        {"run": 1, "key": "b", "id": 7},
        {"run": 1, "key": "a"},  # repeats row 0
        {"run": None, "key": "a"},
        {"run": None, "key": "a"},  # a NULL: not a repeat
        {"run": 2, "key": ["a"]},  # cannot be hashed: the database decides
        {"run": 2, "key": ["a"]},
        {"key": "b"},  # no "run": the database decides
        {"run": 3, "key": "c", "id": 7},  # repeats row 1's id
    ]
    assert sorted(_repeated_in_unique(chunk, unique)) == [2, 8]
