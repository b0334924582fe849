"""Checks of the worker's Celery settings: the visibility timeout against the tasks' limits and
countdowns, acknowledgement, serializers, RabbitMQ's consumer timeout, the embedded broker.

The rules are those of ``taskkit.tasks`` (``uses_visibility_timeout``, ``visibility_timeout``,
``extends_visibility``, ``task_time_limits``, ``effective_consumer_timeout``...), called here,
not copied: the Redis transport (and the embedded ``taskkit+sqlite`` broker) redelivers a
message once it is ``visibility_timeout`` seconds old; a worker's keeper
(``TASKKIT_EXTEND_VISIBILITY``, on by default) re-stamps the messages it holds every third of
it; without the keeper, taskkit clamps a ResilientTask's retry countdowns to 90% of the
timeout, and a task running longer than the timeout is delivered again while it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskkit._utils import mask_password
from taskkit.doctor._context import PROBE_TIMEOUT, Context, one_line
from taskkit.doctor._model import Check
from taskkit.doctor._tasks import is_taskkit_task, user_tasks
from taskkit.tasks import (
    VISIBILITY_SAFE_SHARE,
    consumer_timeout_supported,
    effective_consumer_timeout,
    extends_visibility,
    rabbitmq_version,
    task_time_limits,
    uses_amqp,
    uses_visibility_timeout,
    visibility_timeout,
)

__all__ = [
    "check_acks",
    "check_consumer_timeout",
    "check_embedded_broker",
    "check_serializer",
    "check_visibility_timeout",
]

UNSAFE = frozenset({"pickle", "application/x-python-serialize", "yaml", "application/x-yaml"})
#: File systems a SQLite file must not live on (its locks are not reliable there).
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "glusterfs"})


def _countdown(task: Any) -> float:
    """The longest wait before a ResilientTask's retry is delivered (``outer_max_delay``); 0 for
    a plain Celery task, whose countdowns are its caller's (``self.retry(countdown=...)``)."""
    if is_taskkit_task(task):
        return float(getattr(task, "outer_max_delay", 0) or 0)
    return 0.0


def check_visibility_timeout(ctx: Context) -> Check:
    app = ctx.app
    conf = app.conf
    url = str(conf.broker_url or "")
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if not uses_visibility_timeout(app):
        return Check(
            "visibility_timeout",
            "ok",
            f"the broker ({scheme or 'unknown'}) redelivers on connection loss, not by age: no "
            "visibility timeout applies",
        )
    timeout = visibility_timeout(app)
    keeper = extends_visibility(app)
    tasks = user_tasks(app, ctx.load.registered if ctx.load.app is not None else None)
    longest: tuple[str, str, float] | None = None
    no_limit: list[str] = []
    long_running: list[str] = []
    clamped: list[str] = []
    for name, task in tasks.items():
        limits = task_time_limits(app, task)
        if not limits:
            no_limit.append(name)
        for label, value in limits.items():
            if longest is None or value > longest[2]:
                longest = (name, label, value)
            if value > timeout:
                long_running.append(f"{name} ({label}={value:g}s)")
        countdown = _countdown(task)
        if countdown > timeout * VISIBILITY_SAFE_SHARE:
            clamped.append(f"{name} (outer_max_delay={countdown:g}s)")
    details: dict[str, Any] = {
        "visibility_timeout": timeout,
        "keeper": keeper,
        "longest_limit": None if longest is None else {"task": longest[0], longest[1]: longest[2]},
        "tasks_without_time_limit": no_limit,
    }
    if keeper:
        return Check(
            "visibility_timeout",
            "ok",
            f"visibility_timeout is {timeout:g}s and every worker re-stamps the messages it "
            f"holds every {timeout / 3:g}s (TASKKIT_EXTEND_VISIBILITY): a long task or a "
            "waiting retry is never delivered twice while its worker lives; a dead worker's "
            f"come back within {timeout:g}s",
            None,
            details,
        )
    raise_to = max(
        [timeout]
        + [v for _, task in tasks.items() for v in task_time_limits(app, task).values()]
        + [_countdown(task) / VISIBILITY_SAFE_SHARE for _, task in tasks.items()]
    )
    why_off = (
        f"the {scheme} transport has no keeper"
        if conf.get("taskkit_extend_visibility", False)
        else "TASKKIT_EXTEND_VISIBILITY is off"
    )
    if long_running:
        return Check(
            "visibility_timeout",
            "error",
            f"these tasks may run longer than the broker's visibility_timeout ({timeout:g}s) "
            f"and {why_off}, so they are delivered again while they run: "
            + ", ".join(long_running),
            "set TASKKIT_EXTEND_VISIBILITY=true (the default: workers keep their messages "
            f"invisible), or raise TASKKIT_VISIBILITY_TIMEOUT above {raise_to:g}s, or lower "
            "the tasks' limits",
            details,
        )
    if clamped or no_limit:
        problems = []
        if clamped:
            problems.append(
                f"retry countdowns are clamped to {timeout * VISIBILITY_SAFE_SHARE:g}s (90% of the "
                f"visibility_timeout, {why_off}): " + ", ".join(clamped)
            )
        if no_limit:
            problems.append(
                f"{why_off} and these tasks have no time limit, so one running longer than "
                f"{timeout:g}s is delivered again while it runs: " + ", ".join(no_limit[:10])
            )
        return Check(
            "visibility_timeout",
            "warning",
            "; ".join(problems),
            "set TASKKIT_EXTEND_VISIBILITY=true (the default), or give the tasks a "
            "soft_time_limit under the visibility_timeout",
            details,
        )
    return Check(
        "visibility_timeout",
        "ok",
        f"every task's time limit and retry countdown fits under the visibility_timeout "
        f"({timeout:g}s)",
        None,
        details,
    )


def check_acks(ctx: Context) -> Check:
    app = ctx.app
    conf = app.conf
    tasks = user_tasks(app, ctx.load.registered if ctx.load.app is not None else None)
    early: list[str] = []
    lost: list[str] = []
    for name, task in tasks.items():
        acks_late = task.acks_late if task.acks_late is not None else conf.task_acks_late
        reject = getattr(task, "reject_on_worker_lost", None)
        if reject is None:
            reject = conf.task_reject_on_worker_lost
        if not acks_late:
            early.append(name)
        elif not reject:
            lost.append(name)
    details = {
        "task_acks_late": bool(conf.task_acks_late),
        "task_reject_on_worker_lost": bool(conf.task_reject_on_worker_lost),
        "acknowledged_early": early,
        "failed_on_worker_lost": lost,
        "worker_prefetch_multiplier": conf.worker_prefetch_multiplier,
    }
    if early:
        return Check(
            "acks",
            "error",
            "these tasks are acknowledged when they start (acks_late off), so a worker killed "
            "while running one loses it: " + ", ".join(early),
            "keep task_acks_late=True (create_app's default); remove acks_late=False from "
            "these tasks",
            details,
        )
    if lost:
        return Check(
            "acks",
            "warning",
            "these tasks fail (not redelivered) when their pool process is killed "
            "(reject_on_worker_lost off): " + ", ".join(lost),
            "keep task_reject_on_worker_lost=True (create_app's default)",
            details,
        )
    return Check(
        "acks",
        "ok",
        "every task is acknowledged after it ran (acks_late) and redelivered if its worker "
        "process dies (reject_on_worker_lost)",
        None,
        details,
    )


def check_serializer(ctx: Context) -> Check:
    conf = ctx.app.conf
    accepted = conf.accept_content or ()
    result_accepted = conf.result_accept_content or ()
    details = {
        "task_serializer": conf.task_serializer,
        "result_serializer": conf.result_serializer,
        "accept_content": list(accepted),
        "result_accept_content": list(result_accepted),
    }
    used = {
        str(s)
        for s in (
            conf.task_serializer,
            conf.result_serializer,
            *accepted,
            *result_accepted,
        )
        if s
    }
    unsafe = sorted(used & UNSAFE)
    if unsafe:
        return Check(
            "serializer",
            "error",
            f"the app accepts {', '.join(unsafe)}: whoever can publish to the broker (or write "
            "the result backend) can run code in the workers",
            "keep task_serializer, result_serializer, accept_content and "
            "result_accept_content to json (create_app's defaults)",
            details,
        )
    other = sorted(used - {"json", "application/json"})
    if other:
        return Check(
            "serializer",
            "warning",
            f"the app uses {', '.join(other)} besides json: taskkit's messages, dead letters "
            "and replays are written for JSON",
            "use json (create_app's default)",
            details,
        )
    return Check("serializer", "ok", "task messages and results are JSON only", None, details)


def check_consumer_timeout(ctx: Context) -> Check:
    app = ctx.app
    conf = app.conf
    url = str(conf.broker_url or "")
    if not uses_amqp(app):
        return Check(
            "consumer_timeout", "ok", "the broker is not RabbitMQ: no consumer timeout applies"
        )
    asked = float(conf.get("taskkit_consumer_timeout") or 0)
    details: dict[str, Any] = {"taskkit_consumer_timeout": asked}
    try:
        with app.connection_for_write(connect_timeout=PROBE_TIMEOUT) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=PROBE_TIMEOUT)
            properties = getattr(connection.connection, "server_properties", None) or {}
    except Exception as exc:
        return Check(
            "consumer_timeout",
            "warning",
            f"could not ask RabbitMQ {mask_password(url)} its version: {one_line(exc)}",
            "see the broker check",
            details,
        )
    raw = properties.get("version")
    raw = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    version = rabbitmq_version(properties)
    details["rabbitmq_version"] = raw
    supported = consumer_timeout_supported(version)
    effective = effective_consumer_timeout(app, version)
    tasks = user_tasks(app, ctx.load.registered if ctx.load.app is not None else None)
    longer = []
    unbounded = []
    for name, task in tasks.items():
        limits = task_time_limits(app, task)
        if not limits:
            unbounded.append(name)
        if any(value > effective for value in limits.values()):
            longer.append(name)
    details["effective_timeout"] = effective
    details["tasks_longer"] = longer
    details["tasks_without_time_limit"] = unbounded
    if (not asked or not supported) and not longer and not unbounded:
        return Check(
            "consumer_timeout",
            "ok",
            f"RabbitMQ {raw}: the node's consumer_timeout applies (30 min unless rabbitmq.conf "
            "says otherwise), and every task's time limit is shorter",
            None,
            details,
        )
    if not asked or not supported:
        why = (
            "TASKKIT_CONSUMER_TIMEOUT is 0"
            if not asked
            else f"RabbitMQ {raw} ignores x-consumer-timeout (3.12 and later honour it)"
        )
        return Check(
            "consumer_timeout",
            "warning",
            f"{why}: the node's consumer_timeout applies (30 min unless rabbitmq.conf says "
            "otherwise; AMQP does not tell its value), and closes the channel under a task "
            "that runs longer"
            + (f"; tasks with longer limits: {', '.join(longer)}" if longer else "")
            + (f"; tasks without a time limit: {', '.join(unbounded[:10])}" if unbounded else ""),
            "raise consumer_timeout in rabbitmq.conf above your longest task"
            + ("" if supported is False else ", or set TASKKIT_CONSUMER_TIMEOUT"),
            details,
        )
    if longer:
        return Check(
            "consumer_timeout",
            "error",
            f"these tasks' time limits are longer than the consumer timeout the workers ask "
            f"for ({asked:g}s): RabbitMQ closes the channel under them: " + ", ".join(longer),
            "raise TASKKIT_CONSUMER_TIMEOUT above the longest time limit",
            details,
        )
    return Check(
        "consumer_timeout",
        "ok",
        f"RabbitMQ {raw} honours the consumer timeout the workers ask for ({asked:g}s), longer "
        "than every task's time limit",
        None,
        details,
    )


def _file_system(path: Path) -> str | None:
    """The type of the file system holding ``path`` (from /proc/mounts), if known."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best: tuple[int, str] | None = None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > best[0]):
            best = (len(point), parts[2])
    return None if best is None else best[1]


def check_embedded_broker(ctx: Context) -> Check:
    url = str(ctx.app.conf.broker_url or "")
    shown = mask_password(url)
    if url.startswith("sqla+sqlite://"):
        return Check(
            "embedded_broker",
            "warning",
            "kombu's sqla+sqlite broker marks a taken message invisible for ever: a task whose "
            "whole worker is killed is lost, and `celery inspect` gets no reply",
            "leave TASKKIT_BROKER_URL empty (taskkit's own taskkit+sqlite broker), or use Redis",
            {"url": shown},
        )
    if not url.startswith("taskkit+sqlite://"):
        return Check("embedded_broker", "ok", "the broker is not embedded: nothing to say")
    path = Path("/" + url.split("://", 1)[1].split("?", 1)[0].lstrip("/"))
    folder = path.parent if path.parent.exists() else path.parent.parent
    fs = _file_system(folder)
    details = {"file": str(path), "file_system": fs}
    limits = (
        "one host only (workers on other machines cannot share the file), workers poll the "
        "file (about ten reads a second when idle), leases are lock files on this host; "
        "`celery inspect`, `celery control` and task events (Flower, `celery events`) work"
    )
    if fs in NETWORK_FS:
        return Check(
            "embedded_broker",
            "error",
            f"the embedded broker's file {path} is on a {fs} file system: SQLite's locks are "
            "not reliable there, so two workers can take the same message",
            "keep TASKKIT_HOME on a local disk, or use Redis (TASKKIT_BROKER_URL=redis://...)",
            details,
        )
    return Check(
        "embedded_broker",
        "ok",
        f"the embedded broker ({path}): {limits}",
        None,
        details,
    )
