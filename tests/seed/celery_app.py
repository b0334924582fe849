"""The Celery app the seed's Celery snippets import as ``app.celery_app``: a real Redis broker
and result backend, on a queue no other test run uses."""

from __future__ import annotations

import uuid

from celery import Celery

from tests.conftest import REDIS_URL

QUEUE = f"taskkit-seed-{uuid.uuid4().hex[:8]}"

celery_app = Celery("seed", broker=REDIS_URL, backend=REDIS_URL)
celery_app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=600,
    broker_connection_retry_on_startup=True,
)
