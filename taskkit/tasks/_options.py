"""Task options: one table per task class, merged along the class hierarchy.

Each task class lists the options it adds in ``taskkit_options`` (``Option`` entries, and
``Alias`` entries for deprecated names); a subclass adds its own, or declares one again to
change its default. When a task is bound to its app each option resolves, first found wins:

1. a decorator keyword or class attribute (``@app.task(base=BatchTask, item_delay=0.5)``);
2. the app's config key ``taskkit_<option>`` (``create_app(taskkit_item_delay=0.5)``);
3. the default in the table.

A misspelt option is refused when the task is defined, naming the closest option of *that*
class; ``options_markdown`` renders a class's table for the docs (``docs/tasks.md``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from taskkit._utils import did_you_mean
from taskkit.errors import ConfigurationError

__all__ = [
    "DEFAULTS",
    "RESILIENT_OPTIONS",
    "Alias",
    "Option",
    "check_app_config",
    "install",
    "options_markdown",
    "reject_unknown",
    "resolve_options",
]


@dataclass(frozen=True)
class Option:
    """One task option: its name, default, what it accepts, and what it means.

    ``check`` says whether a value is acceptable (``expected`` says what is, in the error);
    ``convert`` normalises an accepted value (a list of exceptions to a tuple, say).

    Example::

        class Scoring(BatchTask):
            taskkit_options = (
                Option("model_cache_size", 4, positive_int, "an integer >= 1", "Models kept."),
            )
            model_cache_size: int
    """

    name: str
    default: Any
    check: Callable[[Any], bool]
    expected: str
    doc: str
    convert: Callable[[Any], Any] | None = None

    def validate(self, task_name: str, value: Any) -> Any:
        """``value`` (converted) if it is acceptable, else a ``ConfigurationError``."""
        if not self.check(value):
            raise ConfigurationError(
                f"task {task_name}: {self.name} must be {self.expected}, got {value!r}"
            )
        return self.convert(value) if self.convert is not None else value


@dataclass(frozen=True)
class Alias:
    """A deprecated name of an option: still accepted, with a ``DeprecationWarning`` naming
    the new one; ``to_new`` turns an old value into the new option's value.

    Example::

        Alias("item_max_retries", "item_max_attempts", lambda retries: retries + 1,
              non_negative_int, "an integer >= 0", "retries after the first attempt")
    """

    name: str
    new: str
    to_new: Callable[[Any], Any]
    check: Callable[[Any], bool]
    expected: str
    doc: str


# -- checks ----------------------------------------------------------------------------------


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def non_negative(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def at_least_one(value: Any) -> bool:
    return non_negative(value) and value >= 1


def boolean(value: Any) -> bool:
    return isinstance(value, bool)


def optional_name(value: Any) -> bool:
    return value is None or isinstance(value, str)


def one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda value: value in choices


def _exceptions(value: Any) -> bool:
    items = value if isinstance(value, tuple | list) else (value,)
    return all(isinstance(e, type) and issubclass(e, BaseException) for e in items)


def _names(value: Any) -> bool:
    return isinstance(value, tuple | list) and all(isinstance(v, str) and v for v in value)


def _rate(value: Any) -> bool:
    if value is None:
        return True
    from taskkit.recovery import parse_rate  # noqa: PLC0415 - only when a rate is given

    try:
        parse_rate(value)
    except ConfigurationError:
        return False
    return True


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, tuple | list) else (value,)


#: ResilientTask's options (``BatchTask`` and ``TrainingTask`` add theirs).
RESILIENT_OPTIONS: tuple[Option, ...] = (
    Option("inner_max_attempts", 3, positive_int, "an integer >= 1",
           "Attempts in process for a transient error, the first included."),
    Option("inner_delay", 0.2, non_negative, "seconds >= 0",
           "First in-process wait; grows by `inner_backoff` up to `inner_max_delay`."),
    Option("inner_backoff", 2.0, at_least_one, "a number >= 1",
           "Growth factor of the in-process waits."),
    Option("inner_max_delay", 5.0, non_negative, "seconds >= 0",
           "Longest in-process wait."),
    Option("outer_delay", 5.0, non_negative, "seconds >= 0",
           "Base of the re-queue backoff (full jitter: uniform in [0, base * backoff^n])."),
    Option("outer_backoff", 2.0, at_least_one, "a number >= 1",
           "Growth factor of the re-queue backoff."),
    Option("outer_max_delay", 600.0, non_negative, "seconds >= 0",
           "Longest re-queue wait."),
    Option("retry_unknown_errors", True, boolean, "True or False",
           "Re-queue errors that are neither transient nor permanent (False: fail at once)."),
    Option("transient_errors", (), _exceptions, "exception classes",
           "More exception classes to treat as transient.", _as_tuple),
    Option("permanent_errors", (), _exceptions, "exception classes",
           "More exception classes that are never retried.", _as_tuple),
    Option("lease_key", None,
           lambda v: v is None or isinstance(v, str) or callable(v),
           "None, an argument name, or a callable (args, kwargs) -> str",
           "Exclusive lease: an argument name (its value, prefixed by the task name) or a "
           "callable; None: no lease."),
    Option("lease_ttl", 15.0, at_least_one, "seconds >= 1",
           "Seconds a lease outlives its last heartbeat (`TASKKIT_LEASE_TTL`)."),
    Option("progress_interval", 1.0, non_negative, "seconds >= 0",
           "Least seconds between progress writes (`TASKKIT_PROGRESS_INTERVAL`)."),
    Option("progress_run_arg", None, optional_name, "None or an argument name",
           "Argument holding a `ModelRun` id: progress then goes to `TrainingProgress`."),
    Option("progress_flush_timeout", 5.0, non_negative, "seconds >= 0",
           "Seconds the end of a task waits for its last progress row."),
    Option("progress_events", True, boolean, "True or False",
           "Send `task-progress` events."),
    Option("sleep", None, lambda v: v is None or callable(v),
           "None or a callable taking seconds",
           "The in-process wait function (tests inject a recorder); None: `time.sleep`."),
    Option("dead_letter", True, boolean, "True or False",
           "Store a terminal failure in the dead-letter queue (`TASKKIT_DEAD_LETTER`)."),
    Option("fleet_rate_limit", None, _rate, "None or a rate like '100/m'",
           "Calls per period for the whole fleet (every worker, every host), through Redis; "
           "a call over it is re-queued with the limiter's wait, not counted as a retry."),
    Option("fleet_concurrency", None, lambda v: v is None or positive_int(v),
           "None or an integer >= 1",
           "Bodies running at once across the fleet; a dead worker's slot is freed after "
           "`lease_ttl`."),
    Option("fleet_key", None,
           lambda v: v is None or isinstance(v, str) or callable(v),
           "None, an argument name, or a callable (args, kwargs) -> str",
           "Fleet limits per key (e.g. per customer) instead of one for the task."),
    Option("fleet_fail_open", False, boolean, "True or False",
           "Run calls when Redis is unreachable (False: re-queue them, fail closed)."),
    Option("sensitive_args", (), _names, "a tuple of argument names",
           "Arguments (by name, positional or keyword) shown as `[redacted]` in logs, task "
           "events, the result backend and dead letters (whose payload lists them under "
           "`redacted`).",
           _as_tuple),
)  # fmt: skip

#: Every ResilientTask option and its default.
DEFAULTS: dict[str, Any] = {option.name: option.default for option in RESILIENT_OPTIONS}

#: Names that ``app.task(...)`` itself puts in the class it builds.
CELERY_BUILT = frozenset(
    {
        "app",
        "name",
        "run",
        "_decorated",
        "_dump_pydantic_arguments",
        "__doc__",
        "__module__",
        "__annotations__",
        "__header__",
        "__wrapped__",
        "_decorated_fun",
        "__qualname__",
        "__firstlineno__",
        "__static_attributes__",
    }
)

#: Celery's own options most often given to ``app.task`` (offered as suggestions too).
CELERY_OPTIONS = ("max_retries", "acks_late", "time_limit", "soft_time_limit", "rate_limit")

#: ``taskkit_*`` app settings that are not task options.
APP_SETTINGS = frozenset(
    {
        "taskkit_extend_visibility",
        "taskkit_lease_url",
        "taskkit_lease_backend",
        "taskkit_database_url",
        "taskkit_resume_orphaned_runs",
        "taskkit_dead_letter_queue",
        "taskkit_replay_allow",
        "taskkit_consumer_timeout",
    }
)

#: Every option some task class declares, by name (the first declaration): what an app-wide
#: ``taskkit_<option>`` setting is checked against.
_declared: dict[str, Option] = {option.name: option for option in RESILIENT_OPTIONS}


# -- one class's table ------------------------------------------------------------------------


def table(cls: type) -> dict[str, tuple[Option | Alias, type]]:
    """Every option and alias of ``cls`` with the class that declares it; a subclass's entry
    replaces its base's of the same name."""
    merged: dict[str, tuple[Option | Alias, type]] = {}
    for klass in reversed(cls.__mro__):
        for entry in klass.__dict__.get("taskkit_options", ()):
            merged[entry.name] = (entry, klass)
    return merged


def _set_on(cls: type, name: str, owner: type) -> type | None:
    """The first class of ``cls``'s MRO, before ``owner``, that sets ``name`` itself."""
    for klass in cls.__mro__:
        if klass is owner:
            return None
        if name in klass.__dict__:
            return klass
    return None


def resolve_options(cls: type, conf: Any) -> dict[str, Any]:
    """The value of every option of ``cls``: set on it or a base below the option's owner (a
    decorator keyword is one), else the app config's ``taskkit_<name>``, else the default;
    checked. An explicit None counts as unset unless the option accepts None.

    A deprecated alias set instead of its option warns (``DeprecationWarning``) and is
    converted; the more derived class wins, and both set on one class is an error.
    """
    task_name = str(getattr(cls, "name", None) or cls.__name__)
    entries = table(cls)
    aliases = {e.new: (e, owner) for e, owner in entries.values() if isinstance(e, Alias)}
    values: dict[str, Any] = {}
    for name, (option, owner) in entries.items():
        if not isinstance(option, Option):
            continue
        where = _set_on(cls, name, owner)
        value = where.__dict__[name] if where is not None else _UNSET
        if name in aliases:
            alias, alias_owner = aliases[name]
            old_where = _set_on(cls, alias.name, alias_owner)
            if old_where is not None and old_where is where:
                raise ConfigurationError(
                    f"task {task_name}: give {name} or {alias.name} (deprecated), not both"
                )
            if old_where is not None and (where is None or where in old_where.__mro__[1:]):
                value = _from_alias(task_name, alias, old_where.__dict__[alias.name])
                if old_where is cls:
                    delattr(cls, alias.name)  # a second binding reads the new option
        if value is _UNSET or (value is None and not option.check(None)):
            value = conf.get(f"taskkit_{name}", option.default)
        values[name] = option.validate(task_name, value)
    return values


_UNSET: Any = object()


def _from_alias(task_name: str, alias: Alias, old: Any) -> Any:
    if not alias.check(old):
        raise ConfigurationError(
            f"task {task_name}: {alias.name} must be {alias.expected}, got {old!r}"
        )
    new = alias.to_new(old)
    warnings.warn(
        f"task {task_name}: {alias.name} is deprecated; use {alias.new} "
        f"({alias.name}={old!r} is {alias.new}={new!r})",
        DeprecationWarning,
        stacklevel=4,
    )
    return new


def install(cls: type) -> None:
    """Put the defaults of the options ``cls`` declares on ``cls`` (so the class reads right
    before it is bound) and make them known as app settings."""
    own = cls.__dict__.get("taskkit_options", ())
    for entry in own:
        if isinstance(entry, Option):
            setattr(cls, entry.name, entry.default)
            _declared.setdefault(entry.name, entry)


def reject_unknown(cls: type, given: Iterable[str]) -> None:
    """Refuse names given to ``app.task(base=cls, ...)`` that neither Celery nor ``cls``'s
    options know (a typo is silent otherwise), suggesting the closest option of ``cls``."""
    task_name = str(cls.__dict__.get("name", cls.__name__))
    entries = table(cls)
    for name in given:
        if name in CELERY_BUILT or name.startswith("__") or name in entries:
            continue
        if any(name in vars(base) for base in cls.__mro__[1:]):
            continue
        raise ConfigurationError(
            f"task {task_name}: unknown option {name!r}"
            + did_you_mean(name, [*entries, *CELERY_OPTIONS])
        )


def check_app_config(conf: Any) -> None:
    """Refuse ``taskkit_*`` config keys that are neither options nor settings (a misspelt
    app-wide setting), and option values that cannot be right."""
    for key in list(conf.keys()):
        if not key.startswith("taskkit_") or key in APP_SETTINGS:
            continue
        option = _declared.get(key[len("taskkit_") :])
        if option is None:
            raise ConfigurationError(
                f"unknown app setting {key!r}"
                + did_you_mean(key, [f"taskkit_{o}" for o in _declared] + sorted(APP_SETTINGS))
            )
        option.validate("(app config)", conf[key])


# -- the docs ---------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(value: Any) -> str:
    if callable(value) and hasattr(value, "__name__"):
        return f"`{value.__name__}`"
    return f"`{value!r}`"


def options_markdown(cls: type, *, inherited: bool = False) -> str:
    """The options ``cls`` declares (``inherited``: and those of its bases) as a Markdown
    table, then its deprecated names; what ``docs/tasks.md`` shows.

    Example::

        from taskkit.tasks import BatchTask, options_markdown

        print(options_markdown(BatchTask))
    """
    rows = ["| option | default | accepts | meaning |", "|---|---|---|---|"]
    deprecated: list[str] = []
    for name, (entry, owner) in table(cls).items():
        if not inherited and owner is not cls:
            continue
        if isinstance(entry, Alias):
            deprecated.append(f"- `{name}` (deprecated, warns): {entry.doc}; use `{entry.new}`.")
            continue
        rows.append(
            f"| `{name}` | {_default(entry.default)} | {_cell(entry.expected)} "
            f"| {_cell(entry.doc)} |"
        )
    text = "\n".join(rows)
    if deprecated:
        text += "\n\n" + "\n".join(deprecated)
    return text + "\n"
