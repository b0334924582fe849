"""The pydantic answer models the endpoint modules share (so the OpenAPI schema is exact).

Runs: ``RunSummary`` (a row of ``GET /runs``), ``RunOut`` (``GET /runs/{id}``), its
``ProgressOut``, ``CheckpointOut`` and ``EpochOut``; ``TrainOut`` (``POST /train``), ``ModelOut``
(``GET /models/{id}``), ``RunPage`` (a page of runs and the cursor of the next), ``Problem``
(every error answer: ``{"detail": "..."}``). ``run_summary``/``run_out`` build them from a
``taskkit.db.runs.RunView``.

Text going to the database: ``NoNul`` (``Annotated[str, NoNul]``, a query parameter or a body
field, text or a JSON object) refuses a NUL character with a 422, as PostgreSQL stores none;
``has_nul`` finds one inside JSON values.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from taskkit.db.runs import RunView

__all__ = [
    "NO_NUL",
    "CheckpointOut",
    "EpochOut",
    "ModelOut",
    "NoNul",
    "Problem",
    "ProgressOut",
    "RunOut",
    "RunPage",
    "RunSummary",
    "TrainOut",
    "has_nul",
    "run_out",
    "run_summary",
]


#: Text a database can store and compare: no NUL character (PostgreSQL refuses it).
NO_NUL = r"^[^\x00]*$"


def has_nul(value: Any) -> bool:
    """Whether ``value`` (text, or JSON: its keys and items, nested) holds a NUL character.

    Example::

        has_nul({"name": ["a\x00"]})  # True
    """
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(key) or has_nul(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return any(has_nul(item) for item in value)
    return False


def _refuse_nul(value: Any) -> Any:
    if has_nul(value):
        raise ValueError("holds a NUL character (\\u0000), which the database cannot store")
    return value


class _NoNul:
    # The check is the value's (a clear message, on nested JSON too); text's schema also gets
    # the pattern, so a client generated from the OpenAPI schema knows the rule.
    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_after_validator_function(_refuse_nul, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        if json_schema.get("type") == "string":
            json_schema["pattern"] = NO_NUL
        return json_schema


#: ``Annotated[str, NoNul]`` (or a dict): a NUL character anywhere is a 422 naming the field.
#:
#: Example: ``task: Annotated[Annotated[str, NoNul] | None, Query(max_length=255)] = None``
NoNul = _NoNul()


class Problem(BaseModel):
    """An error answer: one line saying what is wrong."""

    detail: str


class TrainOut(BaseModel):
    """``POST /train``'s answer, as in the seed."""

    model_run_id: int
    status: str = Field(description="Always 'queued': the run's status when it was submitted.")


class ModelOut(BaseModel):
    """``GET /models/{id}``'s answer: the seed's four fields, and the run's best score."""

    id: int
    name: str
    status: str
    accuracy: float | None = Field(description="ModelRun.accuracy, as the seed reads it.")
    final_score: float | None = Field(
        None, description="The best score of the task's score metric, once completed."
    )
    model_type: str | None = None


class ProgressOut(BaseModel):
    """What the run's task last reported: epochs done of total, percent, metrics."""

    epoch: int | None = Field(description="Epochs done (the progress row's current_epoch).")
    total_epochs: int | None
    percent: float
    metrics: dict[str, Any]
    message: str | None = None


class CheckpointOut(BaseModel):
    """One checkpoint the run can resume or fork from."""

    step: int = Field(description="The epoch (0-based) it was saved after.")
    created_at: str = Field(description="ISO-8601, UTC.")
    is_best: bool
    metrics: dict[str, Any]


class EpochOut(BaseModel):
    """One epoch of the run's history: its number (1-based, epochs done) and its metrics."""

    epoch: int
    metrics: dict[str, Any]


class RunSummary(BaseModel):
    """A run as ``GET /runs`` lists it."""

    id: int
    name: str
    status: str
    stale: bool = Field(description="running, but no heartbeat for longer than the lease ttl.")
    model_type: str | None
    progress: ProgressOut
    best_score: float | None
    created_at: datetime | None
    updated_at: datetime | None
    heartbeat_at: datetime | None
    error: str | None


class RunOut(RunSummary):
    """A run as ``GET /runs/{id}`` shows it."""

    task_name: str | None
    task_id: str | None
    started_at: datetime | None
    completed_at: datetime | None
    last_seen: datetime | None = Field(
        description="The heartbeat, else the last update of the run or its progress."
    )
    heartbeat_age: float | None = Field(description="Seconds since last_seen.")
    lease_ttl: float
    final_score: float | None
    accuracy: float | None
    stop_requested_at: datetime | None
    parent_run_id: int | None
    parent_step: int | None
    checkpoints: list[CheckpointOut]
    checkpoints_error: str | None = Field(
        None, description="Why the checkpoints could not be listed, when they could not."
    )
    epochs: list[EpochOut] = Field(
        default_factory=list,
        description="The run's epochs, oldest first: the latest 1000 of a longer run "
        "(GET /runs/{id}/events sends them all).",
    )


class RunPage(BaseModel):
    """A page of ``GET /runs``, newest first, and the cursor of the next page (None: last)."""

    runs: list[RunSummary]
    next_cursor: str | None


def _progress(view: RunView) -> ProgressOut:
    return ProgressOut(
        epoch=view.epoch,
        total_epochs=view.total_epochs,
        percent=view.percent,
        metrics=view.metrics,
        message=view.message,
    )


def _summary_fields(view: RunView, now: datetime | None) -> dict[str, Any]:
    return {
        "id": view.id,
        "name": view.name,
        "status": view.status,
        "stale": view.is_stale(now),
        "model_type": view.model_type,
        "progress": _progress(view),
        "best_score": view.best_score,
        "created_at": view.created_at,
        "updated_at": view.updated_at,
        "heartbeat_at": view.heartbeat_at,
        "error": view.error,
    }


def run_summary(view: RunView, now: datetime | None = None) -> RunSummary:
    """The ``GET /runs`` row of ``view`` (stale as of ``now``, default the current time).

    Example::

        run_summary(read_run(7)).model_dump(mode="json")
    """
    return RunSummary(**_summary_fields(view, now))


def run_out(
    view: RunView,
    checkpoints: list[CheckpointOut],
    checkpoints_error: str | None = None,
    now: datetime | None = None,
    epochs: list[EpochOut] | None = None,
) -> RunOut:
    """The ``GET /runs/{id}`` answer of ``view``, its checkpoints and its ``epochs``.

    Example::

        run_out(read_run(7), checkpoints=[])
    """
    return RunOut(
        **_summary_fields(view, now),
        task_name=view.task_name,
        task_id=view.task_id,
        started_at=view.started_at,
        completed_at=view.completed_at,
        last_seen=view.last_seen,
        heartbeat_age=view.heartbeat_age(now),
        lease_ttl=view.lease_ttl,
        final_score=view.final_score,
        accuracy=view.accuracy,
        stop_requested_at=view.stop_requested_at,
        parent_run_id=view.parent_run_id,
        parent_step=view.parent_step,
        checkpoints=checkpoints,
        checkpoints_error=checkpoints_error,
        epochs=epochs or [],
    )
