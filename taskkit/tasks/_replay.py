"""Sending dead letters again into the app's registered tasks: all or nothing.

Every selected letter is checked first (still ``dead``; the target one of the app's taskkit
tasks, or listed in its ``taskkit_replay_allow`` setting, and never Celery's own ``celery.*``;
a batch item going into a ``BatchTask``; the payload still valid for the target: the task's
signature for a whole task, ``BatchTask.validate_item`` for an item); if one fails,
``ReplayRejected`` names it and why, and nothing is sent or changed. Items go out as one new
batch per target task (``replay-<hex>``, the original item keys; another batch when a key
repeats).
"""

from __future__ import annotations

import inspect
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from taskkit.db.models import DeadLetter
from taskkit.deadletter import (
    UNSERIALIZABLE,
    DeadLetterStore,
    ReplayResult,
    SentReplay,
)
from taskkit.errors import ConfigurationError, ReplayRejected
from taskkit.tasks._base import ResilientTask

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
    selected = store.letters_for_replay(
        ids, task=task, batch_id=batch_id, error_type=error_type, older_than=older_than
    )
    with selected as (session, letters):
        plans = _plan(app, letters, into)
        if not eager:
            sent = [plan.send() for plan in plans]
            store.mark_replayed(sent, session)
    if eager:
        sent = [plan.send() for plan in plans]
        store.mark_replayed(sent)
    return ReplayResult([i for message in sent for i in message.letter_ids], sent)


@dataclass
class _Plan:
    task: Any
    letters: list[DeadLetter]
    items: bool

    def send(self) -> SentReplay:
        ids = [letter.id for letter in self.letters]
        if self.items:
            batch_id = f"replay-{uuid.uuid4().hex[:24]}"
            result = self.task.apply_async(
                args=([letter.payload for letter in self.letters],),
                kwargs={
                    "batch_id": batch_id,
                    "keys": [letter.item_key for letter in self.letters],
                },
            )
            return SentReplay(self.task.name, result.id, batch_id, ids)
        (letter,) = self.letters
        payload = letter.payload
        result = self.task.apply_async(
            args=tuple(payload.get("args", ())), kwargs=dict(payload.get("kwargs", {}))
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
            plans.append(_Plan(task, [letter], items=False))
            _check_task_payload(task, letter)
    plans.extend(
        _Plan(app.tasks[target], group, items=True)
        for target, batches in items.items()
        for _, group in batches
    )
    return plans


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
