"""What ``taskkit train``, ``resume`` and ``dlq replay`` load: a run config file, a Celery
app, a task; and whether the app's broker answers.

Every problem is a ``CliError`` whose message names the file, module or task and what is
wrong with it, in one line. YAML, the app (celery, kombu) and its task modules are imported
only when a command asks for them.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from taskkit._utils import mask_password
from taskkit.cli._common import CliError

__all__ = [
    "DEFAULT_TASK",
    "check_services",
    "find_task",
    "load_app",
    "load_config",
    "task_name_for",
]

#: The training task when neither ``--task`` nor the config's ``task`` key names one.
DEFAULT_TASK = "workers.training.train_model"

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


# -- the run config -------------------------------------------------------------------------


def load_config(path: Path) -> dict[str, Any]:
    """The mapping in a ``.json``, ``.yaml`` or ``.yml`` file; it must be JSON-serialisable,
    since it is stored on the run and sent to the worker as JSON."""
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise CliError(
            f"{path}: unsupported config format {suffix or '(no suffix)'!r} "
            "(use .json, .yaml or .yml)"
        )
    text = _read_text(path)
    data = _parse_json(path, text) if suffix == ".json" else _parse_yaml(path, text)
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {_kind(data)}"
        raise CliError(f"{path}: the config must be a mapping (key: value), but it is {kind}")
    try:
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CliError(f"{path}: the config cannot be sent as JSON: {exc}") from None
    return data


def _read_text(path: Path) -> str:
    if not path.exists():
        raise CliError(f"config file {path} does not exist")
    if not path.is_file():
        raise CliError(f"config file {path} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise CliError(f"cannot read config file {path}: {exc.strerror or exc}") from None


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None


def _parse_yaml(path: Path, text: str) -> Any:
    import yaml  # noqa: PLC0415 - only `taskkit train` reads YAML

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise CliError(f"{path}: invalid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None


def _kind(value: object) -> str:
    names = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), type(value).__name__)


def task_name_for(config: dict[str, Any], option: str | None) -> str:
    """``--task``, else the config's ``task`` key, else ``DEFAULT_TASK``."""
    if option:
        return option
    named = config.get("task")
    if named is None:
        return DEFAULT_TASK
    if not isinstance(named, str) or not named.strip():
        raise CliError(f"the config's 'task' must be a task name, not {named!r}")
    return named.strip()


# -- the app and its task -------------------------------------------------------------------


def load_app(spec: str) -> Any:
    """The Celery app at ``module.path`` (its ``app`` or ``celery_app``) or ``module:attr``,
    with the modules its ``include`` names imported, so their tasks are registered."""
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise CliError(f"--app {spec!r} is not a module path (e.g. workers.app or pkg.mod:app)")
    module = _import(module_name, spec)
    app = _attribute(module, attr, spec)
    if not hasattr(app, "tasks") or not hasattr(app, "loader"):
        raise CliError(f"--app {spec!r} is a {type(app).__name__}, not a Celery app")
    try:
        app.loader.import_default_modules()
    except Exception as exc:  # an included module that does not import
        raise CliError(f"app {spec!r}: its task modules do not import: {_one_line(exc)}") from None
    return app


def _import(module_name: str, spec: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path:  # as `celery -A`: the project directory's modules are importable
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise CliError(
                f"cannot import the app module {module_name!r} (--app {spec!r}): "
                f"no module named {exc.name!r}"
            ) from None
        raise CliError(f"cannot import the app module {module_name!r}: {exc}") from None
    except Exception as exc:
        raise CliError(
            f"importing the app module {module_name!r} failed: "
            f"{type(exc).__name__}: {_one_line(exc)}"
        ) from None


def _attribute(module: Any, attr: str, spec: str) -> Any:
    names = [attr] if attr else ["app", "celery_app"]
    for name in names:
        value: Any = module
        try:
            for part in name.split("."):
                value = getattr(value, part)
        except AttributeError:
            continue
        return value
    wanted = " or ".join(repr(n) for n in names)
    raise CliError(f"module {module.__name__!r} has no {wanted} (--app {spec!r})")


def find_task(app: Any, name: str, spec: str) -> Any:
    """The task ``name`` registered in ``app``; else an error naming the closest names."""
    if name in app.tasks:
        return app.tasks[name]
    known = sorted(n for n in app.tasks if not n.startswith("celery."))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    short = {n.rsplit(".", 1)[-1]: n for n in known}
    close += [short[n] for n in difflib.get_close_matches(name.rsplit(".", 1)[-1], short, n=3)]
    close = list(dict.fromkeys(close))
    if close:
        hint = f"did you mean {', '.join(close)}?"
    elif known:
        hint = f"it has {', '.join(known[:10])}{', ...' if len(known) > 10 else ''}"
    else:
        hint = "it registers no tasks"
    raise CliError(f"app {spec!r} has no task {name!r}; {hint}")


def check_services(app: Any) -> None:
    """Fail fast (exit 1) when the app's broker, or its Redis result backend, does not answer:
    before a run is created, not after a 20-second reconnect loop."""
    broker = mask_password(str(app.conf.broker_url))
    try:
        with app.connection_for_write(connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=0)
    except Exception as exc:  # kombu's OperationalError, or a transport's own error
        raise CliError(f"could not reach the broker {broker}: {_one_line(exc)}", 1) from None
    ping = getattr(getattr(app.backend, "client", None), "ping", None)
    if not callable(ping):
        return  # not a Redis result backend: it is only used when a result is stored
    try:
        ping()
    except Exception as exc:
        backend = mask_password(str(app.conf.result_backend))
        raise CliError(
            f"could not reach the result backend {backend}: {_one_line(exc)}", 1
        ) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
