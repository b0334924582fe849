"""A worker checks its database's schema before it takes a task (Celery's ``worker_init``).

The rule, for apps made by ``create_app`` (their ``taskkit_database_url`` setting names the
database), in the worker's main process before the pool starts:

- at this taskkit's head revision: nothing to do;
- a SQLite database (the embedded default under ``TASKKIT_HOME``, or any ``sqlite:///`` file)
  that was never migrated or is at an older revision: the worker upgrades it, under the
  migration lock (SQLite's write lock), so two workers starting at once both start;
- any other database behind this taskkit (PostgreSQL, ...): the worker exits with status 1 and
  one line, ``error: the database postgresql://db:5432/app has no taskkit tables; run: taskkit
  db upgrade``. Migrating a shared server database is a deploy step, not something the first
  worker of a rollout should do while workers of the old version still run on it;
- a database at a revision this taskkit does not know (a newer taskkit migrated it): the
  worker exits with one line, on SQLite too;
- a database that does not answer: a warning, and the worker starts (an outage slows tasks,
  it does not stop the fleet); tasks that then meet a missing table fail with the same line.

The database is named without credentials. ``SystemExit`` is how the worker stops: Celery's
signal dispatch catches ``Exception`` (and only logs it), not ``SystemExit``, which leaves
``celery worker`` before its banner, pool or consumer exist, printing the line and nothing else.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from taskkit.config import get_settings
from taskkit.db.classify import describe_database, driver_message, is_transient
from taskkit.db.migrate import UPGRADE_HINT, schema_status, upgrade_from
from taskkit.db.session import create_engine_for

__all__ = ["prepare_database"]

logger = logging.getLogger("taskkit.tasks")


#: What the start-up check did, logged once Celery has set up logging (after ``worker_init``).
_notes: list[str] = []


def prepare_database(url: str) -> str | None:
    """Bring the worker's database to where a worker can use it (see the module docs); returns
    None when it can, else the one line to stop the worker with.

    Example::

        problem = prepare_database("postgresql+psycopg://app@db/app")
        # 'the database postgresql://db/app has no taskkit tables; run: taskkit db upgrade'
    """
    engine = create_engine_for(url)
    name = describe_database(engine.url)
    try:
        try:
            status = schema_status(engine)
            if status.behind and engine.dialect.name == "sqlite":
                before, reached = upgrade_from(engine)
                if before != reached:  # not when a worker starting beside us did it first
                    _notes.append(
                        f"taskkit: upgraded the database {name} from revision "
                        f"{before or '(none)'} to {reached}"
                    )
                return None
        except ImportError as exc:  # the URL's driver is not installed
            return f"could not use database {name}: {exc}"
        except Exception as exc:
            if not is_transient(exc):
                return f"could not use database {name}: {driver_message(exc)}"
            logger.warning(
                "taskkit: could not check the schema of the database %s at start-up (%s); "
                "starting anyway",
                name,
                driver_message(exc),
            )
            return None
    finally:
        engine.dispose()
    fix = UPGRADE_HINT if url == get_settings().database_url else f"{UPGRADE_HINT} --url URL"
    return status.problem(fix)


@signals.worker_init.connect(weak=False)
def _check_database_at_worker_start(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    url = None if app is None else app.conf.get("taskkit_database_url")
    if not url:
        return  # not an app made by create_app
    problem = prepare_database(str(url))
    if problem is not None:
        raise SystemExit(f"error: {problem}")


@signals.celeryd_after_setup.connect(weak=False)
def _log_start_up_notes(**_: Any) -> None:
    while _notes:
        logger.info(_notes.pop(0))
