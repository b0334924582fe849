"""Fencing a trainer that lost its run (issue 19), layer by layer.

a. A lease whose renewals failed for longer than its ttl counts as lost (a fake clock).
b. ``ModelRun.fence``: raised only upwards when a trainer takes the run; every write a trainer
   makes for the run carries its token and lands only while the fence equals it (SQLite and
   PostgreSQL).
c. Checkpoints record the writer's token: a stale writer neither replaces nor deletes a newer
   holder's, and ``load_latest`` prefers the newest holder's.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from sqlalchemy import select

from taskkit.checkpoint import CheckpointStore, DirectoryStorage
from taskkit.db.models import ModelRun, TrainingEpoch, TrainingProgress
from taskkit.db.session import session_scope
from taskkit.errors import CheckpointTampered, LeaseLost
from taskkit.tasks._fence import take_fence
from taskkit.tasks._lease import Lease, LeaseOwner
from taskkit.tasks._progress import EpochLog, ProgressReport, write_training_progress
from taskkit.tasks._runs import mark_completed, mark_failed, mark_retrying, mark_running
from taskkit.tasks._training import write_heartbeat

# -- a. self-fencing by time ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lease_with(clock: Clock, renew: Any, *, expires: bool = True) -> Lease:
    return Lease(
        "run-7",
        3,
        LeaseOwner("t", "h", 1),
        ttl=15.0,
        renew=renew,
        release=lambda lease: None,
        expires=expires,
        clock=clock,
    )


def unreachable(lease: Lease) -> bool:
    raise ConnectionError("the store is cut off")


def test_a_lease_whose_renewals_fail_for_its_ttl_is_lost_before_any_write(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    lease = lease_with(clock, unreachable)
    clock.now += 14.9
    with pytest.raises(ConnectionError):
        lease.renew()
    lease.check()  # within the ttl: still ours, for all the store could have done
    clock.now += 0.1
    with caplog.at_level(logging.ERROR, "taskkit.tasks"), pytest.raises(LeaseLost) as lost:
        lease.check()
    assert lost.value.token == 3
    assert lease.lost
    assert [r.getMessage() for r in caplog.records] == [
        "taskkit: lease 'run-7' (token 3) was lost: no renewal succeeded for 15 s"
    ]
    assert lease.renew() is False  # lost for good, even if the store answers again


def test_the_ttl_counts_from_the_last_successful_renewal() -> None:
    clock = Clock()
    answers = iter([True])

    def renew(lease: Lease) -> bool:
        if next(answers, None) is None:
            raise ConnectionError("cut off")
        return True

    lease = lease_with(clock, renew)
    clock.now += 10
    assert lease.renew() is True  # renewed at 110
    clock.now += 14
    with pytest.raises(ConnectionError):
        lease.renew()
    lease.check()  # 14 s after the renewal
    clock.now += 1
    with pytest.raises(LeaseLost):
        lease.check()


def test_a_lease_that_does_not_expire_by_itself_is_never_lost_by_time() -> None:
    clock = Clock()
    lease = lease_with(clock, lambda lease: True, expires=False)  # a file lease: the flock
    clock.now += 1000
    lease.check()


def test_a_lease_lost_by_a_refused_write_stops_at_its_next_check() -> None:
    lease = lease_with(Clock(), lambda lease: True)
    lease.lose("a newer trainer fenced the run")
    with pytest.raises(LeaseLost):
        lease.check()


# -- b. the fence where the writes land -----------------------------------------------------


@pytest.fixture
def run_id(default_database: str) -> int:
    with session_scope() as session:
        run = ModelRun(name="fenced", model_type="sgd", config={"epochs": 3}, status="running")
        session.add(run)
        session.flush()
        return run.id


def row(run_id: int) -> ModelRun:
    with session_scope(readonly=True) as session:
        run = session.get(ModelRun, run_id)
        assert run is not None
        session.expunge(run)
        return run


def test_the_fence_only_goes_up(run_id: int) -> None:
    assert take_fence(run_id, 4)
    assert not take_fence(run_id, 3)
    assert row(run_id).fence == 4
    assert take_fence(run_id, 4)  # the holder taking it again
    assert take_fence(run_id, 9)
    assert row(run_id).fence == 9


def test_a_stale_trainer_s_status_writes_are_refused(
    run_id: int, caplog: pytest.LogCaptureFixture
) -> None:
    take_fence(run_id, 1)
    mark_running(run_id, "old", fence=1)
    take_fence(run_id, 2)  # another trainer took the run over
    mark_running(run_id, "new", fence=2)
    mark_completed(run_id, {"weights": [1, 2]}, 0.9, fence=2)
    with caplog.at_level(logging.ERROR, "taskkit.tasks"):
        for write in (
            lambda: mark_retrying(run_id, "LeaseLost", fence=1),
            lambda: mark_failed(run_id, "boom", fence=1),
            lambda: mark_running(run_id, "old", fence=1),
            lambda: mark_completed(run_id, {"weights": [0]}, 0.1, fence=1),
        ):
            with pytest.raises(LeaseLost):
                write()
    run = row(run_id)
    assert (run.status, run.task_id, run.final_score, run.error_message) == (
        "completed",
        "new",
        0.9,
        None,
    )
    assert len(caplog.records) == 4
    assert "refused" in caplog.records[0].getMessage()


def test_unfenced_writes_are_applied_as_before(run_id: int) -> None:
    take_fence(run_id, 5)
    mark_retrying(run_id, "a run trained without a lease", fence=None)
    assert row(run_id).status == "retrying"


def test_a_stale_trainer_s_progress_and_epochs_are_dropped_and_it_is_told(run_id: int) -> None:
    take_fence(run_id, 1)
    epochs = EpochLog()
    epochs.add(1, {"loss": 0.5})
    write_training_progress(run_id, ProgressReport(1, 3), epochs=epochs, fence=1)
    take_fence(run_id, 2)
    told: list[bool] = []
    epochs.add(2, {"loss": 0.4})
    write_training_progress(
        run_id, ProgressReport(2, 3), epochs=epochs, fence=1, on_refused=lambda: told.append(True)
    )
    assert told == [True]
    assert len(epochs) == 0  # dropped: never retried
    with session_scope(readonly=True) as session:
        progress = session.scalars(select(TrainingProgress).filter_by(model_run_id=run_id)).one()
        assert progress.current_epoch == 1
        assert session.scalars(select(TrainingEpoch.epoch)).all() == [1]


def test_a_stale_trainer_s_heartbeat_is_refused(run_id: int) -> None:
    take_fence(run_id, 1)
    write_heartbeat(run_id, fence=1)
    beat = row(run_id).heartbeat_at
    assert beat is not None
    take_fence(run_id, 2)
    with pytest.raises(LeaseLost):
        write_heartbeat(run_id, fence=1)
    assert row(run_id).heartbeat_at == beat


# -- c. checkpoints ------------------------------------------------------------------------


def store(tmp_path: Any, fence: int | None) -> CheckpointStore:
    made = CheckpointStore(
        "run-1", storage=DirectoryStorage(tmp_path), secret_key="k" * 32, keep_last=1, keep_best=0
    )
    made.fence = fence
    return made


def test_a_stale_writer_neither_replaces_nor_deletes_a_newer_holder_s_checkpoints(
    tmp_path: Any,
) -> None:
    old, new = store(tmp_path, 1), store(tmp_path, 2)
    old.save({"epoch": 3}, step=3)
    new.save({"epoch": 4}, step=4)
    new.save({"epoch": 6}, step=6)  # keep_last=1: new's own 4 goes, old's 3 too
    assert [(i.step, i.fence) for i in new.list()] == [(6, 2)]
    with pytest.raises(LeaseLost):
        old.save({"epoch": 6, "stale": True}, step=6)
    with pytest.raises(LeaseLost):
        old.save({"epoch": 9, "stale": True}, step=9)
    old.cleanup()
    assert [(i.step, i.fence) for i in new.list()] == [(6, 2)]
    assert new.load_latest().state == {"epoch": 6}  # type: ignore[union-attr]


def test_load_latest_prefers_the_newest_holder_then_the_highest_step(tmp_path: Any) -> None:
    old, new = store(tmp_path, 1), store(tmp_path, 2)
    new.keep_last = old.keep_last = 10
    old.save({"epoch": 5}, step=5)
    new.save({"epoch": 4}, step=4)
    # A write of the old holder that was stalled past the takeover (its check passed before).
    old.fence = 1
    old.storage.write(  # what a save that passed its checks before the takeover leaves
        old.run_id, 8, [b"x"], lambda: old._finish(old._template(8, {}, False, 1), "0" * 64)
    )
    assert store(tmp_path, None).load_latest().info.step == 4  # type: ignore[union-attr]
    assert store(tmp_path, 3).latest().step == 4  # type: ignore[union-attr]


def test_a_guard_that_finds_the_lease_lost_stops_the_write_before_its_manifest(
    tmp_path: Any,
) -> None:
    made = store(tmp_path, 1)
    made.save({"epoch": 1}, step=1)
    lost = False

    def guard() -> None:
        if lost:
            raise LeaseLost("run-1", 1)

    made.guard = guard
    lost = True
    with pytest.raises(LeaseLost):
        made.save({"epoch": 2}, step=2)
    assert [i.step for i in made.list()] == [1]


def test_the_fencing_token_is_signed(tmp_path: Any) -> None:
    made = store(tmp_path, 1)
    info = made.save({"epoch": 1}, step=1)
    manifest = next(tmp_path.rglob("*.json"))
    data = json.loads(manifest.read_text())
    assert data["fence"] == 1 == info.fence
    data["fence"] = 99  # a writer claiming a newer holder's token
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointTampered):
        store(tmp_path, None).load_latest()
