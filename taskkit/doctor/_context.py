"""What the checks share: the settings, the Celery app a worker would run, the clock, the
secrets to scrub, and the newest checkpoint (looked up once, by whichever check asks first).

The app is loaded the way ``celery -A <app> worker`` (``make worker``) loads it: the working
directory on ``sys.path``, the module imported, its ``app`` or ``celery_app`` (or
``module:attribute``), then ``app.loader.import_default_modules()`` (the ``include`` and
``imports`` modules, and autodiscovery). taskkit's warnings raised meanwhile are recorded, not
shown. Which modules the worker imports is judged by what loading imported in this process:
``taskkit doctor`` runs in a fresh process, as a worker does (a process that imported the app
before, such as a test, sees only what was new).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskkit._utils import mask_password
from taskkit.config import Settings
from taskkit.errors import TaskkitWarning

__all__ = ["AppLoad", "Context", "NewestCheckpoint", "load_app", "one_line"]

#: Seconds each network probe waits to connect, then to be answered.
PROBE_TIMEOUT = 1.0


def one_line(exc: BaseException) -> str:
    """The error's message on one line, URL passwords masked."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return mask_password(text)


@dataclass
class AppLoad:
    """How loading the app went: the app (or None), the problems, the warnings raised."""

    spec: str
    app: Any = None
    #: Why the app module could not be imported or is not a Celery app.
    error: str | None = None
    #: Why its ``include``/``imports`` modules did not import (the worker would not start).
    modules_error: str | None = None
    #: Task names registered once the worker's modules are imported.
    registered: frozenset[str] = frozenset()
    #: Modules imported by loading (the app module and the worker's task modules).
    imported: frozenset[str] = frozenset()
    warnings: list[str] = field(default_factory=list)


def load_app(spec: str) -> AppLoad:
    """Load the app at ``spec`` as a worker would; every problem is recorded in the result."""
    result = AppLoad(spec)
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:  # as `celery -A`: the project directory's modules are importable
        sys.path.insert(0, cwd)
    before = set(sys.modules)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            result.error = f"cannot import the app module {module_name!r}: {_import_error(exc)}"
            module = None
        if module is not None:
            app = _attribute(module, attr)
            if app is None or not hasattr(app, "tasks") or not hasattr(app, "loader"):
                wanted = repr(attr) if attr else "'app' or 'celery_app'"
                result.error = f"module {module_name!r} has no Celery app {wanted}"
            else:
                result.app = app
                try:
                    app.loader.import_default_modules()
                except Exception as exc:
                    result.modules_error = _import_error(exc)
                result.registered = frozenset(app.tasks)
    result.imported = frozenset(set(sys.modules) - before) | {module_name}
    # taskkit's own warnings (a worker prints them at start too); libraries' deprecations are
    # not the deployment's problem
    result.warnings = [
        " ".join(str(w.message).split()) for w in caught if issubclass(w.category, TaskkitWarning)
    ]
    return result


def _import_error(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"no module named {exc.name!r}"
    return f"{type(exc).__name__}: {one_line(exc)}"


def _attribute(module: Any, attr: str) -> Any:
    for name in [attr] if attr else ["app", "celery_app"]:
        value: Any = module
        try:
            for part in name.split("."):
                value = getattr(value, part)
        except AttributeError:
            continue
        return value
    return None


@dataclass(frozen=True)
class NewestCheckpoint:
    """The newest checkpoint the storage holds (by its manifest's ``created_at``), if any."""

    #: The run's key in the storage (its folder), and the manifest.
    run_key: str | None = None
    info: Any = None
    #: How many runs were looked at.
    runs: int = 0
    #: Why the storage could not be read.
    error: str | None = None


class Context:
    """The inputs every check reads; built once per ``diagnose``."""

    def __init__(
        self,
        settings: Settings | None,
        settings_error: str | None,
        load: AppLoad,
        tasks_modules: tuple[str, ...],
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.settings_error = settings_error
        self.load = load
        self.tasks_modules = tasks_modules
        self.clock = clock
        self._lock = threading.Lock()
        self._newest: NewestCheckpoint | None = None
        self._fallback: Any = None

    @property
    def app(self) -> Any:
        """The app the worker would run, else one built from the settings (``create_app``)."""
        if self.load.app is not None:
            return self.load.app
        with self._lock:
            if self._fallback is None and self.settings is not None:
                from taskkit.tasks import create_app  # noqa: PLC0415

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._fallback = create_app("taskkit-doctor", settings=self.settings)
            return self._fallback

    def newest_checkpoint(self) -> NewestCheckpoint:
        """The newest checkpoint of the configured storage (looked up once)."""
        with self._lock:
            if self._newest is None:
                self._newest = _find_newest(self.settings)
            return self._newest


#: Runs looked at, at most, for the newest checkpoint (a storage of thousands is sampled).
MAX_RUNS = 2000


def _find_newest(settings: Settings | None) -> NewestCheckpoint:
    if settings is None:
        return NewestCheckpoint(error="the settings could not be read")
    from taskkit.checkpoint import storage_from_settings  # noqa: PLC0415

    try:
        folder = settings.checkpoint_dir
        if (
            settings.checkpoint_storage == "directory"
            and isinstance(folder, Path)
            and not folder.exists()
        ):
            return NewestCheckpoint()
        storage = storage_from_settings(settings)
        runs = storage.runs()[:MAX_RUNS]
        best: tuple[str, str, Any] | None = None
        for run_key in runs:
            for info in storage.infos(run_key):
                stamp = info.created_at or ""
                if best is None or stamp > best[0]:
                    best = (stamp, run_key, info)
    except Exception as exc:
        return NewestCheckpoint(error=one_line(exc))
    if best is None:
        return NewestCheckpoint(runs=len(runs))
    return NewestCheckpoint(run_key=best[1], info=best[2], runs=len(runs))
