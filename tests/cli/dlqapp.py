"""The Celery app the ``taskkit dlq`` tests load with ``--app tests.cli.dlqapp``.

Like ``cliapp``: a real Redis broker, this test run's key prefix (``cliapp.PREFIX``, whose keys
the ``database`` fixture deletes after each test) and a queue of its own; no worker consumes
it, so the tests read what a replay sent from Redis. ``SCORE`` is a ``BatchTask`` whose
``validate_item`` refuses an item with ``"bad"`` in it; ``PING`` is a plain task.
"""

from __future__ import annotations

from typing import Any

from taskkit.config import Settings
from taskkit.tasks import BatchTask, ResilientTask, create_app
from tests.cli import cliapp
from tests.conftest import REDIS_URL

QUEUE = f"{cliapp.PREFIX}-dlq"
SCORE = f"tkdlq_{cliapp.RUN}.score_items"
SCORE_V2 = f"tkdlq_{cliapp.RUN}.score_items_v2"
PING = f"tkdlq_{cliapp.RUN}.ping"

app = create_app(
    "tkdlq",
    settings=Settings(broker_url=REDIS_URL, lease_ttl=6.0),
    task_default_queue=QUEUE,
    broker_transport_options={"global_keyprefix": f"{cliapp.PREFIX}:"},
    result_expires=600,
)


class ScoreTask(BatchTask):
    """Items are mappings; one with a ``"bad"`` key no longer validates."""

    def validate_item(self, item: Any) -> None:
        if not isinstance(item, dict) or "bad" in item:
            raise ValueError(f"not a valid item: {item!r}")


@app.task(base=ScoreTask, bind=True, shared=False, name=SCORE, item_max_attempts=1)
def score_items(self: ScoreTask, item: dict[str, Any]) -> None:
    """Never run here (no worker consumes ``QUEUE``)."""


@app.task(base=ScoreTask, bind=True, shared=False, name=SCORE_V2, item_max_attempts=1)
def score_items_v2(self: ScoreTask, item: dict[str, Any]) -> None:
    """A second version of ``score_items``, for ``--into``."""


@app.task(base=ResilientTask, bind=True, shared=False, name=PING)
def ping(self: ResilientTask, host: str, timeout: float = 1.0) -> str:
    """A task (not a batch) whose failures are replayed as a whole."""
    return host


def queued() -> list[dict[str, Any]]:
    """The task messages a replay left in ``QUEUE``, oldest first."""
    return cliapp.queued(QUEUE)
