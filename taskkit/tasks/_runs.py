"""Training runs in the database: submit, resume, status transitions, and the final model.

A run is a ``ModelRun`` row. Its ``status`` moves::

    queued -> running -> (retrying -> running)* -> completed
                                                -> failed   (error_message says why)
                                                -> stopped  (stop_run: resume_run continues it)

``submit_run`` creates the row (``queued``) and sends the task with a task id it stores first,
so the row always names the attempt that owns it. ``resume_run`` re-enqueues a failed or
interrupted run with a new task id (the old attempt's copies are then stale and drop
themselves); ``resume_orphaned_runs`` does that, at worker start, for runs whose worker died
(on by default with the embedded SQLite broker: at once, instead of after its visibility
timeout, when the redelivered old copy then drops itself).

The final model is stored on ``ModelRun.model_object`` in taskkit's pickle frame, with a signed
manifest (``CheckpointInfo``: size, digest, HMAC-SHA256 under the signing key) in
``ModelRun.model_state``; ``load_model`` verifies it with the same function as checkpoints
(``taskkit.checkpoint.unseal``) before it unpickles, so a tampered or forged row is refused,
never executed.

``stop_run`` asks a run to stop: a queued or retrying run (nobody trains it yet) is ``stopped``
at once and its message drops itself when delivered; a running run gets ``stop_requested_at``,
and its trainer checkpoints the epoch it finished and ends ``stopped``. ``fork_run`` makes a new
run that starts from a checkpoint of another, with config overrides.

Example::

    from taskkit.tasks._runs import submit_run, load_model

    run_id, task_id = submit_run(train_model, {"epochs": 20, "seed": 7}, name="baseline")
    ...
    model = load_model(run_id)
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from taskkit.checkpoint import CheckpointInfo, CheckpointStore, seal, unseal
from taskkit.db import db_retry
from taskkit.db.models import ModelRun, TrainingEpoch, TrainingProgress
from taskkit.db.session import session_scope
from taskkit.errors import (
    BrokerUnavailable,
    CheckpointTampered,
    RunNotFound,
    RunNotResumable,
    RunNotStoppable,
)
from taskkit.tasks._fence import holds_fence, refused
from taskkit.tasks._submit import PUBLISH_RETRY_POLICY, check_reachable, sending

__all__ = [
    "ACTIVE",
    "ENDED",
    "Attempt",
    "fork_run",
    "load_model",
    "mark_completed",
    "mark_failed",
    "mark_retrying",
    "mark_running",
    "mark_stopped",
    "resume_run",
    "resume_runs_without_trainer",
    "screen_attempt",
    "stop_run",
    "submit_run",
]

logger = logging.getLogger("taskkit.tasks")

#: Statuses of a run that a worker owns or will own.
ACTIVE = ("queued", "running", "retrying")

#: Statuses after which a run does not change by itself (failed and stopped ones resume).
ENDED = ("completed", "failed", "stopped")


#: Status writes read the row, then update it: on SQLite (WAL) another writer committing in
#: between makes the upgrade fail at once with "database is locked", whatever the busy timeout,
#: and a version conflict is possible anywhere. Both are transient: retry the short
#: transaction, not the whole training attempt around it.
_status_write = db_retry(max_attempts=6, delay=0.05, max_delay=1.0)


def _now() -> datetime:
    return datetime.now(UTC)


def _get(session: Any, run_id: int) -> ModelRun:
    run: ModelRun | None = session.get(ModelRun, run_id)
    if run is None:
        raise RunNotFound(run_id)
    return run


@dataclass(frozen=True)
class Attempt:
    """What a delivered training task should do: ``run``, or skip (``completed``/``stale``)."""

    verdict: str
    result: dict[str, Any] | None = None
    owner: str | None = None


def screen_attempt(run_id: int, task_id: str, *, database_url: str | None = None) -> Attempt:
    """Decide whether task ``task_id`` may train run ``run_id``.

    ``completed``: the run finished (a late copy returns its result instead of training again);
    ``stale``: the run was handed to another task id (``resume_run``); ``stopped``: it was
    stopped before this attempt started (``stop_run``; its result says so); else ``run``.

    Example::

        if screen_attempt(7, request.id).verdict == "run": ...
    """
    with session_scope(database_url) as session:
        run = _get(session, run_id)
        if run.status == "completed":
            return Attempt("completed", result=completed_result(run))
        if run.task_id not in (None, task_id):
            return Attempt("stale", owner=run.task_id)
        if run.status == "stopped":
            return Attempt("stopped", result=stopped_result(run.id))
        return Attempt("run")


def completed_result(run: ModelRun) -> dict[str, Any]:
    """The task result of a completed run (what the training task returned)."""
    return {"status": "success", "model_run_id": run.id, "best_score": run.final_score}


def stopped_result(run_id: int, epoch: int | None = None) -> dict[str, Any]:
    """The task result of a run that stopped on request (after ``epoch``, None: before
    training)."""
    return {"status": "stopped", "model_run_id": run_id, "epoch": epoch}


@_status_write
def mark_running(
    run_id: int,
    task_id: str | None,
    *,
    database_url: str | None = None,
    fence: int | None = None,
) -> bool:
    """``running``; records the task id and, the first time, ``started_at``. Returns whether
    a stop was requested (``stop_run``): the trainer then stops before it trains. With
    ``fence`` (the trainer's fencing token), only while the run's fence is that token, else
    ``LeaseLost`` and nothing is written."""
    with session_scope(database_url) as session:
        if not holds_fence(session, run_id, fence):
            raise refused(run_id, fence or 0, "status 'running'")
        run = _get(session, run_id)
        run.status = "running"
        if task_id is not None:
            run.task_id = task_id
        run.error_message = None
        if run.started_at is None:
            run.started_at = _now()
        return run.stop_requested_at is not None


def stop_requested(run_id: int, *, database_url: str | None = None) -> bool:
    """Whether an operator asked run ``run_id`` to stop (one read of its row)."""
    with session_scope(database_url, readonly=True) as session:
        at = session.scalar(select(ModelRun.stop_requested_at).where(ModelRun.id == run_id))
    return at is not None


@_status_write
def mark_stopped(
    run_id: int,
    epoch: int | None,
    *,
    database_url: str | None = None,
    fence: int | None = None,
) -> None:
    """``stopped`` on request, after ``epoch`` (checkpointed) or before training (None); the
    progress row says so too. ``resume_run`` continues it. ``fence``: as ``mark_running``."""
    message = (
        "stopped on request before this attempt trained"
        if epoch is None
        else f"stopped on request after epoch {epoch + 1} (checkpointed)"
    )
    with session_scope(database_url) as session:
        if not holds_fence(session, run_id, fence):
            raise refused(run_id, fence or 0, "status 'stopped'")
        run = _get(session, run_id)
        run.status = "stopped"
        run.error_message = None
        if run.stop_requested_at is None:
            run.stop_requested_at = _now()
        progress = session.scalars(
            select(TrainingProgress).filter_by(model_run_id=run_id)
        ).one_or_none()
        if progress is not None:
            progress.status = "stopped"
            progress.message = message


@_status_write
def stop_run(
    run_id: int,
    *,
    lease_alive: Any = None,
    database_url: str | None = None,
) -> str:
    """Ask run ``run_id`` to stop; returns its status now: ``stopped`` or ``stopping``.

    A run nobody trains yet (``created``, ``queued``, ``retrying``, or ``running`` with no live
    trainer: ``lease_alive(run_id, task_name)`` false) is ``stopped`` at once; its queued
    message drops itself when a worker gets it. A running run gets ``stop_requested_at`` and
    stays ``running`` (``stopping``) until its trainer, at the end of its current epoch,
    checkpoints that epoch and marks it ``stopped``; a second stop of it changes nothing. A
    run that ended (completed, failed, stopped) raises ``RunNotStoppable``; an unknown one
    ``RunNotFound``. ``resume_run`` continues a stopped run from its checkpoint (or from the
    start if it stopped before training).

    Example::

        stop_run(7)          # 'stopping'
        ...                  # the run is 'stopped' after its current epoch
        resume_run(app, 7)   # and continues from there
    """
    with session_scope(database_url) as session:
        run = _get(session, run_id)
        if run.status in ENDED:
            raise RunNotStoppable(run_id, run.status)
        if run.stop_requested_at is None:
            run.stop_requested_at = _now()
        trained = run.status == "running" and (
            lease_alive is None or lease_alive(run_id, run.task_name)
        )
        if trained:
            return "stopping"
        run.status = "stopped"
        run.error_message = None
        return "stopped"


def mark_retrying(
    run_id: int, error: str, *, database_url: str | None = None, fence: int | None = None
) -> None:
    """``retrying``, with the error that caused the retry. ``fence``: as ``mark_running``."""
    _set_status(run_id, "retrying", error, database_url, fence)


def mark_failed(
    run_id: int, error: str, *, database_url: str | None = None, fence: int | None = None
) -> None:
    """``failed``, with the error; the progress row says failed too. ``fence``: as
    ``mark_running``."""
    _set_status(run_id, "failed", error, database_url, fence)


@_status_write
def _set_status(
    run_id: int, status: str, error: str | None, database_url: str | None, fence: int | None
) -> None:
    with session_scope(database_url) as session:
        if not holds_fence(session, run_id, fence):
            raise refused(run_id, fence or 0, f"status {status!r}")
        run = _get(session, run_id)
        run.status = status
        run.error_message = error
        progress = session.scalars(
            select(TrainingProgress).filter_by(model_run_id=run_id)
        ).one_or_none()
        if progress is not None and status == "failed":
            progress.status = "failed"
            progress.message = error


def mark_completed(
    run_id: int,
    model: Any,
    best_score: float | None,
    *,
    database_url: str | None = None,
    fence: int | None = None,
) -> None:
    """``completed``: stores the final model (sealed, see ``load_model``) and the best score.
    ``fence``: as ``mark_running``."""
    data, info = seal(model, str(run_id), kind="model")
    _store_completed(run_id, data, info.to_dict(), best_score, database_url, fence)


@_status_write
def _store_completed(
    run_id: int,
    data: bytes,
    seal: dict[str, Any],
    best_score: float | None,
    database_url: str | None,
    fence: int | None = None,
) -> None:
    with session_scope(database_url) as session:
        if not holds_fence(session, run_id, fence):
            raise refused(run_id, fence or 0, "the final model")
        run = _get(session, run_id)
        run.status = "completed"
        run.final_score = best_score
        run.model_object = data
        run.model_state = seal
        run.error_message = None
        run.completed_at = _now()


def load_model(run_id: int, *, database_url: str | None = None) -> Any:
    """The final model of a completed run, verified before it is unpickled: its manifest's
    signature (``TASKKIT_SECRET_KEY``, the key file, or the key made under ``TASKKIT_HOME``;
    old keys too), its run, size and digest, by the same function that verifies checkpoints.
    ``CheckpointTampered`` otherwise (also for a model stored by taskkit before models were
    signed: train or ``mark_completed`` it again).

    Example::

        model = load_model(run_id)
        model.predict(X)
    """
    with session_scope(database_url, readonly=True) as session:  # never waits for a writer
        run = _get(session, run_id)
        if run.status != "completed" or run.model_object is None:
            raise RunNotResumable(run_id, f"has no final model (status {run.status})", "no_model")
        data, manifest = bytes(run.model_object), run.model_state
    try:
        info = CheckpointInfo.from_dict(manifest)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        raise CheckpointTampered(
            f"the final model of run {run_id}: it has no valid signed manifest (changed, or "
            "stored by a taskkit that did not sign models); refusing to unpickle it"
        ) from None
    return unseal(info, data, run_id=str(run_id), kind="model")


def submit_run(
    task: Any,
    config: dict[str, Any],
    *,
    name: str | None = None,
    model_type: str | None = None,
    database_url: str | None = None,
    idempotency_key: str | None = None,
    **options: Any,
) -> tuple[int, str]:
    """Create a ``queued`` run for ``config`` and send ``task(model_run_id, config)``;
    returns ``(run_id, task_id)``. ``options`` go to ``apply_async`` (queue, countdown...).

    With ``idempotency_key``, a run already submitted with that key is returned instead (its
    ``(run_id, task_id)``; nothing sent, the broker not asked), also when two submissions with
    the key race: the key is a unique column, and the one whose insert loses finds the other's.

    The row is committed, with the task id, before the message is sent, so a worker never
    sees a run it cannot find. Before that, the broker and the result backend are asked to
    answer (``check_reachable``): when either is down, ``BrokerUnavailable`` comes within about
    two seconds and no row is made. If the send itself then fails because one went down, the
    row is deleted again (a run the broker never saw is not a run) and ``BrokerUnavailable``
    raised; any other send error marks the run failed with it ("could not be sent: ...") and
    is raised.

    Example::

        run_id, task_id = submit_run(train_model, {"epochs": 20}, name="baseline")
    """
    task_id = str(uuid.uuid4())
    if idempotency_key is not None and (found := _keyed(idempotency_key, database_url)):
        return found
    check_reachable(task.app)
    try:
        with session_scope(database_url) as session:
            run = ModelRun(
                name=name or f"{task.name}",
                model_type=model_type or str(config.get("model_type", "unknown")),
                config=config,
                status="queued",
                task_id=task_id,
                task_name=task.name,
                idempotency_key=idempotency_key,
            )
            session.add(run)
            session.flush()
            run_id = run.id
    except IntegrityError:
        if idempotency_key is None or not (found := _keyed(idempotency_key, database_url)):
            raise
        return found
    _send(task, run_id, config, task_id, database_url, options, before=None)
    return run_id, task_id


def _keyed(key: str, database_url: str | None) -> tuple[int, str] | None:
    """The ``(run_id, task_id)`` of the run submitted with idempotency key ``key``, if any."""
    with session_scope(database_url, readonly=True) as session:
        row = session.execute(
            select(ModelRun.id, ModelRun.task_id).where(ModelRun.idempotency_key == key)
        ).one_or_none()
    return None if row is None else (row.id, row.task_id or "")


def _send(
    task: Any,
    run_id: int,
    config: dict[str, Any],
    task_id: str,
    database_url: str | None,
    options: dict[str, Any],
    *,
    before: tuple[str, str | None, str | None] | None,
) -> None:
    """Send the run's task; on an outage undo the hand-over to ``task_id``: delete the new run
    (``before`` None) or put back its ``(status, task_id, error_message)``."""
    options.setdefault("retry_policy", PUBLISH_RETRY_POLICY)
    try:
        with sending(task.app):
            task.apply_async(args=(run_id, config), task_id=task_id, **options)
    except BrokerUnavailable:
        _undo_hand_over(run_id, task_id, before, database_url)
        raise
    except Exception as exc:
        mark_failed(run_id, f"could not be sent: {exc}", database_url=database_url)
        raise


@_status_write
def _undo_hand_over(
    run_id: int,
    task_id: str,
    before: tuple[str, str | None, str | None] | None,
    database_url: str | None,
) -> None:
    """Only while the row is still as the failed send left it (``queued`` under ``task_id``):
    a worker that got the message after all owns it then."""
    runs = cast(Table, ModelRun.__table__)
    still_ours = (runs.c.id == run_id) & (runs.c.task_id == task_id) & (runs.c.status == "queued")
    with session_scope(database_url) as session:
        if before is None:
            session.execute(runs.delete().where(still_ours))
        else:
            status, owner, error = before
            session.execute(
                runs.update()
                .where(still_ours)
                .values(status=status, task_id=owner, error_message=error)
            )


def resume_run(
    app: Any,
    run_id: int,
    *,
    require_checkpoint: bool = True,
    lease_alive: Any = None,
    database_url: str | None = None,
    **options: Any,
) -> str:
    """Re-enqueue a failed, stopped or interrupted run; it continues from its last valid
    checkpoint. Returns the new task id.

    Refused (``RunNotFound``, ``RunNotResumable``) for an unknown run, a completed one, one
    whose trainer is alive (``lease_alive(run_id, task_name)`` true), one whose task the app
    does not register, and, with ``require_checkpoint``, one with no checkpoint in the task's
    own ``checkpoint_store``. The checks and the hand-over to a new task id happen in one
    transaction that compares the row's version: a worker or another resume that changed the
    run meanwhile makes this one fail (``RunNotResumable``, kind ``running``) instead of
    sending a second trainer. Any older copy of the run's task still queued then drops itself.
    ``BrokerUnavailable`` when the broker or the result backend is down: the run is left as it
    was (status, task id, error). A ``stopped`` run needs no checkpoint (one stopped before it
    trained starts from the beginning); resuming clears its stop request.

    Example::

        task_id = resume_run(app, 7)
    """
    task_id = str(uuid.uuid4())
    check_reachable(app)
    try:
        with session_scope(database_url) as session:
            run = _get(session, run_id)
            status, task_name, config = run.status, run.task_name, dict(run.config or {})
            task = _resumable_task(app, run_id, status, task_name, lease_alive)
            if require_checkpoint and status != "stopped":
                _require_checkpoint(task, run_id, run.uid)
            before = (status, run.task_id, run.error_message)
            run.status = "queued"
            run.task_id = task_id
            run.error_message = None
            run.stop_requested_at = None
    except StaleDataError:
        raise RunNotResumable(
            run_id, "changed while it was being resumed (a worker or another resume)", "running"
        ) from None
    _send(task, run_id, config, task_id, database_url, options, before=before)
    logger.info("taskkit: run %s re-enqueued as task %s", run_id, task_id)
    return task_id


def _resumable_task(
    app: Any, run_id: int, status: str, task_name: str | None, lease_alive: Any
) -> Any:
    if status == "completed":
        raise RunNotResumable(run_id, "is already completed", "completed")
    if lease_alive is not None and status in ACTIVE and lease_alive(run_id, task_name):
        raise RunNotResumable(run_id, f"is still {status} on a live worker", "running")
    if not task_name or task_name not in app.tasks:
        raise RunNotResumable(
            run_id, f"names task {task_name!r}, which this app does not register", "unknown_task"
        )
    return app.tasks[task_name]


def _open_store(task: Any, run_id: int, run_uid: str) -> CheckpointStore:
    """The run's checkpoints, where its task keeps them: under the run's identity (read from
    this database, which may not be the task's configured one); an override of
    ``checkpoint_store`` without ``run_uid`` is called as before."""
    opener = getattr(task, "checkpoint_store", None)
    if opener is None:
        return CheckpointStore(run_id, run_uid=run_uid)
    if "run_uid" in inspect.signature(opener).parameters:
        return cast(CheckpointStore, opener(run_id, run_uid=run_uid))
    return cast(CheckpointStore, opener(run_id))


def _require_checkpoint(task: Any, run_id: int, run_uid: str) -> None:
    with _open_store(task, run_id, run_uid) as store:
        if store.latest() is None:
            raise RunNotResumable(run_id, "has no checkpoint to resume from", "no_checkpoint")


def resume_runs_without_trainer(
    app: Any, lease_alive: Any, *, database_url: str | None = None
) -> list[int]:
    """Re-enqueue every ``running``/``retrying`` run whose trainer is provably gone
    (``lease_alive`` false; one asked to stop is marked ``stopped`` instead); returns their
    ids. Used at worker start on brokers that never redeliver a dead worker's message.

    Example::

        resumed = resume_runs_without_trainer(app, lease_alive)
    """
    with session_scope(database_url) as session:
        candidates = list(
            session.execute(
                select(ModelRun.id, ModelRun.task_name, ModelRun.stop_requested_at).where(
                    ModelRun.status.in_(("running", "retrying"))
                )
            ).all()
        )
    resumed = []
    for run_id, task_name, stop_requested_at in candidates:
        if lease_alive(run_id, task_name):
            continue
        if stop_requested_at is not None:  # asked to stop: it is, rather than trained again
            with contextlib.suppress(RunNotStoppable, RunNotFound):
                stop_run(run_id, lease_alive=lambda *_: False, database_url=database_url)
            continue
        try:
            resume_run(app, run_id, require_checkpoint=False, database_url=database_url)
        except RunNotResumable as exc:
            logger.warning("taskkit: orphaned run %s not resumed: %s", run_id, exc)
            continue
        resumed.append(run_id)
    return resumed


def fork_run(
    app: Any,
    run_id: int,
    *,
    from_step: int | None = None,
    config: dict[str, Any] | None = None,
    name: str | None = None,
    database_url: str | None = None,
    **options: Any,
) -> tuple[int, str]:
    """A new run that starts from run ``run_id``'s checkpoint ``from_step`` (default: its
    newest) with ``config`` overriding keys of the parent's config; returns ``(run_id,
    task_id)`` of the fork, which is ``queued`` with ``parent_run_id`` and ``parent_step`` set.

    Decided: the checkpoint is copied into the fork's own store at fork time
    (``CheckpointStore.copy_from``): verified (signature, run, size, SHA-256) but not unpickled
    here, then written under the fork's identity and signed with this process's key. The fork
    resumes from it like any run from its own checkpoint (verified again when it loads), so its
    first trained epoch is ``from_step + 1``, and the parent's retention or cleanup can never
    take it away. The parent's epoch rows (``training_epochs``) up to ``from_step + 1`` are
    copied too, in the transaction that makes the fork, so its curve starts where the parent's
    was. The overrides replace top-level keys (a nested mapping is replaced whole);
    the training task decides what they mean for a restored state (``workers.training`` sets a
    new ``alpha`` on the restored model). The parent is not changed, whatever its status.

    ``RunNotFound`` for an unknown run; ``RunNotResumable`` with kind ``no_checkpoint`` (the
    message lists the steps there are) or ``unknown_task``; ``CheckpointTampered`` or
    ``CheckpointCorrupt`` when the chosen checkpoint does not verify (no fork is made);
    ``BrokerUnavailable`` when the broker is down (no fork is made).

    Example::

        fork_id, task_id = fork_run(app, 7, from_step=9, config={"alpha": 1e-5})
    """
    overrides = dict(config or {})
    task_id = str(uuid.uuid4())
    check_reachable(app)
    with session_scope(database_url, readonly=True) as session:
        parent = _get(session, run_id)
        parent_uid, task_name = parent.uid, parent.task_name
        merged = {**dict(parent.config or {}), **overrides}
        fork_name = name or parent.name
        model_type = parent.model_type
    if not task_name or task_name not in app.tasks:
        raise RunNotResumable(
            run_id, f"names task {task_name!r}, which this app does not register", "unknown_task"
        )
    task = app.tasks[task_name]
    with _open_store(task, run_id, parent_uid) as source:
        steps = [info.step for info in source.list()]
        step = steps[-1] if from_step is None and steps else from_step
        if step is None or step not in steps:
            raise RunNotResumable(run_id, _no_such_step(from_step, steps), "no_checkpoint")
        with session_scope(database_url) as session:
            fork = ModelRun(
                name=fork_name,
                model_type=model_type,
                config=merged,
                status="queued",
                task_id=task_id,
                task_name=task_name,
                parent_run_id=run_id,
                parent_step=step,
            )
            session.add(fork)
            session.flush()
            fork_id, fork_uid = fork.id, fork.uid
            _copy_epochs(session, run_id, fork_id, step + 1)
        try:
            with _open_store(task, fork_id, fork_uid) as target:
                target.copy_from(source, step)
        except BaseException:
            _undo_hand_over(fork_id, task_id, None, database_url)
            raise
    try:
        _send(task, fork_id, merged, task_id, database_url, options, before=None)
    except BrokerUnavailable:
        with _open_store(task, fork_id, fork_uid) as target:  # the run is gone: so is its copy
            target.delete_all()
        raise
    logger.info("taskkit: run %s forked from run %s at step %s", fork_id, run_id, step)
    return fork_id, task_id


def _copy_epochs(session: Any, parent_id: int, fork_id: int, last: int) -> None:
    """The parent's epoch rows up to ``last`` (epochs done at the fork's checkpoint), copied to
    the fork: its history reads whole without following ``parent_run_id``, and stays whole if
    the parent is deleted."""
    rows = session.execute(
        select(TrainingEpoch.epoch, TrainingEpoch.metrics, TrainingEpoch.created_at).where(
            TrainingEpoch.model_run_id == parent_id, TrainingEpoch.epoch <= last
        )
    ).all()
    session.add_all(
        TrainingEpoch(
            model_run_id=fork_id, epoch=r.epoch, metrics=r.metrics, created_at=r.created_at
        )
        for r in rows
    )


def _no_such_step(asked: int | None, steps: list[int]) -> str:
    if not steps:
        return "has no checkpoint to fork from"
    listed = ", ".join(map(str, steps))
    return f"has no checkpoint at step {asked} (its checkpoint steps: {listed})"
