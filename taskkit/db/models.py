"""taskkit's tables, as SQLAlchemy 2.0 typed mappings.

``ModelRun`` (``model_runs``: a training run's config, status, final model, score),
``TrainingProgress`` (one row per run), ``TrainingEpoch`` (one row per epoch of a run),
``Prediction``, ``Dataset``, ``CheckpointRecord`` and
``CheckpointChunk`` (``DatabaseStorage``), ``Batch`` and ``BatchItem`` (the item ledger),
``DeadLetter``. Versioning, timestamps, deferred blobs and the unique keys are decided in
``docs/db.md`` ("Models").

Example::

    from taskkit.db.models import ModelRun
    from taskkit.db.session import session_scope

    with session_scope() as db:
        db.add(ModelRun(name="baseline", model_type="sgd", config={"epochs": 5}))
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, deferred, mapped_column

from taskkit.db._types import Json, UTCDateTime, utcnow

__all__ = [
    "Base",
    "Batch",
    "BatchChunk",
    "BatchItem",
    "BatchItemRow",
    "CheckpointChunk",
    "CheckpointRecord",
    "Dataset",
    "DeadLetter",
    "ModelRun",
    "Prediction",
    "TrainingEpoch",
    "TrainingProgress",
]

#: Constraint names that Alembic can rely on, on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# An auto-incrementing 64-bit key; SQLite only auto-increments INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base of taskkit's models; ``Base.metadata`` is what migrations track."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: Json}  # noqa: RUF012

    def __repr__(self) -> str:
        key = getattr(self, "id", None)
        return f"<{type(self).__name__} id={key!r}>"


def _new_run_uid() -> str:
    """A new run identity: 32 hex digits of a random UUID."""
    return uuid.uuid4().hex


class ModelRun(Base):
    """One training run: what was asked (``config``), where it is (``status``), what it made."""

    __tablename__ = "model_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The run's unique identity (32 hex digits of a random UUID), never reused, unlike ``id``
    #: (SQLite hands out a deleted highest id again; another database starts from 1): its
    #: checkpoints are kept and signed under it.
    uid: Mapped[str] = mapped_column(String(32), unique=True, default=_new_run_uid)
    name: Mapped[str] = mapped_column(String(255))
    model_type: Mapped[str] = mapped_column(String(100))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: created, queued, running, retrying, completed, failed, stopped (free text: the seed uses
    #: others).
    status: Mapped[str] = mapped_column(String(32), default="created")
    #: The Celery task id of the latest attempt, when a task runs it.
    task_id: Mapped[str | None] = mapped_column(String(255))
    #: The registered name of the task that trains it (``taskkit resume`` sends it again).
    task_name: Mapped[str | None] = mapped_column(String(255))
    usage_count: Mapped[int] = mapped_column(Integer, default=0)
    final_score: Mapped[float | None] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float)
    model_state: Mapped[dict[str, Any] | None] = deferred(mapped_column(Json))
    model_object: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    #: When the trainer holding the run's lease last renewed it (every third of the lease
    #: ttl); written outside the version check, so it never conflicts with a status write.
    heartbeat_at: Mapped[datetime | None]
    #: The ``Idempotency-Key`` it was submitted with (``POST /train``): one run per key.
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    #: Set when an operator asks the run to checkpoint and stop (the trainer checks each epoch).
    stop_requested_at: Mapped[datetime | None]
    #: A fork's origin: the run and the checkpoint step it started from.
    parent_run_id: Mapped[int | None]
    parent_step: Mapped[int | None]
    #: The fencing token of the trainer that holds the run's lease (raised, only upwards, when
    #: one takes it); a trainer's writes land only while it equals the trainer's token.
    fence: Mapped[int | None] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer, default=1)

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012
    __table_args__ = (
        Index(None, "status", "created_at"),
        Index("ix_model_runs_name_id", "name", "id"),
        # runs list --status S: newest id first, read backwards to the limit (migration 0009)
        Index("ix_model_runs_status_id", "status", "id"),
    )


class TrainingProgress(Base):
    """Where a run is: one row per run, updated as epochs complete."""

    __tablename__ = "training_progress"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_run_id: Mapped[int] = mapped_column(
        ForeignKey("model_runs.id", ondelete="CASCADE"), unique=True
    )
    status: Mapped[str] = mapped_column(String(32), default="initialized")
    current_epoch: Mapped[int] = mapped_column(Integer, default=0)
    total_epochs: Mapped[int | None] = mapped_column(Integer)
    progress_percentage: Mapped[float] = mapped_column(Float, default=0.0)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    version: Mapped[int] = mapped_column(Integer, default=1)

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012


class TrainingEpoch(Base):
    """One epoch of a run: its metrics, written with the progress row of the same report.

    ``epoch`` counts epochs done (1-based, as ``TrainingProgress.current_epoch``); a resumed run
    that trains an epoch again overwrites its row.
    """

    __tablename__ = "training_epochs"

    model_run_id: Mapped[int] = mapped_column(
        ForeignKey("model_runs.id", ondelete="CASCADE"), primary_key=True
    )
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"<TrainingEpoch run={self.model_run_id!r} epoch={self.epoch!r}>"


class Prediction(Base):
    """One prediction made by a run's model: input, output, confidence."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model_run_id: Mapped[int] = mapped_column(
        ForeignKey("model_runs.id", ondelete="CASCADE"), index=True
    )
    #: The caller's key for the input row (a batch item key); unique per run when given.
    item_key: Mapped[str | None] = mapped_column(String(255))
    input_data: Mapped[Any] = mapped_column(Json)
    prediction: Mapped[Any] = mapped_column(Json)
    confidence: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("model_run_id", "item_key"),)


class Dataset(Base):
    """A named dataset: where it is, its shape, and the run that uses it (if any)."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    model_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_runs.id", ondelete="SET NULL"), index=True
    )
    #: A path or URL.
    source: Mapped[str | None] = mapped_column(String(1024))
    format: Mapped[str | None] = mapped_column(String(32))
    num_rows: Mapped[int | None] = mapped_column(Integer)
    num_features: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[dict[str, Any] | None] = mapped_column(Json)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    version: Mapped[int] = mapped_column(Integer, default=1)

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012


class CheckpointRecord(Base):
    """One checkpoint of a run in ``DatabaseStorage``: its signed manifest; data in chunks."""

    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    #: A ``taskkit.checkpoint`` run id (``validate_run_id``), not necessarily a ``ModelRun``.
    run_id: Mapped[str] = mapped_column(String(128))
    step: Mapped[int] = mapped_column(BigInteger)
    #: Bytes of data, the sum of the chunks' lengths.
    size: Mapped[int] = mapped_column(BigInteger)
    #: The JSON manifest (``CheckpointInfo.to_dict()``), verbatim: its signature covers it.
    manifest: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("run_id", "step"),)


class CheckpointChunk(Base):
    """A piece of a checkpoint's data; ``seq`` orders the pieces from 0."""

    __tablename__ = "checkpoint_chunks"

    checkpoint_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("checkpoints.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)

    def __repr__(self) -> str:
        return f"<CheckpointChunk checkpoint_id={self.checkpoint_id!r} seq={self.seq!r}>"


class Batch(Base):
    """A batch sent by ``submit_batch``: which task, how many items, in how many chunks."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_name: Mapped[str] = mapped_column(String(255))
    total: Mapped[int] = mapped_column(Integer)
    chunks: Mapped[int] = mapped_column(Integer)
    #: The Celery group id of the chunks.
    group_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BatchChunk(Base):
    """The ledger of one chunk of a batch: one row however many items (issue 18).

    A chunk's items and their order are fixed by its message, so the row holds its keys once
    (a JSON array) and what became of each position as a string of ``0``/``1`` flags: ``done``
    and ``dead``, one character per item. A flush of done items is one update of one row.
    ``chunk`` is the sha256 of the keys' JSON: a batch id reused with other items is another
    chunk."""

    __tablename__ = "batch_chunks"
    __table_args__ = (Index("ix_batch_chunks_batch_id_position", "batch_id", "position"),)

    batch_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    chunk: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: The item keys, in order, as a JSON array of strings.
    keys: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    #: One character per item: ``1`` done.
    done: Mapped[str] = mapped_column(Text)
    #: One character per item: ``1`` dead-lettered.
    dead: Mapped[str] = mapped_column(Text)
    #: How many deliveries claimed the chunk.
    claims: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The position of the chunk's first item in its batch (its message's ``offset``), for
    #: ``ItemLedger.probe``; None when its claim named none (or came before migration 0013).
    position: Mapped[int | None] = mapped_column(BigInteger, default=None)

    def __repr__(self) -> str:
        return f"<BatchChunk {self.batch_id!r}/{self.chunk[:12]} of {self.size}>"


class BatchItemRow(Base):
    """One item of a batch with a ledger row of its own: items finished outside a claimed
    chunk (``ItemLedger.finish`` of other keys) and the rows of ledgers older than
    ``batch_chunks`` (migration 0010 kept them under this name)."""

    __tablename__ = "batch_item_rows"

    batch_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    item_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    #: claimed, done, dead.
    status: Mapped[str] = mapped_column(String(16), default="claimed")
    claims: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = ({"postgresql_with": {"fillfactor": 70}},)

    def __repr__(self) -> str:
        return f"<BatchItemRow {self.batch_id!r}/{self.item_key!r} {self.status}>"


#: The view ``batch_items`` (migration 0010): not in ``Base.metadata``, so neither
#: ``create_all`` nor the migrations' comparison takes it for a table.
_VIEWS = MetaData()


class _ViewBase(DeclarativeBase):
    metadata = _VIEWS


class BatchItem(_ViewBase):
    """One item of a batch as the ledger sees it (read only: the view ``batch_items`` over
    ``batch_chunks``, one row per position, and ``batch_item_rows``): ``claimed``, ``done`` or
    ``dead``. Example::

        select(BatchItem.item_key).where(BatchItem.batch_id == "b", BatchItem.status == "done")
    """

    __tablename__ = "batch_items"

    batch_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    item_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    #: claimed, done, dead.
    status: Mapped[str] = mapped_column(String(16))
    #: How many deliveries claimed the item's chunk (more than 1: a crash or a retry).
    claims: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    def __repr__(self) -> str:
        return f"<BatchItem {self.batch_id!r}/{self.item_key!r} {self.status}>"


class DeadLetter(Base):
    """An item or a task that exhausted its retries: what it was, how it failed, what became
    of it (``dead``, ``replayed``, ``discarded``)."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    task_name: Mapped[str] = mapped_column(String(255))
    #: The batch of an item; None for a whole task.
    batch_id: Mapped[str | None] = mapped_column(String(64))
    #: The item's key in its batch; None for a whole task.
    item_key: Mapped[str | None] = mapped_column(String(255))
    #: The Celery task id of the last attempt.
    task_id: Mapped[str | None] = mapped_column(String(255))
    #: The item, or ``{"args": [...], "kwargs": {...}}`` of a task: what a replay sends again.
    payload: Mapped[Any] = mapped_column(Json)
    error_type: Mapped[str] = mapped_column(String(255))
    error_message: Mapped[str] = mapped_column(Text, default="")
    traceback: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    first_failed_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_failed_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: dead, replayed, discarded.
    status: Mapped[str] = mapped_column(String(16), default="dead")
    replayed_at: Mapped[datetime | None]
    #: The task a replay sent the payload to, and that task's id.
    replayed_into: Mapped[str | None] = mapped_column(String(255))
    replay_task_id: Mapped[str | None] = mapped_column(String(255))
    replays: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (
        UniqueConstraint("task_name", "batch_id", "item_key"),
        Index(None, "status", "task_name"),
        Index(None, "last_failed_at"),
        # dlq list's first page and a batch's letters at 1M letters (migration 0009)
        Index("ix_dead_letters_status_last_failed_at_id", "status", "last_failed_at", "id"),
        Index("ix_dead_letters_batch_id_status_id", "batch_id", "status", "id"),
    )
