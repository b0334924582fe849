"""Training runs as read for display: ``RunView``, ``read_run``, ``list_runs``.

What ``taskkit runs``, ``taskkit train --watch``, the HTTP service (``GET /runs``) and the
dashboard show of a run comes from here: one ``RunView`` per run, read in one readonly session
(the ``ModelRun`` row and its ``TrainingProgress`` row); ``read_epochs`` reads a run's history
(its ``TrainingEpoch`` rows). Nothing here draws or formats; the
surfaces do (the CLI escapes control characters before it prints, HTML and JSON escape
their own way), so the views carry the data as stored.

A ``running`` run whose trainer has not renewed its lease for longer than the lease ttl
(``TASKKIT_LEASE_TTL``) is stale: its worker died or is cut off. ``RunView.is_stale`` has the
rule.

Example::

    from taskkit.db.runs import list_runs, read_run

    for view in list_runs(status="running"):
        print(view.id, view.name, view.epoch, view.stale)
    print(read_run(7).metrics)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from taskkit._utils import fits_row_id
from taskkit.errors import RunNotFound

if TYPE_CHECKING:
    from taskkit.db.models import ModelRun, TrainingProgress

__all__ = ["FINAL", "RunView", "check_run_id", "list_runs", "read_epochs", "read_run"]

#: Statuses after which a run does not change by itself (a stopped or failed one may be
#: resumed: by someone, not by itself).
FINAL = ("completed", "failed", "stopped")


@dataclass(frozen=True)
class RunView:
    """One run and its progress as read in one session.

    Example::

        view = read_run(7)
        view.status, view.epoch, view.total_epochs, view.percent, view.stale
    """

    id: int
    name: str
    status: str
    task_id: str | None
    task_name: str | None
    error: str | None
    created_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime | None
    final_score: float | None
    epoch: int | None
    total_epochs: int | None
    percent: float
    metrics: dict[str, Any] = field(default_factory=dict)
    #: A passing problem (the database did not answer this time) shown under the run.
    note: str | None = None
    #: When the trainer holding the run's lease last renewed it (None: never, or before 0006).
    heartbeat_at: datetime | None = None
    #: Seconds without a heartbeat after which a running run is stale (``TASKKIT_LEASE_TTL``).
    lease_ttl: float = 15.0
    #: The run's unique identity (its checkpoints are kept under it); "" when not read.
    uid: str = ""
    model_type: str | None = None
    accuracy: float | None = None
    #: When an operator asked the run to checkpoint and stop (None: not asked).
    stop_requested_at: datetime | None = None
    #: A fork's origin: the run and the checkpoint step it started from.
    parent_run_id: int | None = None
    parent_step: int | None = None
    #: The progress row's status and message (what the task last reported), if any.
    progress_status: str | None = None
    message: str | None = None

    @property
    def finished(self) -> bool:
        """Completed, failed or stopped."""
        return self.status in FINAL

    @property
    def last_seen(self) -> datetime | None:
        """The last sign of life: the heartbeat; without one (a run trained by a taskkit older
        than the heartbeat, or not started), the last update of the run or its progress, else
        its start."""
        return self.heartbeat_at or self.updated_at or self.started_at

    def heartbeat_age(self, now: datetime | None = None) -> float | None:
        """Seconds since ``last_seen`` at ``now`` (default: the current time), or None."""
        seen = self.last_seen
        if seen is None:
            return None
        return max(0.0, ((now or datetime.now(UTC)) - seen).total_seconds())

    def is_stale(self, now: datetime | None = None) -> bool:
        """Whether the run says ``running`` but its lease has expired at ``now``: no heartbeat
        for longer than ``lease_ttl`` (the trainer renews every third of it).

        Only ``running`` goes stale: a ``retrying`` run waits out its retry countdown (up to
        the task's ``outer_max_delay``, 10 minutes by default) with no lease held, so silence
        is expected there; ``queued`` has no trainer yet. The ttl is the reader's setting: a
        task with a longer ``lease_ttl`` of its own beats less often than this expects.
        """
        if self.status != "running":
            return False
        age = self.heartbeat_age(now)
        return age is not None and age > self.lease_ttl

    @property
    def stale(self) -> bool:
        """``is_stale()`` now."""
        return self.is_stale()

    @property
    def best_score(self) -> float | None:
        """The final score, else a ``best_score``/``best`` metric the task reported."""
        if self.final_score is not None:
            return self.final_score
        for key in ("best_score", "best"):
            value = self.metrics.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        return None


def _view(run: ModelRun, progress: TrainingProgress | None, lease_ttl: float) -> RunView:
    configured = (run.config or {}).get("epochs")
    total = progress.total_epochs if progress is not None else None
    if total is None and isinstance(configured, int) and not isinstance(configured, bool):
        total = configured
    percent = progress.progress_percentage if progress is not None else 0.0
    if run.status == "completed":
        percent = 100.0
    updated = [run.updated_at] if run.updated_at is not None else []
    if progress is not None and progress.updated_at is not None:
        updated.append(progress.updated_at)
    return RunView(
        id=run.id,
        name=run.name,
        status=run.status,
        task_id=run.task_id,
        task_name=run.task_name,
        error=run.error_message,
        created_at=run.created_at,
        started_at=run.started_at,
        completed_at=run.completed_at,
        updated_at=max(updated) if updated else None,
        final_score=run.final_score,
        epoch=progress.current_epoch if progress is not None else None,
        total_epochs=total,
        percent=float(percent or 0.0),
        metrics=dict(progress.metrics or {}) if progress is not None else {},
        heartbeat_at=run.heartbeat_at,
        lease_ttl=lease_ttl,
        uid=run.uid,
        model_type=run.model_type,
        accuracy=run.accuracy,
        stop_requested_at=run.stop_requested_at,
        parent_run_id=run.parent_run_id,
        parent_step=run.parent_step,
        progress_status=progress.status if progress is not None else None,
        message=progress.message if progress is not None else None,
    )


def _lease_ttl() -> float:
    from taskkit.config import get_settings  # noqa: PLC0415 - settings load for reading only

    return float(get_settings().lease_ttl)


def check_run_id(run_id: int) -> None:
    """``RunNotFound`` for an id no database row can have (negative, or beyond 64 bits).

    Example::

        check_run_id(2**70)   # raises RunNotFound
    """
    if not fits_row_id(run_id):
        raise RunNotFound(run_id)


def read_run(
    run_id: int, database_url: str | None = None, *, lease_ttl: float | None = None
) -> RunView:
    """Run ``run_id`` and its progress, read in one readonly session; ``RunNotFound`` if
    absent. ``lease_ttl`` (default ``TASKKIT_LEASE_TTL``) is the stale rule's.

    Example::

        view = read_run(7)
        print(view.status, f"{view.percent:.0f}%", "stale" if view.stale else "")
    """
    from sqlalchemy import select  # noqa: PLC0415 - the data layer loads for reading only

    from taskkit.db.models import ModelRun, TrainingProgress  # noqa: PLC0415
    from taskkit.db.session import session_scope  # noqa: PLC0415

    check_run_id(run_id)
    with session_scope(database_url, readonly=True) as session:
        run = session.get(ModelRun, run_id)
        if run is None:
            raise RunNotFound(run_id)
        progress = session.scalars(
            select(TrainingProgress).filter_by(model_run_id=run_id)
        ).one_or_none()
        return _view(run, progress, _lease_ttl() if lease_ttl is None else lease_ttl)


def list_runs(
    database_url: str | None = None,
    *,
    status: str | None = None,
    name: str | None = None,
    limit: int = 20,
    before_id: int | None = None,
    lease_ttl: float | None = None,
) -> list[RunView]:
    """The newest ``limit`` runs, newest (highest id) first: with ``status`` and ``name`` only,
    when given, and only ids below ``before_id`` (the next page after a page whose last id it
    is: cursor paging, which neither skips nor repeats a run when new runs arrive meanwhile).
    ``lease_ttl`` (default ``TASKKIT_LEASE_TTL``) is the stale rule's.

    Newest means highest id, not latest ``created_at``: ids only grow, and the order then
    follows the (name, id) index and the primary key, so a page costs the same at any depth.

    Example::

        page = list_runs(status="failed", limit=50)
        more = list_runs(status="failed", limit=50, before_id=page[-1].id)
    """
    from sqlalchemy import select  # noqa: PLC0415 - the data layer loads for reading only

    from taskkit.db.models import ModelRun, TrainingProgress  # noqa: PLC0415
    from taskkit.db.session import session_scope  # noqa: PLC0415

    query = (
        select(ModelRun, TrainingProgress)
        .outerjoin(TrainingProgress, TrainingProgress.model_run_id == ModelRun.id)
        .order_by(ModelRun.id.desc())
        .limit(limit)
    )
    if status is not None:
        query = query.where(ModelRun.status == status)
    if name is not None:
        query = query.where(ModelRun.name == name)
    if before_id is not None:
        query = query.where(ModelRun.id < before_id)
    ttl = _lease_ttl() if lease_ttl is None else lease_ttl
    with session_scope(database_url, readonly=True) as session:
        return [_view(run, progress, ttl) for run, progress in session.execute(query).all()]


def read_epochs(
    run_id: int,
    database_url: str | None = None,
    *,
    after: int = 0,
    limit: int | None = 1000,
    latest: bool = False,
) -> list[tuple[int, dict[str, Any]]]:
    """Run ``run_id``'s epochs as ``(epoch, metrics)``, in epoch order: those after ``after``,
    at most ``limit`` of them (None: all), the first ones, or with ``latest`` the last ones.
    Epochs are 1-based (epochs done, as ``RunView.epoch``). An unknown run has none.

    Example::

        read_epochs(7)                       # [(1, {'loss': 0.9}), (2, {'loss': 0.7}), ...]
        read_epochs(7, after=2, limit=100)   # what an event stream that sent epoch 2 sends next
    """
    from sqlalchemy import select  # noqa: PLC0415 - the data layer loads for reading only

    from taskkit.db.models import TrainingEpoch  # noqa: PLC0415
    from taskkit.db.session import session_scope  # noqa: PLC0415

    check_run_id(run_id)
    order = TrainingEpoch.epoch.desc() if latest else TrainingEpoch.epoch
    query = (
        select(TrainingEpoch.epoch, TrainingEpoch.metrics)
        .where(TrainingEpoch.model_run_id == run_id, TrainingEpoch.epoch > after)
        .order_by(order)
        .limit(limit)
    )
    with session_scope(database_url, readonly=True) as session:
        rows = [(int(epoch), dict(metrics or {})) for epoch, metrics in session.execute(query)]
    return rows[::-1] if latest else rows
