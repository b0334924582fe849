"""Checks of the Celery app a worker runs: the app itself and its taskkit tasks (``app``), and
whether the worker imports every module that holds tasks (``task_modules``)."""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

from taskkit._utils import mask_password
from taskkit.doctor._context import Context
from taskkit.doctor._model import Check

__all__ = ["check_app", "check_task_modules", "is_taskkit_task", "user_tasks"]


def is_taskkit_task(task: Any) -> bool:
    """Whether ``task`` is a ``ResilientTask`` (or a subclass: training, batch)."""
    from taskkit.tasks import ResilientTask  # noqa: PLC0415

    return isinstance(task, ResilientTask)


def user_tasks(app: Any, names: Any = None) -> dict[str, Any]:
    """The app's tasks but Celery's own (``celery.*``), by name (``names``: only those)."""
    wanted = set(app.tasks) if names is None else set(names)
    return {
        name: app.tasks[name]
        for name in sorted(wanted)
        if not name.startswith("celery.") and name in app.tasks
    }


def _worker_tasks(ctx: Context) -> dict[str, Any]:
    return user_tasks(ctx.app, ctx.load.registered if ctx.load.app is not None else None)


def check_app(ctx: Context) -> Check:
    load = ctx.load
    details: dict[str, Any] = {"app": load.spec, "warnings": list(load.warnings)}
    if load.error is not None:
        return Check(
            "app",
            "error",
            f"`make worker` would fail: {load.error}",
            f"make {load.spec!r} importable from the directory the worker starts in, or set "
            "TASKKIT_APP (`taskkit doctor --app`, `make worker APP=...`) to the module holding "
            "your Celery app (module, or module:attribute)",
            details,
        )
    tasks = _worker_tasks(ctx)
    taskkit_tasks = sorted(name for name, task in tasks.items() if is_taskkit_task(task))
    details.update(
        main=ctx.app.main,
        taskkit_tasks=taskkit_tasks,
        other_tasks=sorted(set(tasks) - set(taskkit_tasks)),
    )
    if load.modules_error is not None:
        return Check(
            "app",
            "error",
            f"the app {load.spec!r} imports, but `make worker` would fail loading its task "
            f"modules: {load.modules_error}",
            "fix the module, or its name in the app's include=[...] / imports",
            details,
        )
    if not taskkit_tasks:
        return Check(
            "app",
            "warning",
            f"the app {load.spec!r} registers {len(tasks)} task(s), none of them a taskkit task "
            "(ResilientTask, TrainingTask, BatchTask)",
            "declare tasks with @app.task(base=ResilientTask, bind=True), and list their modules "
            "in create_app(include=[...])",
            details,
        )
    warned = [w for w in load.warnings if w]
    shown = ", ".join(taskkit_tasks[:8]) + (", ..." if len(taskkit_tasks) > 8 else "")
    reason = (
        f"`make worker` loads {load.spec!r} ({ctx.app.main}) with {len(taskkit_tasks)} taskkit "
        f"task(s): {shown}"
    )
    if warned:
        return Check(
            "app",
            "warning",
            reason + f"; loading it warned: {warned[0]}",
            "see the warning: it is printed by every worker at start too",
            details,
        )
    return Check("app", "ok", reason, None, details)


def _foreign_tasks(module: Any, app: Any) -> list[str]:
    """Tasks a module's globals hold that belong to another Celery app than ``app`` with
    another broker: calling them (``.delay()``) sends to a broker this worker does not consume.

    (Celery shares every ``@app.task`` with all the apps of a process, so a task of another
    app on the same broker still reaches this worker.)"""
    from celery import Task  # noqa: PLC0415

    ours = mask_password(str(app.conf.broker_url or ""))
    found = []
    for value in list(vars(module).values()):
        if isinstance(value, Task):
            owner = getattr(value, "_app", None)
            if owner is None or owner is app:
                continue
            theirs = mask_password(str(owner.conf.broker_url or ""))
            if theirs != ours:
                found.append(
                    f"{value.name} (app {getattr(owner, 'main', '?')!r} sends to {theirs}, "
                    f"not {ours})"
                )
    return sorted(found)


def check_task_modules(ctx: Context) -> Check:
    load = ctx.load
    if load.app is None:
        return Check(
            "task_modules",
            "error",
            "not checked: the app could not be loaded (see the app check)",
            "fix the app first",
        )
    app = load.app
    conf = app.conf
    listed = [str(m) for m in (*(conf.include or ()), *(conf.imports or ()))]
    details: dict[str, Any] = {"worker_imports": listed, "tasks_modules": list(ctx.tasks_modules)}
    if load.modules_error is not None:
        return Check(
            "task_modules",
            "error",
            f"a task module of the app does not import, so no worker starts: {load.modules_error}",
            "fix the module, or remove it from the app's include=[...] / imports",
            details,
        )
    problems: list[str] = []
    fixes: list[str] = []
    missing: dict[str, list[str]] = {}
    for name in listed:
        module = sys.modules.get(name)
        if module is None:
            continue
        foreign = _foreign_tasks(module, app)
        if foreign:
            problems.append(
                f"{name} (imported by the worker) defines tasks on another Celery app, whose "
                f"messages this worker never receives: {', '.join(foreign)}"
            )
            fixes.append(f"declare the tasks of {name} with the worker's app")
    for name in ctx.tasks_modules:
        if name in load.imported:
            module = sys.modules.get(name)
            foreign = _foreign_tasks(module, app) if module is not None else []
            if foreign:
                problems.append(f"{name} defines tasks on another Celery app: {', '.join(foreign)}")
                fixes.append(f"declare the tasks of {name} with the worker's app")
            continue
        before = set(app.tasks)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception as exc:
            problems.append(f"{name} does not import: {type(exc).__name__}: {exc}")
            fixes.append(f"fix {name}")
            continue
        new = sorted(set(app.tasks) - before - load.registered)
        foreign = _foreign_tasks(module, app)
        if new:
            missing[name] = new
            problems.append(
                f"the worker does not import {name}, so it never registers "
                f"{', '.join(new)}: their messages would be rejected as unregistered tasks"
            )
            fixes.append(f"add {name!r} to create_app(include=[...]) of {load.spec}")
        elif foreign:
            problems.append(f"{name} defines tasks on another Celery app: {', '.join(foreign)}")
            fixes.append(f"declare the tasks of {name} with the worker's app ({load.spec})")
        else:
            problems.append(
                f"the worker does not import {name} (not in the app's include), and it "
                "registers no task of the app"
            )
            fixes.append(f"add {name!r} to create_app(include=[...]) if it holds tasks")
    details["not_registered_by_worker"] = missing
    if problems:
        return Check("task_modules", "error", "; ".join(problems), "; ".join(fixes), details)
    return Check(
        "task_modules",
        "ok",
        f"the worker imports {', '.join(listed) or 'only the app module'}"
        + (f", which include {', '.join(ctx.tasks_modules)}" if ctx.tasks_modules else "")
        + ", and each module's tasks are on the worker's app",
        None,
        details,
    )
