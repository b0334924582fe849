"""Checkpoint fixtures: every storage test runs on files, SQLite and PostgreSQL.

``storage`` is a real ``DirectoryStorage`` on ``tmp_path`` or a real ``DatabaseStorage`` on the
test run's migrated SQLite file / PostgreSQL schema (tables emptied afterwards). ``raw`` reaches
under a storage to damage what it stored, the way a disk fault or an attacker would.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from taskkit.checkpoint import CheckpointStorage, CheckpointStore, DatabaseStorage, DirectoryStorage

SECRET = "test-secret-key-16b"


class Raw:
    """Direct access to what a storage stored, to corrupt or tamper with it."""

    def data(self, run_id: str, step: int) -> bytes:
        raise NotImplementedError

    def manifest(self, run_id: str, step: int) -> dict[str, Any]:
        raise NotImplementedError

    def put(self, run_id: str, step: int, data: bytes, manifest: dict[str, Any]) -> None:
        """Store ``data`` and ``manifest`` as they are (no checks, no signing)."""
        raise NotImplementedError

    def drop_data(self, run_id: str, step: int) -> None:
        raise NotImplementedError

    def fail_writes(self, monkeypatch: pytest.MonkeyPatch, after_bytes: int) -> None:
        """Make the storage's writes fail with ENOSPC once ``after_bytes`` have been written."""
        raise NotImplementedError

    def leftovers(self, run_id: str) -> list[str]:
        """Anything stored for the run that is not a complete checkpoint."""
        raise NotImplementedError


class RawDirectory(Raw):
    def __init__(self, storage: DirectoryStorage) -> None:
        self.storage = storage

    def _path(self, run_id: str, step: int, kind: str) -> Path:
        return self.storage.run_dir(run_id) / f"step-{step:08d}.{kind}"

    def data(self, run_id: str, step: int) -> bytes:
        return self._path(run_id, step, "ckpt").read_bytes()

    def manifest(self, run_id: str, step: int) -> dict[str, Any]:
        return json.loads(self._path(run_id, step, "json").read_text())

    def put(self, run_id: str, step: int, data: bytes, manifest: dict[str, Any]) -> None:
        self.storage.run_dir(run_id).mkdir(parents=True, exist_ok=True)
        self._path(run_id, step, "ckpt").write_bytes(data)
        self._path(run_id, step, "json").write_text(json.dumps(manifest))

    def drop_data(self, run_id: str, step: int) -> None:
        self._path(run_id, step, "ckpt").unlink()

    def fail_writes(self, monkeypatch: pytest.MonkeyPatch, after_bytes: int) -> None:
        real_write = os.write
        root = str(self.storage.root)
        written = 0

        def write(fd: int, data: Any) -> int:
            nonlocal written
            if not os.readlink(f"/proc/self/fd/{fd}").startswith(root):
                return real_write(fd, data)
            room = after_bytes - written
            if room <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = real_write(fd, memoryview(data)[:room])
            written += n
            return n

        monkeypatch.setattr(os, "write", write)

    def leftovers(self, run_id: str) -> list[str]:
        directory = self.storage.run_dir(run_id)
        if not directory.exists():
            return []
        names = set(os.listdir(directory))
        complete = {n for n in names if n.endswith(".json")}
        complete |= {n[: -len(".json")] + ".ckpt" for n in complete}
        return sorted(names - complete)


class RawDatabase(Raw):
    def __init__(self, storage: DatabaseStorage, url: str) -> None:
        self.storage = storage
        self.url = url

    def _record(self, db: Any, run_id: str, step: int) -> Any:
        from taskkit.db.models import CheckpointRecord

        return db.scalars(select(CheckpointRecord).filter_by(run_id=run_id, step=step)).one()

    def data(self, run_id: str, step: int) -> bytes:
        return bytes(self.storage.read(run_id, step))

    def manifest(self, run_id: str, step: int) -> dict[str, Any]:
        from taskkit.db.session import session_scope

        with session_scope(self.url) as db:
            return json.loads(self._record(db, run_id, step).manifest)

    def put(self, run_id: str, step: int, data: bytes, manifest: dict[str, Any]) -> None:
        from sqlalchemy import delete

        from taskkit.db.models import CheckpointChunk, CheckpointRecord
        from taskkit.db.session import session_scope

        with session_scope(self.url) as db:
            record = db.scalars(
                select(CheckpointRecord).filter_by(run_id=run_id, step=step)
            ).one_or_none()
            if record is None:
                record = CheckpointRecord(run_id=run_id, step=step, size=0, manifest="")
                db.add(record)
                db.flush()
            db.execute(delete(CheckpointChunk).filter_by(checkpoint_id=record.id))
            db.add(CheckpointChunk(checkpoint_id=record.id, seq=0, data=data))
            record.size = len(data)
            record.manifest = json.dumps(manifest)

    def drop_data(self, run_id: str, step: int) -> None:
        from sqlalchemy import delete

        from taskkit.db.models import CheckpointChunk
        from taskkit.db.session import session_scope

        # The storage never makes a record without data; deleting its chunks comes closest.
        with session_scope(self.url) as db:
            record = self._record(db, run_id, step)
            db.execute(delete(CheckpointChunk).filter_by(checkpoint_id=record.id))

    def fail_writes(self, monkeypatch: pytest.MonkeyPatch, after_bytes: int) -> None:
        # The chunks go to the database as they are made (INSERTs, or one binary COPY on
        # PostgreSQL): the disk "fills up" in the middle of sending them.
        from taskkit.checkpoint import _database

        monkeypatch.setattr(self.storage, "chunk_size", 1024)
        rechunk = _database._rechunk

        def failing(buffers: Any, size: int) -> Iterator[Any]:
            written = 0
            for chunk in rechunk(buffers, size):
                if written >= after_bytes:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += len(chunk)
                yield chunk

        monkeypatch.setattr(_database, "_rechunk", failing)

    def leftovers(self, run_id: str) -> list[str]:
        from taskkit.db.models import CheckpointChunk, CheckpointRecord
        from taskkit.db.session import session_scope

        with session_scope(self.url) as db:
            records = set(db.scalars(select(CheckpointRecord.id)))
            chunk_owners = set(db.scalars(select(CheckpointChunk.checkpoint_id)))
            half = db.scalars(
                select(CheckpointRecord.step).filter_by(run_id=run_id, manifest="")
            ).all()
        return [f"chunks of missing record {i}" for i in chunk_owners - records] + [
            f"record without manifest, step {s}" for s in half
        ]


@pytest.fixture(params=["directory", "sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, Raw]]:
    if request.param == "directory":
        storage = DirectoryStorage(tmp_path / "checkpoints")
        yield storage, RawDirectory(storage)
        return
    from taskkit.db.session import get_engine
    from tests.conftest import empty_tables

    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_schema_url")
    database = DatabaseStorage(url)
    raw = RawDatabase(database, url)
    yield database, raw
    empty_tables(get_engine(url))


@pytest.fixture
def storage(backend: tuple[CheckpointStorage, Raw]) -> CheckpointStorage:
    return backend[0]


@pytest.fixture
def raw(backend: tuple[CheckpointStorage, Raw]) -> Raw:
    return backend[1]


@pytest.fixture
def make_store(storage: CheckpointStorage) -> Iterator[Any]:
    """``make_store(run_id, **options)``: a signed store on ``storage``; closed afterwards."""
    stores: list[CheckpointStore] = []

    def make(run_id: str | int = "run-1", **options: Any) -> CheckpointStore:
        options.setdefault("secret_key", SECRET)
        store = CheckpointStore(run_id, storage=storage, **options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()
