"""The Celery app and training task the training tests run, in process and in subprocesses.

Built by ``tests._support.apps.redis_test_app``: a real Redis broker, with a queue, key prefix
and task names of this test session's own (``TASKKIT_TEST_RUN`` is shared with worker
subprocesses). The task is the example ``run_training`` body; every epoch it
starts is recorded in Redis (the tests count epochs from there), and ``config["test"]`` injects
faults at a chosen epoch, once per run:

- ``fail_at``: raise ``KeyError`` (an unclassified error: the task is re-queued);
- ``stop_at``: ``request_stop()``, what a SIGTERM does;
- ``soft_limit_at``: raise ``SoftTimeLimitExceeded``, what Celery raises at the soft limit;
- ``kill_at``: SIGKILL the process that runs the task.
"""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded
from sklearn.linear_model import SGDClassifier

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
