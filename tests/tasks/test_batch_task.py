"""BatchTask in process, on SQLite and PostgreSQL: per-item retry, the item ledger, dead letters,
keys, submit_batch. Worker subprocesses, SIGKILL and replay through a broker are in
tests/batch/test_batch_worker.py."""

from __future__ import annotations

import contextlib
import itertools
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pytest
from celery.app.task import Context
from celery.result import GroupResult
from sqlalchemy import Engine, func, select

from taskkit.config import Settings
from taskkit.db.models import Batch, BatchItem, DeadLetter
from taskkit.deadletter import DeadLetterStore, ItemLedger, batch_progress
from taskkit.errors import ConfigurationError
from taskkit.tasks import (
    BatchSubmission,
    BatchTask,
    ResilientTask,
    TaskFailure,
    create_app,
    submit_batch,
)
from taskkit.tasks._batch import _SeenKeys

app = create_app(
    "tkbatchunit",
    settings=Settings(broker_url="memory://", result_backend="cache+memory://"),
    task_always_eager=True,
)

calls: Counter[Any] = Counter()
#: Items that always fail, fail once, or fail with a permanent error.
ALWAYS, ONCE, PERMANENT = {3, 13}, {5, 15}, {7}


class Crash(BaseException):
    """What a worker dying looks like from inside: nothing catches it."""


crash_at: list[int] = []


@app.task(
    base=BatchTask,
    bind=True,
    shared=False,
    name="tkbatchunit.items",
    item_delay=0,
    ledger_flush_every=4,
)
def items_task(self: BatchTask, item: int) -> int:
    calls[item] += 1
    if crash_at and item == crash_at[0]:
        crash_at.clear()
        raise Crash()
    if item in ALWAYS:
        raise RuntimeError(f"item {item} is broken")
    if item in ONCE and calls[item] == 1:
        raise ConnectionError("flaky")
    if item in PERMANENT:
        raise ValueError(f"item {item} is invalid")
    return item * 2


@app.task(
    base=BatchTask,
    bind=True,
    shared=False,
    name="tkbatchunit.records",
    item_key="sku",
    item_delay=0,
)
def records_task(self: BatchTask, item: dict[str, Any]) -> None:
    calls[item["sku"]] += 1


@app.task(
    base=BatchTask,
    bind=True,
    shared=False,
    name="tkbatchunit.no_ledger",
    ledger=False,
    item_delay=0,
)
def no_ledger_task(self: BatchTask, item: int) -> None:
    calls[item] += 1
    if item in ALWAYS:
        raise RuntimeError("broken")


@app.task(base=BatchTask, bind=True, shared=False, name="tkbatchunit.free", item_delay=0)
def records_free_task(self: BatchTask, item: dict[str, Any]) -> None:
    """Items without an id: keyed by position and content."""
    calls[item["n"]] += 1


@app.task(
    base=ResilientTask,
    bind=True,
    shared=False,
    name="tkbatchunit.whole",
    max_retries=0,
)
def whole_task(self: ResilientTask, x: int, label: str = "") -> None:
    raise ValueError(f"cannot do {x} {label}")


@app.task(
    base=ResilientTask,
    bind=True,
    shared=False,
    name="tkbatchunit.unrecorded",
    dead_letter=False,
    max_retries=0,
)
def unrecorded_task(self: ResilientTask) -> None:
    raise ValueError("not worth keeping")


#: What each chunk's setup saw and left: its items, whether it was closed, flushes inside it.
chunks: list[dict[str, Any]] = []


class Scaled(BatchTask):
    """Sets each chunk up once (a "model": a factor), as a model-scoring task would."""

    @contextlib.contextmanager
    def setup_chunk(self, items: Sequence[Any]) -> Iterator[dict[str, Any]]:
        if -1 in items:
            raise ValueError("no model for this chunk")
        state: dict[str, Any] = {"items": list(items), "factor": 10, "open": True, "flushes": 0}
        chunks.append(state)
        yield state
        state["open"] = False

    def flush_items(self) -> None:
        self.chunk_context["flushes"] += 1


@app.task(base=Scaled, bind=True, shared=False, name="tkbatchunit.scaled", item_delay=0)
def scaled_task(self: Scaled, item: int) -> None:
    context = self.chunk_context
    assert context["open"]
    calls[item * context["factor"]] += 1


@pytest.fixture(autouse=True)
def database(db_url: str, engine: Engine) -> Engine:
    app.conf.taskkit_database_url = db_url
    calls.clear()
    crash_at.clear()
    chunks.clear()
    return engine


def letters(engine: Engine, batch_id: str) -> dict[str, DeadLetter]:
    store = DeadLetterStore(engine=engine)
    return {str(letter.item_key): letter for letter in store.list(batch_id=batch_id)}


def test_a_batch_retries_each_item_and_dead_letters_what_exhausts_its_retries(
    database: Engine,
) -> None:
    batch = uuid.uuid4().hex
    summary = items_task(list(range(20)), batch_id=batch)

    assert summary == {
        "total": 20,
        "successful": 17,
        "failed": 3,
        "failed_ids": [3, 7, 13],
        "batch_id": batch,
        "skipped": 0,
    }
    assert calls[5] == 2
    assert calls[15] == 2
    assert calls[3] == 3  # max_retries=2: three attempts
    assert calls[7] == 1  # permanent: no retry
    dead = letters(database, batch)
    assert set(dead) == {"3", "7", "13"}
    assert dead["3"].attempts == 3
    assert dead["3"].error_type == "RuntimeError"
    assert dead["3"].payload == 3
    assert "item 3 is broken" in dead["3"].error_message
    assert "RuntimeError" in (dead["3"].traceback or "")
    assert dead["7"].attempts == 1
    assert dead["7"].error_type == "ValueError"
    assert dead["3"].task_name == "tkbatchunit.items"
    progress = batch_progress(batch, str(database.url.render_as_string(hide_password=False)))
    assert (progress.done, progress.dead, progress.claimed) == (17, 3, 0)


def test_a_batch_delivered_again_skips_what_is_finished(database: Engine) -> None:
    batch = uuid.uuid4().hex
    items_task(list(range(20)), batch_id=batch)
    calls.clear()

    again = items_task(list(range(20)), batch_id=batch)

    assert calls == Counter()  # nothing ran twice
    assert again["skipped"] == 20
    assert (again["successful"], again["failed"]) == (17, 3)
    assert again["failed_ids"] == [3, 7, 13]
    assert len(letters(database, batch)) == 3  # no second letter


def test_after_a_crash_only_items_not_yet_marked_done_run_again(database: Engine) -> None:
    batch = uuid.uuid4().hex
    crash_at.append(130)  # batch_size=100: done marks are flushed after a batch, not before
    items = list(range(100, 140))
    with pytest.raises(Crash):
        items_task(items, batch_id=batch)
    ledger = ItemLedger(batch, database)
    before = ledger.statuses([str(i) for i in items])
    assert set(before.values()) == {"claimed"}  # one batch of 100: nothing flushed yet

    calls.clear()
    crash_at.append(135)
    with pytest.raises(Crash):
        items_task(items, batch_id=batch)
    calls.clear()
    summary = items_task(items, batch_id=batch)
    assert summary["successful"] == 40
    assert summary["failed"] == 0
    with database.connect() as connection:
        claims = dict(
            connection.execute(
                select(BatchItem.item_key, BatchItem.claims).where(BatchItem.batch_id == batch)
            ).all()
        )
    assert set(claims.values()) == {3}  # three deliveries claimed every item


def test_done_items_are_flushed_while_the_batch_runs(database: Engine) -> None:
    batch = uuid.uuid4().hex
    items = list(range(200, 450))  # batch_size 100: progress after 100, 200; flush every 4
    crash_at.append(420)
    with pytest.raises(Crash):
        items_task(items, batch_id=batch)
    statuses = ItemLedger(batch, database).statuses([str(i) for i in items])
    done = sorted(int(k) for k, s in statuses.items() if s == "done")
    assert done == list(range(200, 400))  # the two full batches before the crash

    calls.clear()
    summary = items_task(items, batch_id=batch)
    assert summary["skipped"] == 200
    assert set(calls) == set(range(400, 450))


def test_item_keys_from_a_field_must_be_unique(database: Engine) -> None:
    rows = [{"sku": "a"}, {"sku": "b"}]
    assert records_task(rows)["successful"] == 2
    with pytest.raises(ConfigurationError, match="unique"):
        records_task([{"sku": "a"}, {"sku": "a"}])
    with pytest.raises(ConfigurationError, match="no 'sku'"):
        records_task([{"id": 1}])
    with pytest.raises(ConfigurationError, match="1 to 255"):
        records_task([{"sku": "x" * 300}])


def test_default_keys_use_the_item_its_id_or_its_position_and_content(database: Engine) -> None:
    task = items_task
    assert task.key_of(5, 0) == 5
    assert task.key_of("abc", 0) == "abc"
    assert task.key_of({"id": 9, "x": 1}, 0) == 9
    key = task.key_of([1, 2], 4)
    assert re.fullmatch(r"#4:[0-9a-f]{16}", key)
    assert task.key_of((1, 2), 4) == key  # what the JSON message turns a tuple into
    assert task.key_of([1, 3], 4) != key
    assert task.key_of({"a": 1, "b": 2}, 0) == task.key_of({"b": 2, "a": 1}, 0)  # canonical
    assert re.fullmatch(r"#2:[0-9a-f]{16}", task.key_of(True, 2))


def test_a_reused_batch_id_runs_new_items_at_the_same_positions(database: Engine) -> None:
    """Issue 14 item 8: positional keys (#0, #1) made a second "nightly" batch with the same
    batch id skip its new items as done."""
    first = records_free_task([{"n": 1}, {"n": 2}], batch_id="nightly")
    again = records_free_task([{"n": 1}, {"n": 2}], batch_id="nightly")  # a redelivery
    second = records_free_task([{"n": 3}, {"n": 4}, {"n": 1}], batch_id="nightly")

    assert (first["successful"], again["skipped"]) == (2, 2)
    assert (second["successful"], second["skipped"]) == (3, 0)
    assert calls == Counter({1: 2, 2: 1, 3: 1, 4: 1})  # {"n": 1} moved to position 2: new item


def test_equal_items_without_ids_in_one_batch_are_each_run(database: Engine) -> None:
    summary = records_free_task([{"n": 7}, {"n": 7}], batch_id=uuid.uuid4().hex)

    assert summary["successful"] == 2
    assert calls == Counter({7: 2})


def test_without_the_ledger_items_still_reach_the_dead_letter_queue(database: Engine) -> None:
    batch = uuid.uuid4().hex
    summary = no_ledger_task([1, 3, 4], batch_id=batch)
    assert summary["failed_ids"] == [3]
    with database.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(BatchItem)) == 0
    assert set(letters(database, batch)) == {"3"}


def test_a_chunk_that_fails_as_a_whole_dead_letters_its_unfinished_items(
    database: Engine,
) -> None:
    batch = uuid.uuid4().hex
    items = list(range(500, 720))
    crash_at.append(710)
    with pytest.raises(Crash):
        items_task(items, batch_id=batch)  # 200 done and flushed, 20 claimed

    items_task.record_failure(
        TaskFailure(
            task_name=items_task.name,
            task_id="t-1",
            args=(items,),
            kwargs={"batch_id": batch},
            error_type="WorkerLostError",
            error="Worker exited prematurely: signal 9 (SIGKILL)",
            traceback="",
            attempts=6,
        )
    )

    dead = letters(database, batch)
    assert set(dead) == {str(i) for i in range(700, 720)}
    assert {letter.error_type for letter in dead.values()} == {"WorkerLostError"}
    progress = batch_progress(batch, database.url.render_as_string(hide_password=False))
    assert (progress.done, progress.dead, progress.claimed) == (200, 20, 0)


def test_a_resilient_task_stores_its_terminal_failure_unless_told_not_to(
    database: Engine,
) -> None:
    assert unrecorded_task.apply().failed()
    assert DeadLetterStore(engine=database).list(task="tkbatchunit.unrecorded") == []

    result = whole_task.apply(args=(4,), kwargs={"label": "x"})
    assert result.failed()
    (letter,) = DeadLetterStore(engine=database).list(task="tkbatchunit.whole")
    assert letter.payload == {"args": [4], "kwargs": {"label": "x"}}
    assert letter.error_type == "ValueError"
    assert letter.batch_id is None


def test_submit_batch_splits_into_chunks_and_merges_one_summary(database: Engine) -> None:
    submission = submit_batch(items_task, list(range(1000, 1025)), chunk_size=10)

    summary = submission.get(timeout=30)
    assert summary["total"] == 25
    assert summary["successful"] == 25
    assert summary["batch_id"] == submission.batch_id
    assert len(submission.result.results) == 3
    progress = submission.progress()
    assert (progress.total, progress.done, progress.pending) == (25, 25, 0)
    with database.connect() as connection:
        row = connection.execute(select(Batch).where(Batch.id == submission.batch_id)).one()
    assert (row.total, row.chunks, row.task_name) == (25, 3, "tkbatchunit.items")


def test_submit_batch_refuses_repeated_keys_before_sending_anything(database: Engine) -> None:
    with pytest.raises(ConfigurationError, match="unique"):
        submit_batch(items_task, [1, 2, 1], chunk_size=2)
    assert calls == Counter()
    with database.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Batch)) == 0
    with pytest.raises(ConfigurationError, match="BatchTask"):
        submit_batch(whole_task, [1])  # type: ignore[arg-type]


def test_bad_options_are_refused_when_the_task_is_made() -> None:
    with pytest.raises(ConfigurationError, match="batch_size"):

        @app.task(
            base=BatchTask,
            bind=True,
            shared=False,
            name=f"tkbatchunit.bad{uuid.uuid4().hex}",
            batch_size=0,
        )
        def bad(self: BatchTask, item: int) -> None: ...

        bad.name  # noqa: B018 - binding the task resolves its options


def test_a_failed_chunk_whose_items_have_no_keys_is_dead_lettered_whole(database: Engine) -> None:
    rows = [{"sku": "a"}, {"name": "no sku"}]
    records_task.record_failure(
        TaskFailure(
            task_name=records_task.name,
            task_id="t-2",
            args=(rows,),
            kwargs={"batch_id": "b-nokeys"},
            error_type="ConfigurationError",
            error="item at position 1 has no 'sku'",
            traceback="",
            attempts=1,
        )
    )
    (letter,) = DeadLetterStore(engine=database).list(task=records_task.name)
    assert letter.item_key is None
    assert letter.payload == {"args": [rows], "kwargs": {"batch_id": "b-nokeys"}}


def test_setup_chunk_runs_once_per_chunk_around_its_items_and_flushes(database: Engine) -> None:
    summary = scaled_task([1, 2, 3], batch_id=uuid.uuid4().hex)

    assert summary["successful"] == 3
    assert calls == Counter({10: 1, 20: 1, 30: 1})  # each item saw its chunk's context
    (chunk,) = chunks
    assert chunk["items"] == [1, 2, 3]
    assert chunk["open"] is False  # closed when the chunk ended
    assert chunk["flushes"] == 1  # the last flush ran inside the chunk

    submit_batch(scaled_task, list(range(100, 125)), chunk_size=10).get(timeout=30)
    assert [len(c["items"]) for c in chunks[1:]] == [10, 10, 5]  # one setup per chunk


def test_a_setup_that_fails_fails_the_chunk_and_dead_letters_its_items(database: Engine) -> None:
    batch = uuid.uuid4().hex

    result = scaled_task.apply(args=([4, -1, 6],), kwargs={"batch_id": batch})

    assert result.failed()
    assert calls == Counter()  # no item ran
    dead = letters(database, batch)
    assert set(dead) == {"4", "-1", "6"}
    assert {(letter.error_type, letter.error_message) for letter in dead.values()} == {
        ("ValueError", "no model for this chunk")
    }
    progress = batch_progress(batch, database.url.render_as_string(hide_password=False))
    assert (progress.dead, progress.claimed) == (3, 0)


def test_chunk_context_outside_a_chunk_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="only set while a chunk runs"):
        scaled_task.run(1)
    assert items_task.setup_chunk([1]).__enter__() is None  # the default: nothing to set up


# -- submit_batch streams its items (issue 18) ---------------------------------------------------

#: How many items the generator under test has handed out so far.
produced: list[int] = [0]
#: For each item run: (item, items handed out by the generator when it ran).
seen_at: list[tuple[int, int]] = []


@app.task(base=BatchTask, bind=True, shared=False, name="tkbatchunit.streamed", item_delay=0)
def streamed_task(self: BatchTask, item: int) -> None:
    seen_at.append((item, produced[0]))  # eager: a chunk runs when it is sent


def counted(items: Iterable[Any]) -> Iterator[Any]:
    """``items`` as a generator that counts what it has handed out."""
    produced[0] = 0
    for item in items:
        produced[0] += 1
        yield item


def batch_row(engine: Engine, batch_id: str) -> tuple[Any, ...] | None:
    with engine.connect() as connection:
        row = connection.execute(
            select(Batch.total, Batch.chunks, Batch.group_id).where(Batch.id == batch_id)
        ).first()
    return None if row is None else tuple(row)


def test_submit_batch_reads_a_generator_one_chunk_ahead_of_what_it_sent(database: Engine) -> None:
    seen_at.clear()

    submission = submit_batch(streamed_task, counted(range(25)), chunk_size=10)

    # The chunk at offset o (size s) was sent when the generator had handed out o + s items:
    # it was read, sent, and only then was the next chunk read.
    assert seen_at == [(i, min(25, (i // 10 + 1) * 10)) for i in range(25)]
    assert produced[0] == 25
    assert (submission.total, len(submission.result.results)) == (25, 3)
    assert submission.get(timeout=30)["successful"] == 25
    assert batch_row(database, submission.batch_id) == (25, 3, submission.result.id)


def test_a_generator_and_a_list_give_the_same_batch(database: Engine) -> None:
    items = list(range(25))  # 3, 5, 7, 13, 15: failing always, once, permanently

    from_list = submit_batch(items_task, items, chunk_size=10).get(timeout=30)
    calls.clear()
    streamed = submit_batch(items_task, iter(items), chunk_size=10)
    from_generator = streamed.get(timeout=30)

    assert from_list["failed_ids"] == [3, 7, 13]
    assert {k: v for k, v in from_generator.items() if k != "batch_id"} == {
        k: v for k, v in from_list.items() if k != "batch_id"
    }
    assert batch_row(database, streamed.batch_id)[:2] == (25, 3)  # type: ignore[index]
    progress = streamed.progress()
    assert (progress.total, progress.done, progress.dead, progress.pending) == (25, 22, 3, 0)


def test_a_repeated_key_in_a_later_chunk_stops_the_generator_there(database: Engine) -> None:
    batch = uuid.uuid4().hex
    with pytest.raises(ConfigurationError, match=r"unique in a batch; repeated: \['4'\]") as caught:
        submit_batch(
            items_task, counted([1, 2, 4, 6, 8, 10, 4, 11, 12, 13]), chunk_size=3, batch_id=batch
        )

    assert produced[0] == 9  # the chunk with the repeat was read, not sent, and nothing more
    assert sorted(calls) == [1, 2, 4, 6, 8, 10]
    assert "2 chunk(s), 6 item(s), were sent before this error" in "".join(caught.value.__notes__)
    assert batch_row(database, batch)[:2] == (6, 2)  # type: ignore[index]
    assert batch_progress(batch, str(database.url.render_as_string(False))).total == 6


def test_an_empty_generator_records_an_empty_batch(database: Engine) -> None:
    submission = submit_batch(items_task, iter(()), chunk_size=3)
    assert submission.get(timeout=30)["total"] == 0
    assert batch_row(database, submission.batch_id) == (0, 0, submission.result.id)


def test_a_streamed_chunk_that_fails_as_a_whole_is_counted_from_its_dead_letters(
    database: Engine,
) -> None:
    items = [*range(100, 110), -1, *range(111, 120)]

    submission = submit_batch(scaled_task, counted(items), chunk_size=10)
    summary = submission.get(timeout=30)  # eager results keep no arguments: letters it is

    assert (summary["total"], summary["successful"], summary["failed"]) == (20, 10, 10)
    assert summary["failed_ids"] == [-1, *range(111, 120)]  # as the items give them


@pytest.mark.redis
def test_a_chunk_that_failed_as_a_whole_is_counted_by_its_stored_arguments(
    database: Engine, redis_url: str
) -> None:
    """A worker's chunk that failed for good leaves its arguments in the result backend
    (``result_extended``): ``get()`` derives its keys from them and reads the ledger."""
    stored = create_app(
        "tkbatchargs", settings=Settings(broker_url="memory://", result_backend=redis_url)
    )
    batch, task_id = uuid.uuid4().hex, uuid.uuid4().hex
    try:
        ledger = ItemLedger(batch, database)
        ledger.claim(["20", "21", "22"])
        ledger.finish(done=["20"])  # one item finished before the chunk failed as a whole
        request = Context(
            id=task_id, task=items_task.name, args=[[20, 21, 22]],
            kwargs={"batch_id": batch, "offset": 3}, hostname="w@h", retries=5,
            delivery_info={}, ignore_result=False,
        )  # fmt: skip
        stored.backend.mark_as_failure(task_id, RuntimeError("worker lost"), request=request)
        first = stored.AsyncResult(uuid.uuid4().hex)
        stored.backend.mark_as_done(first.id, {"total": 3, "successful": 3, "failed": 0})
        submission = BatchSubmission(
            batch, GroupResult("g", [first, stored.AsyncResult(task_id)], app=stored), 6, 3,
            items_task,
        )  # fmt: skip

        summary = submission.get(timeout=30)

        assert (summary["total"], summary["successful"], summary["failed"]) == (6, 4, 2)
        assert summary["failed_ids"] == [21, 22]
    finally:
        for forget in (task_id, first.id):
            stored.backend.forget(forget)


def test_the_batch_key_check_finds_a_repeat_of_any_earlier_chunk() -> None:
    """Pure logic: the hashes of earlier chunks are merged into ever larger sorted arrays; a
    repeat of a key from any of them is found, wherever it went."""
    seen = _SeenKeys(items_task)
    for offset in range(0, 100_000, 1000):
        seen.add(range(offset, offset + 1000), offset)
    sizes = [len(level) for level in seen.levels]
    assert sum(sizes) == 100_000
    assert all(a > b for a, b in itertools.pairwise(sizes))  # a few arrays, largest first
    for repeated in (0, 31_999, 64_000, 99_999):
        with pytest.raises(ConfigurationError, match=rf"repeated: \['{repeated}'\]"):
            seen.add([-5, repeated], 100_000)
    seen.add([-5, 100_000], 100_000)  # new keys pass, and are remembered
    with pytest.raises(ConfigurationError, match=r"repeated: \['-5'\]"):
        seen.add([-5], 100_002)
