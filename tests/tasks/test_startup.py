"""A worker checks its database's schema when it starts (``taskkit/tasks/_startup.py``): the
embedded SQLite default is upgraded under the migration lock; a PostgreSQL database behind
this taskkit, or any database ahead of it, stops the worker with one line and no traceback."""

from __future__ import annotations

import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from taskkit.config import load_settings
from taskkit.db.migrate import head_revision, schema_status, upgrade
from taskkit.db.session import create_engine_for, dispose_engines
from taskkit.errors import ConfigurationError
from taskkit.tasks import create_app, load_model
from taskkit.tasks._startup import prepare_database
from tests._support.commands import clean_env, run_command
from tests._support.workers import REPO, WorkerProcess
from tests.conftest import pg_schema

#: Seconds a worker that refuses to start may take to exit (it stops before its pool starts).
EXIT_BOUND = 60


def _worker_command(concurrency: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def _refused_start(home: Path, database_url: str | None = None) -> tuple[int, str]:
    """Start ``celery -A workers.app worker`` and wait for it to exit: its status and output."""
    env = clean_env(TASKKIT_HOME=str(home), PYTHONPATH=str(REPO))
    if database_url is not None:
        env["TASKKIT_DATABASE_URL"] = database_url
    done = run_command(_worker_command(), cwd=REPO, env=env, timeout=EXIT_BOUND)
    return done.returncode, done.stdout + done.stderr


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture
def empty_pg(postgres_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL schema, its URL carrying a password (the server trusts anyone:
    it is never checked, so the tests can see it is never printed)."""
    with pg_schema(postgres_url, "taskkit_startup") as url:
        yield url.replace("postgres@", "postgres:hunter2@", 1)


# -- the embedded default is upgraded ----------------------------------------------------------


def _embedded_app(home: Path):  # type: ignore[no-untyped-def]
    return create_app("workers", settings=load_settings(home=home))


def test_a_worker_on_a_fresh_embedded_home_upgrades_the_database_and_runs_a_task(tmp_path: Path):
    home = tmp_path / "home"
    worker = WorkerProcess("fresh", tmp_path, app="workers.app", env={"TASKKIT_HOME": str(home)})
    try:
        worker.wait_ready()
        assert f"upgraded the database sqlite:///{home / 'taskkit.db'}" in worker.log()
        app = _embedded_app(home)
        result = app.send_task("workers.tasks.add", args=(2, 3))
        assert result.get(timeout=60) == 5
    finally:
        worker.stop()
    assert schema_status(f"sqlite:///{home / 'taskkit.db'}").current
    assert "Traceback" not in worker.log()
    dispose_engines()


def test_two_workers_starting_at_once_on_a_fresh_home_both_start(tmp_path: Path):
    home = tmp_path / "home"
    workers = [
        WorkerProcess(name, tmp_path, app="workers.app", env={"TASKKIT_HOME": str(home)})
        for name in ("first", "second")
    ]
    try:
        for worker in workers:
            worker.wait_ready()
    finally:
        for worker in workers:
            worker.stop()
    assert schema_status(f"sqlite:///{home / 'taskkit.db'}").current
    upgrades = sum(worker.log().count("upgraded the database") for worker in workers)
    assert upgrades == 1  # the second waited for the lock, then found the schema at head
    dispose_engines()


def test_concurrent_upgrades_of_one_sqlite_file_all_succeed(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'taskkit.db'}"
    start = threading.Barrier(4)
    outcomes: list[object] = []

    def migrate() -> None:
        engine = create_engine_for(url)
        try:
            start.wait(timeout=30)
            outcomes.append(upgrade(engine))
        except Exception as exc:
            outcomes.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert outcomes == [head_revision()] * 4


# -- other databases stop the worker with one line ---------------------------------------------


def test_a_worker_on_an_unmigrated_postgres_database_exits_with_one_line(
    tmp_path: Path, empty_pg: str
):
    status, output = _refused_start(tmp_path / "home", empty_pg)

    assert status != 0
    assert _error_lines(output) == [
        "error: the database postgresql://127.0.0.1:5432/test has no taskkit tables; "
        "run: taskkit db upgrade"
    ]
    assert "Traceback" not in output
    assert "hunter2" not in output
    assert schema_status(empty_pg).revision is None  # the worker changed nothing
    dispose_engines()


def test_a_worker_on_an_older_postgres_database_names_its_revision(tmp_path: Path, empty_pg: str):
    upgrade(empty_pg, "0003")

    status, output = _refused_start(tmp_path / "home", empty_pg)

    assert status != 0
    assert _error_lines(output) == [
        "error: the database postgresql://127.0.0.1:5432/test is at revision 0003, older than "
        f"this taskkit (head {head_revision()}); run: taskkit db upgrade"
    ]
    assert "Traceback" not in output
    assert schema_status(empty_pg).revision == "0003"
    dispose_engines()


def test_a_worker_on_a_database_from_a_newer_taskkit_exits_on_sqlite_too(tmp_path: Path):
    home = tmp_path / "home"
    database = home / "taskkit.db"
    upgrade(f"sqlite:///{database}")
    dispose_engines()
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'f00dfeed'")

    status, output = _refused_start(home)

    assert status != 0
    assert _error_lines(output) == [
        f"error: the database sqlite:///{database} is at revision f00dfeed, which this "
        f"taskkit (head {head_revision()}) does not know: a newer taskkit migrated it; "
        "upgrade taskkit, or use a database of this version"
    ]
    assert "Traceback" not in output


def test_a_database_that_does_not_answer_does_not_stop_the_worker(caplog):
    assert prepare_database("postgresql+psycopg://postgres:hunter2@127.0.0.1:1/none") is None
    assert "could not check the schema of the database postgresql://127.0.0.1:1/none" in (
        caplog.text
    )
    assert "hunter2" not in caplog.text


# -- a task that meets a missing table says the same -------------------------------------------


def test_a_task_on_a_database_migrated_away_fails_with_the_one_line(empty_pg: str):
    upgrade(empty_pg)
    engine = create_engine_for(empty_pg)
    try:
        with engine.begin() as connection:  # someone dropped the schema under a running worker
            for table in inspect(connection).get_table_names():
                connection.execute(text(f'DROP TABLE "{table}" CASCADE'))
    finally:
        engine.dispose()

    with pytest.raises(ConfigurationError) as caught:
        load_model(1, database_url=empty_pg)

    assert str(caught.value) == (
        "the database postgresql://127.0.0.1:5432/test has no taskkit tables; "
        "run: taskkit db upgrade"
    )
    dispose_engines()
