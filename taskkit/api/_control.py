"""Steering runs: POST /runs/{id}/resume, /runs/{id}/stop, /runs/{id}/fork (token required).

- ``resume``: ``taskkit.tasks.resume_run`` (as ``taskkit resume``): 202 with the new task id; 409
  when the run is completed, still trained by a live worker (a stale run is resumable), or has
  no checkpoint; 404 unknown; 503 when the broker or the lease store does not answer.
- ``stop``: ``taskkit.tasks.stop_run``: 202 ``stopping`` (a running run checkpoints the epoch it
  is training and ends ``stopped``) or ``stopped`` (a queued, retrying or stale run, at once);
  409 when it has ended already. A stopped run is resumed with ``resume``.
- ``fork``: ``taskkit.tasks.fork_run``: 201 with the new run, which starts from the chosen
  checkpoint step (default the newest) with the config overrides; 422 when there is no such
  step (the answer lists the steps there are) or the checkpoint does not verify.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, status
from pydantic import BaseModel, ConfigDict, Field

from taskkit._utils import fits_row_id, mask_password
from taskkit.api._auth import require_token
from taskkit.api._deps import celery_app, service_settings
from taskkit.api._models import NoNul
from taskkit.config import Settings
from taskkit.errors import (
    BrokerUnavailable,
    CheckpointError,
    RunNotFound,
    RunNotResumable,
    RunNotStoppable,
)

__all__ = ["ForkIn", "ForkOut", "ResumeOut", "StopOut", "router"]

router = APIRouter(tags=["runs"], dependencies=[Depends(require_token)])

RunId = Annotated[int, Path(description="The run's id.")]


class ResumeOut(BaseModel):
    """A resumed run: queued again under a new task id."""

    model_run_id: int
    task_id: str
    status: str = Field(description="Always 'queued'.")


class StopOut(BaseModel):
    """A stop request: ``stopped`` now, or ``stopping`` at the end of the current epoch."""

    model_run_id: int
    status: str = Field(description="'stopped' (at once) or 'stopping' (after this epoch).")


class ForkIn(BaseModel):
    """Where a fork starts and what it changes."""

    model_config = ConfigDict(extra="forbid")

    from_step: int | None = Field(
        None, ge=0, le=2**31 - 1, description="The parent's checkpoint step (default: newest)."
    )
    config: Annotated[dict[str, Any], NoNul] = Field(
        default_factory=dict, description="Keys that replace the parent's config keys."
    )
    name: Annotated[str, NoNul] | None = Field(
        None, min_length=1, max_length=255, description="The fork's name (default: parent's)."
    )


class ForkOut(BaseModel):
    """The new run: queued, starting after ``parent_step``."""

    model_run_id: int
    task_id: str
    status: str = Field(description="Always 'queued'.")
    parent_run_id: int
    parent_step: int | None


_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "No run has this id."},
    503: {"description": "The broker, the result backend or the lease store did not answer."},
}


def _known(run_id: int) -> None:
    if not fits_row_id(run_id):  # beyond the id column: no such run (never a database error)
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model run {run_id} not found")


def _unavailable(exc: Exception) -> HTTPException:
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, mask_password(str(exc)))


class _LeaseStoreDown(Exception):
    """The lease store (Redis, or the lock folder) did not answer whether a trainer lives."""


def _lease_alive(app: Any, run_id: int, task_name: str | None) -> bool:
    from taskkit.tasks import run_is_alive  # noqa: PLC0415 - celery: with the app

    try:
        return run_is_alive(app, run_id, task_name)
    except (ConnectionError, OSError) as exc:
        raise _LeaseStoreDown(f"the lease store did not answer: {exc}") from exc
    except Exception as exc:
        if type(exc).__module__.startswith("redis"):
            raise _LeaseStoreDown(f"the lease store did not answer: {exc}") from exc
        raise


@router.post(
    "/runs/{run_id}/resume",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ResumeOut,
    responses={**_RESPONSES, 409: {"description": "The run cannot be resumed now."}},
)
def resume(
    run_id: RunId,
    settings: Annotated[Settings, Depends(service_settings)],
    app: Annotated[Any, Depends(celery_app)],
) -> ResumeOut:
    """Re-enqueue a failed, stopped or interrupted (stale) run from its last checkpoint."""
    from taskkit.tasks import resume_run  # noqa: PLC0415

    _known(run_id)
    try:
        task_id = resume_run(
            app,
            run_id,
            lease_alive=lambda rid, name: _lease_alive(app, rid, name),
            database_url=settings.database_url,
        )
    except RunNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model run {run_id} not found") from None
    except RunNotResumable as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except (BrokerUnavailable, _LeaseStoreDown) as exc:
        raise _unavailable(exc) from None
    return ResumeOut(model_run_id=run_id, task_id=task_id, status="queued")


@router.post(
    "/runs/{run_id}/stop",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=StopOut,
    responses={**_RESPONSES, 409: {"description": "The run has ended: nothing to stop."}},
)
def stop(
    run_id: RunId,
    settings: Annotated[Settings, Depends(service_settings)],
    app: Annotated[Any, Depends(celery_app)],
) -> StopOut:
    """Checkpoint and stop: at once for a run nobody trains, else after its current epoch."""
    from taskkit.tasks import stop_run  # noqa: PLC0415

    _known(run_id)
    try:
        now = stop_run(
            run_id,
            lease_alive=lambda rid, name: _lease_alive(app, rid, name),
            database_url=settings.database_url,
        )
    except RunNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model run {run_id} not found") from None
    except RunNotStoppable as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except (BrokerUnavailable, _LeaseStoreDown) as exc:
        raise _unavailable(exc) from None
    return StopOut(model_run_id=run_id, status=now)


@router.post(
    "/runs/{run_id}/fork",
    status_code=status.HTTP_201_CREATED,
    response_model=ForkOut,
    responses={
        **_RESPONSES,
        409: {"description": "This service's app does not register the run's task."},
        422: {"description": "No such checkpoint step, or it does not verify."},
    },
)
def fork(
    run_id: RunId,
    settings: Annotated[Settings, Depends(service_settings)],
    app: Annotated[Any, Depends(celery_app)],
    body: ForkIn | None = None,
) -> ForkOut:
    """A new run from a checkpoint step of this one, with config overrides."""
    from taskkit.tasks import fork_run  # noqa: PLC0415

    body = body or ForkIn(from_step=None, name=None)
    _known(run_id)
    try:
        fork_id, task_id = fork_run(
            app,
            run_id,
            from_step=body.from_step,
            config=body.config,
            name=body.name,
            database_url=settings.database_url,
        )
    except RunNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model run {run_id} not found") from None
    except RunNotResumable as exc:
        code = 422 if exc.kind == "no_checkpoint" else status.HTTP_409_CONFLICT
        raise HTTPException(code, str(exc)) from None
    except CheckpointError as exc:
        raise HTTPException(422, f"run {run_id}'s checkpoint cannot be forked: {exc}") from None
    except (BrokerUnavailable, _LeaseStoreDown) as exc:
        raise _unavailable(exc) from None
    with_step = _parent_step(fork_id, settings)
    return ForkOut(
        model_run_id=fork_id,
        task_id=task_id,
        status="queued",
        parent_run_id=run_id,
        parent_step=with_step,
    )


def _parent_step(fork_id: int, settings: Settings) -> int | None:
    from sqlalchemy import select  # noqa: PLC0415

    from taskkit.db.models import ModelRun  # noqa: PLC0415
    from taskkit.db.session import session_scope  # noqa: PLC0415

    with session_scope(settings.database_url, readonly=True) as session:
        return session.scalar(select(ModelRun.parent_step).where(ModelRun.id == fork_id))
