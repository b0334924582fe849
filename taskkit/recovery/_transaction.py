"""``TransactionManager``: commit on success, roll back on error."""

from __future__ import annotations

import inspect
import logging
from types import TracebackType
from typing import Any

from taskkit.errors import ConfigurationError

__all__ = ["TransactionManager"]

logger = logging.getLogger("taskkit.recovery")


class TransactionManager:
    """Commit ``session`` when the block succeeds; roll it back and re-raise when it fails.

    Works with anything that has ``commit()`` and ``rollback()``: a SQLAlchemy ``Session``, a
    ``sqlite3`` or DB-API connection. With ``async with`` it also awaits them, so a SQLAlchemy
    ``AsyncSession`` works too.

    Decisions: a commit that fails is rolled back and its error raised, so the session is usable
    again; a rollback that fails while an error is already propagating is logged, and the
    original error (the one that explains what happened) is the one raised.

    Example::

        with TransactionManager(db):
            run = ModelRun(name="baseline", model_type="sgd", config={}, status="queued")
            db.add(run)
            db.flush()  # run.id is known here, nothing is committed yet
        # committed
    """

    def __init__(self, session: Any) -> None:
        missing = [m for m in ("commit", "rollback") if not callable(getattr(session, m, None))]
        if missing:
            raise ConfigurationError(
                f"TransactionManager needs an object with commit() and rollback(); "
                f"{type(session).__name__} has no {' or '.join(m + '()' for m in missing)}"
            )
        self.session = session

    def __enter__(self) -> TransactionManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            try:
                self.session.commit()
            except BaseException as commit_error:
                self._rollback_after(commit_error)
                raise
        else:
            self._rollback_after(exc)

    async def __aenter__(self) -> TransactionManager:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            try:
                await _maybe_await(self.session.commit())
            except BaseException as commit_error:
                await self._async_rollback_after(commit_error)
                raise
        else:
            await self._async_rollback_after(exc)

    def _rollback_after(self, error: BaseException) -> None:
        try:
            self.session.rollback()
        except Exception:
            _log_failed_rollback(error)

    async def _async_rollback_after(self, error: BaseException) -> None:
        try:
            await _maybe_await(self.session.rollback())
        except Exception:
            _log_failed_rollback(error)


async def _maybe_await(value: object) -> None:
    if inspect.isawaitable(value):
        await value


def _log_failed_rollback(error: BaseException) -> None:
    logger.exception(
        "taskkit.transaction: rollback failed while handling %s: %s", type(error).__name__, error
    )
