"""The Celery app that ``make worker`` starts: ``celery -A workers.app worker``.

Configured entirely from ``TASKKIT_*`` settings (see ``taskkit.config``): with nothing set, the
broker, results and database are SQLite files under ``./.taskkit``; in production set
``TASKKIT_BROKER_URL=redis://...`` and ``TASKKIT_DATABASE_URL=postgresql+psycopg://...``.
"""

from __future__ import annotations

from taskkit.tasks import create_app

app = create_app("workers", include=["workers.tasks", "workers.training", "workers.batch"])
celery_app = app  # the name the seed's snippets import
