"""Signatures: a changed or unsigned checkpoint is refused and never unpickled."""

from __future__ import annotations

import hashlib
import hmac
import json
import pathlib

import blake3
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
    """Replace a checkpoint's data and fix its size and digest, keeping the old signature."""
    manifest = raw.manifest(run_id, step)
    manifest.update(size=len(data), blake3=blake3.blake3(data).hexdigest())
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


def test_without_a_key_a_deliberate_change_is_still_refused(storage, raw, tmp_path):
    """Before, a store without TASKKIT_SECRET_KEY only checksummed: a swapped payload with a
    recomputed checksum was unpickled. Now it signs with the key made under TASKKIT_HOME."""
    store = CheckpointStore("run-1", storage=storage)
    store.save({"model": 1}, step=1)
    marker = tmp_path / "pwned"
    swap_in(raw, "run-1", 1, evil_bytes(marker))
    with pytest.raises(CheckpointTampered, match="signature does not match"):
        store.load_latest()
    assert not marker.exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [("step", 9), ("run_id", "other"), ("metrics", {"loss": 0.0}), ("is_best", True)],
)
def test_any_changed_manifest_field_breaks_the_signature(make_store, storage, raw, field, value):
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
    make_store(secret_key="the-old-key-of-2025").save({"v": 1}, step=1)
    with pytest.raises(CheckpointTampered, match="another key"):
        make_store(secret_key="the-new-key-of-2026").load_latest()


def test_an_unsigned_newest_checkpoint_is_refused_not_skipped(make_store, raw):
    make_store().save({"v": 1}, step=1)
    make_store().save({"v": 2}, step=2)
    manifest = raw.manifest("run-1", 2)
    manifest["signature"] = None
    raw.put("run-1", 2, raw.data("run-1", 2), manifest)
    store = make_store()
    with pytest.raises(CheckpointTampered, match="step 2: it is not signed"):
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


def test_signing_cannot_be_turned_off(storage):
    """TASKKIT_REQUIRE_SIGNED_CHECKPOINTS and require_signature= are gone: always signed."""
    assert "require_signed_checkpoints" not in Settings.model_fields
    with pytest.raises(TypeError):
        CheckpointStore("x", storage=storage, require_signature=False)  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="secret_key is 0 bytes"):
        CheckpointStore("x", storage=storage, secret_key="")
    assert CheckpointStore("x", storage=storage).signed


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
    manifest["blake3"] = blake3.blake3(data).hexdigest()
    info = CheckpointInfo.from_dict(manifest)
    manifest["signature"] = hmac.new(
        SECRET.encode(), info.signed_bytes(), hashlib.sha256
    ).hexdigest()
    raw.put("run-1", 1, bytes(data), manifest)
    with pytest.raises(CheckpointError, match="could not be loaded .*saved with Python") as caught:
        store.load_latest()
    assert not isinstance(caught.value, CheckpointTampered)


# -- signing always on (issue 14, item 1) -------------------------------------------------------


@pytest.fixture
def no_key_anywhere(tmp_path, monkeypatch):
    """A fresh TASKKIT_HOME and no key in the environment: what a default install looks like."""
    from taskkit.config import reset_settings

    home = tmp_path / "fresh-home"
    monkeypatch.setenv("TASKKIT_HOME", str(home))
    for name in ("TASKKIT_SECRET_KEY", "TASKKIT_SECRET_KEY_FILE", "TASKKIT_SECRET_KEYS_OLD"):
        monkeypatch.delenv(name, raising=False)
    reset_settings()
    yield home
    monkeypatch.undo()
    reset_settings()


def forged_manifest(run_id: str, step: int, data: bytes, signature: str | None) -> dict:
    """What an attacker writes beside their data: a well-formed manifest with the right size
    and SHA-256, and no signature (or one they made up)."""
    info = CheckpointInfo(
        run_id=run_id,
        step=step,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        created_at="2026-01-01T00:00:00.000000+00:00",
    )
    return {**info.to_dict(), "signature": signature}


@pytest.mark.parametrize("signature", [None, "0" * 64, "not-hex"])
def test_with_no_key_configured_a_forged_checkpoint_is_never_unpickled(
    no_key_anywhere, storage, raw, tmp_path, signature
):
    """Before: a store without a key accepted an unsigned newest checkpoint and unpickled it."""
    marker = tmp_path / "pwned"
    store = CheckpointStore("run-1", storage=storage)
    run_key = store.run_id
    data = evil_bytes(marker)
    raw.put(run_key, 5, data, forged_manifest(run_key, 5, data, signature))
    with pytest.raises(CheckpointTampered, match="step 5: "):
        store.load_latest()
    with pytest.raises(CheckpointTampered):
        store.load(5)
    with pytest.raises(CheckpointTampered):
        CheckpointStore("run-1", storage=storage).load_latest()  # another process, same home
    assert not marker.exists()


def test_with_no_key_configured_checkpoints_are_signed_with_a_key_made_once(
    no_key_anywhere, storage
):
    store = CheckpointStore("run-1", storage=storage)
    info = store.save({"v": 1}, step=1)
    assert info.signature is not None
    key_file = no_key_anywhere / "secret.key"
    assert key_file.is_file()
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_bytes()
    assert len(key.strip()) >= 32
    assert CheckpointStore("run-1", storage=storage).load(1).state == {"v": 1}
    assert key_file.read_bytes() == key  # made once, then reused


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o602])
def test_a_home_key_others_could_read_or_have_planted_is_refused(tmp_path, mode):
    """Whoever can read the key can sign checkpoints: taskkit's own key must be private."""
    from taskkit._keys import home_key

    home = tmp_path / "home"
    home.mkdir()
    planted = home / "secret.key"
    planted.write_text("an-attackers-key-of-enough-length\n")
    planted.chmod(mode)

    with pytest.raises(ConfigurationError, match="must belong to this user") as refused:
        home_key(home)
    assert "an-attackers-key" not in str(refused.value)
    planted.chmod(0o600)
    assert home_key(home) == b"an-attackers-key-of-enough-length"  # private: the operator's


def test_processes_racing_to_make_the_key_agree_on_one(tmp_path):
    """Eight processes create the home key at the same moment: all end up with the same key."""
    import subprocess
    import sys

    home = tmp_path / "raced-home"
    script = (
        "import sys, time; from pathlib import Path; from taskkit._keys import home_key\n"
        "start = float(sys.argv[2])\n"
        "while time.time() < start: pass\n"
        "print(home_key(Path(sys.argv[1])).hex())\n"
    )
    import time

    start = str(time.time() + 1.5)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(home), start], stdout=subprocess.PIPE, text=True
        )
        for _ in range(8)
    ]
    keys = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(keys) == 1
    assert bytes.fromhex(keys.pop()) == (home / "secret.key").read_bytes().strip()
    assert [p.name for p in home.iterdir()] == ["secret.key"]  # no temp file left


@pytest.mark.parametrize("key", ["short", "fifteen-bytes!!", b"0123456789"])
def test_a_key_shorter_than_16_bytes_is_refused_without_showing_it(storage, key):
    with pytest.raises(ConfigurationError, match="at least 16 bytes") as caught:
        CheckpointStore("x", storage=storage, secret_key=key)
    shown = key.decode() if isinstance(key, bytes) else key
    assert shown not in str(caught.value)


def test_a_short_key_from_the_environment_names_the_variable(monkeypatch, storage):
    from taskkit.config import reset_settings

    monkeypatch.setenv("TASKKIT_SECRET_KEY", "hunter2-hunter")
    reset_settings()
    try:
        with pytest.raises(ConfigurationError, match="TASKKIT_SECRET_KEY .*at least 16") as caught:
            CheckpointStore("x", storage=storage)
        assert "hunter2" not in str(caught.value)
    finally:
        monkeypatch.undo()
        reset_settings()


def test_a_key_file_signs_and_the_home_key_is_not_made(no_key_anywhere, monkeypatch, storage):
    from taskkit.config import reset_settings

    key_file = no_key_anywhere.parent / "team.key"
    key_file.write_text("a-team-key-from-the-secret-store\n")
    monkeypatch.setenv("TASKKIT_SECRET_KEY_FILE", str(key_file))
    reset_settings()
    CheckpointStore("k", storage=storage).save({"v": 1}, step=1)
    assert CheckpointStore(
        "k", storage=storage, secret_key="a-team-key-from-the-secret-store"
    ).load(1).state == {"v": 1}
    assert not (no_key_anywhere / "secret.key").exists()


def test_rotation_old_keys_verify_the_first_key_signs(make_store):
    old, new = "the-old-team-key-2025", "the-new-team-key-2026"
    make_store(secret_key=old).save({"v": 1}, step=1)
    rotated = make_store(secret_key=new, old_keys=[old])
    assert rotated.load(1).state == {"v": 1}
    rotated.save({"v": 2}, step=2)
    assert make_store(secret_key=new).load(2).state == {"v": 2}  # signed with the new key
    with pytest.raises(CheckpointTampered, match="another key"):
        make_store(secret_key=new).load(1)  # the old key is no longer accepted


def test_rotation_from_the_environment(monkeypatch, storage):
    from taskkit.config import reset_settings

    old, new = "the-old-team-key-2025", "the-new-team-key-2026"
    CheckpointStore("k", storage=storage, secret_key=old).save({"v": 1}, step=1)
    monkeypatch.setenv("TASKKIT_SECRET_KEY", new)
    monkeypatch.setenv("TASKKIT_SECRET_KEYS_OLD", f"an-even-older-key-2024,{old}")
    reset_settings()
    try:
        assert CheckpointStore("k", storage=storage).load(1).state == {"v": 1}
    finally:
        monkeypatch.undo()
        reset_settings()
