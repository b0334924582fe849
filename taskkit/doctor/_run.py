"""``diagnose``: load the settings and the app, run every check at once, each bounded in time.

The settings are read and the app is imported first, in the calling thread (as a worker would
import it). Then every check runs on a daemon thread of its own, all together; one that has
not answered ``CHECK_TIMEOUT`` seconds after they started is an error ("did not answer"),
and is left behind (it never delays the answer, nor the process's exit). Finally every check
is scrubbed of the secrets the settings hold (``Scrubber``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from taskkit._utils import mask_password
from taskkit.config import Settings, load_settings
from taskkit.doctor import _celery, _local, _services, _tasks
from taskkit.doctor._context import AppLoad, Context, load_app, one_line
from taskkit.doctor._model import Check, Report, Scrubber

__all__ = ["CHECKS", "CHECK_TIMEOUT", "DEFAULT_APP", "diagnose"]

#: Seconds every check has, all running at once (each probe inside waits 1-2 s at most).
CHECK_TIMEOUT = 3.0

#: The app ``make worker`` runs when neither ``--app`` nor ``TASKKIT_APP`` names one.
DEFAULT_APP = "workers.app"

#: Every check, in the order they are reported.
CHECKS: tuple[tuple[str, Callable[[Context], Check]], ...] = (
    ("settings", _local.check_settings),
    ("home", _local.check_home),
    ("broker", _services.check_broker),
    ("result_backend", _services.check_result_backend),
    ("database", _services.check_database),
    ("app", _tasks.check_app),
    ("task_modules", _tasks.check_task_modules),
    ("secret_key", _local.check_secret_key),
    ("visibility_timeout", _celery.check_visibility_timeout),
    ("acks", _celery.check_acks),
    ("serializer", _celery.check_serializer),
    ("consumer_timeout", _celery.check_consumer_timeout),
    ("clock_redis", _services.check_clock_redis),
    ("clock_database", _services.check_clock_database),
    ("checkpoint_storage", _local.check_checkpoint_storage),
    ("embedded_broker", _celery.check_embedded_broker),
)

#: Checks that need a Celery app (the loaded one, or one made from the settings).
_NEEDS_APP = frozenset(
    {
        "broker",
        "result_backend",
        "visibility_timeout",
        "acks",
        "serializer",
        "consumer_timeout",
        "clock_redis",
        "embedded_broker",
    }
)


def diagnose(
    settings: Settings | None = None,
    *,
    app: Any = None,
    app_spec: str | None = None,
    tasks_modules: Iterable[str] = (),
    clock: Callable[[], float] = time.time,
    timeout: float = CHECK_TIMEOUT,
) -> Report:
    """Run every check of ``taskkit doctor`` and return the ``Report``.

    ``settings``: default ``load_settings()`` (the environment and ``.env``; a bad value is
    the ``settings`` check's error). ``app``: a Celery app, or a callable returning one;
    default: the app at ``app_spec`` (else ``TASKKIT_APP``, else ``workers.app``), imported
    as ``celery -A`` would. ``tasks_modules``: modules that hold tasks the worker must
    register (an error names each one the worker does not import). ``clock``: this host's
    clock (``time.time``), compared with Redis's and PostgreSQL's.

    Example::

        from taskkit.doctor import diagnose

        report = diagnose(app_spec="workers.app")
        for check in report.checks:
            print(check.name, check.verdict, check.reason)
        raise SystemExit(report.exit_code)
    """
    settings_error = None
    if settings is None:
        try:
            settings = load_settings()
        except Exception as exc:
            settings_error = one_line(exc)
    spec = app_spec or os.environ.get("TASKKIT_APP") or DEFAULT_APP
    if app is not None:
        load = _given_app(app, app_spec or os.environ.get("TASKKIT_APP") or "the given app")
    else:
        load = load_app(spec)
    ctx = Context(settings, settings_error, load, tuple(tasks_modules), clock)
    # The fallback app (from the settings) is made here, not raced for by the threads.
    if load.app is None and settings is not None:
        _ = ctx.app
    results = _run_all(ctx, timeout)
    scrub = Scrubber(_secrets(settings, ctx))
    return Report(tuple(scrub.check(check) for check in results))


def _given_app(app: Any, spec: str) -> AppLoad:
    name = spec
    try:
        value = app() if callable(app) and not hasattr(app, "tasks") else app
    except Exception as exc:
        return AppLoad(name, error=f"the app could not be loaded: {type(exc).__name__}: "
                       f"{one_line(exc)}")  # fmt: skip
    load = AppLoad(name, app=value)
    try:
        value.loader.import_default_modules()
    except Exception as exc:
        load.modules_error = f"{type(exc).__name__}: {one_line(exc)}"
    load.registered = frozenset(value.tasks)
    return load


def _run_all(ctx: Context, timeout: float) -> list[Check]:
    found: dict[str, Check] = {}
    threads = []
    for name, check in CHECKS:
        if ctx.app is None and name in _NEEDS_APP:
            found[name] = Check(
                name,
                "error",
                "not checked: neither the app nor the settings could be loaded",
                "see the settings and app checks",
            )
            continue
        thread = threading.Thread(
            target=_one, args=(name, check, ctx, found), name=f"doctor-{name}", daemon=True
        )
        thread.start()
        threads.append((name, thread))
    deadline = time.monotonic() + timeout
    for _name, thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    results = []
    for name, _ in CHECKS:
        result = found.get(name)
        if result is None:
            result = Check(
                name,
                "error",
                f"did not answer within {timeout:g}s (a service that accepts connections but "
                "does not answer, or a very slow file system)",
                "see the other checks; run taskkit doctor again",
            )
        results.append(result)
    return results


def _one(
    name: str, check: Callable[[Context], Check], ctx: Context, found: dict[str, Check]
) -> None:
    try:
        found[name] = check(ctx)
    except Exception as exc:  # a check's own bug must not hide the others
        found[name] = Check(
            name,
            "error",
            f"the check failed: {type(exc).__name__}: {one_line(exc)}",
            "report this to the taskkit developers",
        )


def _secrets(settings: Settings | None, ctx: Context) -> list[str]:
    """Every secret the output must not hold: keys, tokens, URL passwords."""
    found: list[str] = []
    if settings is not None:
        for name in ("secret_key", "secret_keys_old", "api_token", "alert_webhook_url"):
            value = getattr(settings, name, None)
            if value is not None:
                text = value.get_secret_value()
                found.append(text)
                found += [part.strip() for part in text.split(",")]
        urls = [
            settings.database_url,
            settings.broker_url,
            settings.result_backend,
            settings.lease_url,
            settings.predictor_url or "",
        ]
    else:
        urls = []
    app = ctx.load.app
    if app is not None:
        urls += [str(app.conf.broker_url or ""), str(app.conf.result_backend or "")]
    for url in urls:
        found += _passwords(url)
    if settings is not None:
        found += _key_material(settings)
    return found


def _passwords(url: str) -> list[str]:
    from urllib.parse import unquote, urlsplit  # noqa: PLC0415

    if "://" not in url or url == mask_password(url):
        return []
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [password, unquote(password)] if password else []


def _key_material(settings: Settings) -> list[str]:
    """The keys in the key file and in the key taskkit made (read only when they exist)."""
    found = []
    for path in (settings.secret_key_file, settings.home / "secret.key"):
        if path is None:
            continue
        try:
            found.append(path.read_text(errors="replace").strip())
        except OSError:
            continue
    return found
