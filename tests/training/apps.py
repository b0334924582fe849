"""The Celery app and training task the training tests run, in process and in subprocesses.

Built by ``tests._support.apps.redis_test_app``: a real Redis broker, with a queue, key prefix
and task names of this test session's own (``TASKKIT_TEST_RUN`` is shared with worker
subprocesses). The task is the example ``run_training`` body; every epoch it
starts is recorded in Redis (the tests count epochs from there), and ``config["test"]`` injects
faults at a chosen epoch, once per run:

- ``fail_at``: raise ``KeyError`` (an unclassified error: the task is re-queued);
- ``stop_at``: ``request_stop()``, what a SIGTERM does;
- ``soft_limit_at``: raise ``SoftTimeLimitExceeded``, what Celery raises at the soft limit;
- ``kill_at``: SIGKILL the process that runs the task;
- ``soft_limit_in_checkpoint_at``: raise ``SoftTimeLimitExceeded`` inside the write of that
  epoch's checkpoint (task ``train_limit_in_write``), as Celery's soft-limit signal handler
  does when the limit strikes there;
- ``swallowed_soft_limit_at``: send this process Celery's soft-limit signal and catch what its
  handler raises, as code with an ``except Exception`` on the way does (a progress write).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded
from sklearn.linear_model import SGDClassifier

from taskkit.checkpoint import CheckpointInfo, CheckpointStore, DirectoryStorage
from taskkit.config import get_settings
from taskkit.tasks import TrainingTask
from taskkit.tasks._training import request_stop
from tests._support.apps import redis_test_app
from workers.training import run_training

kit = redis_test_app("tkt")
app, counter, key = kit.app, kit.counter, kit.key
PREFIX, QUEUE, deliveries = kit.prefix, kit.queue, kit.deliveries


def trial(config: dict[str, Any], run_id: int) -> str:
    """What the counters of a run are keyed by: the config's ``nonce`` (run ids restart when a
    test empties the tables), else the run id."""
    return str(config.get("nonce", run_id))


def epochs_started(config: dict[str, Any], run_id: int = 0) -> list[int]:
    """Every epoch any attempt of the run started, in order."""
    return [int(e) for e in counter.lrange(key("epochs", trial(config, run_id)), 0, -1)]


def fault_injector(run_id: int, config: dict[str, Any]) -> Any:
    faults = dict(config.get("test") or {})
    name = trial(config, run_id)

    def _once(fault: str) -> bool:
        return bool(counter.set(key("fault", name, fault), 1, nx=True, ex=3600))

    def on_epoch(epoch: int) -> None:
        counter.rpush(key("epochs", name), epoch)
        counter.expire(key("epochs", name), 3600)
        if faults.get("fail_at") == epoch and _once("fail"):
            raise KeyError(f"injected failure at epoch {epoch}")
        if faults.get("stop_at") == epoch and _once("stop"):
            request_stop()
        if faults.get("soft_limit_at") == epoch and _once("soft"):
            raise SoftTimeLimitExceeded(f"injected soft time limit at epoch {epoch}")
        if faults.get("kill_at") == epoch and _once("kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        if faults.get("soft_limit_in_checkpoint_at") == epoch and _once("soft_in_write"):
            _limit_in_write.add(epoch)
        if faults.get("swallowed_soft_limit_at") == epoch and _once("swallowed"):
            try:  # Celery's soft-limit signal: its handler raises SoftTimeLimitExceeded here
                signal.raise_signal(signal.SIGUSR1)
            except Exception:
                logging.getLogger(__name__).warning("swallowed", exc_info=True)

    return on_epoch


@app.task(base=TrainingTask, bind=True, shared=False, name=kit.name("train"))
def train(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    return run_training(self, config, on_epoch=fault_injector(model_run_id, config))


@app.task(
    base=TrainingTask,
    bind=True,
    shared=False,
    name=kit.name("train_every3"),
    checkpoint_every=3,
    score_metric=None,
)
def train_every3(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    return run_training(self, config, on_epoch=fault_injector(model_run_id, config))


@app.task(
    base=TrainingTask, bind=True, shared=False, name=kit.name("train_limited"), soft_time_limit=1
)
def train_limited(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    try:
        return run_training(self, config, on_epoch=fault_injector(model_run_id, config))
    except SoftTimeLimitExceeded as exc:
        record_limit(model_run_id, config, exc)
        raise


def record_limit(run_id: int, config: dict[str, Any], exc: BaseException) -> None:
    """Record where a soft time limit struck: the epoch in progress and the innermost frames."""
    name = trial(config, run_id)
    started = epochs_started(config, run_id)
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    counter.rpush(key("limits", name), f"after epoch start {started[-1:]}: {where}")
    counter.expire(key("limits", name), 3600)


def limits(config: dict[str, Any], run_id: int = 0) -> list[str]:
    """Where each soft time limit of the run struck (``record_limit``), in order."""
    return [raw.decode() for raw in counter.lrange(key("limits", trial(config, run_id)), 0, -1)]


#: Steps whose checkpoint write a soft time limit interrupts (``soft_limit_in_checkpoint_at``).
_limit_in_write: set[int] = set()


class _LimitInWrite(DirectoryStorage):
    """Checkpoint files whose write of an armed step is cut by a soft time limit halfway:
    after the data's temp file is written, before the manifest is (the signal handler raises
    in whatever frame the process is in)."""

    def write(
        self,
        run_id: str,
        step: int,
        data: Sequence[Any],
        manifest: Callable[[], CheckpointInfo],
    ) -> None:
        def interrupted() -> CheckpointInfo:
            if step in _limit_in_write:
                _limit_in_write.discard(step)
                raise SoftTimeLimitExceeded(f"soft time limit inside the checkpoint of {step}")
            return manifest()

        super().write(run_id, step, data, interrupted)


class LimitInWriteTask(TrainingTask):
    def checkpoint_store(self, run_id: Any, *, run_uid: str | None = None) -> CheckpointStore:
        return CheckpointStore(
            run_id,
            run_uid=run_uid or self.run_uid(run_id),
            storage=_LimitInWrite(get_settings().checkpoint_dir),
        )


@app.task(base=LimitInWriteTask, bind=True, shared=False, name=kit.name("train_limit_in_write"))
def train_limit_in_write(
    self: TrainingTask, model_run_id: int, config: dict[str, Any]
) -> dict[str, Any]:
    return run_training(self, config, on_epoch=fault_injector(model_run_id, config))


@app.task(base=TrainingTask, bind=True, shared=False, name=kit.name("draws"), score_metric=None)
def draws(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> list[list[float]]:
    """Draws from a registered Generator, the global numpy state and ``random`` every epoch."""
    seed = int(config.get("seed", 0))
    np.random.seed(seed)
    random.seed(seed)
    on_epoch = fault_injector(model_run_id, config)
    with self.training(total_epochs=int(config["epochs"])) as run:
        generator = run.rng("g", seed)
        state = run.restore() or {
            "draws": [],
            "estimator": SGDClassifier(random_state=config.get("estimator_seed")),
        }
        for epoch in run.epochs():
            on_epoch(epoch)
            state["draws"].append([generator.random(), float(np.random.random()), random.random()])
            run.report(epoch, {}, state)
        run.complete(state)
        return list(state["draws"])
