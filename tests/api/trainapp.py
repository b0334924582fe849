"""The Celery app and training task of the run API tests (in process and in worker
subprocesses): the example ``run_training`` body on the real Redis broker, under this test
session's prefix (``tests._support.apps``).

``config["gate"]``: before each epoch after the first, the task waits (up to a minute) until the
test opens that epoch's gate (``open_gate``), so a test that reads the run's event stream sees
every epoch end before the next one starts, however loaded the machine is.
"""

from __future__ import annotations

import time
from typing import Any

from taskkit.tasks import TrainingTask
from tests._support.apps import redis_test_app
from workers.training import run_training

kit = redis_test_app("tka")
app, counter, key = kit.app, kit.counter, kit.key
QUEUE = kit.queue

#: Seconds the task waits for a gate before it trains on anyway (the test then fails).
GATE_TIMEOUT = 60.0


def open_gate(gate: str, epoch: int) -> None:
    """Let the run of ``gate`` start epoch ``epoch`` (0-based)."""
    counter.set(key("gate", gate, epoch), 1, ex=3600)


def _gated(config: dict[str, Any]) -> Any:
    gate = config.get("gate")

    def on_epoch(epoch: int) -> None:
        if not gate or epoch == 0:
            return
        deadline = time.monotonic() + GATE_TIMEOUT
        while not counter.exists(key("gate", gate, epoch)) and time.monotonic() < deadline:
            time.sleep(0.02)

    return on_epoch


@app.task(base=TrainingTask, bind=True, shared=False, name=kit.name("train"))
def train(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    return run_training(self, config, on_epoch=_gated(config))
