"""CheckpointStore on every storage: round trips, retention, integrity, failures, processes."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
import threading
import time

import blake3
import numpy as np
import pytest

from taskkit.checkpoint import (
    Checkpoint,
    CheckpointInfo,
    CheckpointStore,
    DirectoryStorage,
)
from taskkit.errors import CheckpointCorrupt, CheckpointError, CheckpointWarning, ConfigurationError
from tests.checkpoint.conftest import SECRET


def sample_state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "weights": rng.normal(size=(64, 32)),
        "bias": rng.normal(size=32).astype(np.float32),
        "labels": np.arange(10, dtype=np.int64),
        "fortran": np.asfortranarray(rng.normal(size=(5, 7))),
        "strided": rng.normal(size=20)[::3],  # not contiguous: pickled in-band
        "rng": np.random.default_rng(seed).bit_generator.state,
        "epoch": seed,
        "history": [0.9, 0.7, 0.5],
        "name": "sgd",
    }


def assert_same_state(loaded: dict, expected: dict) -> None:
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(loaded[key], value), key
            assert loaded[key].dtype == value.dtype, key
        else:
            assert loaded[key] == value, key


# -- round trips -------------------------------------------------------------------------------


def test_save_then_load_latest_round_trips_a_dict_of_numpy_arrays(make_store):
    store = make_store()
    state = sample_state(1)
    info = store.save(state, step=1, metrics={"loss": np.float32(0.25), "acc": 0.9})
    checkpoint = store.load_latest()
    assert isinstance(checkpoint, Checkpoint)
    assert_same_state(checkpoint.state, state)
    assert checkpoint.info == info
    assert info.metrics == {"loss": 0.25, "acc": 0.9}
    # Arrays come back usable in place: writable and aligned for their dtype.
    weights = checkpoint.state["weights"]
    assert weights.flags.writeable
    assert weights.flags.aligned
    weights += 1.0


def test_load_of_a_step_and_the_manifest_fields(make_store):
    store = make_store("exp-7")
    for step in (3, 4):
        store.save(sample_state(step), step=step, is_best=step == 3)
    checkpoint = store.load(3)
    assert_same_state(checkpoint.state, sample_state(3))
    info = checkpoint.info
    assert (info.run_id, info.step, info.format, info.compression) == ("exp-7", 3, "pickle", None)
    assert info.is_best is True
    assert info.size == len(bytes(store.storage.read("exp-7", 3)))
    assert info.algorithm == "blake3"
    assert info.sha256 is None
    assert info.blake3 == info.digest == blake3.blake3(store.storage.read("exp-7", 3)).hexdigest()
    assert info.created_at.endswith("+00:00")
    assert info.python == ".".join(map(str, sys.version_info[:3]))
    assert info.numpy == np.__version__
    import sklearn

    assert info.sklearn == sklearn.__version__
    assert info.signature is not None
    assert len(info.signature) == 64
    assert CheckpointInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_int_run_ids_become_strings(make_store):
    store = make_store(42)
    assert store.run_id == "42"
    store.save({"a": 1}, step=0)
    assert store.load_latest().state == {"a": 1}


def test_an_empty_run_has_nothing_to_load(make_store):
    store = make_store("never-saved")
    assert store.load_latest() is None
    assert store.latest() is None
    assert store.list() == []
    with pytest.raises(CheckpointError, match="step 5: no such checkpoint"):
        store.load(5)


@pytest.mark.parametrize("fmt", ["pickle", "joblib"])
@pytest.mark.parametrize("compress", [False, True, 9])
def test_formats_and_compression_round_trip(make_store, fmt, compress):
    store = make_store(format=fmt, compress=compress)
    state = sample_state(2)
    state["zeros"] = np.zeros(200_000)  # compresses well
    info = store.save(state, step=1)
    assert info.format == fmt
    assert info.compression == (None if compress is False else "zlib")
    if compress:
        assert info.size < state["zeros"].nbytes / 10
    assert_same_state(store.load_latest().state, state)


def test_a_fitted_scikit_learn_model_round_trips_with_joblib(make_store):
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(0).normal(size=(60, 4))
    y = (x[:, 0] > 0).astype(int)
    model = LogisticRegression().fit(x, y)
    store = make_store(format="joblib")
    store.save({"model": model}, step=0)
    loaded = store.load_latest().state["model"]
    assert np.array_equal(loaded.predict_proba(x), model.predict_proba(x))


def test_saving_a_step_again_replaces_it(make_store):
    store = make_store()
    store.save({"v": 1}, step=1)
    store.save({"v": 2}, step=1)
    assert [i.step for i in store.list()] == [1]
    assert store.load(1).state == {"v": 2}


def test_metrics_must_be_json_values(make_store):
    store = make_store()
    with pytest.raises(TypeError, match="JSON values"):
        store.save({}, step=0, metrics={"model": object()})
    with pytest.raises(ConfigurationError, match="step must be an int >= 0"):
        store.save({}, step=-1)


def test_a_state_that_cannot_be_pickled_is_a_checkpoint_error(make_store):
    store = make_store("unpicklable")
    with pytest.raises(CheckpointError, match="run 'unpicklable', step 0: .*serialised"):
        store.save({"lock": threading.Lock()}, step=0)
    assert store.list() == []


# -- retention ---------------------------------------------------------------------------------


def steps(store: CheckpointStore) -> list[int]:
    return [info.step for info in store.list()]


def test_retention_keeps_the_last_n_and_the_newest_best(make_store, raw):
    store = make_store(keep_last=2, keep_best=1)
    for step in range(6):
        store.save({"step": step}, step=step, is_best=step in (1, 3))
        store.wait()  # old checkpoints are deleted on the writer thread
        assert raw.leftovers("run-1") == []
    assert steps(store) == [3, 4, 5]  # 3: newest best; 4, 5: the last two
    store.save({"step": 6}, step=6)
    assert steps(store) == [3, 5, 6]
    assert store.load(3).info.is_best


def test_keep_best_zero_ignores_the_best_flag(make_store):
    store = make_store(keep_last=1, keep_best=0)
    for step in range(3):
        store.save({}, step=step, is_best=step == 0)
    assert steps(store) == [2]


def test_two_best_kept(make_store):
    store = make_store(keep_last=1, keep_best=2)
    for step in range(6):
        store.save({}, step=step, is_best=step % 2 == 0)
    assert steps(store) == [2, 4, 5]


def test_protected_checkpoint_is_never_deleted(make_store):
    first = make_store(keep_last=2, keep_best=0)
    for step in range(3):
        first.save({"step": step}, step=step)
    first.close()
    resumed = make_store(keep_last=2, keep_best=0)
    checkpoint = resumed.load_latest()
    resumed.protect(checkpoint.info.step)  # resumed from step 2
    for step in range(3, 8):
        resumed.save({"step": step}, step=step)
    assert steps(resumed) == [2, 6, 7]
    assert resumed.load(2).state == {"step": 2}


def test_retention_settings_come_from_settings(storage):
    from taskkit.config import Settings

    settings = Settings(checkpoint_keep_last=1, checkpoint_keep_best=0, secret_key=SECRET)
    store = CheckpointStore("from-settings", storage=storage, settings=settings)
    assert (store.keep_last, store.keep_best, store.signed) == (1, 0, True)
    for step in range(3):
        store.save({}, step=step)
    assert steps(store) == [2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keep_last": 0}, "keep_last must be >= 1"),
        ({"keep_best": -1}, "keep_best must be >= 0"),
        ({"compress": 10}, "compress must be"),
        ({"format": "json"}, "format must be one of"),
    ],
)
def test_bad_options_are_configuration_errors(storage, options, message):
    with pytest.raises(ConfigurationError, match=message):
        CheckpointStore("x", storage=storage, secret_key=SECRET, **options)


def test_cleanup_after_success_keeps_the_final_checkpoint_or_nothing(make_store):
    store = make_store(keep_last=5)
    for step in range(4):
        store.save({"step": step}, step=step)
    store.protect(0)  # protection is for resumed runs; a finished run cleans up anyway
    store.cleanup()
    assert steps(store) == [3]
    assert store.load_latest().state == {"step": 3}
    store.cleanup(keep_final=False)
    assert steps(store) == []
    assert store.storage.runs() == []


def test_cleanup_after_success_keeps_the_best_k_and_the_final(make_store):
    """Completion keeps what retention says: a best at step 0 survives (issue 14, item 4)."""
    store = make_store(keep_last=5, keep_best=2)
    for step in range(6):
        store.save({"step": step}, step=step, is_best=step in (0, 1, 3))
    store.cleanup()
    assert steps(store) == [1, 3, 5]
    store.cleanup(keep_best=0)
    assert steps(store) == [5]


def test_cleanup_with_keep_best_one_keeps_the_epoch_0_best(make_store):
    store = make_store(keep_best=1)
    store.save({"step": 0}, step=0, is_best=True)
    for step in range(1, 4):
        store.save({"step": step}, step=step)
    store.cleanup()
    assert steps(store) == [0, 3]
    assert store.load(0).state == {"step": 0}


def test_delete_all(make_store):
    store = make_store()
    other = make_store("other-run")
    store.save({}, step=0)
    other.save({}, step=0)
    assert store.storage.runs() == ["other-run", "run-1"]
    store.delete_all()
    assert steps(store) == []
    assert store.storage.runs() == ["other-run"]
    assert steps(other) == [0]


# -- corrupt checkpoints -----------------------------------------------------------------------


def test_a_truncated_latest_falls_back_to_the_previous_one_with_a_warning(make_store, raw):
    store = make_store()
    store.save(sample_state(1), step=1)
    store.save(sample_state(2), step=2)
    data = raw.data("run-1", 2)
    raw.put("run-1", 2, data[: len(data) // 2], raw.manifest("run-1", 2))
    with pytest.warns(CheckpointWarning, match=r"step 2 is unusable \(its data is truncated"):
        checkpoint = store.load_latest()
    assert checkpoint.info.step == 1
    assert_same_state(checkpoint.state, sample_state(1))
    with pytest.raises(CheckpointCorrupt, match="step 2: its data is truncated") as caught:
        store.load(2)
    assert (caught.value.run_id, caught.value.step) == ("run-1", 2)


def test_flipped_bytes_fail_the_checksum(make_store, raw):
    store = make_store()
    store.save({"a": np.arange(100)}, step=1)
    store.save({"a": np.arange(200)}, step=2)
    data = bytearray(raw.data("run-1", 2))
    data[-10] ^= 0xFF
    raw.put("run-1", 2, bytes(data), raw.manifest("run-1", 2))
    with pytest.warns(CheckpointWarning, match="step 2 is unusable .*BLAKE3"):
        assert np.array_equal(store.load_latest().state["a"], np.arange(100))


def test_missing_data_falls_back(make_store, raw):
    store = make_store()
    store.save({"v": 1}, step=1)
    store.save({"v": 2}, step=2)
    raw.drop_data("run-1", 2)
    with pytest.warns(CheckpointWarning, match="step 2 is unusable"):
        assert store.load_latest().state == {"v": 1}


def test_when_every_checkpoint_is_corrupt_there_is_nothing_to_resume(make_store, raw):
    store = make_store()
    store.save({"v": 1}, step=1)
    raw.put("run-1", 1, b"garbage", raw.manifest("run-1", 1))
    with pytest.warns(CheckpointWarning, match="step 1 is unusable"):
        assert store.load_latest() is None


# -- failed writes -----------------------------------------------------------------------------


@pytest.mark.parametrize("after_bytes", [0, 4096, 10**9], ids=["at-once", "midway", "manifest"])
def test_a_full_disk_leaves_the_previous_checkpoint_intact(
    make_store, raw, monkeypatch, after_bytes
):
    store = make_store("full-disk", keep_last=1)
    state = {"w": np.arange(50_000, dtype=np.float64)}
    store.save(state, step=1)
    saved = store.latest()
    if after_bytes == 10**9:
        # The data fits, the manifest does not.
        if isinstance(store.storage, DirectoryStorage):
            after_bytes = saved.size + 100
        else:

            def no_room(self):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(CheckpointInfo, "to_json", no_room)
    raw.fail_writes(monkeypatch, after_bytes)
    with pytest.raises(CheckpointError, match="run 'full-disk', step 2: could not be written") as e:
        store.save({"w": np.ones(50_000)}, step=2)
    assert isinstance(e.value.__cause__, OSError)
    assert e.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()
    assert raw.leftovers("full-disk") == []
    assert store.latest() == saved
    assert np.array_equal(store.load_latest().state["w"], state["w"])


# -- background writes -------------------------------------------------------------------------


class SlowStorage:
    """A storage whose writes take ``delay`` seconds longer; records when each ran."""

    def __init__(self, inner, delay: float = 0.3, fail: bool = False) -> None:
        self.inner = inner
        self.delay = delay
        self.fail = fail
        self.writes: list[tuple[int, float, float]] = []

    def write(self, run_id, step, data, manifest):
        start = time.monotonic()
        time.sleep(self.delay)
        if self.fail:
            raise OSError(errno.EIO, "I/O error")
        self.inner.write(run_id, step, data, manifest)
        self.writes.append((step, start, time.monotonic()))

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_background_save_returns_at_once_and_snapshots_the_state(storage):
    slow = SlowStorage(storage)
    store = CheckpointStore("bg", storage=slow, secret_key=SECRET, background=True)
    state = {"w": np.zeros(1000)}
    began = time.monotonic()
    info = store.save(state, step=1)
    assert time.monotonic() - began < slow.delay  # did not wait for the write
    state["w"][:] = 7.0  # changed after save(): must not leak into the checkpoint
    store.save(state, step=2)  # waits for the first write
    assert [s for s, _, _ in slow.writes] == [1]
    store.wait()
    (_, _, end1), (_, start2, _) = slow.writes
    assert start2 >= end1  # one writer, one write at a time
    assert store.load(1).info == info
    assert np.array_equal(store.load(1).state["w"], np.zeros(1000))
    assert np.array_equal(store.load(2).state["w"], np.full(1000, 7.0))
    store.close()


def test_reads_wait_for_the_background_write(storage):
    store = CheckpointStore("bg", storage=SlowStorage(storage), secret_key=SECRET, background=True)
    store.save({"v": 1}, step=1)
    assert store.load_latest().state == {"v": 1}
    store.close()


def test_a_failed_background_write_is_raised_by_wait_once(storage):
    slow = SlowStorage(storage, delay=0.05, fail=True)
    store = CheckpointStore("bg", storage=slow, secret_key=SECRET, background=True)
    store.save({"v": 1}, step=1)
    with pytest.raises(CheckpointError, match="run 'bg', step 1: could not be written .*I/O error"):
        store.wait()
    store.wait()  # raised once
    slow.fail = False
    store.save({"v": 2}, step=2)
    store.close()
    assert steps(store) == [2]


def test_a_failed_background_write_is_raised_by_the_next_save(storage):
    slow = SlowStorage(storage, delay=0.05, fail=True)
    store = CheckpointStore("bg", storage=slow, secret_key=SECRET, background=True)
    store.save({"v": 1}, step=1)
    with pytest.raises(CheckpointError, match="step 1: could not be written"):
        store.save({"v": 2}, step=2)
    slow.fail = False
    store.save({"v": 3}, step=3)
    store.close()
    assert steps(store) == [3]


def test_wait_with_a_timeout_and_close_as_context_manager(storage):
    slow = SlowStorage(storage, delay=0.5)
    with CheckpointStore("bg", storage=slow, secret_key=SECRET, background=True) as store:
        store.save({"v": 1}, step=1)
        with pytest.raises(TimeoutError):
            store.wait(timeout=0.01)
    assert [s for s, _, _ in slow.writes] == [1]  # close() waited
    with pytest.raises(CheckpointError, match="closed"):
        store.save({}, step=2)


# -- another process ---------------------------------------------------------------------------


def storage_expression(storage) -> str:
    if isinstance(storage, DirectoryStorage):
        return f"DirectoryStorage({str(storage.root)!r})"
    return f"DatabaseStorage({storage.database_url!r})"


def test_a_new_process_loads_what_this_one_saved_and_the_other_way_round(make_store, tmp_path):
    store = make_store("cross-process")
    state = sample_state(5)
    store.save(state, step=5, metrics={"loss": 0.1})
    script = tmp_path / "other.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            import numpy as np
            from taskkit.checkpoint import CheckpointStore, DirectoryStorage, DatabaseStorage

            store = CheckpointStore("cross-process", storage={storage_expression(store.storage)},
                                    secret_key={SECRET!r})
            checkpoint = store.load_latest()
            state = checkpoint.state
            print(json.dumps({{
                "step": checkpoint.info.step,
                "loss": checkpoint.info.metrics["loss"],
                "weights_sum": float(state["weights"].sum()),
                "rng": state["rng"]["state"]["state"],
            }}))
            state["epoch"] = 6
            store.save(state, step=6)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {
        "step": 5,
        "loss": 0.1,
        "weights_sum": float(state["weights"].sum()),
        "rng": state["rng"]["state"]["state"],
    }
    checkpoint = store.load_latest()
    assert checkpoint.info.step == 6
    assert checkpoint.state["epoch"] == 6
    assert np.array_equal(checkpoint.state["weights"], state["weights"])


def test_a_manifest_copied_under_another_step_is_skipped_not_counted_twice(make_store, raw):
    """A manifest's step must be the step it is stored under (issue 14, item 5)."""
    store = make_store()
    store.save({"v": 1}, step=1)
    raw.put("run-1", 5, raw.data("run-1", 1), raw.manifest("run-1", 1))
    with pytest.warns(CheckpointWarning, match="describes step 1"):
        assert [info.step for info in store.list()] == [1]
    with pytest.warns(CheckpointWarning, match="describes step 1"):
        assert store.load_latest().state == {"v": 1}


RUN_UID = "0123456789abcdef0123456789abcdef"


def test_a_run_identity_keys_the_store_and_is_signed_in_every_manifest(make_store, raw):
    """Issue 14, item 3: the identity is in the storage key and in the signed manifest."""
    from taskkit.errors import CheckpointTampered

    store = make_store(7, run_uid=RUN_UID)
    assert store.run_id == f"7-{RUN_UID}"
    info = store.save({"v": 1}, step=1)
    assert info.run_uid == RUN_UID
    assert f'"run_uid":"{RUN_UID}"'.encode() in info.signed_bytes()
    assert make_store(7).list() == []  # the bare id is another namespace
    manifest = raw.manifest(store.run_id, 1)
    manifest["run_uid"] = "f" * 32
    raw.put(store.run_id, 1, raw.data(store.run_id, 1), manifest)
    with pytest.warns(CheckpointWarning, match="belongs to another run"):
        assert store.load_latest() is None  # never restored: the run starts fresh
    forged = make_store(7, run_uid="f" * 32)
    raw.put(forged.run_id, 1, raw.data(store.run_id, 1), manifest)
    with pytest.raises(CheckpointTampered):
        forged.load_latest()  # the same fields, but the signature covers run_uid


@pytest.mark.parametrize("bad", ["", "x", "a/b", "../" + "a" * 10, 12345678])
def test_a_bad_run_uid_is_a_configuration_error(make_store, bad):
    with pytest.raises(ConfigurationError, match="run_uid"):
        make_store(7, run_uid=bad)
