"""Fencing where a trainer's writes land: ``ModelRun.fence`` (issue 19).

A trainer that takes a run's lease raises the run's ``fence`` to its lease's fencing token,
only upwards (``take_fence``). Every write it then makes for the run (progress and epoch rows,
status changes, heartbeat, the final model) first locks the run's row and compares the fence
with its token in the same transaction (``holds_fence``): a trainer whose lease a newer one took
over (a larger token) finds the fence past its token, its write is dropped with one log line
(``refused``), and it stops (``LeaseLost``). A write stalled in a cut-off host's connection that
reaches the database after the takeover is refused the same way: the check runs where the
write lands, not in the trainer's process.

``fence=None`` (a run trained without a lease: called directly, eagerly, or a task without
``lease_key``) writes as before.

Example::

    if take_fence(run_id, lease.token):
        with session_scope() as session:
            if holds_fence(session, run_id, lease.token):
                ...  # the write
"""

from __future__ import annotations

import logging
from typing import Any, cast

from sqlalchemy import Table, select

from taskkit.db.models import ModelRun
from taskkit.db.session import session_scope
from taskkit.errors import LeaseLost

__all__ = ["holds_fence", "refused", "take_fence"]

logger = logging.getLogger("taskkit.tasks")


def take_fence(run_id: Any, token: int, *, database_url: str | None = None) -> bool:
    """Raise run ``run_id``'s fence to ``token`` (never lower it); True when the fence is now
    ``token``, False when a newer holder's token is already there."""
    table = cast(Table, ModelRun.__table__)
    with session_scope(database_url) as session:
        session.execute(
            table.update()
            .where(table.c.id == run_id)
            .where(table.c.fence.is_(None) | (table.c.fence < token))
            .values(fence=token)
        )
        fence = session.scalar(select(ModelRun.fence).where(ModelRun.id == run_id))
    return fence == token


def holds_fence(session: Any, run_id: Any, token: int | None) -> bool:
    """Whether run ``run_id``'s fence is ``token`` (always, for ``token`` None), read with the
    row locked (``FOR UPDATE``; on SQLite a write session holds the database's write lock) so
    no newer holder can take the fence before ``session`` commits."""
    if token is None:
        return True
    fence = session.scalar(select(ModelRun.fence).where(ModelRun.id == run_id).with_for_update())
    return bool(fence == token)


def refused(run_id: Any, token: int, what: str, key: str | None = None) -> LeaseLost:
    """Log that ``what`` (a write of run ``run_id`` under fencing token ``token``) was dropped
    because a newer trainer fenced the run, and return the ``LeaseLost`` to raise."""
    logger.error(
        "taskkit: run %s: %s refused: a newer trainer holds the run (its fence is past "
        "token %d); this trainer stops",
        run_id,
        what,
        token,
    )
    return LeaseLost(key or f"run {run_id}", token)
