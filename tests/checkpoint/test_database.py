"""DatabaseStorage: chunks, one transaction per checkpoint, settings."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from taskkit.checkpoint import (
    CheckpointStore,
    DatabaseStorage,
    DirectoryStorage,
    storage_from_settings,
)
from taskkit.checkpoint._database import CHUNK_SIZE
from taskkit.config import Settings
from taskkit.db.models import CheckpointChunk, CheckpointRecord
from taskkit.db.session import get_engine, session_scope
from tests.checkpoint.conftest import SECRET
from tests.conftest import empty_tables


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    url = str(
        request.getfixturevalue(f"{'pg_schema' if request.param == 'postgresql' else 'sqlite'}_url")
    )
    yield url
    empty_tables(get_engine(url))


def chunks_of(url: str, run_id: str, step: int) -> list[int]:
    with session_scope(url) as db:
        record = db.scalars(select(CheckpointRecord).filter_by(run_id=run_id, step=step)).one()
        return [
            len(data)
            for data in db.scalars(
                select(CheckpointChunk.data)
                .filter_by(checkpoint_id=record.id)
                .order_by(CheckpointChunk.seq)
            )
        ]


def test_large_data_is_stored_in_chunks_of_8_mib(url):
    store = CheckpointStore("big", storage=DatabaseStorage(url), secret_key=SECRET)
    state = {"w": np.random.default_rng(0).random(20 * 1024 * 1024 // 8)}
    info = store.save(state, step=1)
    sizes = chunks_of(url, "big", 1)
    assert sizes[:2] == [CHUNK_SIZE, CHUNK_SIZE]
    assert sum(sizes) == info.size
    assert np.array_equal(store.load_latest().state["w"], state["w"])


def test_small_chunks_reassemble_in_order(url):
    storage = DatabaseStorage(url, chunk_size=1000)
    store = CheckpointStore("small", storage=storage, secret_key=SECRET)
    state = {"a": np.arange(3000), "b": list(range(500)), "c": np.ones(7)}
    info = store.save(state, step=1)
    sizes = chunks_of(url, "small", 1)
    assert set(sizes[:-1]) == {1000}
    assert sum(sizes) == info.size
    loaded = store.load(1).state
    assert np.array_equal(loaded["a"], state["a"])
    assert loaded["b"] == state["b"]


def test_the_record_keeps_the_manifest_text_it_was_signed_as(url):
    store = CheckpointStore("rec", storage=DatabaseStorage(url), secret_key=SECRET)
    info = store.save({"v": 1}, step=4, metrics={"loss": float("nan")})  # NaN: not JSONB-able
    with session_scope(url) as db:
        record = db.scalars(select(CheckpointRecord).filter_by(run_id="rec")).one()
        assert (record.step, record.size) == (4, info.size)
        assert json.loads(record.manifest)["blake3"] == info.blake3 == info.digest
    loaded = store.load(4)
    assert loaded.state == {"v": 1}
    assert np.isnan(loaded.info.metrics["loss"])


CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys
    from taskkit.checkpoint import CheckpointStore, DatabaseStorage, _database

    url = sys.argv[1]
    store = CheckpointStore("crashy", storage=DatabaseStorage(url, chunk_size=1024),
                            secret_key="{secret}")
    store.save({{"v": 1}}, step=1)
    rechunk = _database._rechunk

    def crash_after_two_chunks(buffers, size):
        # The chunks go to the database as they are produced (INSERTs, or one COPY on
        # PostgreSQL): two have been sent when the process dies in the middle of the write.
        for number, chunk in enumerate(rechunk(buffers, size)):
            if number == 2:
                os._exit(3)  # killed in the middle of the transaction
            yield chunk

    _database._rechunk = crash_after_two_chunks
    store.save({{"v": 2, "blob": bytes(range(256)) * 40}}, step=2)
    """
).format(secret=SECRET)


def test_a_crash_in_the_middle_of_a_write_leaves_nothing_behind(url, tmp_path: Path):
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_WRITER)
    result = subprocess.run(
        [sys.executable, str(script), url], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 3, result.stderr
    storage = DatabaseStorage(url)
    assert [info.step for info in storage.infos("crashy")] == [1]
    with session_scope(url) as db:
        (record_id,) = db.scalars(select(CheckpointRecord.id)).all()
        owners = set(db.scalars(select(CheckpointChunk.checkpoint_id)))
    assert owners == {record_id}
    store = CheckpointStore("crashy", storage=storage, secret_key=SECRET)
    assert store.load_latest().state == {"v": 1}


def test_runs_and_delete(url):
    storage = DatabaseStorage(url)
    for run_id in ("b", "a"):
        CheckpointStore(run_id, storage=storage, secret_key=SECRET).save({}, step=0)
    assert storage.runs() == ["a", "b"]
    storage.delete("a", 0)
    storage.delete("a", 0)  # nothing to delete: no error
    assert storage.runs() == ["b"]
    with session_scope(url) as db:
        assert len(db.scalars(select(CheckpointChunk.checkpoint_id)).all()) == 1
    with pytest.raises(FileNotFoundError):
        storage.read("a", 0)
    assert storage.remove_orphans("b") == 0


def test_storage_from_settings(tmp_path: Path, url):
    directory = storage_from_settings(Settings(home=tmp_path))
    assert isinstance(directory, DirectoryStorage)
    assert directory.root == tmp_path / "checkpoints"
    database = storage_from_settings(Settings(checkpoint_storage="database", database_url=url))
    assert isinstance(database, DatabaseStorage)
    assert database.database_url == url
    store = CheckpointStore(
        "via-settings",
        settings=Settings(checkpoint_storage="database", database_url=url, secret_key=SECRET),
    )
    store.save({"v": 1}, step=0)
    assert DatabaseStorage(url).infos("via-settings")[0].step == 0
    assert "password" not in repr(DatabaseStorage("postgresql+psycopg://u:password@h/db"))
