"""The Celery app the CLI tests load with ``--app tests.cli.cliapp``.

A real Redis broker with a queue, a key prefix and task names of this test run's own, so no
other test's worker consumes its messages and no other run shares its leases. No worker runs
here: the tests check the rows and the messages waiting in Redis.
"""

from __future__ import annotations

import uuid
from typing import Any

from taskkit.config import Settings
from taskkit.tasks import TrainingTask, create_app
from tests.conftest import REDIS_URL

RUN = uuid.uuid4().hex[:10]
PREFIX = f"tkcli-{RUN}"
QUEUE = f"{PREFIX}-q"
#: The task ``taskkit train`` sends in these tests.
TRAIN = f"tkcli_{RUN}.train_model"
OTHER = f"tkcli_{RUN}.train_forest"

app = create_app(
    "tkcli",
    settings=Settings(broker_url=REDIS_URL, lease_ttl=6.0),
    task_default_queue=QUEUE,
    broker_transport_options={"global_keyprefix": f"{PREFIX}:"},
    result_expires=600,
)
#: The same app under another name, for ``--app tests.cli.cliapp:other_app``.
other_app = app


def _train(task: TrainingTask, config: dict[str, Any]) -> dict[str, Any]:
    with task.training(total_epochs=int(config.get("epochs", 2))) as run:
        state: dict[str, int] = run.restore() or {"seen": 0}
        for epoch in run.epochs():
            state = {"seen": state["seen"] + 1}
            run.report(epoch, {"score": epoch / 10}, state)
        return run.complete(state)


@app.task(base=TrainingTask, bind=True, shared=False, name=TRAIN)
def train_model(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    """A tiny epoch loop (never run by the CLI tests: no worker consumes ``QUEUE``)."""
    return _train(self, config)


@app.task(base=TrainingTask, bind=True, shared=False, name=OTHER)
def train_forest(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    """A second training task, so a config can choose it."""
    return _train(self, config)


#: Apps whose broker, or result backend, never answers (nothing listens on port 1).
DOWN = "redis://127.0.0.1:1/0"
broker_down = create_app("tkcli-down", settings=Settings(broker_url=DOWN, lease_url=REDIS_URL))
backend_down = create_app(
    "tkcli-down2", settings=Settings(broker_url=REDIS_URL, result_backend=DOWN)
)


def _train_down(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    """Never sent: a service is down."""
    return _train(self, config)


for _down in (broker_down, backend_down):
    _down.task(base=TrainingTask, bind=True, shared=False, name="down.train")(_train_down)


def queued(queue: str = QUEUE) -> list[dict[str, Any]]:
    """The task messages waiting in ``queue`` (oldest first), as kombu stored them."""
    import json

    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        raw = client.lrange(f"{PREFIX}:{queue}", 0, -1)
    finally:
        client.close()
    return [json.loads(message) for message in reversed(raw)]
