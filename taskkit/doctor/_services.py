"""Checks of the services: broker, result backend, database (reachable, at migration head), and
the clock of this host against Redis (``TIME``) and PostgreSQL (``clock_timestamp()``).

Every probe has its own connection with ``PROBE_TIMEOUT`` (1 s) to connect and to answer
(PostgreSQL: 2 s, libpq's least), so a service that is down costs about a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskkit._utils import mask_password
from taskkit.doctor._context import PROBE_TIMEOUT, Context, one_line
from taskkit.doctor._model import Check, no_settings

__all__ = [
    "ERROR_SKEW_DATABASE",
    "WARN_SKEW",
    "check_broker",
    "check_clock_database",
    "check_clock_redis",
    "check_database",
    "check_result_backend",
]

#: Seconds of clock difference that earn a warning.
WARN_SKEW = 1.0
#: Seconds of difference against the database that are an error (a heartbeat's age is off).
ERROR_SKEW_DATABASE = 10.0

_REDIS = ("redis://", "rediss://", "redis+socket://", "unix://")


def _redis_client(url: str) -> Any:
    import redis  # noqa: PLC0415

    return redis.Redis.from_url(
        url, socket_timeout=PROBE_TIMEOUT, socket_connect_timeout=PROBE_TIMEOUT
    )


def _broker_url(ctx: Context) -> str:
    return str(ctx.app.conf.broker_url or "")


def check_broker(ctx: Context) -> Check:
    app = ctx.app
    url = _broker_url(ctx)
    shown = mask_password(url)
    options: dict[str, Any] = {}
    if url.startswith(_REDIS) or url.startswith("sentinel://"):
        options = {"socket_timeout": PROBE_TIMEOUT, "socket_connect_timeout": PROBE_TIMEOUT}
    details: dict[str, Any] = {"url": shown}
    if url.startswith("taskkit+sqlite://"):
        path = Path("/" + url.split("://", 1)[1].split("?", 1)[0].lstrip("/"))
        if not path.exists():  # connecting would make it: doctor changes nothing
            return Check(
                "broker",
                "ok",
                f"the embedded broker's file {path} is not made yet (the first worker or submit "
                "makes it; see the home check for its folder)",
                None,
                details,
            )
    try:
        with app.connection_for_write(
            connect_timeout=PROBE_TIMEOUT, transport_options=options
        ) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=PROBE_TIMEOUT)
            version = _server_version(connection)
            if version:
                details["server_version"] = version
    except Exception as exc:
        return Check(
            "broker",
            "error",
            f"the broker {shown} does not answer: {one_line(exc)}",
            "start the broker, or point TASKKIT_BROKER_URL (or the app's broker_url) at one "
            "this host can reach; workers wait for it, submits fail with BrokerUnavailable",
            details,
        )
    return Check("broker", "ok", f"the broker {shown} answers", None, details)


def _server_version(connection: Any) -> str | None:
    transport = getattr(connection, "connection", None)
    properties = getattr(transport, "server_properties", None) or {}
    raw = properties.get("version")
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    return raw if isinstance(raw, str) else None


def check_result_backend(ctx: Context) -> Check:
    app = ctx.app
    url = str(app.conf.result_backend or "")
    shown = mask_password(url)
    details: dict[str, Any] = {"url": shown}
    if not url or url == "disabled":
        return Check(
            "result_backend",
            "warning",
            "the app has no result backend: task states, progress and `taskkit tasks show` "
            "need one",
            "set TASKKIT_RESULT_BACKEND (a Redis URL, or leave it empty for the default)",
            details,
        )
    try:
        if url.startswith(_REDIS):
            client = _redis_client(url)
            try:
                client.ping()
            finally:
                client.close()
            reason = f"the result backend {shown} answers"
        elif url.startswith("db+"):
            reason = _probe_sql(url[3:], f"the result backend {shown}")
        elif url.startswith("rpc://"):
            reason = "results travel over the broker (rpc://): see the broker check"
        else:
            reason = f"the result backend {shown} is not probed by taskkit doctor"
    except Exception as exc:
        return Check(
            "result_backend",
            "error",
            f"the result backend {shown} does not answer: {one_line(exc)}",
            "start it, or set TASKKIT_RESULT_BACKEND to one this host can reach; submits fail "
            "with BrokerUnavailable while it is down",
            details,
        )
    return Check("result_backend", "ok", reason, None, details)


def _probe_sql(url: str, what: str) -> str:
    from sqlalchemy import create_engine  # noqa: PLC0415
    from sqlalchemy.engine import make_url  # noqa: PLC0415
    from sqlalchemy.pool import NullPool  # noqa: PLC0415

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if parsed.database and not path.exists():
            return f"{what} is a SQLite file not made yet (the first stored result makes it)"
        connect_args: dict[str, Any] = {"timeout": PROBE_TIMEOUT}
    else:
        connect_args = {"connect_timeout": 2} if parsed.get_backend_name() == "postgresql" else {}
    engine = create_engine(parsed, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()
    return f"{what} answers"


def _engine(ctx: Context) -> Any:
    """A one-connection engine for the settings' database with short timeouts, or None for a
    SQLite file that does not exist (connecting would create it)."""
    from sqlalchemy import create_engine  # noqa: PLC0415
    from sqlalchemy.engine import make_url  # noqa: PLC0415
    from sqlalchemy.pool import NullPool  # noqa: PLC0415

    assert ctx.settings is not None
    url = make_url(ctx.settings.database_url)
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        name = url.database or ""
        on_disk = name and name != ":memory:" and not name.startswith("file:")
        if on_disk and not Path(name).expanduser().exists():
            return None
        connect_args = {"timeout": PROBE_TIMEOUT}
    elif url.get_backend_name() == "postgresql":
        connect_args = {"connect_timeout": 2}  # libpq's least
    return create_engine(url, poolclass=NullPool, connect_args=connect_args)


def _database_name(ctx: Context) -> str:
    from sqlalchemy.engine import make_url  # noqa: PLC0415

    from taskkit.db.classify import describe_database  # noqa: PLC0415

    assert ctx.settings is not None
    return describe_database(make_url(ctx.settings.database_url))


def check_database(ctx: Context) -> Check:
    if ctx.settings is None:
        return no_settings("database")
    from taskkit.db.migrate import schema_status  # noqa: PLC0415

    name = _database_name(ctx)
    details: dict[str, Any] = {"database": name}
    engine = _engine(ctx)
    if engine is None:
        return Check(
            "database",
            "error",
            f"the database {name} does not exist yet (no taskkit tables)",
            "run: taskkit db upgrade",
            details,
        )
    try:
        status = schema_status(engine)
    except Exception as exc:
        return Check(
            "database",
            "error",
            f"the database {name} does not answer: {one_line(exc)}",
            "start it, or set TASKKIT_DATABASE_URL to one this host can reach",
            details,
        )
    finally:
        engine.dispose()
    details.update(revision=status.revision, head=status.head)
    problem = status.problem(fix="")
    if problem is None:
        return Check(
            "database", "ok", f"{name} answers, at revision {status.head} (head)", None, details
        )
    fix = "run: taskkit db upgrade" if status.behind else "upgrade taskkit on this host"
    return Check("database", "error", problem.rstrip("; "), fix, details)


def _skew_verdict(skew: float, error_at: float) -> str:
    if abs(skew) > error_at:
        return "error"
    if abs(skew) > WARN_SKEW:
        return "warning"
    return "ok"


def _redis_for_clock(ctx: Context) -> str | None:
    assert ctx.settings is not None
    candidates = [_broker_url(ctx), str(ctx.app.conf.result_backend or ""), ctx.settings.lease_url]
    for url in candidates:
        if url.startswith(_REDIS):
            return url
    return None


def _transport_timeout(ctx: Context) -> float:
    options = ctx.app.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", ctx.settings.visibility_timeout))  # type: ignore[union-attr]


def check_clock_redis(ctx: Context) -> Check:
    if ctx.settings is None:
        return no_settings("clock_redis")
    url = _redis_for_clock(ctx)
    if url is None:
        return Check("clock_redis", "ok", "no Redis is configured: nothing to compare")
    shown = mask_password(url)
    client = _redis_client(url)
    try:
        client.ping()  # connect first: the measured round trip is the TIME call alone
        before = ctx.clock()
        seconds, micros = client.time()
        after = ctx.clock()
    except Exception as exc:
        return Check(
            "clock_redis",
            "warning",
            f"could not read the clock of {shown}: {one_line(exc)}",
            "see the broker and result_backend checks",
            {"url": shown},
        )
    finally:
        client.close()
    server = seconds + micros / 1e6
    skew = server - (before + after) / 2
    limit = _transport_timeout(ctx) / 3
    details = {
        "url": shown,
        "skew_seconds": round(skew, 3),
        "uncertainty_seconds": round((after - before) / 2, 3),
        "error_above_seconds": round(limit, 3),
    }
    verdict = _skew_verdict(skew, limit)
    direction = "behind" if skew > 0 else "ahead of"
    if verdict == "ok":
        return Check(
            "clock_redis", "ok", f"this host's clock is within {abs(skew):.3f}s of {shown}", None,
            details,
        )  # fmt: skip
    return Check(
        "clock_redis",
        verdict,  # type: ignore[arg-type]
        f"this host's clock is {abs(skew):.1f}s {direction} the clock of {shown}: workers stamp "
        "the messages they hold with their own clock and another host's restore sweep compares "
        f"with its clock, so beyond {limit:g}s (a third of the visibility timeout) a live "
        "worker's task can be delivered again; countdowns and ETAs shift as much",
        "synchronise the clocks of every worker host (chrony or systemd-timesyncd against the "
        "same NTP servers)",
        details,
    )


def check_clock_database(ctx: Context) -> Check:
    if ctx.settings is None:
        return no_settings("clock_database")
    from sqlalchemy.engine import make_url  # noqa: PLC0415

    url = make_url(ctx.settings.database_url)
    if url.get_backend_name() != "postgresql":
        return Check(
            "clock_database",
            "ok",
            f"the database is {url.get_backend_name()}, not PostgreSQL: nothing to compare",
        )
    name = _database_name(ctx)
    engine = _engine(ctx)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
            before = ctx.clock()
            server = connection.exec_driver_sql(
                "SELECT extract(epoch FROM clock_timestamp())"
            ).scalar_one()
            after = ctx.clock()
    except Exception as exc:
        return Check(
            "clock_database",
            "warning",
            f"could not read the clock of {name}: {one_line(exc)}",
            "see the database check",
            {"database": name},
        )
    finally:
        engine.dispose()
    skew = float(server) - (before + after) / 2
    details = {
        "database": name,
        "skew_seconds": round(skew, 3),
        "uncertainty_seconds": round((after - before) / 2, 3),
        "error_above_seconds": ERROR_SKEW_DATABASE,
    }
    verdict = _skew_verdict(skew, ERROR_SKEW_DATABASE)
    direction = "behind" if skew > 0 else "ahead of"
    if verdict == "ok":
        return Check(
            "clock_database", "ok", f"this host's clock is within {abs(skew):.3f}s of {name}",
            None, details,
        )  # fmt: skip
    return Check(
        "clock_database",
        verdict,  # type: ignore[arg-type]
        f"this host's clock is {abs(skew):.1f}s {direction} the clock of {name}: the times this "
        "host writes (run heartbeats, start and end times, dead-letter ages) disagree with other "
        "hosts', so a live run can look stale (or a dead one alive) in `taskkit runs` and the "
        "dashboard",
        "synchronise the clocks of every worker host and the database server (NTP)",
        details,
    )
