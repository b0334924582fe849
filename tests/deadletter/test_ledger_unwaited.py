"""The ledger's round trips not waited for (issue 18), on PostgreSQL with psycopg inside ``with``.

``ItemLedger.probe``: a chunk's position looked up before its keys are known, so that a first
delivery's claim is sent without waiting for its answer. A redelivery, a chunk claimed with no
position, or a batch with per-item rows is still found and waited for; a claim whose answer
failed is made again by the next write; a delivery that claimed the chunk between the probe and
the claim is fenced out and its flags are kept.

A durable write sent without waiting (``finish(wait=False)``) and ``settle``: the write is
finished only once its answer says it landed, or it has been written again; a write the fence
refused raises ``LeaseLost`` at ``settle``; the end of the ``with`` block settles, unless the
block raised (``BatchTask`` builds its summary during its end's round trip)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Engine, exc, select, text

from taskkit.db.models import BatchChunk
from taskkit.deadletter import ItemLedger, _ledger
from taskkit.deadletter._ledger import (
    _KEPT,
    _PROBE_LIMIT,
    _PROBE_SQL,
    _RUN,
    _RUN_LIMIT,
    _keys_json,
    _Raw,
    _set_flags,
    statement_hooks,
)
from taskkit.errors import LeaseLost
from tests.deadletter.test_ledger import dead, rows

KEYS = [f"key-{i}" for i in range(20)]


@pytest.fixture
def batch_id() -> str:
    return f"batch-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def sent(pg_engine: Engine) -> Iterator[list[str]]:
    """The first words of each statement the ledger sends on its raw path."""
    statements: list[str] = []

    def note(engine: Engine, statement: str) -> None:
        if engine is pg_engine:
            statements.append(" ".join(statement.split()[:2]))

    statement_hooks.append(note)
    yield statements
    statement_hooks.remove(note)


def statuses(engine: Engine, batch_id: str) -> dict[str, str]:
    return {key: status for key, (status, _) in rows(engine, batch_id).items()}


def chunk_row(engine: Engine, batch_id: str) -> tuple[int | None, int]:
    """(position, claims) of the batch's only chunk."""
    with engine.connect() as connection:
        position, claims = connection.execute(
            select(BatchChunk.position, BatchChunk.claims).where(BatchChunk.batch_id == batch_id)
        ).one()
    return position, claims


def claim_pending() -> bool:
    return _KEPT.raw is not None and _KEPT.raw.pending is not None


def test_a_first_delivery_sends_its_claim_without_waiting(
    pg_engine: Engine, batch_id: str, sent: list[str]
):
    with ItemLedger(batch_id, pg_engine) as ledger:
        ledger.probe(40)
        assert ledger.claim(KEYS, durable=False, fenced=True, position=40) == {}
        assert claim_pending()  # the claim's answer is read by the next statement
        ledger.finish(done_at=range(10), durable=False, wait=False)
        ledger.finish(done_at=range(10, 15))
    assert sent == ["SELECT chunk", "INSERT INTO", "UPDATE batch_chunks", "UPDATE batch_chunks"]
    assert statuses(pg_engine, batch_id) == {
        **dict.fromkeys(KEYS[:15], "done"),
        **dict.fromkeys(KEYS[15:], "claimed"),
    }
    assert chunk_row(pg_engine, batch_id) == (40, 1)


def test_a_redelivery_is_found_by_its_probe_and_skips_what_was_done(
    pg_engine: Engine, batch_id: str, sent: list[str]
):
    with ItemLedger(batch_id, pg_engine) as first:
        first.probe(0)
        first.claim(KEYS, durable=False, position=0)
        first.finish(done=KEYS[:3])
    with ItemLedger(batch_id, pg_engine) as again:
        again.probe(0)
        assert again.claim(KEYS, durable=False, position=0) == dict.fromkeys(KEYS[:3], "done")
        assert not claim_pending()  # waited for: its answer said what to skip
    assert chunk_row(pg_engine, batch_id) == (0, 2)


def test_a_chunk_claimed_without_a_position_is_found_and_given_one(
    pg_engine: Engine, batch_id: str
):
    """A chunk claimed before migration 0013 (or by a caller naming no position)."""
    ItemLedger(batch_id, pg_engine).claim(KEYS)
    ItemLedger(batch_id, pg_engine).finish(done=KEYS[:2])
    assert chunk_row(pg_engine, batch_id) == (None, 1)
    with ItemLedger(batch_id, pg_engine) as again:
        again.probe(7)
        assert again.claim(KEYS, durable=False, position=7) == dict.fromkeys(KEYS[:2], "done")
    assert chunk_row(pg_engine, batch_id) == (7, 2)


def test_a_batch_id_reused_with_other_items_runs_them_all_without_waiting(
    pg_engine: Engine, batch_id: str
):
    """A "nightly" batch id: another chunk at the same position is not this one."""
    with ItemLedger(batch_id, pg_engine) as yesterday:
        yesterday.probe(0)
        yesterday.claim(KEYS, durable=False, position=0)
        yesterday.finish(done=KEYS)
    today_keys = [f"today-{i}" for i in range(20)]
    with ItemLedger(batch_id, pg_engine) as today:
        today.probe(0)
        assert today.claim(today_keys, durable=False, position=0) == {}
        assert claim_pending()
        today.finish(done=today_keys[:1])
    found = statuses(pg_engine, batch_id)
    assert [found[key] for key in today_keys[:2]] == ["done", "claimed"]
    assert all(found[key] == "done" for key in KEYS)


def test_a_probe_that_finds_per_item_rows_leaves_the_claim_to_move_them(
    pg_engine: Engine, batch_id: str
):
    ItemLedger(batch_id, pg_engine).finish(done=KEYS[:2])  # loose keys: a row each
    with ItemLedger(batch_id, pg_engine) as ledger:
        ledger.probe(0)
        assert ledger.claim(KEYS, durable=False, position=0) == dict.fromkeys(KEYS[:2], "done")
        assert not claim_pending()
        ledger.finish(done=KEYS[2:])
    assert statuses(pg_engine, batch_id) == dict.fromkeys(KEYS, "done")


def test_a_probe_of_another_position_or_a_durable_claim_waits(pg_engine: Engine, batch_id: str):
    with ItemLedger(batch_id, pg_engine) as ledger:
        ledger.probe(0)
        ledger.claim(KEYS, durable=False, position=1000)
        assert not claim_pending()
    with ItemLedger(batch_id + "-d", pg_engine) as durable:
        durable.probe(0)
        durable.claim(KEYS, position=0)  # a durable claim is on disk when it returns
        assert not claim_pending()


def test_a_probe_does_nothing_outside_with_or_on_sqlite(engine: Engine, batch_id: str):
    ledger = ItemLedger(batch_id, engine)
    ledger.probe(0)
    assert ledger.claim(KEYS, durable=False, position=0) == {}
    ledger.finish(done=KEYS[:1])
    with ItemLedger(batch_id + "-w", engine) as held:
        held.probe(0)
        held.claim(KEYS, durable=False, position=0)
        if engine.dialect.name == "sqlite":
            assert not claim_pending()
        held.finish(done=KEYS[:1])
    assert statuses(engine, batch_id)[KEYS[0]] == "done"
    assert statuses(engine, batch_id + "-w")[KEYS[0]] == "done"


def test_a_claim_whose_answer_failed_is_made_again_by_the_next_write(
    pg_engine: Engine, batch_id: str, sent: list[str]
):
    backend = _kept_backend(pg_engine, batch_id)
    kept = _KEPT.connection
    with ItemLedger(batch_id, pg_engine) as ledger:
        ledger.probe(0)
        with _claim_lost(pg_engine, batch_id, backend):
            assert ledger.claim(KEYS, durable=False, position=0) == {}
        ledger.finish(done_at=[0, 1])  # claims again, on a new connection, then writes
        assert _KEPT.connection is not kept
    # The opener's claim, the probe, the claim that failed, the claim again, the write.
    assert sent == [
        "INSERT INTO",
        "SELECT chunk",
        "INSERT INTO",
        "INSERT INTO",
        "UPDATE batch_chunks",
    ]
    assert statuses(pg_engine, batch_id) == {
        **dict.fromkeys(KEYS[:2], "done"),
        **dict.fromkeys(KEYS[2:], "claimed"),
    }
    assert chunk_row(pg_engine, batch_id) == (0, 1)


def _kept_backend(engine: Engine, batch_id: str) -> int:
    """The server process of the thread's kept connection (opened by a chunk of its own)."""
    with ItemLedger(batch_id + "-o", engine) as opener:
        opener.claim(["other"], durable=False)
    assert _KEPT.connection is not None
    return int(_KEPT.connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


@contextmanager
def _claim_lost(engine: Engine, batch_id: str, backend: int) -> Iterator[None]:
    """The claim sent in the block fails: its insert waits for a row this holds, uncommitted,
    while its connection is terminated; then the row is rolled back (it never existed)."""
    with engine.connect() as locker:
        locker.execute(
            text(
                "INSERT INTO batch_chunks (batch_id, chunk, keys, size, done, dead, claims, "
                "updated_at) VALUES (:b, :c, '[]', 0, '', '', 1, now())"
            ),
            {"b": batch_id, "c": hashlib.sha256(_keys_json(KEYS).encode()).hexdigest()},
        )
        yield
        with engine.connect() as other:
            other.exec_driver_sql(f"SELECT pg_terminate_backend({backend})")
        locker.rollback()


class TimeLimit(Exception):
    """What Celery's soft time limit raises inside the task, wherever it is."""


def test_a_fenced_claim_made_again_stays_fenced_when_the_first_attempt_fails(
    pg_engine: Engine, batch_id: str, monkeypatch: pytest.MonkeyPatch
):
    """The claim's answer is an error, and claiming again fails too (the server still down):
    no write goes out without the claim's count; the next one claims first."""
    backend = _kept_backend(pg_engine, batch_id)
    with ItemLedger(batch_id, pg_engine) as ledger:
        ledger.probe(0)
        with _claim_lost(pg_engine, batch_id, backend):
            assert ledger.claim(KEYS, durable=False, fenced=True, position=0) == {}
        with monkeypatch.context() as patched:
            patched.setattr(ItemLedger, "_claim_raw", _fails_once(ItemLedger._claim_raw))
            with pytest.raises(RuntimeError, match="still down"):
                ledger.finish(done_at=[0], durable=False)
        # What raised is sent again (BatchTask keeps a failed flush's items for the next one).
        ledger.finish(done_at=[0, 1], durable=False)  # claims first, then writes, fenced
        ItemLedger(batch_id, pg_engine).claim(KEYS, fenced=True)  # another takes it over
        with pytest.raises(LeaseLost):
            ledger.finish(done_at=[2])
    assert statuses(pg_engine, batch_id) == {
        **dict.fromkeys(KEYS[:2], "done"),
        **dict.fromkeys(KEYS[2:], "claimed"),
    }


def test_a_claim_whose_answer_was_never_read_is_made_again_by_the_next_write(
    pg_engine: Engine, batch_id: str, sent: list[str], monkeypatch: pytest.MonkeyPatch
):
    """A time limit while reading the claim's answer: the connection is dropped unread, and the
    delivery's next write claims again (fenced) before it writes."""
    with ItemLedger(batch_id, pg_engine) as ledger:
        ledger.probe(0)
        ledger.claim(KEYS, durable=False, fenced=True, position=0)
        with monkeypatch.context() as patched:
            patched.setattr(_Raw, "_answer", _raises(TimeLimit("soft time limit exceeded")))
            with pytest.raises(TimeLimit):
                ledger.finish(done_at=[0], durable=False)
        assert _KEPT.connection is None  # dropped with the answer in flight
        ledger.finish(done_at=[0, 1], durable=False)
        ItemLedger(batch_id, pg_engine).claim(KEYS, fenced=True)
        with pytest.raises(LeaseLost):
            ledger.finish(done_at=[2])
    assert sent[:4] == ["SELECT chunk", "INSERT INTO", "INSERT INTO", "UPDATE batch_chunks"]
    assert statuses(pg_engine, batch_id) == {
        **dict.fromkeys(KEYS[:2], "done"),
        **dict.fromkeys(KEYS[2:], "claimed"),
    }


def test_a_probe_that_cannot_connect_is_forgotten_and_the_claim_waits(
    pg_engine: Engine, batch_id: str, monkeypatch: pytest.MonkeyPatch
):
    with ItemLedger(batch_id, pg_engine) as ledger:
        with monkeypatch.context() as patched:
            patched.setattr(_ledger, "_kept_raw", _raises(_error()))
            ledger.probe(0)
        assert ledger.claim(KEYS, durable=False, position=0) == {}
        assert not claim_pending()
        ledger.finish(done=KEYS[:1])
    assert statuses(pg_engine, batch_id)[KEYS[0]] == "done"


def test_a_probe_of_a_batch_with_too_many_unplaced_chunks_leaves_the_claim_to_wait(
    pg_engine: Engine, batch_id: str
):
    with pg_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO batch_chunks (batch_id, chunk, keys, size, done, dead, claims, "
                "updated_at) SELECT :b, md5(i::text), '[]', 0, '', '', 1, now() "
                "FROM generate_series(1, :n) AS i"
            ),
            {"b": batch_id, "n": _PROBE_LIMIT},
        )
    with ItemLedger(batch_id, pg_engine) as ledger:
        ledger.probe(0)
        ledger.claim(KEYS, durable=False, position=0)
        assert not claim_pending()


def test_runs_of_positions_beyond_the_cached_run_are_set_one_by_one():
    flags = bytearray(b"0" * (_RUN_LIMIT + 10))
    _set_flags(flags, list(range(_RUN_LIMIT - 5, _RUN_LIMIT + 5)))
    _set_flags(flags, [0, 5, 2])
    assert flags.count(b"1") == 13
    assert flags[_RUN_LIMIT - 5 : _RUN_LIMIT + 5] == b"1" * 10
    assert len(_RUN[0]) <= _RUN_LIMIT


def _error() -> exc.OperationalError:
    return exc.OperationalError("SELECT", {}, Exception("server closed the connection"))


def _raises(error: BaseException) -> Any:
    def raising(*args: Any, **kwargs: Any) -> Any:
        raise error

    return raising


def _fails_once(method: Any) -> Any:
    calls = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the server is still down")
        return method(*args, **kwargs)

    return failing


def test_a_delivery_that_claimed_between_probe_and_claim_is_fenced_out_and_its_flags_kept(
    pg_engine: Engine, batch_id: str
):
    """Two deliveries at once (no lease to keep them apart): the later claim wins, as when both
    wait for their claims; the earlier one's finished items are not lost."""
    with ItemLedger(batch_id, pg_engine) as late:
        late.probe(0)  # finds nothing: the other delivery has not claimed yet
        early = ItemLedger(batch_id, pg_engine)
        early.claim(KEYS, fenced=True)
        early.finish(done=KEYS[:1])
        assert late.claim(KEYS, durable=False, fenced=True, position=0) == {}
        late.finish(done_at=[1])  # reads its claim's answer first: claim 2, the fence
        with pytest.raises(LeaseLost):
            early.finish(done=KEYS[2:3])
        ItemLedger(batch_id, pg_engine).claim(KEYS, fenced=True)  # a third takes it over
        with pytest.raises(LeaseLost):
            late.finish(done_at=[3])
    assert statuses(pg_engine, batch_id) == {
        **dict.fromkeys(KEYS[:2], "done"),
        **dict.fromkeys(KEYS[2:], "claimed"),
    }
    assert chunk_row(pg_engine, batch_id) == (0, 3)


def test_the_probe_reads_the_position_index(pg_engine: Engine, batch_id: str):
    """Its generic plan (the raw path runs it prepared), in a batch of 5,000 chunks."""
    with pg_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO batch_chunks (batch_id, chunk, keys, size, done, dead, claims, "
                "updated_at, position) SELECT :b, md5(i::text), '[]', 0, '', '', 1, now(), i "
                "FROM generate_series(1, 5000) AS i"
            ),
            {"b": batch_id},
        )
        connection.exec_driver_sql("ANALYZE batch_chunks")
        connection.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
        connection.exec_driver_sql(f"PREPARE probe_plan AS {_PROBE_SQL}")
        plan = "\n".join(
            connection.exec_driver_sql(f"EXPLAIN EXECUTE probe_plan('{batch_id}', 3)").scalars()
        )
        connection.exec_driver_sql("DEALLOCATE probe_plan")
    assert "ix_batch_chunks_batch_id_position" in plan, plan


# -- durable writes sent without waiting, and settle --------------------------------------------


def durable_pending() -> bool:
    return _KEPT.raw is not None and _KEPT.raw.pending is not None


def test_a_durable_write_sent_without_waiting_is_settled_by_its_answer(
    pg_engine: Engine, batch_id: str, sent: list[str]
):
    with ItemLedger(batch_id, pg_engine) as ledger:
        ledger.claim(KEYS, durable=False)
        ledger.finish(done_at=range(4), wait=False)
        assert durable_pending()
        ledger.settle()
        assert not durable_pending()
        ledger.settle()  # nothing left to settle: no statement
    assert sent == ["INSERT INTO", "UPDATE batch_chunks"]
    assert statuses(pg_engine, batch_id) == {
        **dict.fromkeys(KEYS[:4], "done"),
        **dict.fromkeys(KEYS[4:], "claimed"),
    }


def test_the_end_of_the_block_settles(pg_engine: Engine, batch_id: str):
    with ItemLedger(batch_id, pg_engine) as ledger:
        ledger.claim(KEYS, durable=False)
        ledger.finish(done_at=range(len(KEYS)), wait=False)
    assert not durable_pending()
    assert statuses(pg_engine, batch_id) == dict.fromkeys(KEYS, "done")


def test_a_durable_write_the_fence_refused_raises_at_settle(pg_engine: Engine, batch_id: str):
    with pytest.raises(LeaseLost), ItemLedger(batch_id, pg_engine) as stale:
        stale.claim(KEYS, durable=False, fenced=True)
        ItemLedger(batch_id, pg_engine).claim(KEYS, fenced=True)  # a newer delivery
        stale.finish(done_at=[0], wait=False)  # refused where it lands; answered later
        stale.settle()
    assert statuses(pg_engine, batch_id) == dict.fromkeys(KEYS, "claimed")


def test_a_refused_end_of_dead_items_alone_raises_at_settle(pg_engine: Engine, batch_id: str):
    """A chunk whose items all failed, its letters not recorded (``dead_letter=False``): the
    end carries dead flags only, and is still settled."""
    with pytest.raises(LeaseLost), ItemLedger(batch_id, pg_engine) as stale:
        stale.claim(KEYS, durable=False, fenced=True)
        ItemLedger(batch_id, pg_engine).claim(KEYS, fenced=True)
        stale.finish(dead=dead(batch_id, *KEYS), record=False, wait=False)
    assert statuses(pg_engine, batch_id) == dict.fromkeys(KEYS, "claimed")


def test_an_end_that_did_not_land_is_tried_again_by_the_block_end(pg_engine: Engine, batch_id: str):
    """``settle`` raised inside the block and the caller went on: the end of the block tries
    again, and raises again, rather than take the write for landed."""
    with pytest.raises(LeaseLost), ItemLedger(batch_id, pg_engine) as stale:
        stale.claim(KEYS, durable=False, fenced=True)
        ItemLedger(batch_id, pg_engine).claim(KEYS, fenced=True)
        stale.finish(done_at=[0], wait=False)
        with pytest.raises(LeaseLost):
            stale.settle()


def test_a_block_that_raised_does_not_settle_over_its_error(pg_engine: Engine, batch_id: str):
    """Its own error goes on; the refused write's ``LeaseLost`` does not replace it."""
    with pytest.raises(KeyError), ItemLedger(batch_id, pg_engine) as stale:
        stale.claim(KEYS, durable=False, fenced=True)
        ItemLedger(batch_id, pg_engine).claim(KEYS, fenced=True)
        stale.finish(done_at=[0], wait=False)
        raise KeyError("the caller's own error")
    assert not durable_pending()  # its answer was read and dropped


def test_a_durable_write_that_failed_unanswered_is_written_again_by_settle(
    pg_engine: Engine, batch_id: str, sent: list[str]
):
    with ItemLedger(batch_id, pg_engine) as ledger:
        ledger.claim(KEYS, durable=False)
        kept = _KEPT.connection
        assert kept is not None
        backend = kept.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with pg_engine.connect() as locker:  # the write waits for this row lock...
            locker.execute(
                text("SELECT 1 FROM batch_chunks WHERE batch_id = :b FOR UPDATE"), {"b": batch_id}
            )
            ledger.finish(done_at=[0, 1], wait=False)
            with pg_engine.connect() as other:  # ...and its connection is dropped meanwhile
                other.exec_driver_sql(f"SELECT pg_terminate_backend({int(backend)})")
            locker.rollback()
        ledger.settle()  # written again, waited for, on a new connection
        assert _KEPT.connection is not kept
    assert sent == ["INSERT INTO", "UPDATE batch_chunks", "UPDATE batch_chunks"]
    assert statuses(pg_engine, batch_id) == {
        **dict.fromkeys(KEYS[:2], "done"),
        **dict.fromkeys(KEYS[2:], "claimed"),
    }


def test_a_waited_durable_write_after_one_unanswered_settles_both(
    pg_engine: Engine, batch_id: str, sent: list[str]
):
    with ItemLedger(batch_id, pg_engine) as ledger:
        ledger.claim(KEYS, durable=False)
        ledger.finish(done_at=[0], wait=False)
        ledger.finish(done_at=[1])  # reads the first's answer, then writes every flag
        ledger.settle()
    assert sent == ["INSERT INTO", "UPDATE batch_chunks", "UPDATE batch_chunks"]
    assert statuses(pg_engine, batch_id)[KEYS[1]] == "done"


def test_elsewhere_a_write_asked_not_to_wait_waits(engine: Engine, batch_id: str):
    ledger = ItemLedger(batch_id, engine)
    ledger.claim(KEYS)
    ledger.finish(done_at=[0], wait=False)
    assert statuses(engine, batch_id)[KEYS[0]] == "done"
    with ItemLedger(batch_id + "-s", engine) as held:
        held.claim(KEYS)
        held.finish(done_at=[0], wait=False)
        if engine.dialect.name == "sqlite":
            assert statuses(engine, batch_id + "-s")[KEYS[0]] == "done"
