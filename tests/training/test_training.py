"""TrainingTask called in this process (no worker): resume, random state, policy, integrity.

Each test runs on the embedded SQLite database and on PostgreSQL, with checkpoints in a
directory of its own. Runs are compared with ``np.array_equal``: bit-identical, not close.
"""

from __future__ import annotations

import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery.exceptions import SoftTimeLimitExceeded

from taskkit.checkpoint import CheckpointStore
from taskkit.config import reset_settings
from taskkit.db.models import ModelRun, TrainingProgress
from taskkit.db.session import session_scope
from taskkit.errors import CheckpointCorrupt, CheckpointTampered, ConfigurationError, RunNotFound
from taskkit.tasks import ReproducibilityWarning, TrainingTask, load_model
from taskkit.tasks._runs import mark_completed, screen_attempt
from tests.training import apps

REPO = Path(__file__).resolve().parents[2]
CONFIG = {"epochs": 8, "seed": 3, "batch_size": 200}


def cfg(base: dict[str, Any] = CONFIG, **extra: Any) -> dict[str, Any]:
    """A run config with a fresh ``nonce``: its fault and epoch counters are its own."""
    return {**base, "nonce": uuid.uuid4().hex, **extra}


@pytest.fixture(autouse=True)
def training_env(
    default_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    monkeypatch.setenv("TASKKIT_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("TASKKIT_SECRET_KEY", "training-tests-key")
    reset_settings()
    apps.app.conf.taskkit_database_url = default_database
    yield default_database
    reset_settings()


def new_run(config: dict[str, Any] | None = None, task: str = apps.train.name) -> int:
    with session_scope() as db:
        run = ModelRun(name="t", model_type="sgd", config=config or {}, task_name=task)
        db.add(run)
        db.flush()
        return run.id


def train(config: dict[str, Any], task: Any = apps.train) -> tuple[int, Any]:
    config = {**config, "nonce": uuid.uuid4().hex}
    run_id = new_run(config, task.name)
    return run_id, task(run_id, config)


def store_of(run_id: int, task: Any = apps.train) -> CheckpointStore:
    """The run's checkpoint store, as its task opens it (keyed by the run's identity)."""
    return task.checkpoint_store(run_id)  # type: ignore[no-any-return]


def coefficients(run_id: int) -> tuple[np.ndarray, np.ndarray]:
    model = load_model(run_id)
    return model.coef_, model.intercept_


def assert_same_model(a: int, b: int) -> None:
    (coef_a, icpt_a), (coef_b, icpt_b) = coefficients(a), coefficients(b)
    assert np.array_equal(coef_a, coef_b)
    assert np.array_equal(icpt_a, icpt_b)


def test_a_fresh_run_completes_stores_its_model_and_keeps_the_final_checkpoint() -> None:
    run_id, result = train(CONFIG)

    assert result["status"] == "success"
    assert result["resumed_from"] is None
    assert result["epochs_run"] == 8
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        assert run is not None
        assert run.status == "completed"
        assert run.completed_at is not None
        assert run.final_score == result["best_score"]
        assert run.final_score > 0.6
        progress = db.query(TrainingProgress).filter_by(model_run_id=run_id).one()
        assert (progress.current_epoch, progress.total_epochs) == (8, 8)
        assert progress.progress_percentage == 100.0
        assert progress.status == "completed"
        assert set(progress.metrics) == {"score", "loss", "best_score"}
        assert progress.metrics["best_score"] == run.final_score
    assert load_model(run_id).coef_.shape == (1, 10)
    kept = store_of(run_id).list()
    assert kept[-1].step == 7
    assert {info.step for info in kept[:-1]} <= {info.step for info in kept if info.is_best}


@pytest.mark.parametrize("task", [apps.train, apps.train_every3], ids=["every1", "every3"])
def test_a_run_resumed_after_a_failure_continues_at_the_next_epoch_and_ends_identical(
    task: Any,
) -> None:
    fail_at = random.randint(1, CONFIG["epochs"] - 2)
    config = cfg(test={"fail_at": fail_at})
    run_id = new_run(config, task.name)

    with pytest.raises(KeyError):
        task(run_id, config)
    # The failure struck before epoch `fail_at` trained: the last completed epoch was saved,
    # whatever the checkpoint interval.
    assert store_of(run_id).latest().step == fail_at - 1  # type: ignore[union-attr]
    result = task(run_id, config)

    assert result["resumed_from"] == fail_at
    assert apps.epochs_started(config) == [*range(fail_at + 1), *range(fail_at, 8)]
    reference, _ = train(CONFIG, task)
    assert_same_model(run_id, reference)


def test_a_run_resumes_from_checkpoints_kept_in_the_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No shared disk: a retry on another host finds the checkpoint in the database."""
    monkeypatch.setenv("TASKKIT_CHECKPOINT_STORAGE", "database")
    monkeypatch.setenv("TASKKIT_CHECKPOINT_DIR", "/nonexistent/never-written")
    reset_settings()
    config = cfg(test={"fail_at": 4})
    run_id = new_run(config)
    with pytest.raises(KeyError):
        apps.train(run_id, config)

    result = apps.train(run_id, config)

    assert result["resumed_from"] == 4
    assert not Path("/nonexistent").exists()
    reference, _ = train(CONFIG)
    assert_same_model(run_id, reference)


def test_a_run_killed_in_another_process_resumes_in_a_new_process_bit_identical(
    training_env: str, tmp_path: Path
) -> None:
    kill_at = random.randint(1, CONFIG["epochs"] - 2)
    config = cfg(test={"kill_at": kill_at})
    run_id = new_run(config)

    def run_in_new_process() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tests.training.run_directly", str(run_id)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    killed = run_in_new_process()
    assert killed.returncode == -9, killed.stderr
    assert store_of(run_id).latest().step == kill_at - 1  # type: ignore[union-attr]
    resumed = run_in_new_process()
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed_from={kill_at}" in resumed.stdout

    reference, _ = train(CONFIG)
    assert_same_model(run_id, reference)


def test_random_state_of_generators_numpy_and_python_is_restored_on_resume() -> None:
    config = {"epochs": 6, "seed": 11, "estimator_seed": 1}
    _, uninterrupted = train(config, apps.draws)
    interrupted = cfg(config, test={"fail_at": 4})
    run_id = new_run(interrupted, apps.draws.name)
    with pytest.raises(KeyError):
        apps.draws(run_id, interrupted)
    # Whatever this process draws in between must not matter: the checkpoint has the state.
    np.random.random(100)
    random.random()

    resumed = apps.draws(run_id, interrupted)

    assert resumed == uninterrupted
    assert len({tuple(d) for d in resumed}) == 6


def test_an_estimator_without_random_state_is_warned_about() -> None:
    with pytest.warns(ReproducibilityWarning, match="random_state=None"):
        train({"epochs": 2, "seed": 1}, apps.draws)


def test_a_soft_time_limit_checkpoints_the_last_completed_epoch() -> None:
    config = cfg(test={"soft_limit_at": 4})
    run_id = new_run(config, apps.train_every3.name)

    with pytest.raises(SoftTimeLimitExceeded):
        apps.train_every3(run_id, config)

    assert store_of(run_id).latest().step == 3  # type: ignore[union-attr]


def test_a_checkpoint_signed_with_another_key_is_refused_and_the_run_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKKIT_SECRET_KEY", "the-key-of-the-team")
    reset_settings()
    config = cfg(test={"fail_at": 3})
    run_id = new_run(config)
    with pytest.raises(KeyError):
        apps.train(run_id, config)
    monkeypatch.setenv("TASKKIT_SECRET_KEY", "somebody-else-key!")
    reset_settings()

    with pytest.raises(CheckpointTampered):
        apps.train(run_id, config)
    assert apps.epochs_started(config) == [0, 1, 2, 3]


def test_an_attempt_is_screened_against_the_run_row() -> None:
    run_id = new_run()
    assert screen_attempt(run_id, "a").verdict == "run"
    with session_scope() as db:
        db.get(ModelRun, run_id).task_id = "b"  # type: ignore[union-attr]
    stale = screen_attempt(run_id, "a")
    assert (stale.verdict, stale.owner) == ("stale", "b")
    mark_completed(run_id, {"weights": [1.0]}, 0.9)
    done = screen_attempt(run_id, "a")
    assert done.verdict == "completed"
    assert done.result == {
        "status": "success",
        "model_run_id": run_id,
        "best_score": 0.9,
    }
    with pytest.raises(RunNotFound, match="training run 424242 does not exist"):
        screen_attempt(424242, "a")


def test_a_stored_model_whose_bytes_were_changed_is_refused() -> None:
    run_id = new_run()
    mark_completed(run_id, {"weights": [1.0]}, 0.9)
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        assert run is not None
        assert run.model_object is not None
        run.model_object = run.model_object.replace(b"weights", b"weighty")
    # the same check as a checkpoint's: the data no longer matches its signed manifest
    with pytest.raises(CheckpointCorrupt, match="final model of run .*does not match the BLAKE3"):
        load_model(run_id)


def test_bad_training_options_are_refused_with_the_option_named() -> None:
    app = apps.app
    name = f"bad.every.{uuid.uuid4().hex}"
    with pytest.raises(ConfigurationError, match="checkpoint_every must be an integer >= 1"):

        @app.task(base=TrainingTask, bind=True, shared=False, name=name, checkpoint_every=0)
        def every(self: TrainingTask, model_run_id: int) -> None: ...

        _ = app.tasks[name]
    with pytest.raises(ConfigurationError, match="total_epochs must be an integer >= 1"):
        apps.train(new_run(), {"epochs": 0})


@apps.app.task(base=TrainingTask, bind=True, shared=False, name=apps.kit.name("best_first"))
def best_first(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    """Scores that only get worse: the best epoch is epoch 0."""
    with self.training(total_epochs=int(config["epochs"])) as run:
        state = run.restore() or {"epoch": -1}
        for epoch in run.epochs():
            state = {"epoch": epoch}
            run.report(epoch, {"score": 1.0 / (epoch + 1)}, state)
        return run.complete(state)


def test_a_completed_run_keeps_its_best_checkpoint_and_its_final_one() -> None:
    """keep_best holds at completion too: a best at epoch 0 survives (issue 14, item 4)."""
    run_id = new_run({"epochs": 5}, best_first.name)
    result = best_first(run_id, {"epochs": 5})
    assert result["best_score"] == 1.0
    kept = store_of(run_id, best_first).list()
    assert [(info.step, info.is_best) for info in kept] == [(0, True), (4, False)]
    assert store_of(run_id, best_first).load(0).state["state"] == {"epoch": 0}


# -- run identity (issue 14, item 3) -----------------------------------------------------------


def test_a_new_run_that_gets_a_deleted_runs_id_trains_from_epoch_0(training_env: str) -> None:
    """SQLite reuses the highest id after a delete: the new run must not resume the old one's
    checkpoint."""
    if not training_env.startswith("sqlite"):
        pytest.skip("PostgreSQL never hands out an id twice")
    old = cfg(test={"fail_at": 4})
    run_id = new_run(old)
    with pytest.raises(KeyError):
        apps.train(run_id, old)
    assert store_of(run_id).latest().step == 3  # type: ignore[union-attr]
    with session_scope() as db:
        db.query(TrainingProgress).filter_by(model_run_id=run_id).delete()
        db.delete(db.get(ModelRun, run_id))

    new = cfg()
    assert new_run(new) == run_id  # the same integer id, another run
    result = apps.train(run_id, new)

    assert result["resumed_from"] is None
    assert apps.epochs_started(new) == list(range(8))
    reference, _ = train(CONFIG)
    assert_same_model(run_id, reference)


def test_two_databases_sharing_one_checkpoint_folder_never_share_a_run(
    training_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second (or recreated) database numbers its runs from 1 again, over the same folder."""
    if not training_env.startswith("sqlite"):
        pytest.skip("the two databases are SQLite files of their own; once is enough")
    from taskkit.db.migrate import upgrade
    from taskkit.db.session import create_engine_for

    def use_database(name: str) -> str:
        url = f"sqlite:///{tmp_path / name}"
        engine = create_engine_for(url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        monkeypatch.setenv("TASKKIT_DATABASE_URL", url)
        reset_settings()
        apps.app.conf.taskkit_database_url = url
        return url

    use_database("a.db")
    first = cfg(test={"fail_at": 4})
    run_a = new_run(first)
    with pytest.raises(KeyError):
        apps.train(run_a, first)

    use_database("b.db")
    second = cfg()
    run_b = new_run(second)
    assert run_b == run_a == 1
    result = apps.train(run_b, second)

    assert result["resumed_from"] is None
    assert apps.epochs_started(second) == list(range(8))


def test_a_checkpoint_of_another_run_identity_is_not_restored(training_env: str) -> None:
    """Copied into the run's folder, a checkpoint signed with the right key but saved for
    another run identity is skipped with a warning; the run starts fresh."""
    from taskkit.errors import CheckpointWarning

    donor = cfg(test={"fail_at": 4})
    donor_id = new_run(donor)
    with pytest.raises(KeyError):
        apps.train(donor_id, donor)
    victim = cfg()
    victim_id = new_run(victim)
    source = store_of(donor_id)
    target = store_of(victim_id)
    assert source.run_id != target.run_id
    for info in source.list():
        data = source.storage.read(source.run_id, info.step)
        target.storage.write(target.run_id, info.step, [data], lambda info=info: info)

    with pytest.warns(CheckpointWarning, match="another run"):
        result = apps.train(victim_id, victim)

    assert result["resumed_from"] is None
    assert apps.epochs_started(victim) == list(range(8))


def test_a_soft_limit_during_the_first_heartbeat_write_ends_the_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The limit strikes wherever the task is; inside the heartbeat write it is no outage."""
    from taskkit.tasks import _training

    def struck(*args: Any, **kwargs: Any) -> None:
        raise SoftTimeLimitExceeded("soft time limit (in the heartbeat write)")

    monkeypatch.setattr(_training, "write_heartbeat", struck)
    config = cfg()
    run_id = new_run(config)

    with pytest.raises(SoftTimeLimitExceeded):
        apps.train(run_id, config)


def test_a_soft_limit_during_the_stop_request_read_ends_the_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from taskkit.tasks import _runs

    def struck(*args: Any, **kwargs: Any) -> bool:
        raise SoftTimeLimitExceeded("soft time limit (in the stop request read)")

    monkeypatch.setattr(_runs, "stop_requested", struck)
    config = cfg()
    run_id = new_run(config)

    with pytest.raises(SoftTimeLimitExceeded):
        apps.train(run_id, config)
