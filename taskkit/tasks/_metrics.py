"""A worker's Prometheus ``/metrics`` (Celery signals; ``taskkit.telemetry.metrics`` does the rest).

On only when ``celery -A app worker --metrics-port 9108`` (apps made by ``create_app``) or
``TASKKIT_METRICS_PORT`` is set; otherwise these handlers return at once and nothing is
imported, subscribed or served: zero cost.

- ``worker_init`` (main process, before the pool forks): empty ``TASKKIT_METRICS_DIR`` (default
  ``$TASKKIT_HOME/metrics``) and turn prometheus_client's multiprocess mode on there. A solo or
  threads pool runs tasks in this process: it subscribes here. A prefork main process never
  subscribes (it runs no task, and a thread or lock of its own would be copied into the pool
  processes it forks later).
- ``worker_process_init`` (each pool process): subscribe; the values go to files of its pid,
  task attempts within ``FLUSH_SECONDS``.
- ``worker_process_shutdown``: flush, then forget that process's live gauges
  (``mark_process_dead``). A pool process killed outright keeps its last state of
  ``taskkit_circuit_state`` until the worker restarts, and loses at most its last
  ``FLUSH_SECONDS`` of task attempts.
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

__all__ = ["add_worker_option"]

logger = logging.getLogger("taskkit.tasks")

_serving: dict[str, Any] = {}

#: ``celery worker --metrics-port N`` (set in the main process, inherited by the pool).
_option: dict[str, int] = {}


def add_worker_option(app: Any) -> None:
    """Give ``celery -A app worker`` a ``--metrics-port`` option (it wins over
    ``TASKKIT_METRICS_PORT``); ``create_app`` calls it.

    Example::

        add_worker_option(app)   # celery -A myapp worker --metrics-port 9108
    """
    import click  # noqa: PLC0415 - Celery's command line is click

    options = app.user_options["worker"]
    if not any("--metrics-port" in getattr(o, "opts", ()) for o in options):
        options.add(
            click.Option(
                ["--metrics-port"],
                type=click.IntRange(0, 65535),
                default=None,
                help="Serve Prometheus /metrics of all pool processes on this port "
                "(default: TASKKIT_METRICS_PORT; 0: a free port, logged).",
            )
        )


def _port() -> int | None:
    if "port" in _option:
        return _option["port"]
    return get_settings().metrics_port


def _enabled() -> bool:
    return _port() is not None


def _database_url(sender: Any) -> str | None:
    app = getattr(sender, "app", None)
    url = None if app is None else app.conf.get("taskkit_database_url")
    return str(url) if url else None


@signals.worker_init.connect(weak=False)
def _prepare(sender: Any = None, **_: Any) -> None:
    given = (getattr(sender, "options", None) or {}).get("metrics_port")
    if given is not None:
        _option["port"] = int(given)
    if not _enabled():
        return
    from taskkit.telemetry import metrics  # noqa: PLC0415

    settings = get_settings()
    path = settings.metrics_dir or settings.home / "metrics"
    metrics.prepare_multiprocess_dir(path)
    _serving["database_url"] = _database_url(sender)
    if not _forks(sender):
        metrics.install()  # tasks run in this process (solo, threads...)


def _forks(sender: Any) -> bool:
    """Whether the worker's pool forks (prefork): then nothing starts a thread or takes a lock
    of prometheus_client in the main process, which forks again when a pool process dies."""
    pool = getattr(sender, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    return pool is None or "prefork" in str(name)


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

    current = metrics.installed()
    if current is not None:
        current.stop_flusher()  # its last counts reach the directory
    metrics.mark_dead(pid or os.getpid())


@signals.worker_ready.connect(weak=False)
def _serve(**_: Any) -> None:
    if not _enabled() or "server" in _serving:
        return
    from taskkit.telemetry import metrics  # noqa: PLC0415

    port = _port()
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
