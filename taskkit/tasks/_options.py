"""ResilientTask's own options: names, defaults, checks, and where a value comes from.

A value is resolved per task class, then app-wide, then from the default here:

1. a decorator keyword or class attribute (``@app.task(base=ResilientTask, inner_max_attempts=5)``);
2. the app's config key ``taskkit_<option>`` (``create_app(taskkit_inner_max_attempts=5)``);
3. ``DEFAULTS``.

A misspelt option is refused when the task is defined, naming the closest real one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

from taskkit.errors import ConfigurationError

__all__ = ["DEFAULTS", "check_app_config", "check_option", "reject_unknown", "resolve"]

#: Every ResilientTask option and its default.
DEFAULTS: dict[str, Any] = {
    "inner_max_attempts": 3,
    "inner_delay": 0.2,
    "inner_backoff": 2.0,
    "inner_max_delay": 5.0,
    "outer_delay": 5.0,
    "outer_backoff": 2.0,
    "outer_max_delay": 600.0,
    "retry_unknown_errors": True,
    "transient_errors": (),
    "permanent_errors": (),
    "lease_key": None,
    "lease_ttl": 15.0,
    "progress_interval": 1.0,
    "progress_run_arg": None,
    "progress_flush_timeout": 5.0,
    "progress_events": True,
    "sleep": None,
    "dead_letter": True,
}

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


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _exceptions(value: Any) -> bool:
    items = value if isinstance(value, tuple | list) else (value,)
    return all(isinstance(e, type) and issubclass(e, BaseException) for e in items)


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "inner_max_attempts": (_positive_int, "an integer >= 1"),
    "inner_delay": (_non_negative, "seconds >= 0"),
    "inner_backoff": (lambda v: _non_negative(v) and v >= 1, "a number >= 1"),
    "inner_max_delay": (_non_negative, "seconds >= 0"),
    "outer_delay": (_non_negative, "seconds >= 0"),
    "outer_backoff": (lambda v: _non_negative(v) and v >= 1, "a number >= 1"),
    "outer_max_delay": (_non_negative, "seconds >= 0"),
    "retry_unknown_errors": (lambda v: isinstance(v, bool), "True or False"),
    "transient_errors": (_exceptions, "exception classes"),
    "permanent_errors": (_exceptions, "exception classes"),
    "lease_key": (
        lambda v: v is None or isinstance(v, str) or callable(v),
        "None, an argument name, or a callable (args, kwargs) -> str",
    ),
    "lease_ttl": (lambda v: _non_negative(v) and v >= 1, "seconds >= 1"),
    "progress_interval": (_non_negative, "seconds >= 0"),
    "progress_run_arg": (lambda v: v is None or isinstance(v, str), "None or an argument name"),
    "progress_flush_timeout": (_non_negative, "seconds >= 0"),
    "progress_events": (lambda v: isinstance(v, bool), "True or False"),
    "sleep": (lambda v: v is None or callable(v), "None or a callable taking seconds"),
    "dead_letter": (lambda v: isinstance(v, bool), "True or False"),
}


def check_option(task_name: str, option: str, value: Any) -> Any:
    """``value`` if it is valid for ``option``; otherwise a ``ConfigurationError`` naming both."""
    ok, expected = _CHECKS[option]
    if not ok(value):
        raise ConfigurationError(f"task {task_name}: {option} must be {expected}, got {value!r}")
    if option in {"transient_errors", "permanent_errors"}:
        return tuple(value) if isinstance(value, tuple | list) else (value,)
    return value


def resolve(task_name: str, option: str, class_value: Any, conf: Any) -> Any:
    """The value of ``option``: the class's, else the app config's, else the default."""
    value = class_value
    if value is None:
        value = conf.get(f"taskkit_{option}", DEFAULTS[option])
    if value is None and DEFAULTS[option] is None:
        return None
    return check_option(task_name, option, value)


def suggestion(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def reject_unknown(task_name: str, given: Iterable[str], known: Callable[[str], bool]) -> None:
    """Refuse option names that neither Celery nor taskkit knows (a typo is silent otherwise)."""
    for name in given:
        if name in CELERY_BUILT or name.startswith("__") or known(name):
            continue
        raise ConfigurationError(
            f"task {task_name}: unknown option {name!r}"
            + suggestion(name, [*DEFAULTS, "max_retries", "acks_late", "time_limit"])
        )


def check_app_config(conf: Any) -> None:
    """Refuse ``taskkit_*`` config keys that are not options (a misspelt app-wide setting)."""
    extra = {
        "taskkit_extend_visibility",
        "taskkit_lease_url",
        "taskkit_database_url",
        "taskkit_resume_orphaned_runs",
        "taskkit_dead_letter_queue",
    }
    for key in list(conf.keys()):
        if key.startswith("taskkit_") and key not in extra and key[8:] not in DEFAULTS:
            raise ConfigurationError(
                f"unknown app setting {key!r}"
                + suggestion(key, [f"taskkit_{o}" for o in DEFAULTS] + sorted(extra))
            )
        if key.startswith("taskkit_") and key[8:] in DEFAULTS:
            check_option("(app config)", key[8:], conf[key])
