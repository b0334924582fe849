"""The lease's beat hooks (``Lease.on_beat``) and the training task's heartbeat writer."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.tasks import FileLeaseStore, Lease, LeaseOwner
from taskkit.tasks._training import write_heartbeat
from tests._support.workers import wait_for


def file_lease(tmp_path: Path, ttl: float = 15.0) -> Lease:
    lease = FileLeaseStore(tmp_path / "leases").acquire("run-1", LeaseOwner.here("t1"), ttl)
    assert lease is not None
    return lease


def test_a_beat_hook_runs_after_each_successful_renew_even_of_a_file_lease(tmp_path: Path):
    lease = file_lease(tmp_path)
    beats: list[Lease] = []
    lease.on_beat(beats.append)
    try:
        assert lease.renew()
        assert lease.renew()
    finally:
        lease.release()
    assert beats == [lease, lease]


def test_a_failing_beat_hook_is_logged_and_neither_stops_the_others_nor_the_lease(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    lease = file_lease(tmp_path)
    beats: list[str] = []

    def broken(_: Lease) -> None:
        raise RuntimeError("database blip")

    lease.on_beat(broken)
    lease.on_beat(lambda _: beats.append("second"))
    try:
        with caplog.at_level(logging.WARNING, logger="taskkit.tasks"):
            assert lease.renew()
    finally:
        lease.release()
    assert beats == ["second"]
    assert not lease.lost
    assert "beat hook" in caplog.text
    assert "database blip" in caplog.text


def test_a_lost_lease_calls_no_beat_hook(tmp_path: Path):
    lease = Lease("k", 1, LeaseOwner.here("t"), 15.0, lambda _: False, lambda _: None)
    beats: list[Lease] = []
    lease.on_beat(beats.append)
    assert not lease.renew()
    assert beats == []


def test_the_heartbeat_thread_calls_the_hooks(tmp_path: Path):
    lease = file_lease(tmp_path, ttl=0.3)  # beats every 0.1 s
    beats: list[Lease] = []
    lease.on_beat(beats.append)
    with lease.kept_alive():
        wait_for(lambda: len(beats) >= 2, 10, "two beats")


@pytest.fixture
def run_id(db_url: str, engine: Engine) -> int:
    with session_scope(db_url) as session:
        run = ModelRun(name="r", model_type="sgd", status="running")
        session.add(run)
        session.flush()
        return run.id


def test_write_heartbeat_sets_heartbeat_at_without_a_version_conflict_or_a_new_updated_at(
    db_url: str, run_id: int
):
    with session_scope(db_url) as session:
        before = session.get(ModelRun, run_id)
        assert before is not None
        version, updated = before.version, before.updated_at
    moment = datetime.now(UTC) + timedelta(seconds=30)

    write_heartbeat(run_id, database_url=db_url, now=lambda: moment)

    with session_scope(db_url) as session:
        after = session.get(ModelRun, run_id)
        assert after is not None
        assert after.heartbeat_at == moment
        assert after.version == version  # a status write holding the old version still works
        assert after.updated_at == updated
