"""The shipped fakes answer like the real things (the real CheckpointStore runs on the memory
storage, so signatures and checksums are checked as on files)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from taskkit.checkpoint import CheckpointStore
from taskkit.deadletter import DeadLetterEntry
from taskkit.errors import DeadLetterNotFound, TaskkitError
from taskkit.testing import FakeDeadLetterStore, MemoryCheckpointStorage


def entry(task="jobs.fetch", item=None, error="ValueError"):
    return DeadLetterEntry(
        task, {"item": item}, error, "bad", batch_id="b1" if item else None, item_key=item
    )


def test_a_checkpoint_round_trips_through_the_memory_storage():
    storage = MemoryCheckpointStorage()
    with CheckpointStore("exp-1", storage=storage, secret_key="a-test-key-16-bytes") as store:
        store.save({"w": [1, 2]}, step=0)
        store.save({"w": [3]}, step=1)
        assert store.load_latest().state == {"w": [3]}
    assert storage.steps("exp-1") == [0, 1]
    assert storage.runs() == ["exp-1"]


def test_a_tampered_checkpoint_is_refused_on_load():
    storage = MemoryCheckpointStorage()
    with CheckpointStore("exp-1", storage=storage, secret_key="a-test-key-16-bytes") as store:
        store.save({"w": 1}, step=0)
    storage.tamper("exp-1", 0)
    with (
        CheckpointStore("exp-1", storage=storage, secret_key="a-test-key-16-bytes") as store,
        pytest.raises(TaskkitError),
    ):
        store.load(0)


def test_reading_a_missing_step_is_file_not_found():
    with pytest.raises(FileNotFoundError):
        MemoryCheckpointStorage().read("exp-1", 3)


def test_the_dead_letter_fake_records_updates_counts_discards_and_purges():
    store = FakeDeadLetterStore()
    assert store.record([entry(item="1"), entry(item="2"), entry(task="jobs.other")]) == 3
    store.record([entry(item="1", error="KeyError")])  # the same item again: one letter
    letters = store.list(task="jobs.fetch")
    assert [(x.item_key, x.error_type, x.attempts) for x in letters] == [
        ("2", "ValueError", 1),
        ("1", "KeyError", 2),
    ]
    assert store.depth() == {"jobs.fetch": 2, "jobs.other": 1}
    assert store.discard([letters[0].id]) == 1
    assert store.depth("discarded") == {"jobs.fetch": 1}
    assert store.list(newer_than=timedelta(minutes=1), status=None, limit=1)
    with pytest.raises(DeadLetterNotFound):
        store.discard([999])
    with pytest.raises(DeadLetterNotFound):
        store.get(999)
    assert store.purge(task="jobs.other") == 1
    assert store.purge() == 2
    assert store.list(status=None) == []


def test_the_dead_letter_fake_pages_newest_first_as_the_store_does():
    store = FakeDeadLetterStore()
    for item in "abcd":
        store.record([entry(item=item)])
    ids = [letter.id for letter in store.list()]

    assert [x.id for x in store.list(newest_first=True, limit=3)] == ids[:0:-1]
    assert [x.id for x in store.list(before_id=ids[1])] == [ids[0]]


def whole_task_failure(task_id: str | None) -> DeadLetterEntry:
    return DeadLetterEntry(
        "jobs.fetch", {"args": [1], "kwargs": {}}, "ValueError", "bad", task_id=task_id
    )


def test_the_dead_letter_fake_merges_whole_task_failures_per_task_id_as_the_store_does():
    store = FakeDeadLetterStore()
    store.record([whole_task_failure("t1"), whole_task_failure("t1"), whole_task_failure("t2")])

    letters = store.list(task="jobs.fetch")
    assert sorted((letter.task_id, letter.attempts) for letter in letters) == [("t1", 2), ("t2", 1)]


def test_wait_for_returns_a_letter_recorded_by_another_thread():
    store = FakeDeadLetterStore()
    recorder = threading.Timer(0.01, store.record, args=([whole_task_failure("t1")],))
    recorder.start()

    (letter,) = store.wait_for(task="jobs.fetch", timeout=10)

    assert letter.task_id == "t1"
    recorder.join()


def test_wait_for_names_what_it_waited_for_when_it_times_out():
    store = FakeDeadLetterStore()
    store.record([whole_task_failure("t1")])

    with pytest.raises(TimeoutError, match=r"1 of 2 dead letter\(s\) matching"):
        store.wait_for(2, task="jobs.fetch", timeout=0.01)
