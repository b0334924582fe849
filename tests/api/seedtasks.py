"""The seed's ``app.tasks.training_tasks``: ``train_model_task(model_run_id, config)``, a real
``TrainingTask`` (the example ``run_training`` body: checkpoints, progress, a signed final model)
on the real Redis broker under this session's prefix, for ``tests/api/test_seed_app.py`` (the
test process sends, a worker subprocess runs it)."""

from __future__ import annotations

from typing import Any

from taskkit.tasks import TrainingTask
from tests._support.apps import redis_test_app
from workers.training import run_training

kit = redis_test_app("tkseed")
app = kit.app


@app.task(base=TrainingTask, bind=True, shared=False, name=kit.name("train_model_task"))
def train_model_task(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> Any:
    """Train run ``model_run_id`` with ``config`` (the seed's training task)."""
    return run_training(self, config)
