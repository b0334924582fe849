"""The content digest: BLAKE3 in new manifests, SHA-256 ones (written before) still verified.

A manifest names its digest by its key (``"blake3"`` or ``"sha256"``); the key is signed, so a
checkpoint is verified with the algorithm it was written with and that choice cannot be
changed without breaking the signature. Every storage hashes through ``_codec`` while reading.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
from typing import Any

import blake3
import numpy as np
import pytest

from taskkit.checkpoint import CheckpointInfo, _codec, _seal, seal, unseal
from taskkit.checkpoint._codec import Hashed, StreamDigest, encode
from taskkit.errors import CheckpointCorrupt, CheckpointFormatError, CheckpointTampered
from tests.checkpoint.test_signing import Evil

# A checkpoint written by taskkit before BLAKE3 (commit e9390f9), signed with the fixtures'
# key (conftest.SECRET): run
# "legacy-1", step 3, state {"weights": [1.5, 2.5], "epoch": 7}. Its manifest has "sha256".
LEGACY_DATA = bytes.fromhex(
    "544b434b5054000100000000000000003a000000000000008005952f000000000000007d94288c07776569"
    "67687473945d9428473ff8000000000000474004000000000000658c0565706f6368944b07752e"
)
LEGACY_MANIFEST: dict[str, Any] = {
    "compression": None,
    "created_at": "2026-12-01T21:53:21.002236+00:00",
    "format": "pickle",
    "is_best": False,
    "metrics": {},
    "numpy": "2.4.6",
    "python": "3.11.7",
    "run_id": "legacy-1",
    "run_uid": None,
    "sha256": "8e3b4c32ecc73a29d6d4b94902f38092dc5326f34ade4ade096040e1995804e4",
    "signature": "5b4a7b626526e66f8e98071718e7e94a37e30806ff0f981d0ea829e930e5fc8a",
    "size": 82,
    "sklearn": "1.9.1",
    "step": 3,
}
LEGACY_STATE = {"weights": [1.5, 2.5], "epoch": 7}


@pytest.fixture
def algorithms(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The algorithm of every hash object made from now on (by a storage, a store, unseal)."""
    made: list[str] = []
    real = _codec.new_hash

    def recording(algorithm: str = _codec.DIGEST) -> Any:
        made.append(algorithm)
        return real(algorithm)

    monkeypatch.setattr(_codec, "new_hash", recording)
    return made


def _frame(state: Any) -> bytes:
    return b"".join(bytes(c) for c in encode(state, "pickle", None).chunks)


def _same_size_evil(size: int, marker: pathlib.Path) -> bytes:
    """A payload in taskkit's frame that creates ``marker`` when unpickled, ``size`` bytes."""
    for pad in range(size):
        data = _frame({"model": Evil(marker), "pad": b"x" * pad})
        if len(data) == size:
            return data
    raise AssertionError(f"no evil payload of {size} bytes")


def test_a_new_manifest_records_the_blake3_of_the_stored_bytes(make_store, raw, algorithms):
    store = make_store()
    info = store.save({"w": np.arange(1000.0)}, step=1)
    manifest, data = raw.manifest("run-1", 1), raw.data("run-1", 1)
    assert manifest["blake3"] == blake3.blake3(data).hexdigest() == info.digest
    assert "sha256" not in manifest
    assert (info.algorithm, info.sha256) == ("blake3", None)
    assert algorithms == ["blake3"]  # hashed once, with BLAKE3
    algorithms.clear()
    np.testing.assert_array_equal(store.load_latest().state["w"], np.arange(1000.0))
    assert algorithms == ["blake3"]  # hashed once while reading, not again


def test_a_checkpoint_written_with_sha256_still_loads_verified_with_sha256(
    make_store, raw, algorithms, monkeypatch
):
    raw.put("legacy-1", 3, LEGACY_DATA, LEGACY_MANIFEST)
    store = make_store("legacy-1")
    (info,) = store.list()
    assert (info.algorithm, info.digest, info.blake3) == ("sha256", LEGACY_MANIFEST["sha256"], None)
    assert info.to_dict() == LEGACY_MANIFEST  # reads, and signs, as it was written

    def no_second_hash(data: Any, algorithm: str = "") -> str:
        raise AssertionError("the storage's digest was not used")

    monkeypatch.setattr(_seal, "digest_of", no_second_hash)
    checkpoint = store.load_latest()
    assert checkpoint is not None
    assert checkpoint.state == LEGACY_STATE
    assert algorithms == ["sha256"]  # hashed while reading, with the manifest's algorithm


def test_a_changed_byte_in_a_sha256_checkpoint_is_caught_by_its_sha256(make_store, raw):
    data = bytearray(LEGACY_DATA)
    data[-3] ^= 1
    raw.put("legacy-1", 3, bytes(data), LEGACY_MANIFEST)
    with pytest.raises(CheckpointCorrupt, match="does not match the SHA-256"):
        make_store("legacy-1").load(3)


def test_a_changed_blake3_checkpoint_is_refused_before_unpickling(make_store, raw, tmp_path):
    store = make_store()
    store.save({"model": np.arange(50), "pad": b""}, step=1)
    manifest, size = raw.manifest("run-1", 1), len(raw.data("run-1", 1))
    marker = tmp_path / "pwned"
    evil = _same_size_evil(size, marker)
    # Same size, digest left as it was: the BLAKE3 of the bytes read does not match.
    raw.put("run-1", 1, evil, manifest)
    with pytest.raises(CheckpointCorrupt, match="does not match the BLAKE3"):
        store.load(1)
    assert not marker.exists()
    # The digest recomputed by the attacker: the signature no longer matches.
    raw.put("run-1", 1, evil, {**manifest, "blake3": blake3.blake3(evil).hexdigest()})
    with pytest.raises(CheckpointTampered, match="signature does not match"):
        store.load(1)
    assert not marker.exists()


def test_a_blake3_manifest_rewritten_to_sha256_is_refused(make_store, raw, tmp_path):
    """The algorithm is signed: switching a manifest to SHA-256 breaks its signature."""
    store = make_store()
    store.save({"v": 1}, step=1)
    manifest = raw.manifest("run-1", 1)
    marker = tmp_path / "pwned"
    evil = _frame({"model": Evil(marker)})
    del manifest["blake3"]
    manifest.update(size=len(evil), sha256=hashlib.sha256(evil).hexdigest())
    raw.put("run-1", 1, evil, manifest)
    with pytest.raises(CheckpointTampered, match="signature does not match"):
        store.load_latest()
    assert not marker.exists()


def test_a_manifest_has_exactly_one_well_formed_digest():
    good = CheckpointInfo(run_id="r", step=1, size=3, blake3="b" * 64, created_at="t").to_dict()
    assert CheckpointInfo.from_dict(good).digest == "b" * 64
    with pytest.raises(CheckpointFormatError, match="exactly one digest"):
        CheckpointInfo.from_dict({**good, "sha256": "a" * 64})
    with pytest.raises(CheckpointFormatError, match="exactly one digest"):
        CheckpointInfo.from_dict({k: v for k, v in good.items() if k != "blake3"})
    with pytest.raises(CheckpointFormatError, match="'blake3' is not a hex BLAKE3"):
        CheckpointInfo.from_dict({**good, "blake3": "B" * 64})
    with pytest.raises(CheckpointFormatError, match="exactly one digest"):
        CheckpointInfo(run_id="r", step=1, size=3)


def test_a_model_is_sealed_with_blake3_and_a_sha256_one_still_unseals():
    data, info = seal({"coef": [1.0]}, "7", keys=None)
    assert info.algorithm == "blake3"
    assert info.digest == blake3.blake3(data).hexdigest()
    assert unseal(info, data, run_id="7") == {"coef": [1.0]}
    legacy = _seal.sign_info(
        CheckpointInfo(
            run_id="7",
            step=0,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            created_at="t",
        ),
        _seal.get_settings().signing_keys(),
        "model",
    )
    assert unseal(legacy, data, run_id="7") == {"coef": [1.0]}
    # A digest a storage made with another algorithm than the manifest's is not trusted: the
    # bytes are hashed again with the manifest's.
    wrong = Hashed(data, hashlib.sha256(b"other").hexdigest(), "sha256")
    assert unseal(info, wrong, run_id="7") == {"coef": [1.0]}


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_stream_digest_of_either_algorithm(algorithm):
    pieces = [b"a" * 5000, b"", b"b" * 70000]
    digest = StreamDigest(threaded=True, algorithm=algorithm)
    for piece in pieces:
        digest.update(piece)
    expected = (blake3.blake3 if algorithm == "blake3" else hashlib.sha256)(b"".join(pieces))
    assert digest.hexdigest() == expected.hexdigest()


def test_an_unknown_algorithm_is_refused():
    with pytest.raises(CheckpointFormatError, match="unknown digest algorithm 'md5'"):
        _codec.new_hash("md5")


def test_a_process_forked_after_a_load_can_still_load(make_store):
    """BLAKE3's all-core mode (a Rayon pool) hangs a child forked after the parent used it;
    the store hashes on one thread, so a prefork worker's child loads like its parent."""
    store = make_store()
    weights = np.random.default_rng(3).random((_codec._THREAD_MIN * 3) // 8)
    store.save({"w": weights}, step=1)
    assert store.load_latest() is not None  # the parent hashes (save and load) before forking
    pid = os.fork()
    if pid == 0:  # the child: killed by its own alarm if hashing hangs
        code = 1
        try:
            signal.alarm(30)
            checkpoint = store.load_latest()
            code = 0 if checkpoint is not None and (checkpoint.state["w"] == weights).all() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"the forked child was killed by signal {os.WTERMSIG(status)}"
    assert os.WEXITSTATUS(status) == 0
