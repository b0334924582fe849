"""Signatures: a changed or unsigned checkpoint is refused and never unpickled."""

from __future__ import annotations

import hashlib
import hmac
import json
import pathlib
import warnings

import numpy as np
import pytest

from taskkit.checkpoint import CheckpointInfo, CheckpointStore
from taskkit.checkpoint._codec import encode
from taskkit.config import Settings
from taskkit.errors import (
    CheckpointError,
    CheckpointTampered,
    CheckpointWarning,
    ConfigurationError,
    PermanentError,
)
from tests.checkpoint.conftest import SECRET


class Evil:
    """Unpickling this creates ``path``: what an attacker's checkpoint would do."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def evil_bytes(marker: pathlib.Path) -> bytes:
    """A checkpoint payload in taskkit's own format, so only verification stands in its way."""
    return b"".join(bytes(c) for c in encode({"model": Evil(marker)}, "pickle", None).chunks)


def swap_in(raw, run_id: str, step: int, data: bytes) -> None:
    """Replace a checkpoint's data and fix its size and checksum, keeping the old signature."""
    manifest = raw.manifest(run_id, step)
    manifest.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    raw.put(run_id, step, data, manifest)


def test_the_evil_payload_really_runs_when_nothing_checks_it(tmp_path):
    """Guard for the tests below: the payload would create the marker if unpickled."""
    import pickle

    marker = tmp_path / "pwned"
    data = evil_bytes(marker)
    from taskkit.checkpoint._codec import decode

    decode(bytearray(data), "pickle", None)
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()


def test_tampered_data_with_a_recomputed_checksum_is_refused_unread(make_store, raw, tmp_path):
    store = make_store()
    store.save({"model": np.arange(10)}, step=1)
    store.save({"model": np.arange(20)}, step=2)
    marker = tmp_path / "pwned"
    swap_in(raw, "run-1", 2, evil_bytes(marker))
    with pytest.raises(CheckpointTampered, match="step 2: its signature does not match") as caught:
        store.load_latest()  # no fallback to step 1 past a tampered checkpoint
    assert not marker.exists()
    assert isinstance(caught.value, PermanentError)
    with pytest.raises(CheckpointTampered):
        store.load(2)
    assert not marker.exists()
    assert np.array_equal(store.load(1).state["model"], np.arange(10))


def test_without_a_key_checksums_do_not_stop_a_deliberate_change(storage, raw, tmp_path):
    """Why TASKKIT_SECRET_KEY matters: an unsigned store only detects accidents."""
    store = CheckpointStore("run-1", storage=storage)
    store.save({"model": 1}, step=1)
    marker = tmp_path / "pwned"
    swap_in(raw, "run-1", 1, evil_bytes(marker))
    store.load_latest()
    assert marker.exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [("step", 9), ("run_id", "other"), ("metrics", {"loss": 0.0}), ("is_best", True)],
)
def test_any_changed_manifest_field_breaks_the_signature(make_store, raw, field, value):
    store = make_store()
    store.save({"v": 1}, step=1)
    manifest = raw.manifest("run-1", 1)
    manifest[field] = value
    raw.put("run-1", 1, raw.data("run-1", 1), manifest)
    if field == "step":
        # a storage ignores a manifest whose step is not its file's (its record's)
        with pytest.warns(CheckpointWarning, match="describes step 9"):
            assert store.load_latest() is None
        return
    with pytest.raises(CheckpointTampered, match="signature does not match"):
        store.load_latest()


def test_a_validly_signed_checkpoint_of_another_run_is_refused(make_store, raw):
    other = make_store("run-a")
    other.save({"from": "a"}, step=1)
    raw.put("run-b", 1, raw.data("run-a", 1), raw.manifest("run-a", 1))
    store = make_store("run-b")
    with pytest.raises(CheckpointTampered, match="run 'run-b', step 1: .*belongs to run 'run-a'"):
        store.load_latest()


def test_a_checkpoint_signed_with_another_key_is_refused(make_store):
    make_store(secret_key="old-key").save({"v": 1}, step=1)
    with pytest.raises(CheckpointTampered, match="another key"):
        make_store(secret_key="new-key").load_latest()


def test_an_unsigned_checkpoint_is_refused_when_a_key_is_set(make_store, storage):
    make_store().save({"v": 1}, step=1)  # signed
    CheckpointStore("run-1", storage=storage).save({"v": 2}, step=2)  # no key: unsigned
    store = make_store()
    with pytest.raises(CheckpointTampered, match="step 2: it is not signed, but a secret key"):
        store.load_latest()
    assert store.load(1).state == {"v": 1}


def test_a_stripped_signature_is_refused(make_store, raw):
    make_store().save({"v": 1}, step=1)
    manifest = raw.manifest("run-1", 1)
    manifest["signature"] = None
    raw.put("run-1", 1, raw.data("run-1", 1), manifest)
    with pytest.raises(CheckpointTampered, match="not signed"):
        make_store().load(1)


def test_the_signature_is_hmac_sha256_over_the_canonical_manifest(make_store):
    info = make_store().save({"v": 1}, step=3, metrics={"b": 1, "a": [1.5]})
    fields = info.to_dict()
    del fields["signature"]
    assert fields.pop("run_uid") is None  # no run identity: signed as before identities
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    expected = hmac.new(
        SECRET.encode(), b"taskkit-checkpoint-v1\n" + canonical.encode(), hashlib.sha256
    ).hexdigest()
    assert info.signature == expected
    assert info.signed_bytes().endswith(canonical.encode())


def test_keys_can_be_bytes_str_or_secret_str_and_come_from_settings(storage):
    from pydantic import SecretStr

    CheckpointStore("k", storage=storage, secret_key=SECRET.encode()).save({"v": 1}, step=1)
    for key in (SECRET, SecretStr(SECRET)):
        assert CheckpointStore("k", storage=storage, secret_key=key).load(1).state == {"v": 1}
    settings = Settings(secret_key=SECRET)
    assert CheckpointStore("k", storage=storage, settings=settings).load(1).state == {"v": 1}


def test_require_signature_without_a_key_is_a_configuration_error(storage):
    with pytest.raises(ConfigurationError, match="no secret key is set"):
        CheckpointStore("x", storage=storage, require_signature=True)
    with pytest.raises(ConfigurationError, match="TASKKIT_SECRET_KEY"):
        CheckpointStore("x", storage=storage, settings=Settings(require_signed_checkpoints=True))
    store = CheckpointStore(
        "x", storage=storage, secret_key=SECRET, settings=Settings(require_signed_checkpoints=True)
    )
    assert store.signed


def test_require_signed_checkpoints_from_the_environment(monkeypatch, storage):
    from taskkit.config import reset_settings

    monkeypatch.setenv("TASKKIT_REQUIRE_SIGNED_CHECKPOINTS", "1")
    monkeypatch.delenv("TASKKIT_SECRET_KEY", raising=False)
    reset_settings()
    try:
        with pytest.raises(ConfigurationError, match="signed checkpoints are required"):
            CheckpointStore("x", storage=storage)
        monkeypatch.setenv("TASKKIT_SECRET_KEY", SECRET)
        reset_settings()
        assert CheckpointStore("x", storage=storage).signed
    finally:
        monkeypatch.undo()
        reset_settings()


def test_no_key_warns_once_per_process(monkeypatch, storage):
    from taskkit.checkpoint import _store

    monkeypatch.setattr(_store, "_unsigned_warned", False)
    with pytest.warns(CheckpointWarning, match="only checksummed, not signed") as caught:
        CheckpointStore("a", storage=storage)
    assert caught[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CheckpointStore("b", storage=storage)  # not again
        CheckpointStore("c", storage=storage, secret_key=SECRET)


def test_manifests_are_checked_field_by_field():
    good = CheckpointInfo(run_id="r", step=1, size=3, sha256="a" * 64, created_at="t").to_dict()
    assert CheckpointInfo.from_dict(good).step == 1
    for field, value in [("step", "1"), ("step", True), ("sha256", "xyz"), ("size", -1)]:
        with pytest.raises(ValueError, match="manifest"):
            CheckpointInfo.from_dict({**good, field: value})
    with pytest.raises(ValueError, match="no 'run_id'"):
        CheckpointInfo.from_dict({k: v for k, v in good.items() if k != "run_id"})


def test_an_unreadable_manifest_is_skipped_with_a_warning(make_store, raw):
    store = make_store()
    store.save({"v": 1}, step=1)
    store.save({"v": 2}, step=2)
    raw.put("run-1", 2, raw.data("run-1", 2), {"not": "a manifest"})
    with pytest.warns(CheckpointWarning, match="unreadable, ignored"):
        assert store.load_latest().state == {"v": 1}


def test_a_verified_checkpoint_that_cannot_be_unpickled_names_the_versions(make_store, raw):
    store = make_store()
    store.save({"v": 1}, step=1)
    data = bytearray(raw.data("run-1", 1))
    data[:8] = b"NOTMAGIC"
    manifest = raw.manifest("run-1", 1)
    manifest["sha256"] = hashlib.sha256(data).hexdigest()
    info = CheckpointInfo.from_dict(manifest)
    manifest["signature"] = hmac.new(
        SECRET.encode(), info.signed_bytes(), hashlib.sha256
    ).hexdigest()
    raw.put("run-1", 1, bytes(data), manifest)
    with pytest.raises(CheckpointError, match="could not be loaded .*saved with Python") as caught:
        store.load_latest()
    assert not isinstance(caught.value, CheckpointTampered)
