"""``taskkit dlq``: the dead-letter queue (``taskkit.deadletter``) from a shell.

::

    taskkit dlq list [FILTERS] [--status S] [--limit N] [--wide] [--json]
    taskkit dlq show ID [--json]
    taskkit dlq replay (ID... | --task T | --batch B | --error-type E | --older-than AGE | --all)
                       [--into TASK] [--app APP] [--yes]
    taskkit dlq discard (ID... | FILTERS) [--yes]
    taskkit dlq purge (ID... | FILTERS | --retention) [--status S] [--yes]
                      (--status: handled (default), dead, replayed, discarded, any)
    taskkit dlq depth [--json]

    FILTERS: [--task T] [--batch B] [--error-type E] [--older-than AGE] [--newer-than AGE]

Every command takes ``--url`` (default: the project's database, see ``docs/cli.md``). An
``AGE`` is a number and a unit, ``s``, ``m``, ``h``, ``d`` or ``w`` (``30s``, ``15m``, ``2h``,
``7d``), compared with a letter's last failure. ``--status`` is ``dead`` (waiting),
``replayed``, ``discarded`` or ``any``. The exit codes are ``taskkit``'s (``docs/cli.md``): 1
when the database or the broker does not answer, 2 for bad arguments, an app or task that
cannot be used, a database without the taskkit tables, or a replay that was refused (nothing
was sent), 3 for an unknown letter id.

Decisions:

- ``taskkit.deadletter`` (SQLAlchemy, kombu) and the app (celery) load inside the commands, so
  ``taskkit --help`` does without them.
- A replay refused because a letter's task is not registered says which app was loaded and
  how to point ``--app`` or ``TASKKIT_APP`` at the module that defines the task.
- ``--json`` is for scripts: every command writes one JSON document (``list``:
  ``{"letters": [...], "more": N}``); times are ISO 8601 in UTC. Tables are for people: local
  times, the newest failure first, one line per letter cut to the terminal's width with an
  ellipsis (``--wide``: whole messages), and ``N more not shown`` when ``--limit`` cut.
- ``list``, ``discard`` and ``purge`` take the same filters (``taskkit.deadletter.LetterQuery``),
  so what ``list`` shows is what the other two touch. ``purge`` deletes for good, so it asks
  first, saying how many letters; without a terminal to ask on it needs ``--yes``. By default it
  deletes handled letters only (``replayed`` or ``discarded``): a ``dead`` letter is a failure
  nobody has looked at, deleted only with ``--status dead`` (or ``any``). ``discard`` by filter
  asks too (it may match thousands; a discarded letter is never replayed); ``discard`` by ids
  names what it touches and does not ask. Both act only on the letters they counted: one
  recorded while the question waits is left alone.
- ``replay --all`` sends every waiting letter again, which cannot be taken back: it asks
  first too, and needs ``--yes`` without a terminal. Ids and filters do not ask (they name
  what they send).

Example::

    $ taskkit dlq depth --json
    {"jobs.score_items": 12}
    $ taskkit dlq list --task jobs.score_items --error-type KeyError
    $ taskkit dlq replay --task jobs.score_items --app workers.app
    sent dead letters 4, 5, 9 to jobs.score_items as task 0b6c... (batch replay-3f...)
    replayed 3 dead letters in 1 message
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from taskkit._utils import mask_password
from taskkit.cli import _common
from taskkit.cli._common import (
    DEFAULT_APP,
    AppOption,
    CliError,
    Database,
    UrlOption,
    database,
    echo_json,
    out,
    printable,
    when,
)
from taskkit.cli._launch import check_services, find_task, load_app
from taskkit.errors import DeadLetterNotFound, ReplayRejected

if TYPE_CHECKING:
    from taskkit.db.models import DeadLetter
    from taskkit.deadletter import DeadLetterStore, LetterQuery

__all__ = ["dlq_app", "letter_panel", "letter_record", "letters_table", "parse_age"]

dlq_app = typer.Typer(
    cls=_common.Group,
    help="The dead-letter queue: items and tasks that exhausted their retries; list, show, "
    "replay, discard, purge them.",
    no_args_is_help=True,
)

STATUS_STYLES = {"dead": "bold red", "replayed": "green", "discarded": "dim"}
STATUS_CHOICES = ("dead", "replayed", "discarded", "any")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]
TaskOption = Annotated[
    str | None,
    typer.Option("--task", help="Only letters of this task (its full name).", show_default=False),
]
BatchOption = Annotated[
    str | None,
    typer.Option("--batch", help="Only the items of this batch id.", show_default=False),
]
ErrorTypeOption = Annotated[
    str | None,
    typer.Option(
        "--error-type",
        help="Only failures with this exception class name (KeyError, ...).",
        show_default=False,
    ),
]
OlderOption = Annotated[
    str | None,
    typer.Option(
        "--older-than",
        metavar="AGE",
        help="Only letters whose last failure is older than AGE (30s, 15m, 2h, 7d).",
        show_default=False,
    ),
]
NewerOption = Annotated[
    str | None,
    typer.Option(
        "--newer-than",
        metavar="AGE",
        help="Only letters whose last failure is at most AGE ago (30s, 15m, 2h, 7d).",
        show_default=False,
    ),
]
IdsArgument = Annotated[
    list[int] | None,
    typer.Argument(help="Letter ids (see: taskkit dlq list).", show_default=False),
]
LetterId = Annotated[int, typer.Argument(help="The letter's id (see: taskkit dlq list).")]


# -- what the commands share ------------------------------------------------------------------


@contextmanager
def _reported(db: Database, broker: str | None = None) -> Iterator[None]:
    """``taskkit``'s error lines and exit codes, plus the dead-letter errors: an unknown id is
    3, a refused replay (nothing was sent) is 2."""
    with _common.reported(db, broker):
        try:
            yield
        except DeadLetterNotFound as exc:
            raise CliError(f"{exc} in {db.name}; see: taskkit dlq list --status any", 3) from None
        except ReplayRejected as exc:
            raise CliError(str(exc), 2) from None


def _store(url: str, app: Any = None) -> DeadLetterStore:
    from taskkit.deadletter import DeadLetterStore  # noqa: PLC0415 - SQLAlchemy, kombu: only here

    return DeadLetterStore(url, app=app)


def _with_app_hint(
    exc: ReplayRejected, store: DeadLetterStore, celery_app: Any, spec: str, into: str | None
) -> ReplayRejected | CliError:
    """A replay refused because a letter's task is not registered in the loaded app: the same
    message, plus which app was loaded and how to load the right one. Other refusals as they
    are. (``--into`` was checked against the app before: only a letter's own task is left.)"""
    if into is not None:
        return exc
    letters = store.list(ids=[i for i in exc.letter_ids if isinstance(i, int)], status=None)
    if not letters or all(letter.task_name in celery_app.tasks for letter in letters):
        return exc
    return CliError(
        f"{exc}; the app was loaded from {spec} (--app, else TASKKIT_APP, else {DEFAULT_APP}): "
        "point --app or TASKKIT_APP at the module that defines that task"
    )


def _interactive() -> bool:
    """Whether a person can answer the ``purge`` or ``replay --all`` question (tests replace
    this)."""
    return sys.stdin.isatty()


def _ask(question: str, refused: str) -> bool:
    """Ask ``question`` (no by default); Ctrl-C or the end of input there exits 130."""
    try:
        return typer.confirm(question, default=False)
    except typer.Abort:
        raise CliError(f"interrupted; {refused}", 130) from None


def _confirm_replay_all(store: DeadLetterStore, db: Database, into: str | None) -> bool:
    """``replay --all`` asks first, as ``purge`` does: it sends every waiting letter, perhaps
    thousands, and what they do cannot be taken back. Without a terminal it needs ``--yes``.
    Nothing waiting: says so, no question."""
    count = sum(store.depth().values())
    if count == 0:
        out.print(escape(f"no dead letters (status dead) in {db.name}"), highlight=False)
        return False
    if not _interactive():
        raise CliError(
            "replay --all sends every dead letter again: add --yes (no terminal to ask on)"
        )
    target = f" into {into}" if into else ""
    question = f"send {_plural(count, 'dead letter')} (status dead) again{target}, from {db.name}?"
    if _ask(question, "nothing was sent"):
        return True
    out.print("nothing was sent", highlight=False)
    return False


# -- arguments ---------------------------------------------------------------------------------

_AGE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Longer ages reach before year 1, which no date can be compared with.
_LONGEST_AGE = timedelta(days=365 * 1000)


def parse_age(text: str, option: str = "--older-than") -> timedelta:
    """``30s``, ``15m``, ``2h``, ``7d`` or ``2w`` as a ``timedelta``; else a ``CliError``
    (exit 2) naming ``option``.

    Example::

        parse_age("36h")    # timedelta(days=1, seconds=43200)
    """
    match = _AGE.fullmatch(text.strip().lower())
    if match is None:
        raise CliError(
            f"{option} {text!r} is not an age: give a number and a unit, s, m, h, d or w "
            "(30s, 15m, 2h, 7d)"
        )
    try:
        age = timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
    except OverflowError:
        age = _LONGEST_AGE * 2
    if age > _LONGEST_AGE:
        raise CliError(f"{option} {text!r} is too long ago: at most 1000 years")
    return age


def _age(text: str | None, option: str) -> timedelta | None:
    return None if text is None else parse_age(text, option)


def _statuses(status: str) -> tuple[str, ...] | None:
    """The query's status filter: None for ``any``."""
    if status not in STATUS_CHOICES:
        raise CliError(f"--status {status!r} is not one of {', '.join(STATUS_CHOICES)}")
    return None if status == "any" else (status,)


def _letter_query(**filters: Any) -> LetterQuery:
    from taskkit.deadletter import LetterQuery  # noqa: PLC0415 - SQLAlchemy: only here

    return LetterQuery(**filters)


def _query(
    store: DeadLetterStore,
    task: str | None,
    batch: str | None,
    error_type: str | None,
    older_than: str | None,
    newer_than: str | None,
    statuses: tuple[str, ...] | None,
) -> LetterQuery:
    """The letters ``list`` shows and ``discard`` touches; the store's clock is fixed, so a
    count and the change after it compare ages with the same "now"."""
    now = store.clock()
    store.clock = lambda: now
    return _letter_query(
        task=task,
        batch_id=batch,
        error_type=error_type,
        older_than=_age(older_than, "--older-than"),
        newer_than=_age(newer_than, "--newer-than"),
        statuses=statuses,
    )


def _unique(ids: Sequence[int] | None) -> list[int]:
    return list(dict.fromkeys(ids or ()))


def _criteria(
    status: str | None = None,
    task: str | None = None,
    batch: str | None = None,
    error_type: str | None = None,
    older_than: str | None = None,
    newer_than: str | None = None,
) -> str:
    """``" (status dead, task jobs.x)"``: the filters a command was given, for its messages."""
    parts = [
        f"{name} {value}"
        for name, value in (
            ("status", status),
            ("task", task),
            ("batch", batch),
            ("error type", error_type),
            ("older than", older_than),
            ("newer than", newer_than),
        )
        if value is not None
    ]
    return f" ({', '.join(parts)})" if parts else ""


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# -- drawing -----------------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def _status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def letter_record(letter: DeadLetter, *, full: bool = False) -> dict[str, Any]:
    """A letter as JSON data; ``full`` adds its payload and traceback."""
    record: dict[str, Any] = {
        "id": letter.id,
        "task_name": letter.task_name,
        "batch_id": letter.batch_id,
        "item_key": letter.item_key,
        "task_id": letter.task_id,
        "error_type": letter.error_type,
        "error_message": letter.error_message,
        "attempts": letter.attempts,
        "first_failed_at": _iso(letter.first_failed_at),
        "last_failed_at": _iso(letter.last_failed_at),
        "status": letter.status,
        "replayed_at": _iso(letter.replayed_at),
        "replayed_into": letter.replayed_into,
        "replay_task_id": letter.replay_task_id,
        "replays": letter.replays,
    }
    if full:
        record["payload"] = letter.payload
        record["traceback"] = letter.traceback
    return record


#: Columns of the ``list`` table that give way when the terminal is narrow, in the order they
#: give way, each step down to the width given: ids and keys first, the message and the task
#: name (what a reader looks for) last. 100 columns fit with the STATUS column.
_SHRINK_ORDER = (
    ("BATCH", 10),
    ("ITEM", 10),
    ("MESSAGE", 24),
    ("TASK", 24),
    ("ERROR", 14),
    ("BATCH", 6),
    ("ITEM", 6),
    ("MESSAGE", 10),
    ("TASK", 12),
    ("ERROR", 8),
)
#: Widest a column gets before the message (the message takes what is left).
_CAPS = {"TASK": 40, "BATCH": 16, "ITEM": 20, "ERROR": 24}
_ELLIPSIS = "…"


def _cut(text: str, width: int, *, keep_end: bool = False) -> str:
    """``text`` in ``width`` characters, an ellipsis for what was cut (at the start with
    ``keep_end``: a task's own name is at the end of its dotted path)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return _ELLIPSIS[:width]
    return _ELLIPSIS + text[-(width - 1) :] if keep_end else text[: width - 1] + _ELLIPSIS


def _whole(text: str | None) -> str:
    """The whole message on one line (``--wide``)."""
    return " ".join((text or "").split())


def _first_line(text: str | None) -> str:
    """The message on one line: its first line, ``…`` when more follow."""
    lines = (text or "").strip().splitlines()
    first = " ".join(lines[0].split()) if lines else ""
    return first + " " + _ELLIPSIS if len(lines) > 1 else first


def _widths(natural: dict[str, int], fixed: int, width: int) -> dict[str, int]:
    """The widths of the flexible columns so that the table fits ``width`` (``fixed``: what
    the other columns and the gaps take)."""
    widths = {name: min(size, _CAPS.get(name, size)) for name, size in natural.items()}
    excess = fixed + sum(widths.values()) - width
    for name, narrowest in _SHRINK_ORDER:
        if excess <= 0:
            break
        give = min(excess, max(0, widths[name] - narrowest))
        widths[name] -= give
        excess -= give
    if excess < 0 and widths["MESSAGE"] < natural["MESSAGE"]:  # room left: to the message
        widths["MESSAGE"] = min(natural["MESSAGE"], widths["MESSAGE"] - excess)
    return widths


def letters_table(
    letters: Sequence[DeadLetter],
    *,
    width: int | None = None,
    wide: bool = False,
    status: bool = True,
) -> Table:
    """The ``dlq list`` table: one line per letter, cut to ``width`` columns with an ellipsis
    (``wide``: whole cells, as wide as they are); ``status`` adds the STATUS column."""
    columns = ["ID", "TASK", "BATCH", "ITEM", "ERROR", "MESSAGE", "ATTEMPTS", "LAST FAILURE"]
    if status:
        columns.append("STATUS")
    rows = [
        {  # the letters' text is data: never read as markup; escapes measured as printed
            "ID": str(letter.id),
            "TASK": printable(letter.task_name),
            "BATCH": printable(letter.batch_id or "-"),
            "ITEM": printable(letter.item_key or "-"),
            "ERROR": printable(letter.error_type),
            "MESSAGE": printable(
                _whole(letter.error_message) if wide else _first_line(letter.error_message)
            )
            or "-",
            "ATTEMPTS": str(letter.attempts),
            "LAST FAILURE": when(letter.last_failed_at),
            "STATUS": letter.status,
        }
        for letter in letters
    ]
    natural = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in columns}
    flexible = ["TASK", "BATCH", "ITEM", "ERROR", "MESSAGE"]
    sizes: dict[str, int] = {}
    if not wide:
        gaps = 2 * (len(columns) - 1)
        fixed = gaps + sum(natural[c] for c in columns if c not in flexible)
        sizes = _widths({c: natural[c] for c in flexible}, fixed, width or out.width)
    table = Table(box=None, header_style="bold", pad_edge=False, expand=False)
    for column in columns:
        numeric = column in ("ID", "ATTEMPTS")
        size = sizes.get(column)
        table.add_column(
            _cut(column, size) if size else column,
            justify="right" if numeric else "left",
            overflow="ellipsis",
            no_wrap=True,
            width=size,
        )
    for row in rows:
        cells: list[Text] = []
        for column in columns:
            text, size = row[column], sizes.get(column)
            if size:
                text = _cut(text, size, keep_end=column == "TASK")
            style = STATUS_STYLES.get(text, "") if column == "STATUS" else ""
            cells.append(Text(text, style=style))
        table.add_row(*cells)
    return table


def letter_panel(letter: DeadLetter) -> RenderableType:
    """The ``dlq show`` view: every field, the payload as indented JSON, the traceback."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    error = f"{letter.error_type}: {letter.error_message}" if letter.error_message else ""
    rows: list[tuple[str, str | Text]] = [
        ("letter", str(letter.id)),
        ("status", _status_text(letter.status)),
        ("task", f"{letter.task_name} [{letter.task_id or '-'}]"),
        ("batch", letter.batch_id or "-"),
        ("item", letter.item_key or "-"),
        ("error", Text(error or letter.error_type, style="red")),
        ("attempts", str(letter.attempts)),
        ("first failure", when(letter.first_failed_at)),
        ("last failure", when(letter.last_failed_at)),
    ]
    if letter.replays or letter.replayed_at is not None:
        rows.append(("replays", str(letter.replays)))
        rows.append(
            (
                "replayed",
                f"{when(letter.replayed_at)} into {letter.replayed_into or '-'} "
                f"[{letter.replay_task_id or '-'}]",
            )
        )
    for label, value in rows:  # plain strings are the letter's data: never read as markup
        grid.add_row(label, Text(value) if isinstance(value, str) else value)
    payload = json.dumps(letter.payload, indent=2, sort_keys=True, ensure_ascii=False)
    parts: list[RenderableType] = [grid, Text("payload", style="bold"), Text(payload)]
    if letter.traceback:
        parts += [Text("traceback", style="bold"), Text(letter.traceback.rstrip(), style="dim")]
    return Group(*parts)


# -- commands ----------------------------------------------------------------------------------


WideOption = Annotated[
    bool, typer.Option("--wide", help="Whole messages and names, folded (not cut to the terminal).")
]


@dlq_app.command("list")
def _list_command(
    task: TaskOption = None,
    batch: BatchOption = None,
    error_type: ErrorTypeOption = None,
    older_than: OlderOption = None,
    newer_than: NewerOption = None,
    status: Annotated[
        str, typer.Option(help="dead (waiting), replayed, discarded, or any.")
    ] = "dead",
    limit: Annotated[int, typer.Option(min=1, help="At most this many letters.")] = 100,
    wide: WideOption = False,
    as_json: JsonOption = False,
    url: UrlOption = None,
) -> None:
    """Dead letters, newest failure first, one line each (JSON: {"letters": [...], "more": N})."""
    db = database(url)
    with _reported(db):
        store = _store(db.url)
        query = _query(store, task, batch, error_type, older_than, newer_than, _statuses(status))
        letters = query.letters(store, limit=limit)
        more = query.count(store) - len(letters) if len(letters) == limit else 0
    if as_json:
        echo_json({"letters": [letter_record(letter) for letter in letters], "more": more})
        return
    if not letters:
        which = _criteria(status, task, batch, error_type, older_than, newer_than)
        out.print(escape(f"no dead letters{which} in {db.name}"), highlight=False)
        return
    table = letters_table(letters, wide=wide, status=status == "any")
    if wide:  # as wide as the cells are: the terminal wraps the lines, nothing is cut
        needed = Measurement.get(out, out.options.update(width=1_000_000), table).maximum
        _common.console(width=max(out.width, needed)).print(table)
    else:
        out.print(table)
    if more > 0:
        out.print(f"{more} more not shown (--limit {limit})", style="dim", highlight=False)


@dlq_app.command("show")
def _show_command(letter_id: LetterId, as_json: JsonOption = False, url: UrlOption = None) -> None:
    """One letter: task, batch, item, error, attempts, times, replays, payload, traceback."""
    db = database(url)
    with _reported(db):
        letter = _store(db.url).get(letter_id)
    if as_json:
        echo_json(letter_record(letter, full=True))
    else:
        out.print(letter_panel(letter))


@dlq_app.command("replay")
def _replay_command(
    letter_ids: IdsArgument = None,
    task: TaskOption = None,
    batch: BatchOption = None,
    error_type: ErrorTypeOption = None,
    older_than: OlderOption = None,
    replay_all: Annotated[
        bool, typer.Option("--all", help="Every letter with status dead.")
    ] = False,
    into: Annotated[
        str | None,
        typer.Option(
            metavar="TASK",
            help="Send them to this task instead of their own (batch items: a BatchTask).",
            show_default=False,
        ),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Do not ask for confirmation (--all asks).")
    ] = False,
    app_spec: AppOption = DEFAULT_APP,
    url: UrlOption = None,
) -> None:
    """Send letters again, by id or filter, to their task or --into; all or nothing."""
    db = database(url)
    ids = _unique(letter_ids)
    with _reported(db):
        age = _age(older_than, "--older-than")
        filtered = any(value is not None for value in (task, batch, error_type, age))
        if ids and (filtered or replay_all):
            raise CliError("give letter ids or filters (or --all), not both")
        if replay_all and filtered:
            raise CliError("--all replays every dead letter: give --all or filters, not both")
        if not (ids or filtered or replay_all):
            raise CliError(
                "replay what? give letter ids, --task, --batch, --error-type, --older-than or --all"
            )
        celery_app = load_app(app_spec)
        if into is not None:
            find_task(celery_app, into, app_spec)
        check_services(celery_app)
    with _reported(db, mask_password(str(celery_app.conf.broker_url))):
        from taskkit.tasks import replay_dead_letters  # noqa: PLC0415 - heavy; only here

        store = _store(db.url, celery_app)
        if replay_all and not yes and not _confirm_replay_all(store, db, into):
            return
        try:
            result = replay_dead_letters(
                ids or None,
                app=celery_app,
                store=store,
                into=into,
                task=task,
                batch_id=batch,
                error_type=error_type,
                older_than=age,
                all=replay_all,
            )
        except ReplayRejected as exc:
            raise _with_app_hint(exc, store, celery_app, app_spec, into) from None
    if not result.sent:
        which = _criteria("dead", task, batch, error_type, older_than)
        out.print(escape(f"no dead letters{which} in {db.name}; nothing was sent"), highlight=False)
        return
    for message in result.sent:
        letters = ", ".join(str(i) for i in message.letter_ids)
        noun = "dead letter" if len(message.letter_ids) == 1 else "dead letters"
        line = f"sent {noun} {letters} to {message.task_name} as task {message.task_id}"
        if message.batch_id is not None:
            line += f" (batch {message.batch_id})"
        out.print(escape(line), highlight=False)
    out.print(
        f"replayed {_plural(len(result.letter_ids), 'dead letter')} in "
        f"{_plural(len(result.sent), 'message')}",
        highlight=False,
    )


YesOption = Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")]


@dlq_app.command("discard")
def _discard_command(
    letter_ids: IdsArgument = None,
    task: TaskOption = None,
    batch: BatchOption = None,
    error_type: ErrorTypeOption = None,
    older_than: OlderOption = None,
    newer_than: NewerOption = None,
    yes: YesOption = False,
    url: UrlOption = None,
) -> None:
    """Mark letters discarded (kept for the record, never replayed): by id, or the waiting
    letters that match the filters (asks first, saying how many)."""
    db = database(url)
    ids = _unique(letter_ids)
    filters = (task, batch, error_type, older_than, newer_than)
    with _reported(db):
        filtered = any(value is not None for value in filters)
        if ids and filtered:
            raise CliError("give letter ids or filters, not both")
        if not (ids or filtered):
            raise CliError(
                "discard what? give letter ids, --task, --batch, --error-type, --older-than "
                "or --newer-than"
            )
        store = _store(db.url)
        if ids:
            count = store.discard(ids)
            listed = ", ".join(str(i) for i in ids)
            out.print(f"discarded {_plural(count, 'dead letter')}: {listed}", highlight=False)
            return
        query = _query(store, task, batch, error_type, older_than, newer_than, ("dead",))
        which = _criteria("dead", task, batch, error_type, older_than, newer_than)
        count, query = query.counted(store)
        if count == 0:
            out.print(escape(f"no dead letters{which} in {db.name}"), highlight=False)
            return
        if not yes and not _confirmed(
            f"discard {_plural(count, 'dead letter')}{which} in {db.name}?", "discarded", "discard"
        ):
            return
        changed = query.discard(store)
    out.print(
        escape(f"discarded {_plural(changed, 'dead letter')}{which} in {db.name}"), highlight=False
    )


def _confirmed(question: str, done: str, verb: str) -> bool:
    """Ask ``question`` on a terminal; without one, a ``CliError`` asking for ``--yes``."""
    if not _interactive():
        raise CliError(f"{verb} changes letters for good: add --yes (no terminal to ask on)")
    if _ask(question, f"nothing was {done}"):
        return True
    out.print(f"nothing was {done}", highlight=False)
    return False


@dlq_app.command("purge")
def _purge_command(
    letter_ids: IdsArgument = None,
    task: TaskOption = None,
    batch: BatchOption = None,
    error_type: ErrorTypeOption = None,
    older_than: OlderOption = None,
    newer_than: NewerOption = None,
    retention: Annotated[
        bool,
        typer.Option(
            "--retention",
            help="Letters older than TASKKIT_DEAD_LETTER_RETENTION_DAYS (default 30).",
        ),
    ] = False,
    status: Annotated[
        str | None,
        typer.Option(
            help="Only letters with this status: handled (replayed or discarded, the default), "
            "dead (waiting: never handled), replayed, discarded, any.",
            show_default=False,
        ),
    ] = None,
    yes: YesOption = False,
    url: UrlOption = None,
) -> None:
    """Delete letters for good: by id, or those matching the filters (or older than the
    retention); asks first, saying how many."""
    db = database(url)
    ids = _unique(letter_ids)
    with _reported(db):
        age = _age(older_than, "--older-than")
        _age(newer_than, "--newer-than")
        if older_than is not None and retention:
            raise CliError("purge what? give --older-than AGE or --retention, not both")
        filtered = retention or any(
            value is not None for value in (task, batch, error_type, older_than, newer_than)
        )
        if ids and (filtered or status is not None):
            raise CliError(
                "purge what? give letter ids, or filters (--task, --batch, --error-type, "
                "--older-than, --newer-than, --retention) and --status: not both"
            )
        if not (ids or filtered):
            raise CliError(
                "purge what? give letter ids, --older-than AGE, --retention, or filters "
                "(--task, --batch, --error-type, --newer-than)"
            )
        wanted = _purge_status(status or "handled")
        age_text = older_than
        if retention:
            from taskkit.config import get_settings  # noqa: PLC0415 - heavy; only here

            days = get_settings().dead_letter_retention_days
            age = timedelta(days=days)
            age_text = f"the retention of {days:g}d"
        if not yes and not _interactive():
            raise CliError("purge deletes letters for good: add --yes (no terminal to ask on)")
        store = _store(db.url)
        if ids:
            query = _letter_query(ids=tuple(ids), statuses=None)
            missing = query.missing_ids(store)
            if missing:
                raise DeadLetterNotFound(missing)
            which = ""
        else:
            now = store.clock()
            store.clock = lambda: now  # the ages of the count are the ages of the delete
            query = _letter_query(
                task=task,
                batch_id=batch,
                error_type=error_type,
                older_than=age,
                newer_than=_age(newer_than, "--newer-than"),
                statuses=wanted,
            )
            which = _criteria(_status_words(wanted), task, batch, error_type, age_text, newer_than)
        count, query = query.counted(store)
        if count == 0:
            out.print(escape(f"no dead letters{which} in {db.name}"), highlight=False)
            return
        question = f"delete {_plural(count, 'dead letter')}{which} from {db.name}?"
        if not yes and not _confirmed(question, "deleted", "purge"):
            return
        deleted = query.purge(store)
    out.print(f"deleted {_plural(deleted, 'dead letter')} from {escape(db.name)}", highlight=False)


#: ``purge --status``: ``handled`` (the default) is a letter someone dealt with.
HANDLED = ("replayed", "discarded")


def _purge_status(status: str) -> tuple[str, ...] | None:
    """The statuses ``purge`` deletes: ``handled`` = replayed or discarded; None for ``any``."""
    if status == "handled":
        return HANDLED
    if status not in STATUS_CHOICES:
        choices = ", ".join(("handled", *STATUS_CHOICES))
        raise CliError(f"--status {status!r} is not one of {choices}")
    return None if status == "any" else (status,)


def _status_words(statuses: tuple[str, ...] | None) -> str | None:
    return None if statuses is None else " or ".join(statuses)


@dlq_app.command("depth")
def _depth_command(as_json: JsonOption = False, url: UrlOption = None) -> None:
    """Letters waiting (status dead) per task, for monitoring (JSON: {task: count})."""
    db = database(url)
    with _reported(db):
        depth = _store(db.url).depth()
    if as_json:
        echo_json(depth, indent=None)
        return
    if not depth:
        out.print(escape(f"no dead letters waiting in {db.name}"), highlight=False)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("TASK", overflow="fold")
    table.add_column("DEAD", justify="right")
    for name, count in depth.items():
        table.add_row(Text(name), str(count))
    out.print(table)
