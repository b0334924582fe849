"""What every ``taskkit`` command shares: the two consoles, the ``--url`` and ``--app`` options,
``CliError``, which database a command uses, and how an error becomes one ``error:`` line and
an exit status (the table is in ``taskkit.cli``).

Nothing heavy is imported here: SQLAlchemy, the settings and the database helpers load inside
the functions that need them, so ``taskkit --help`` starts without them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.segment import Segment
from typer.core import TyperGroup

from taskkit.errors import ConfigurationError, DatabaseUnavailable, TaskkitError

__all__ = [
    "DEFAULT_APP",
    "AppOption",
    "CliError",
    "Database",
    "Group",
    "UrlOption",
    "console",
    "database",
    "echo_json",
    "err",
    "fail",
    "iso",
    "missing_file",
    "out",
    "printable",
    "reported",
    "short",
    "unreachable",
    "when",
]

#: Control characters (C0 but newline and tab, DEL, C1) as visible escapes: ``\x1b`` -> ``\\x1b``.
_ESCAPES = {
    code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0)) if chr(code) not in "\n\t"
}


def printable(text: str) -> str:
    r"""``text`` with every control character but newline and tab shown as an escape, so data
    (a run name, an error, a traceback) cannot move the cursor or clear the screen.

    Example::

        printable("a\x1b[2Jb")   # 'a\\x1b[2Jb'
    """
    return text.translate(_ESCAPES)


class _SafeConsole(Console):
    """A console whose printed text passes through ``printable``: every command's output, its
    tables and panels included, whatever data they show. Rich's own control segments (a live
    view's cursor moves) and its styles are kept."""

    def render(self, renderable: Any, options: Any = None) -> Iterator[Segment]:
        for segment in super().render(renderable, options):
            if segment.control or segment.text.isprintable():
                yield segment
            else:
                yield Segment(printable(segment.text), segment.style)


#: The one console of standard output, and the one of standard error.
out = _SafeConsole(soft_wrap=True)
err = _SafeConsole(stderr=True, soft_wrap=True)


def console(*, width: int) -> Console:
    """A console of standard output, like ``out``, ``width`` columns wide whatever the
    terminal is (``--wide`` tables: the terminal wraps their lines, nothing is cut).

    Example::

        console(width=240).print(table)
    """
    return _SafeConsole(soft_wrap=True, width=width)


#: The app ``--app`` and ``TASKKIT_APP`` default to (``make worker`` runs it).
DEFAULT_APP = "workers.app"

#: Options every command that needs them spells the same way.
UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="Database URL (default: TASKKIT_DATABASE_URL).", show_default=False),
]
AppOption = Annotated[
    str,
    typer.Option(
        "--app",
        envvar="TASKKIT_APP",
        help="The Celery app: a module (its app or celery_app) or module:attribute.",
    ),
]


class CliError(Exception):
    """A problem to report as ``error: <message>`` with exit status ``code``.

    Example::

        raise CliError("--limit must be positive")   # error: --limit must be positive (exit 2)
    """

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Group(TyperGroup):
    """A command group whose help shows no value for flags (``--watch``, not
    ``--watch <bool>``).

    Typer's rich help asks every option for its type label (``TyperOption.display_type_rich``),
    which does not check ``is_flag``; the plain help does. An empty metavar is the label it
    prints as is, so flags (``--help`` included) get none.

    Example::

        runs_app = typer.Typer(cls=Group)
    """

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _hide_flag_values(self.get_params(ctx))
        super().format_help(ctx, formatter)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _hide_flag_values(command.get_params(ctx))
        return command


def _hide_flag_values(params: Iterable[Any]) -> None:
    for param in params:
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""


def fail(message: str, code: int) -> typer.Exit:
    """Print ``error: message`` on stderr; returns the ``typer.Exit`` to raise.

    Example::

        raise fail("no such thing", 3)
    """
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


@dataclass(frozen=True)
class Database:
    """The database a command uses: its URL and how to name it (no password)."""

    url: str
    name: str
    #: Given with ``--url`` (the hint to migrate it must repeat it).
    from_option: bool = False


def database(url: str | None, *, must_exist: bool = True) -> Database:
    """``--url``, else ``TASKKIT_DATABASE_URL``, else the embedded SQLite file of
    ``TASKKIT_HOME``; a bad URL or setting exits 2. A SQLite file that does not exist exits 2
    with the hint to migrate, and is not created (only ``db upgrade`` passes
    ``must_exist=False``).

    Example::

        db = database(None)
        print(db.name)   # sqlite:////home/me/project/.taskkit/taskkit.db
    """
    from sqlalchemy.engine import make_url  # noqa: PLC0415 - heavy; only for commands
    from sqlalchemy.exc import ArgumentError  # noqa: PLC0415

    from taskkit.config import get_settings  # noqa: PLC0415
    from taskkit.db.classify import describe_database  # noqa: PLC0415

    try:
        resolved = url or get_settings().database_url
        db = Database(resolved, describe_database(make_url(resolved)), url is not None)
    except ConfigurationError as exc:
        raise fail(str(exc), 2) from None
    except ArgumentError:
        raise fail("--url is not a database URL (dialect+driver://host/name)", 2) from None
    if must_exist and missing_file(db):
        raise fail(f"the database {db.name} has no taskkit tables; {_fix(db)}", 2)
    return db


def missing_file(db: Database) -> bool:
    """Whether ``db`` is a SQLite file that does not exist (opening it would create it).

    Example::

        if missing_file(database(None, must_exist=False)): ...
    """
    from sqlalchemy.engine import make_url  # noqa: PLC0415 - loaded by database() already

    parsed = make_url(db.url)
    name = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or name in ("", ":memory:"):
        return False
    if name.startswith("file:") or parsed.query.get("uri"):
        return False  # a URI filename: SQLite's own rules (mode=ro, memory, ...)
    return not Path(name).expanduser().exists()


@contextmanager
def reported(db: Database, broker: str | None = None) -> Iterator[None]:
    """Turn what a command raises into one ``error:`` line and its exit status: a
    ``CliError`` its own code, bad settings 2, a database without the taskkit tables 2, a
    database or broker that does not answer 1, Ctrl-C 130, another taskkit error 1.

    First the database's schema revision is checked (once per database and process): a
    database not at this taskkit's head (never migrated, older, or migrated by a newer
    taskkit) is one line and exit 2 before the command does anything.

    Example::

        with reported(db):
            runs = list_runs(db.url)
    """
    try:
        _check_schema(db)
        yield
    except typer.Exit:  # already reported
        raise
    except CliError as exc:
        raise fail(exc.message, exc.code) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None
    except Exception as exc:
        problem = _unmigrated(db) if _missing_tables(exc) else None
        if problem is not None:
            _current.discard(db.url)
            raise fail(problem, 2) from None
        if isinstance(exc, ConfigurationError):
            raise fail(str(exc), 2) from None
        if isinstance(exc, ImportError):  # the database URL's driver is not installed
            raise fail(f"could not use database {db.name}: {short(exc)}", 2) from None
        if _database_error(exc):
            raise fail(f"could not use database {db.name}: {short(exc)}", 1) from None
        if isinstance(exc, TaskkitError):  # a checkpoint store that cannot be read, ...
            raise fail(str(exc), 1) from None
        if not unreachable(exc):
            raise
        where = f"the broker {broker}" if broker else "a service"
        raise fail(f"could not reach {where}: {short(exc)}", 1) from None


def _database_error(exc: BaseException) -> bool:
    if isinstance(exc, DatabaseUnavailable):
        return True
    loaded = sys.modules.get("sqlalchemy.exc")  # raised by SQLAlchemy, so loaded already
    return loaded is not None and isinstance(exc, loaded.SQLAlchemyError)


#: Databases whose schema revision this process found at head (checked once each).
_current: set[str] = set()


def _check_schema(db: Database) -> None:
    """``CliError`` (2) naming the database and the fix when it is not at this taskkit's head."""
    if db.url in _current:
        return
    from taskkit.db.migrate import schema_status  # noqa: PLC0415 - heavy; only for commands

    problem = schema_status(db.url).problem(_fix(db))
    if problem is not None:
        raise CliError(problem, 2)
    _current.add(db.url)


def _missing_tables(exc: BaseException) -> bool:
    """A table or column is missing (SQLite's "no such table", PostgreSQL's 42P01, 42703),
    here or in the errors it was raised from: the database was never migrated, or not to this
    version (or migrated away while the command ran)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if _database_error(seen):
            from taskkit.db.classify import is_missing_schema  # noqa: PLC0415 - with SQLAlchemy

            if is_missing_schema(seen):
                return True
        seen = seen.__cause__ or seen.__context__
    return False


def _fix(db: Database) -> str:
    return "run: taskkit db upgrade" + (" --url URL" if db.from_option else "")


def _unmigrated(db: Database) -> str | None:
    """The one line for a database that lacks taskkit's tables, naming it and the fix; None
    when its revision is this taskkit's head after all (a table dropped by hand: the
    database's own error says more)."""
    from taskkit.db.migrate import schema_status  # noqa: PLC0415

    try:
        return schema_status(db.url).problem(_fix(db))
    except Exception:  # the database cannot tell: the line for a database never migrated
        return f"the database {db.name} has no taskkit tables; {_fix(db)}"


def unreachable(exc: BaseException) -> bool:
    """A broker or Redis error: its module is loaded if it was raised, so none is imported.

    Example::

        if unreachable(exc):
            raise CliError(f"could not reach the broker: {short(exc)}", 1)
    """
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (
        ("kombu.exceptions", "OperationalError"),
        ("redis.exceptions", "RedisError"),
    ):
        loaded = sys.modules.get(module)
        if loaded is not None:
            kinds.append(getattr(loaded, name))
    return isinstance(exc, tuple(kinds))


def short(exc: BaseException) -> str:
    """The error's own message on one line (a database error: the driver's message).

    Example::

        short(OperationalError(...))   # 'connection refused'
    """
    if _database_error(exc):
        from taskkit.db.classify import driver_message  # noqa: PLC0415

        return driver_message(exc)
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def echo_json(data: Any, *, indent: int | None = 2) -> None:
    """Print ``data`` as one JSON document on standard output, for scripts: plain (rich
    would wrap long lines, read ``[...]`` as markup and ``:name:`` as emoji), non-ASCII kept,
    what JSON cannot hold as its ``str``. Commands pass data whose secrets are masked already.

    Example::

        echo_json({"runs": [record(view) for view in views]})
    """
    typer.echo(json.dumps(data, indent=indent, ensure_ascii=False, default=str))


def iso(moment: datetime | None) -> str | None:
    """A time for JSON: ISO 8601 in UTC (a naive time is taken to be UTC); None stays None.

    Example::

        iso(run.started_at)   # '2025-03-01T13:02:11.120000+00:00'
    """
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


def when(moment: datetime | None) -> str:
    """A time for a table: local, to the second; ``-`` for none.

    Example::

        when(run.started_at)   # '2025-03-01 14:02:11'
    """
    return "-" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")
