"""Forged checkpoints and models are never unpickled, with no key configured anywhere.

An attacker who can write the checkpoint storage or the database writes a well-formed
checkpoint (taskkit's own frame around a pickle whose ``__reduce__`` creates a marker file,
plus a manifest with the right size and SHA-256 but no valid signature) or a ``model_runs`` row.
The process has no ``TASKKIT_SECRET_KEY``: a fresh ``TASKKIT_HOME``, so taskkit makes its own
key. ``load_model``, and ``taskkit resume`` with a real worker subprocess, must refuse them: the
marker never appears.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import pickle
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from taskkit.checkpoint import CheckpointInfo
from taskkit.config import reset_settings
from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.errors import CheckpointTampered
from taskkit.tasks import load_model
from tests._support.commands import TASKKIT, run_command
from tests._support.workers import REPO, WorkerProcess, wait_for
from tests.training import apps

KEY_VARIABLES = ("TASKKIT_SECRET_KEY", "TASKKIT_SECRET_KEY_FILE", "TASKKIT_SECRET_KEYS_OLD")


class Evil:
    """Unpickling this creates ``path``: what an attacker's pickle would do."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (self.path,))


def framed(obj: Any) -> bytes:
    """``obj`` in taskkit's checkpoint frame (header, pickle, buffers), as ``encode`` writes it."""
    import struct

    head = pickle.dumps(obj, protocol=5)
    return struct.pack("<8sQQ", b"TKCKPT\x00\x01", 0, len(head)) + head


def manifest(run_key: str, step: int, data: bytes, signature: str | None) -> CheckpointInfo:
    return CheckpointInfo(
        run_id=run_key,
        step=step,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        created_at=datetime.now(UTC).isoformat(),
        signature=signature,
    )


@pytest.fixture
def no_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_schema_url: str, redis_url: str
) -> Iterator[dict[str, str]]:
    """A fresh TASKKIT_HOME (checkpoints under it), PostgreSQL, no key: for this process and
    the worker subprocesses it starts."""
    values = {"TASKKIT_HOME": str(tmp_path / "home"), "TASKKIT_DATABASE_URL": pg_schema_url}
    for name in (*KEY_VARIABLES, "TASKKIT_CHECKPOINT_DIR", "TASKKIT_CHECKPOINT_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    apps.app.conf.taskkit_database_url = pg_schema_url
    yield values
    monkeypatch.undo()
    reset_settings()


def drop_messages_of(task_id: str) -> int:
    """Delete every message of ``task_id`` from the test app's queues and its unacknowledged
    set (what a stopped worker left requeued): none may reach the next test's worker, whose
    database reuses run ids. Returns how many were dropped."""
    client = apps.kit.counter
    prefix = f"{apps.PREFIX}:"

    def of_task(raw: bytes) -> bool:
        message = json.loads(raw)
        if isinstance(message, list):  # unacked entries: [message, exchange, routing key]
            message = message[0]
        return bool((message.get("headers") or {}).get("id") == task_id)

    dropped = 0
    for key in client.scan_iter(f"{prefix}{apps.QUEUE}*"):
        if client.type(key) == b"list":
            for raw in client.lrange(key, 0, -1):
                if of_task(raw):
                    dropped += int(client.lrem(key, 0, raw))
    for tag, raw in client.hgetall(f"{prefix}unacked").items():
        if of_task(raw):
            dropped += int(client.hdel(f"{prefix}unacked", tag))
            client.zrem(f"{prefix}unacked_index", tag)
    return dropped


def completed_run(data: bytes, seal: dict[str, Any]) -> int:
    with session_scope() as db:
        run = ModelRun(
            name="forged",
            model_type="sgd",
            config={},
            status="completed",
            task_name=apps.train.name,
            model_object=data,
            model_state=seal,
        )
        db.add(run)
        db.flush()
        return int(run.id)


def test_the_payload_creates_the_marker_when_unpickled_unchecked(tmp_path: Path) -> None:
    """Guard: the forgeries below would create the marker if anything unpickled them."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()
    marker.unlink()
    pickle.loads(framed(Evil(marker))[24:])  # the pickle inside the frame
    assert marker.exists()


@pytest.mark.parametrize("kind", ["plain pickle, sha256 only", "framed, made-up signature"])
def test_load_model_refuses_a_forged_model_row(
    no_key: dict[str, str], pg_engine: Any, tmp_path: Path, kind: str
) -> None:
    """Before: load_model checked only the sha256 when no key was set, then unpickled."""
    marker = tmp_path / "pwned"
    if kind.startswith("plain"):
        data = pickle.dumps(Evil(marker), protocol=5)
        seal: dict[str, Any] = {
            "format": "pickle",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "signature": None,
        }
    else:
        data = framed(Evil(marker))
        seal = manifest("0", 0, data, "ab" * 32).to_dict()
    run_id = completed_run(data, seal)
    if not kind.startswith("plain"):
        with session_scope() as db:
            row = db.get(ModelRun, run_id)
            assert row is not None
            row.model_state = {**seal, "run_id": str(run_id)}
    with pytest.raises(CheckpointTampered, match=f"run {run_id}"):
        load_model(run_id)
    assert not marker.exists()


def test_taskkit_resume_and_a_real_worker_refuse_a_forged_checkpoint(
    no_key: dict[str, str], pg_engine: Any, tmp_path: Path
) -> None:
    """Before: the worker unpickled the forged newest checkpoint of the resumed run."""
    marker = tmp_path / "pwned"
    config = {"epochs": 4, "seed": 1, "batch_size": 100, "nonce": uuid.uuid4().hex}
    with session_scope() as db:
        run = ModelRun(
            name="victim",
            model_type="sgd",
            config=config,
            status="failed",
            task_name=apps.train.name,
            task_id="old-task",
            error_message="WorkerLost",
        )
        db.add(run)
        db.flush()
        run_id = int(run.id)
    # Written the way an attacker with write access to the checkpoint folder would: straight
    # into the storage the task reads, under the key it reads (no signing key involved).
    with apps.train.checkpoint_store(run_id) as store:
        data = framed({"version": 1, "epoch": 2, "model": Evil(marker)})
        info = manifest(store.run_id, 2, data, None)
        # the run's identity is no secret (it is in the database): the forger copies it
        info = dataclasses.replace(info, run_uid=store.run_uid)
        store.storage.write(store.run_id, 2, [data], lambda: info)

    env = {**os.environ, "TASKKIT_APP": "tests.training.apps", "PYTHONPATH": str(REPO)}
    resumed = run_command([str(TASKKIT), "resume", str(run_id)], cwd=REPO, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    worker = WorkerProcess("forgery", tmp_path, app="tests.training.apps", queue=apps.QUEUE)
    try:
        worker.wait_ready()

        def refused() -> tuple[str, str]:
            with session_scope() as db:
                row = db.get(ModelRun, run_id)
                assert row is not None
                return row.status, row.error_message or ""

        # the worker marks the run failed with its reason (stopping the worker afterwards may
        # put it back to retrying: the message is requeued, and would be refused again)
        wait_for(lambda: refused()[0] == "failed", 60, f"run {run_id} to be refused")
        _, error = refused()
    finally:
        worker.stop()
        # Stopping the worker may requeue the refused task (a retry): drop it, so it cannot
        # run against the next test's run of the same id.
        with session_scope() as db:
            task_id = db.get(ModelRun, run_id).task_id  # type: ignore[union-attr]
        if task_id:
            drop_messages_of(task_id)
    assert not marker.exists()
    assert "refusing to unpickle" in worker.log()
    assert "CheckpointTampered" in error
    assert "refusing to unpickle" in error
