"""``create_app``: a Celery app with reliable defaults, configured from ``taskkit.config``."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from celery import Celery, signals

import taskkit.broker  # registers the taskkit+sqlite:// transport with kombu
from taskkit.config import Settings, get_settings
from taskkit.errors import TaskkitWarning
from taskkit.tasks import (
    _events,  # noqa: F401  (signal handlers)
    _logs,  # noqa: F401  (signal handlers)
    _metrics,  # signal handlers, and the worker's --metrics-port
)
from taskkit.tasks._options import check_app_config
from taskkit.tasks._rabbitmq import ConsumerTimeout, amqp_defaults
from taskkit.tasks._visibility import VisibilityKeeper, check_visibility, uses_visibility_timeout

__all__ = ["create_app", "reliable_defaults"]

#: The app setting holding the lease store's URL. Celery hides or masks settings by name when
#: it prints its config (``celery.app.utils.filter_hidden_settings``): a name with "backend"
#: gets its URL password masked. ``taskkit_lease_url=`` is accepted and stored under this name.
LEASE_SETTING = "taskkit_lease_backend"

#: Serializers that turn a message into code execution for whoever can publish one.
UNSAFE_CONTENT = frozenset({"pickle", "application/x-python-serialize"})

#: The Redis result backend's reconnects (a submitter's subscription to its result, a write's
#: retries): give up after about a second, not Celery's 20 tries a second apart.
BACKEND_RETRY_POLICY: dict[str, float] = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
    "timeout": 1.0,
}

#: Seconds between the Redis transport's sweeps for messages of dead workers.
RESTORE_INTERVAL = 5
#: Seconds a worker without an event loop (the embedded broker's: billiard's threaded pool)
#: waits for the result of a task whose pool process died before it fails the task with
#: ``WorkerLostError`` (``worker_lost_wait``; Celery's 10 s held a killed chunk's front-of-queue
#: retry back that long). A result the process sent before it died is read within
#: milliseconds; on Redis and RabbitMQ (event loop) the task fails at once whatever this says.
LOST_WORKER_WAIT = 1.0


def reliable_defaults(settings: Settings) -> dict[str, Any]:
    """The Celery settings ``create_app`` starts from (before your overrides).

    Example::

        from taskkit.config import Settings

        conf = reliable_defaults(Settings(broker_url="redis://127.0.0.1:6379/0"))
        assert conf["task_acks_late"] and conf["worker_prefetch_multiplier"] == 1
    """
    conf: dict[str, Any] = {
        # JSON only: a pickled message from anyone who can reach the broker runs code.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Acknowledge after the task ran; a lost worker means redelivery, not loss.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_lost_wait": LOST_WORKER_WAIT,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_publish_retry": True,
        "result_extended": True,
        "result_expires": 7 * 24 * 3600,
        # A Redis result backend that is down fails a submitter in about a second (the retry
        # policy above, a 2 s connect timeout instead of the OS's minutes), while a worker keeps
        # retrying a result write for about a minute: Celery retries those (and result reads)
        # over the short policy, with backoff from 0.1 s to 10 s, 10 times.
        "redis_socket_connect_timeout": 2.0,
        "result_backend_always_retry": True,
        "result_backend_max_retries": 10,
        "result_backend_base_sleep_between_retries_ms": 100,
        "taskkit_extend_visibility": settings.extend_visibility,
        # Under a name Celery masks (its "backend" rule): `celery report`, `inspect conf` and
        # Flower show the lease URL without its password, as they show broker_url.
        LEASE_SETTING: settings.lease_url,
        "taskkit_lease_ttl": settings.lease_ttl,
        "taskkit_progress_interval": settings.progress_interval,
        "taskkit_database_url": settings.database_url,
        "taskkit_dead_letter": settings.dead_letter,
        "taskkit_dead_letter_queue": settings.dead_letter_queue,
        "taskkit_resume_orphaned_runs": (
            settings.embedded_broker
            if settings.resume_orphaned_runs is None
            else settings.resume_orphaned_runs
        ),
        # Flower and `celery events` see tasks only when workers (and clients) send events.
        "worker_send_task_events": settings.worker_events,
        "task_send_sent_event": settings.worker_events,
    }
    if settings.broker_uses_redis:
        conf["broker_transport_options"] = {
            "visibility_timeout": settings.visibility_timeout,
            # Sweep for a dead worker's messages every few seconds, not every 100 s.
            "unacked_restore_interval": RESTORE_INTERVAL,
            "unacked_restore_throttle": 1,
        }
        conf["result_backend_transport_options"] = {"retry_policy": dict(BACKEND_RETRY_POLICY)}
    elif settings.broker_url.startswith(f"{taskkit.broker.SCHEME}+"):
        # The embedded broker redelivers by age too, and the keeper extends it the same way.
        conf["broker_transport_options"] = {"visibility_timeout": settings.visibility_timeout}
    return conf


def create_app(
    main: str = "taskkit",
    *,
    settings: Settings | None = None,
    include: Iterable[str] = (),
    **config: Any,
) -> Celery:
    """A Celery app: taskkit's reliable defaults, then ``config`` (Celery setting names, or
    ``taskkit_<option>`` for ResilientTask options app-wide).

    With no ``TASKKIT_BROKER_URL`` the broker and result backend are SQLite files under
    ``TASKKIT_HOME`` (nothing to run on a laptop); with ``redis://...`` Redis is the broker and
    the result backend, with the short visibility timeout and the keeper described in
    ``taskkit.tasks``. Countdowns and time limits are checked against the visibility timeout
    here and again when a worker starts.

    Example::

        from taskkit.tasks import ResilientTask, create_app

        app = create_app("jobs", include=["myproject.tasks"], worker_concurrency=4)

        @app.task(base=ResilientTask, bind=True)
        def ping(self) -> str:
            return "pong"
    """
    settings = settings or get_settings()
    if settings.embedded_broker or settings.result_backend.startswith("db+sqlite:"):
        Path(settings.home).mkdir(parents=True, exist_ok=True)
    app = Celery(
        main,
        broker=config.pop("broker_url", settings.broker_url),
        backend=config.pop("result_backend", settings.result_backend),
        include=list(include),
    )
    conf = reliable_defaults(settings)
    conf.update(amqp_defaults(str(app.conf.broker_url or ""), settings.consumer_timeout))
    # The Redis options fit only a Redis broker (``broker_url=`` may have replaced the settings'
    # one); your own transport options are kept for any broker.
    transport = conf.pop("broker_transport_options", {}) if uses_visibility_timeout(app) else {}
    transport.update(config.pop("broker_transport_options", {}))
    if "taskkit_lease_url" in config:
        config[LEASE_SETTING] = config.pop("taskkit_lease_url")
    _warn_unsafe_content(config)
    conf.update(config)
    if transport:
        conf["broker_transport_options"] = transport
    app.conf.update(conf)
    check_app_config(app.conf)
    check_visibility(app)
    app.steps["consumer"].add(VisibilityKeeper)
    app.steps["consumer"].add(ConsumerTimeout)
    _metrics.add_worker_option(app)
    return app


def _warn_unsafe_content(config: dict[str, Any]) -> None:
    """Warn when the app would accept task messages that run code when decoded (pickle)."""
    accepted = config.get("accept_content") or ()
    serializers = [
        config.get("task_serializer"),
        *([accepted] if isinstance(accepted, str) else accepted),
    ]
    unsafe = sorted({str(s) for s in serializers if s in UNSAFE_CONTENT})
    if unsafe:
        warnings.warn(
            f"create_app: task messages in {', '.join(unsafe)} are accepted; a pickle message "
            "lets anyone who can publish to the broker run code in the workers. "
            "Keep task_serializer and accept_content to json.",
            TaskkitWarning,
            stacklevel=3,
        )


@signals.worker_init.connect(weak=False)
def _check_at_worker_start(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None and app.conf.get(LEASE_SETTING) is not None:
        check_visibility(app)


#: Seconds between checks for pool processes that died. Celery's own check runs every 5 s and is
#: the only one that finds a death it missed (its main loop can wake on a process's exit before
#: the process can be reaped), which delayed the re-send of a killed task by up to 5 s.
POOL_CHECK_INTERVAL = 0.5


@signals.worker_ready.connect(weak=False)
def _check_pool_processes_often(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None or app.conf.get(LEASE_SETTING) is None:
        return  # not an app made by create_app
    pool = getattr(getattr(sender, "pool", None), "_pool", None)
    maintain = getattr(pool, "maintain_pool", None)
    hub = getattr(sender, "hub", None)
    if hub is not None and maintain is not None:  # prefork; solo and threads have no processes
        hub.call_repeatedly(POOL_CHECK_INTERVAL, maintain)
