"""The Celery app and training task of the run API tests (in process and in worker
subprocesses): the example ``run_training`` body on the real Redis broker, under this test
session's prefix (``tests._support.apps``).

Nothing holds an epoch back for the tests' event streams: the stream sends every epoch from
the run's history (``training_epochs``), however fast the epochs end.
"""

from __future__ import annotations

from typing import Any

from taskkit.tasks import TrainingTask
from tests._support.apps import redis_test_app
from workers.training import run_training

kit = redis_test_app("tka")
app, counter, key = kit.app, kit.counter, kit.key
QUEUE = kit.queue


@app.task(base=TrainingTask, bind=True, shared=False, name=kit.name("train"))
def train(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    return run_training(self, config)
