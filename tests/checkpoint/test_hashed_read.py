"""Loading hashes while reading: ``read_hashed`` of each storage, and ``load_latest`` using it.

A load reads the data piece by piece into one buffer and a second thread hashes each piece
while the next is read (``StreamDigest``); ``unseal`` compares that digest with the manifest's
instead of hashing the bytes again. Verification is unchanged: signature first, then size and
digest (BLAKE3, or the SHA-256 of an older manifest), and only then unpickling.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

import blake3
import numpy as np
import pytest
from sqlalchemy import event

from taskkit.checkpoint import CheckpointStore, DatabaseStorage, DirectoryStorage, _seal
from taskkit.checkpoint._codec import _THREAD_MIN, Hashed, StreamDigest
from taskkit.checkpoint._info import CheckpointInfo
from taskkit.checkpoint._storage import _READ_STEP, read_hashed
from taskkit.db.session import get_engine
from taskkit.errors import CheckpointCorrupt
from tests.checkpoint.conftest import SECRET

# Below the threading threshold (hashed inline), and above it across several read pieces
# with a ragged end.
SIZES = [1000, _THREAD_MIN + 3 * _READ_STEP + 17]


def _manifest(run_id: str, step: int, data: bytes) -> CheckpointInfo:
    return CheckpointInfo(
        run_id=run_id,
        step=step,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        format="pickle",
        compression=None,
        created_at="2026-01-01T00:00:00+00:00",
        python="3",
        numpy=None,
        sklearn=None,
    )


@pytest.mark.parametrize("size", SIZES)
def test_read_hashed_returns_the_bytes_read_and_their_digest(storage, size):
    data = os.urandom(size)
    storage.write(
        "hashed", 3, [data[:5], memoryview(data)[5:]], lambda: _manifest("hashed", 3, data)
    )
    result = read_hashed(storage, "hashed", 3)
    assert isinstance(result, Hashed)
    assert bytes(result.data) == data == bytes(storage.read("hashed", 3))
    assert (result.algorithm, result.digest) == ("blake3", blake3.blake3(data).hexdigest())
    assert not memoryview(result.data).readonly  # arrays loaded over it stay writable
    # the algorithm a manifest names (here SHA-256, as written before BLAKE3)
    result = read_hashed(storage, "hashed", 3, "sha256")
    assert isinstance(result, Hashed)
    assert bytes(result.data) == data
    assert (result.algorithm, result.digest) == ("sha256", hashlib.sha256(data).hexdigest())


def test_read_hashed_of_a_missing_step_is_file_not_found(storage):
    with pytest.raises(FileNotFoundError):
        read_hashed(storage, "nothing-here", 1)


def test_load_latest_uses_the_digest_computed_while_reading(make_store, monkeypatch):
    store = make_store("no-second-pass")
    weights = np.random.default_rng(1).random((_THREAD_MIN + _READ_STEP) // 8)
    store.save({"w": weights}, step=1)

    def no_second_hash(data: Any, algorithm: str = "") -> str:
        raise AssertionError("load_latest hashed the data again after reading it")

    monkeypatch.setattr(_seal, "digest_of", no_second_hash)
    checkpoint = store.load_latest()
    assert checkpoint is not None
    np.testing.assert_array_equal(checkpoint.state["w"], weights)
    checkpoint.state["w"][0] = 5.0  # a view of the buffer read, writable


def test_a_byte_changed_on_disk_is_still_caught_by_the_digest_of_the_read(make_store, raw):
    store = make_store("flipped")
    store.save({"w": np.arange(_THREAD_MIN // 8 + 1000, dtype=np.float64)}, step=1)
    store.save({"w": np.ones(10)}, step=2)
    data = bytearray(raw.data(store.run_id, 2))
    data[-1] ^= 1
    raw.put(store.run_id, 2, bytes(data), raw.manifest(store.run_id, 2))
    with pytest.raises(CheckpointCorrupt, match="does not match the BLAKE3"):
        store.load(2)
    with pytest.warns(UserWarning, match="step 2 is unusable"):
        checkpoint = store.load_latest()
    assert checkpoint is not None
    assert checkpoint.info.step == 1


class _PlainStorage:
    """A storage with ``read`` only (no ``read_hashed``): loads hash after reading, as before."""

    def __init__(self) -> None:
        self.data: dict[int, bytes] = {}
        self.manifests: dict[int, CheckpointInfo] = {}

    def write(self, run_id: str, step: int, data: Any, manifest: Any) -> None:
        self.data[step] = b"".join(bytes(d) for d in data)
        self.manifests[step] = manifest()

    def infos(self, run_id: str) -> list[CheckpointInfo]:
        return [self.manifests[s] for s in sorted(self.manifests)]

    def read(self, run_id: str, step: int) -> bytes:
        return self.data[step]

    def delete(self, run_id: str, step: int) -> None:
        self.data.pop(step, None)
        self.manifests.pop(step, None)

    def runs(self) -> list[str]:
        return ["plain"]

    def remove_orphans(self, run_id: str) -> int:
        return 0


def test_a_storage_without_read_hashed_is_hashed_after_reading():
    storage = _PlainStorage()
    store = CheckpointStore("plain", storage=storage, secret_key=SECRET)
    store.save({"v": 1}, step=1)
    assert store.load_latest().state == {"v": 1}
    storage.data[1] = storage.data[1][:-1] + bytes([storage.data[1][-1] ^ 1])
    with pytest.raises(CheckpointCorrupt, match="does not match the BLAKE3"):
        store.load(1)


@pytest.mark.parametrize("threaded", [True, False])
def test_stream_digest_is_the_blake3_of_the_pieces_in_order(threaded):
    pieces = [os.urandom(n) for n in (0, 1, 4096, 1 << 20, 7)]
    digest = StreamDigest(threaded=threaded)
    for piece in pieces:
        digest.update(memoryview(piece))
    assert digest.hexdigest() == blake3.blake3(b"".join(pieces)).hexdigest()
    digest.close()  # idempotent


def test_stream_digest_raises_the_hashing_threads_error():
    digest = StreamDigest(threaded=True)
    digest.update(b"ok")
    digest.update("not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        digest.hexdigest()


def test_a_failed_read_stops_the_hashing_thread(tmp_path, monkeypatch):
    storage = DirectoryStorage(tmp_path)
    data = os.urandom(_THREAD_MIN + _READ_STEP)
    storage.write("failing", 1, [data], lambda: _manifest("failing", 1, data))
    before = len(_threads())

    def broken(fd: int, size: int, digest: Any) -> Any:
        digest.update(data[:10])
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(DirectoryStorage, "_read_fd", staticmethod(broken))
    with pytest.raises(OSError, match="Input/output"):
        storage.read_hashed("failing", 1)
    assert len(_threads()) <= before


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "taskkit-checkpoint-digest"]


def test_on_postgresql_chunks_are_copied_in_not_inserted_one_by_one(pg_schema_url):
    """psycopg's binary COPY: no INSERT INTO checkpoint_chunks reaches the database."""
    from tests.conftest import empty_tables

    storage = DatabaseStorage(pg_schema_url, chunk_size=1 << 20)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    engine = get_engine(pg_schema_url)
    event.listen(engine, "before_cursor_execute", record)
    try:
        store = CheckpointStore("copied", storage=storage, secret_key=SECRET)
        weights = np.random.default_rng(2).random(3 * (1 << 20) // 8 + 5)
        store.save({"w": weights}, step=1)
        np.testing.assert_array_equal(store.load_latest().state["w"], weights)
    finally:
        event.remove(engine, "before_cursor_execute", record)
        empty_tables(engine)
    assert statements  # the record and the manifest still go through SQLAlchemy
    assert not [s for s in statements if "INSERT INTO checkpoint_chunks" in s]


def test_a_database_read_that_fails_midway_leaves_the_storage_usable(url_storage, monkeypatch):
    """The chunk cursor is closed before the transaction ends; the next read works."""
    storage = url_storage
    data = os.urandom(3 * 1024 + 5)
    storage.write("midway", 1, [data], lambda: _manifest("midway", 1, data))
    calls = 0
    real_update = StreamDigest.update

    def update(self: StreamDigest, piece: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(5, "Input/output error")
        real_update(self, piece)

    monkeypatch.setattr(StreamDigest, "update", update)
    with pytest.raises(OSError, match="Input/output"):
        storage.read_hashed("midway", 1)
    monkeypatch.undo()
    result = storage.read_hashed("midway", 1)
    assert bytes(result.data) == data
    assert result.digest == blake3.blake3(data).hexdigest()


@pytest.fixture(params=["sqlite", "postgresql"])
def url_storage(request: pytest.FixtureRequest) -> Any:
    from tests.conftest import empty_tables

    url = request.getfixturevalue(
        "pg_schema_url" if request.param == "postgresql" else "sqlite_url"
    )
    yield DatabaseStorage(url, chunk_size=1024)
    empty_tables(get_engine(url))
