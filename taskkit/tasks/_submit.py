"""Sending work from a submitter: within about two seconds, either sent or ``BrokerUnavailable``.

taskkit's submit paths (``submit_run``, ``resume_run``, ``submit_batch``,
``replay_dead_letters``) call ``check_reachable`` before they write anything, then send inside
``sending``. Left to Celery, a dead Redis result backend held a submit for ~20 s (its reconnect
loop: 20 retries, 1 s apart) and a broker that accepts connections but never answers held it
for ever; the run row was already committed by then.

Decisions:

- The probe asks the broker (a connection of its own with ``PROBE_TIMEOUT`` to connect and to
  answer, so a silent or unroutable host costs one second, not the OS's two minutes) and then a
  Redis result backend (``PING`` on a client of its own with the same timeouts). Other result
  backends (a database, ``rpc://``) are only written by workers: not probed. A healthy probe
  costs about a millisecond per service; the submit paths are not a hot path.
- The send then uses the app's own connections, with ``PUBLISH_RETRY_POLICY`` unless the caller
  gives ``retry_policy=``; the Redis result backend's reconnects are bounded by the app's
  ``result_backend_transport_options`` (``reliable_defaults``: about a second). A service that
  dies between the probe and the send is found by probing again when the send fails.
- Workers are not submitters: they keep retrying result writes for longer
  (``result_backend_always_retry``, see ``reliable_defaults``), and their broker connection
  retries for ever as before.

Example::

    check_reachable(app)          # BrokerUnavailable if the broker or backend is down
    with sending(app):
        task.apply_async(args, retry_policy=PUBLISH_RETRY_POLICY)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from taskkit._utils import mask_password
from taskkit.errors import BrokerUnavailable

__all__ = ["PROBE_TIMEOUT", "PUBLISH_RETRY_POLICY", "check_reachable", "sending"]

#: Seconds a probe waits for a connection, then for an answer, from each service.
PROBE_TIMEOUT = 1.0

#: kombu's publish retries in a submit (Celery's default shape, stated here so an app's longer
#: ``task_publish_retry_policy`` does not hold a submitter): 3 tries within ~0.4 s.
PUBLISH_RETRY_POLICY: dict[str, float] = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.2,
}

_REDIS_SCHEMES = ("redis://", "rediss://", "redis+socket://", "sentinel://", "socket://")


def check_reachable(app: Any) -> None:
    """``BrokerUnavailable`` unless the app's broker, then its Redis result backend, answer
    within ``PROBE_TIMEOUT`` each. Nothing to ask for an eager app (``task_always_eager``):
    its tasks run in this process.

    Example::

        check_reachable(app)
    """
    if app.conf.task_always_eager:
        return
    _check_broker(app)
    _check_backend(app)


@contextmanager
def sending(app: Any, detail: str = "") -> Iterator[None]:
    """Run a send; if it fails and the broker or the result backend does not answer a probe
    now, raise ``BrokerUnavailable`` (``detail`` says what was done anyway) from the send's
    error; any other error is raised as it is.

    Example::

        with sending(app):
            task.apply_async((1,))
    """
    try:
        yield
    except BrokerUnavailable:
        raise
    except Exception as exc:
        if app.conf.task_always_eager:
            raise  # the task's own error, raised where it ran
        _check_broker(app, cause=exc, detail=detail)
        _check_backend(app, cause=exc, detail=detail)
        raise


def _reason(exc: BaseException) -> str:
    return mask_password(" ".join(str(exc).split())).rstrip(".") or type(exc).__name__


def _check_broker(app: Any, cause: BaseException | None = None, detail: str = "") -> None:
    url = str(app.conf.broker_url or "")
    options: dict[str, Any] = {}
    if url.startswith(_REDIS_SCHEMES):
        options = {"socket_timeout": PROBE_TIMEOUT, "socket_connect_timeout": PROBE_TIMEOUT}
    try:
        with app.connection_for_write(
            connect_timeout=PROBE_TIMEOUT, transport_options=options
        ) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=PROBE_TIMEOUT)
    except Exception as exc:  # kombu's OperationalError, or a transport's own error
        error = BrokerUnavailable(mask_password(url), _reason(exc), "broker", detail)
        raise error from cause or exc


def _check_backend(app: Any, cause: BaseException | None = None, detail: str = "") -> None:
    url = str(app.conf.result_backend or "")
    if not url.startswith(_REDIS_SCHEMES):
        return
    backend = app.backend
    params = dict(getattr(backend, "connparams", {}))
    create = getattr(backend, "_create_client", None)
    if not params or create is None:
        return  # not Celery's Redis backend: nothing to ask
    params.update(socket_timeout=PROBE_TIMEOUT, socket_connect_timeout=PROBE_TIMEOUT)
    if "path" in params:  # a Unix socket: no connect timeout there
        params.pop("socket_connect_timeout")
    client = create(**params)
    try:
        client.ping()
    except Exception as exc:
        error = BrokerUnavailable(mask_password(url), _reason(exc), "result backend", detail)
        raise error from cause or exc
    finally:
        client.connection_pool.disconnect()
