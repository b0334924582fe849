"""``db_retry``, ``ensure_connection`` and ``with_savepoint``: decorators for database code."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ParamSpec, TypeVar, cast, overload

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from taskkit._utils import exception_tuple, keep_identity, qualified_name
from taskkit.db.classify import describe_database, driver_message, is_disconnect, is_transient
from taskkit.db.session import get_engine
from taskkit.errors import ConfigurationError, DatabaseUnavailable
from taskkit.recovery import Retrying

__all__ = ["db_retry", "ensure_connection", "find_session", "with_savepoint"]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("taskkit.db")

Decorator = Callable[[Callable[P, R]], Callable[P, R]]


def find_session(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Session | None:
    """The first SQLAlchemy ``Session`` among a call's arguments (``db=`` is looked at first)."""
    candidate = kwargs.get("db")
    if isinstance(candidate, Session):
        return candidate
    for value in (*args, *kwargs.values()):
        if isinstance(value, Session):
            return value
    return None


Around = Callable[[tuple[Any, ...], dict[str, Any]], AbstractContextManager[object]]


def _wrap_in(fn: Callable[..., Any], around: Around, decorator: str) -> Any:
    """``fn`` (sync or ``async def``) called inside ``around(args, kwargs)``, identity kept."""
    if not callable(fn):
        raise ConfigurationError(f"{decorator} decorates a callable, got {fn!r}")
    if inspect.iscoroutinefunction(fn):
        coroutine_fn = cast(Callable[..., Coroutine[Any, Any, Any]], fn)

        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            with around(args, kwargs):
                return await coroutine_fn(*args, **kwargs)

        return keep_identity(async_wrapper, fn)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with around(args, kwargs):
            return fn(*args, **kwargs)

    return keep_identity(wrapper, fn)


def _rollback(session: Session | None, error: BaseException) -> None:
    if session is None:
        return
    try:
        session.rollback()
    except Exception:  # the original error is the one worth raising
        logger.exception("taskkit.db: rollback after %s failed", type(error).__name__)


# -- db_retry ---------------------------------------------------------------------------------


@overload
def db_retry(fn: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def db_retry(
    *,
    max_attempts: int = 3,
    delay: float = 0.5,
    backoff: float = 2.0,
    max_delay: float = 10.0,
    jitter: bool | float = 0.25,
    exceptions: type[BaseException] | tuple[type[BaseException], ...] = (),
    sleep: Callable[[float], object] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def db_retry(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    max_attempts: int = 3,
    delay: float = 0.5,
    backoff: float = 2.0,
    max_delay: float = 10.0,
    jitter: bool | float = 0.25,
    exceptions: type[BaseException] | tuple[type[BaseException], ...] = (),
    sleep: Callable[[float], object] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Any:
    """Retry a database function on transient errors, rolling its session back in between.

    What is retried is decided by ``taskkit.db.is_transient``: dropped connections,
    ``OperationalError`` (SQLite's "database is locked" included), PostgreSQL serialization
    failures and deadlocks, and ``StaleDataError``; never ``IntegrityError``, ``DataError`` or
    ``ProgrammingError``. ``exceptions`` adds your own transient types.

    After a transient failure the ``Session`` found among the call's arguments (``db=`` first,
    then any positional or keyword argument) is rolled back, so the next attempt starts from a
    clean transaction; a function that makes its own session (``next(get_db())``) must close it
    in a ``finally``, as the seed does. Waits are ``delay * backoff**n``, capped at
    ``max_delay``, with ``jitter`` (a share of each wait, randomised so that two transactions
    that deadlocked do not retry in lockstep). The last error propagates unchanged.

    Works on ``def`` and ``async def`` functions and keeps their signature, so FastAPI still
    sees ``db: Session = Depends(get_db)``. ``db_retry(**DATABASE_RETRY_CONFIG)`` takes the
    seed's configuration dict.

    Example::

        @ensure_connection
        @db_retry(max_attempts=3, delay=0.5)
        def rename(db: Session, run_id: int, name: str) -> None:
            with TransactionManager(db):
                db.get(ModelRun, run_id).name = name
    """
    extra = exception_tuple("exceptions", exceptions) if exceptions else ()

    def retry_if(error: BaseException) -> bool:
        return is_transient(error) or isinstance(error, extra)

    policy = Retrying(
        max_attempts=max_attempts,
        delay=delay,
        backoff=backoff,
        max_delay=max_delay,
        jitter=jitter,
        exceptions=(Exception,),
        retry_if=retry_if,
        sleep=sleep,
        clock=clock,
        _stacklevel=3,
    )

    @contextmanager
    def rollback_on_transient(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[None]:
        try:
            yield
        except Exception as error:
            if retry_if(error):
                _rollback(find_session(args, kwargs), error)
            raise

    def decorate(fn: Callable[..., Any]) -> Any:
        attempt = _wrap_in(fn, rollback_on_transient, "db_retry")
        return keep_identity(policy(attempt), fn, db_retry=policy)

    if fn is not None:
        return decorate(fn)
    return decorate


# -- ensure_connection ------------------------------------------------------------------------


@overload
def ensure_connection(fn: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def ensure_connection(
    *,
    max_attempts: int = 3,
    delay: float = 0.5,
    backoff: float = 2.0,
    engine: Engine | None = None,
    sleep: Callable[[float], object] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def ensure_connection(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    max_attempts: int = 3,
    delay: float = 0.5,
    backoff: float = 2.0,
    engine: Engine | None = None,
    sleep: Callable[[float], object] | None = None,
) -> Any:
    """Make sure the database answers before the call; raise ``DatabaseUnavailable`` if not.

    With a ``Session`` among the arguments, that session's connection is checked: one it already
    holds is pinged, and if the server dropped it, the session is rolled back (the server has
    discarded that transaction anyway) and a new connection is taken from the pool, which
    SQLAlchemy invalidates after a disconnect, so stale pooled connections are replaced too.
    A session without a connection takes one now (the pool pings it first), so the check costs
    no extra round trip. Without a session (a function that calls ``next(get_db())`` itself),
    ``engine`` (default ``get_engine()``) is checked.

    When the database cannot be reached after ``max_attempts`` tries (waits ``delay *
    backoff**n``), ``DatabaseUnavailable`` is raised: it names the host, port and database and
    never the password, and its ``__cause__`` is the driver's error. It is a
    ``ConnectionError``, so task retry ladders treat an outage as transient.

    Decision: the check happens before the call only. A connection lost during the call is
    ``db_retry``'s business (put ``ensure_connection`` outside it, as the seed does).

    Example::

        @ensure_connection
        @db_retry(max_attempts=3)
        def update_progress(run_id: int, epoch: int) -> None:
            db = next(get_db())
            try:
                ...
            finally:
                db.close()
    """
    policy = Retrying(
        max_attempts=max_attempts,
        delay=delay,
        backoff=backoff,
        exceptions=(SQLAlchemyError,),
        retry_if=is_transient,
        sleep=sleep,
        _stacklevel=3,
    )

    def check(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        session = find_session(args, kwargs)
        target = session.get_bind() if session is not None else engine
        if target is None:
            target = get_engine()
        try:
            if session is not None:
                policy.call(_check_session, session)
            else:
                policy.call(_check_engine, cast(Engine, target))
        except SQLAlchemyError as error:
            if not is_transient(error):
                raise
            url = target.url if isinstance(target, Engine) else target.engine.url
            reason = driver_message(error)
            if url.password:
                reason = reason.replace(str(url.password), "***")
            raise DatabaseUnavailable(
                describe_database(url), getattr(error, "taskkit_attempts", max_attempts), reason
            ) from error

    @contextmanager
    def checked(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[None]:
        check(args, kwargs)
        yield

    def decorate(fn: Callable[..., Any]) -> Any:
        return _wrap_in(fn, checked, "ensure_connection")

    if fn is not None:
        return decorate(fn)
    return decorate


def _check_session(session: Session) -> None:
    if not session.in_transaction():
        session.connection()  # checks a connection out of the pool, which pings it
        return
    try:
        session.connection().exec_driver_sql("SELECT 1")
    except SQLAlchemyError as error:
        if is_disconnect(error):
            logger.warning("taskkit.db: the session's connection was dropped; reconnecting")
            session.rollback()
        raise


def _check_engine(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT 1")


# -- with_savepoint ---------------------------------------------------------------------------


def with_savepoint(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` in a nested transaction (a SAVEPOINT) of the session among its arguments.

    On success the savepoint is released (its changes join the outer transaction, still
    uncommitted); on error only the savepoint's changes are rolled back, the error propagates,
    and the outer transaction and everything flushed before it are kept.

    Example::

        @with_savepoint
        def add_dataset(db: Session, name: str) -> Dataset:
            dataset = Dataset(name=name)
            db.add(dataset)
            db.flush()          # a duplicate name fails here: only this part is undone
            return dataset
    """
    name = qualified_name(fn)

    def savepoint(args: tuple[Any, ...], kwargs: dict[str, Any]) -> AbstractContextManager[object]:
        session = find_session(args, kwargs)
        if session is None:
            raise ConfigurationError(
                f"with_savepoint: {name} was called without a SQLAlchemy Session argument"
            )
        return session.begin_nested()

    return cast(Callable[P, R], _wrap_in(fn, savepoint, "with_savepoint"))
