"""The Celery app the two simulated hosts run (``tests/fleet_hosts``).

Its broker, result backend and lease store are the Redis of the test (``RedisOnLinks``), at
the address each process reaches it by: ``TASKKIT_TEST_HOSTS_REDIS`` (127.0.0.1 in the test
process, the root side of its own link in a host's worker). Every epoch a trainer starts is
appended to ``$TASKKIT_TEST_HOSTS_DIR/epochs-<nonce>-<host>`` (a file: it needs no network,
so a partitioned host still records what it does).
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any

from taskkit.config import Settings
from taskkit.tasks import TrainingTask, create_app
from workers.training import run_training

LEASE_TTL = 3.0
QUEUE = "tk-hosts-q"
HOST = os.environ.get("TASKKIT_TEST_HOST", "test")

settings = Settings(
    broker_url=os.environ.get("TASKKIT_TEST_HOSTS_REDIS", "redis://127.0.0.1:1/0"),
    visibility_timeout=5.0,
    lease_ttl=LEASE_TTL,
    progress_interval=0.0,
)
app = create_app(
    "tkhosts",
    settings=settings,
    task_default_queue=QUEUE,
    taskkit_outer_delay=0.05,
    taskkit_outer_max_delay=0.2,
    taskkit_inner_delay=0.01,
    taskkit_inner_max_delay=0.02,
)


def epochs_file(nonce: str, host: str) -> pathlib.Path:
    return pathlib.Path(os.environ["TASKKIT_TEST_HOSTS_DIR"]) / f"epochs-{nonce}-{host}"


def epochs_started(nonce: str, host: str) -> list[int]:
    path = epochs_file(nonce, host)
    lines = path.read_text().splitlines() if path.exists() else []
    return [int(line.split()[0]) for line in lines]


@app.task(base=TrainingTask, bind=True, shared=False, name="tkhosts.train")
def train(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    nonce = str(config.get("nonce", model_run_id))

    def on_epoch(epoch: int) -> None:
        if "TASKKIT_TEST_HOSTS_DIR" in os.environ:
            with epochs_file(nonce, HOST).open("a") as out:
                out.write(f"{epoch} {time.time():.3f}\n")

    return run_training(self, config, on_epoch=on_epoch)
