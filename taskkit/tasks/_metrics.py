"""A worker's Prometheus ``/metrics`` (Celery signals; ``taskkit.telemetry.metrics`` does the rest).

On only when ``TASKKIT_METRICS_PORT`` is set (``TASKKIT_METRICS_PORT=9108 celery -A app
worker``); otherwise these handlers return at once and nothing is imported, subscribed or
served: zero cost.

- ``worker_init`` (main process, before the pool forks): empty ``TASKKIT_METRICS_DIR`` (default
  ``$TASKKIT_HOME/metrics``) and turn prometheus_client's multiprocess mode on there; subscribe
  this process too (a solo or threads pool runs tasks here).
- ``worker_process_init`` (each pool process): subscribe; the values go to files of its pid.
- ``worker_process_shutdown``: forget that process's live gauges (``mark_process_dead``).
- ``worker_ready`` (main process, the pool is running): serve the aggregated ``/metrics`` on
  the port, with the database-backed gauges (``taskkit_dead_letters``, ``taskkit_runs``) read
  here only. Served after the pool started, so pool processes do not inherit the listening
  socket. The port bound is logged (``taskkit: metrics on http://0.0.0.0:PORT/metrics``).

Two workers on one host need two ports and two directories.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals

from taskkit.config import get_settings

__all__: list[str] = []

logger = logging.getLogger("taskkit.tasks")

_serving: dict[str, Any] = {}


def _enabled() -> bool:
    return get_settings().metrics_port is not None


def _database_url(sender: Any) -> str | None:
    app = getattr(sender, "app", None)
    url = None if app is None else app.conf.get("taskkit_database_url")
    return str(url) if url else None


@signals.worker_init.connect(weak=False)
def _prepare(sender: Any = None, **_: Any) -> None:
    if not _enabled():
        return
    from taskkit.telemetry import metrics  # noqa: PLC0415

    settings = get_settings()
    path = settings.metrics_dir or settings.home / "metrics"
    metrics.prepare_multiprocess_dir(path)
    metrics.install()
    _serving["database_url"] = _database_url(sender)


@signals.worker_process_init.connect(weak=False)
def _subscribe_pool_process(**_: Any) -> None:
    if not _enabled():
        return
    from taskkit.telemetry import metrics  # noqa: PLC0415

    metrics.install()


@signals.worker_process_shutdown.connect(weak=False)
def _forget_pool_process(pid: int | None = None, **_: Any) -> None:
    if not _enabled():
        return
    from taskkit.telemetry import metrics  # noqa: PLC0415

    metrics.mark_dead(pid or os.getpid())


@signals.worker_ready.connect(weak=False)
def _serve(**_: Any) -> None:
    if not _enabled() or "server" in _serving:
        return
    from taskkit.telemetry import metrics  # noqa: PLC0415

    port = get_settings().metrics_port
    assert port is not None
    extra = [metrics.DatabaseCollector(_serving.get("database_url")), metrics.BreakerCollector()]
    try:
        server, bound = metrics.serve(port, extra=extra)
    except OSError as exc:
        logger.error("taskkit: could not serve metrics on port %s: %s", port, exc)
        return
    _serving["server"] = server
    logger.info("taskkit: metrics on http://0.0.0.0:%d/metrics", bound)


@signals.worker_shutdown.connect(weak=False)
def _stop_serving(**_: Any) -> None:
    server = _serving.pop("server", None)
    if server is not None:
        server.shutdown()
        server.server_close()
