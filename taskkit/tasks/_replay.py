"""Sending dead letters again into the app's registered tasks: all or nothing.

Every selected letter is checked first (still ``dead``; the target one of the app's taskkit
tasks, or listed in its ``taskkit_replay_allow`` setting, and never Celery's own ``celery.*``;
a batch item going into a ``BatchTask``; the payload still valid for the target: the task's
signature for a whole task, ``BatchTask.validate_item`` for an item); if one fails,
``ReplayRejected`` names it and why, and nothing is sent or changed. Items go out as one new
batch per target task (``replay-<hex>``, the original item keys; another batch when a key
repeats). A ``TrainingTask``'s letter resumes its failed run (``resume_run``, as ``taskkit
resume`` does) instead of sending its arguments again, which the worker would drop.
"""

from __future__ import annotations

import inspect
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from taskkit.db.models import DeadLetter, ModelRun
from taskkit.db.session import session_scope
from taskkit.deadletter import (
    UNSERIALIZABLE,
    DeadLetterStore,
    ReplayResult,
    SentReplay,
)
from taskkit.errors import ConfigurationError, ReplayRejected, RunNotResumable
from taskkit.tasks._base import ResilientTask
from taskkit.tasks._runs import resume_run
from taskkit.tasks._submit import PUBLISH_RETRY_POLICY, check_reachable, sending
from taskkit.tasks._training import TrainingTask

__all__ = ["replay_dead_letters"]


def replay_dead_letters(
    ids: Sequence[int] | None = None,
    *,
    app: Any,
    store: DeadLetterStore | None = None,
    into: str | None = None,
    task: str | None = None,
    batch_id: str | None = None,
    error_type: str | None = None,
    older_than: timedelta | None = None,
    all: bool = False,
) -> ReplayResult:
    """Send dead letters again: those in ``ids``, or those matching the filters (``all=True``
    for every waiting letter), into their own task or ``into``; mark them ``replayed``.

    ``app`` is the Celery app whose registered tasks receive them; ``store`` defaults to the
    one at ``TASKKIT_DATABASE_URL``. All or nothing: ``DeadLetterNotFound`` for an unknown id,
    ``ReplayRejected`` for a letter that is not waiting, a task that is not registered, or a
    payload that no longer validates; then nothing was sent or changed.

    The letters are marked ``replayed`` in the transaction that selected them, after the send:
    a failed send leaves them ``dead``, and a crash after sending can repeat a replay (which
    the batch's ledger and an idempotent item function absorb) but never lose one.

    ``BrokerUnavailable`` within about two seconds when the broker or the result backend is
    down: both are asked to answer before any letter is read, and a send that fails in an
    outage leaves its letters ``dead`` (those of sends before it are left as the paragraph
    above says).

    Example::

        from taskkit.tasks import replay_dead_letters
        from workers.app import app

        result = replay_dead_letters(task="jobs.score_items", app=app)  # after the fix
        print(result.letter_ids)
    """
    if app is None:
        raise ConfigurationError("replay needs the Celery app whose tasks receive the letters")
    store = store if store is not None else DeadLetterStore(app=app)
    filtered = any(f is not None for f in (task, batch_id, error_type, older_than))
    if ids is None and not filtered and not all:
        raise ConfigurationError(
            "replay what? give letter ids, a filter (task, batch, error type, age) or all=True"
        )
    # Eager apps (tests) run the replayed tasks inside send(), and those write to this
    # database: send after the commit there.
    eager = bool(app.conf.get("task_always_eager"))
    check_reachable(app)
    selected = store.letters_for_replay(
        ids, task=task, batch_id=batch_id, error_type=error_type, older_than=older_than
    )
    # Resuming a training run writes its row in a transaction of its own, which SQLite's one
    # writer cannot grant while this one holds the letters: those go after the commit too.
    with selected as (session, letters):
        plans = _plan(app, letters, into)
        now = [plan for plan in plans if not eager and plan.run_id is None]
        sent = [plan.send() for plan in now]
        store.mark_replayed(sent, session)
    for plan in plans:
        if eager or plan.run_id is not None:
            # marked one by one: if a later send is refused, those already sent stay marked
            message = plan.send()
            store.mark_replayed([message])
            sent.append(message)
    return ReplayResult([i for message in sent for i in message.letter_ids], sent)


@dataclass
class _Plan:
    task: Any
    letters: list[DeadLetter]
    items: bool
    #: A training run to resume (a TrainingTask's letter) instead of sending the arguments.
    run_id: int | None = None

    def send(self) -> SentReplay:
        ids = [letter.id for letter in self.letters]
        if self.run_id is not None:
            app = self.task.app
            try:
                task_id = resume_run(
                    app,
                    self.run_id,
                    require_checkpoint=False,
                    database_url=app.conf.get("taskkit_database_url"),
                )
            except RunNotResumable as exc:  # changed since the check (a resume, a worker)
                raise ReplayRejected(f"cannot resume it: {exc}", ids) from exc
            return SentReplay(self.task.name, task_id, None, ids)
        if self.items:
            batch_id = f"replay-{uuid.uuid4().hex[:24]}"
            with sending(self.task.app):
                result = self.task.apply_async(
                    args=([letter.payload for letter in self.letters],),
                    kwargs={
                        "batch_id": batch_id,
                        "keys": [letter.item_key for letter in self.letters],
                    },
                    retry_policy=PUBLISH_RETRY_POLICY,
                )
            return SentReplay(self.task.name, result.id, batch_id, ids)
        (letter,) = self.letters
        payload = letter.payload
        with sending(self.task.app):
            result = self.task.apply_async(
                args=tuple(payload.get("args", ())),
                kwargs=dict(payload.get("kwargs", {})),
                retry_policy=PUBLISH_RETRY_POLICY,
            )
        return SentReplay(self.task.name, result.id, None, ids)


def _plan(app: Any, letters: list[DeadLetter], into: str | None) -> list[_Plan]:
    """Check every letter against its target task; group items per target. Raises
    ``ReplayRejected`` for the first problem, before anything is sent."""
    # per target, batches of items whose keys are unique (a batch refuses a repeated key)
    items: dict[str, list[tuple[set[str | None], list[DeadLetter]]]] = defaultdict(list)
    plans: list[_Plan] = []
    allowed = _allow_list(app)
    for letter in letters:
        target = into or letter.task_name
        task = _target(app, target, allowed, letter)
        if isinstance(letter.payload, dict) and UNSERIALIZABLE in letter.payload:
            raise ReplayRejected(
                "its payload was not JSON when it failed, so it cannot be sent again", [letter.id]
            )
        if letter.item_key is not None:
            validate = getattr(task, "validate_item", None)
            if validate is None:
                raise ReplayRejected(
                    f"{letter.task_name!r} failed on a batch item, and {target!r} is not a "
                    "BatchTask (items replay into batch tasks)",
                    [letter.id],
                )
            try:
                validate(letter.payload)
            except Exception as exc:
                raise ReplayRejected(
                    f"the payload no longer validates for {target!r}: {type(exc).__name__}: {exc}",
                    [letter.id],
                ) from exc
            batches = items[target]
            for keys, group in batches:
                if letter.item_key not in keys:
                    keys.add(letter.item_key)
                    group.append(letter)
                    break
            else:
                batches.append(({letter.item_key}, [letter]))
        else:
            _check_task_payload(task, letter)
            run_id = _training_run(task, letter, into) if isinstance(task, TrainingTask) else None
            plans.append(_Plan(task, [letter], items=False, run_id=run_id))
    plans.extend(
        _Plan(app.tasks[target], group, items=True)
        for target, batches in items.items()
        for _, group in batches
    )
    return plans


def _training_run(task: Any, letter: DeadLetter, into: str | None) -> int:
    """The failed run a ``TrainingTask``'s letter resumes, or ``ReplayRejected``.

    Decision: a training task's arguments name a run, and the run belongs to the task id of its
    current attempt; the same arguments sent again under a new task id are dropped by the
    worker as a stale copy, and the run stays failed. So a training letter is replayed as
    ``taskkit resume`` does (``resume_run``: the run is handed to a new task id and continues
    from its last valid checkpoint, or from the start when it has none), and only a ``failed``
    run is: a completed one needs nothing, and a queued or running one has a trainer.
    """
    if into is not None and into != letter.task_name:
        raise ReplayRejected(
            f"{letter.task_name!r} failed on a training run, which resumes into its own task, "
            f"not {into!r}",
            [letter.id],
        )
    payload = letter.payload
    try:
        run_id = task._argument(
            tuple(payload.get("args", ())), dict(payload.get("kwargs", {})), task.run_arg
        )
    except ConfigurationError as exc:
        raise ReplayRejected(str(exc), [letter.id]) from exc
    if not isinstance(run_id, int) or isinstance(run_id, bool):
        raise ReplayRejected(f"its {task.run_arg!r} is not a run id: {run_id!r}", [letter.id])
    with session_scope(task.app.conf.get("taskkit_database_url")) as session:
        run = session.get(ModelRun, run_id)
        status = None if run is None else run.status
        run_task = None if run is None else run.task_name
    if run is None:
        raise ReplayRejected(f"run {run_id} does not exist any more", [letter.id])
    if run_task != task.name:
        raise ReplayRejected(
            f"run {run_id} belongs to task {run_task!r}, not {task.name!r}", [letter.id]
        )
    if status != "failed":
        raise ReplayRejected(
            f"run {run_id} is {status}; only a failed run is resumed by a replay "
            "(discard the letter, or see: taskkit runs show)",
            [letter.id],
        )
    return run_id


def _allow_list(app: Any) -> frozenset[str]:
    """The app's ``taskkit_replay_allow``: names of tasks that are not taskkit tasks which a
    replay may still send to (never Celery's own)."""
    listed = app.conf.get("taskkit_replay_allow") or ()
    if isinstance(listed, str) or not all(isinstance(name, str) for name in listed):
        raise ConfigurationError(
            f"taskkit_replay_allow must be a list of task names, not {listed!r}"
        )
    return frozenset(listed)


def _target(app: Any, name: str, allowed: frozenset[str], letter: DeadLetter) -> Any:
    """The task ``name`` of ``app`` a letter may be sent to, or ``ReplayRejected`` saying why.

    Decision: a replay sends what a database row says to a task the row names, so whoever can
    write the ``dead_letters`` table chooses both. Only the app's own taskkit tasks
    (``ResilientTask`` and its subclasses, whose arguments the checks below verify) and the
    names listed in ``taskkit_replay_allow`` are targets; Celery's own tasks (``celery.*``:
    ``celery.map`` calls any task with arguments from the row) never are, listed or not.
    """
    if name.startswith("celery.") or name == "celery":
        raise ReplayRejected(
            f"{name!r} is Celery's own task; replay only sends to the app's taskkit tasks",
            [letter.id],
        )
    task = app.tasks.get(name)
    if task is None:
        raise ReplayRejected(f"task {name!r} is not registered in app {app.main!r}", [letter.id])
    if not isinstance(task, ResilientTask) and name not in allowed:
        raise ReplayRejected(
            f"task {name!r} is not a taskkit task (a ResilientTask) of app {app.main!r}; list it "
            "in the app's taskkit_replay_allow setting to replay into it",
            [letter.id],
        )
    return task


def _check_task_payload(task: Any, letter: DeadLetter) -> None:
    payload = letter.payload
    if isinstance(payload, dict) and payload.get("redacted"):
        names = ", ".join(map(str, payload["redacted"]))
        raise ReplayRejected(
            f"its sensitive arguments ({names}) were redacted when it failed, so it cannot be "
            "sent again; send the task anew with them",
            [letter.id],
        )
    if not isinstance(payload, dict) or not set(payload) <= {"args", "kwargs"}:
        raise ReplayRejected(
            "a task's payload must be {'args': [...], 'kwargs': {...}}", [letter.id]
        )
    # What the task's ladder calls with its arguments (a BatchTask's batch), else its run.
    body = task.body() if callable(getattr(task, "body", None)) else task.run
    try:
        inspect.signature(body).bind(*payload.get("args", ()), **payload.get("kwargs", {}))
    except TypeError as exc:
        raise ReplayRejected(
            f"the payload no longer fits {task.name!r}'s arguments: {exc}", [letter.id]
        ) from exc
