"""Shared fixtures: real services, fake time, databases.

Tests that need Redis take the ``redis_url`` fixture, tests that need PostgreSQL take
``postgres_url``. When the service is unreachable they fail, with the command that starts it; a
laptop without them can set ``TASKKIT_REQUIRE_SERVICES=0`` to skip them instead. CI never sets
it.

Database tests take ``db_url`` (or ``engine``, ``db``): it is parametrized over the embedded
SQLite default and PostgreSQL, migrated to head once per test run; PostgreSQL runs use a schema
of their own (``taskkit_test_<pid>_<random>``, dropped at the end), so runs never collide.
Tables are emptied after each test.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from tests._support.redis_server import start_redis_server

# pytest-xdist's workers run with COLUMNS/LINES set to their controller's terminal; the CLI's
# consoles read COLUMNS once, when taskkit.cli is imported, and would keep that width for every
# test. The tests give each command the width it needs (CliRunner's env).
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest-xdist worker is a session of its own, with its own nonce for the names it
    puts in Redis (``TASKKIT_TEST_RUN``, tests/_support/apps.py). The controller may have set
    one already (loading a folder's conftest that imports the test apps): forget it before the
    workers start, or they would all inherit it and share queues and counters."""
    if not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None):
        os.environ.pop("TASKKIT_TEST_RUN", None)


REDIS_URL = os.environ.get("TASKKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
RABBITMQ_URL = os.environ.get("TASKKIT_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES_URL = os.environ.get(
    "TASKKIT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


def _service_missing(what: str, how: str) -> None:
    message = f"{what} is not reachable; start it with: {how}"
    if os.environ.get("TASKKIT_REQUIRE_SERVICES", "1") == "0":
        pytest.skip(message + " (skipped: TASKKIT_REQUIRE_SERVICES=0)")
    pytest.fail(message + " (set TASKKIT_REQUIRE_SERVICES=0 to skip instead)", pytrace=False)


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        _service_missing(
            f"Redis at {REDIS_URL}",
            'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no',
        )
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    from kombu import Connection

    try:
        with Connection(RABBITMQ_URL, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception:
        _service_missing(f"RabbitMQ at {RABBITMQ_URL}", "rabbitmq-server -detached")
    return RABBITMQ_URL


@pytest.fixture(scope="session", autouse=True)
def _delete_this_sessions_keys() -> Iterator[None]:
    """At session end, delete the Redis keys of this session's test apps, and only those: a
    pytest session running at the same time keeps its leases (``tests/_support/apps.py``)."""
    yield
    import sys

    support = sys.modules.get("tests._support.apps")
    if support is not None:  # no test app was built, so nothing was written
        support.delete_own_keys()


@pytest.fixture(scope="module")
def worker(redis_url: str, worker_app: Any) -> Iterator[object]:
    """An in-process Celery worker (solo pool) on the folder's ``worker_app`` (a
    ``RedisTestApp`` its conftest provides), for the tests of one module."""
    from tests._support.workers import in_process_worker

    with in_process_worker(worker_app.app) as running:
        yield running


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def unique() -> str:
    """A name no other test (or test run) uses: for breaker names and key prefixes."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def key_prefix(redis_client: redis.Redis, unique: str) -> Iterator[str]:
    """A Redis key prefix for one test; its keys are deleted afterwards."""
    prefix = f"taskkit-test:{unique}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=prefix + "*"))
    if keys:
        redis_client.delete(*keys)


class FakeClock:
    """A clock that only moves when told to; ``sleep`` records the wait and moves it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class PrivateRedis:
    """A redis-server of the test's own, on a free port, that the test may stop and restart."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tmp_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed; the outage tests start their own", False)
        self.process = start_redis_server(self.port, self.dir)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def private_redis(tmp_path: pathlib.Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


# -- databases ---------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _taskkit_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """Embedded defaults (SQLite file, ...) go to a temporary directory, never the checkout."""
    from taskkit.config import reset_settings

    home = tmp_path_factory.mktemp("taskkit-home")
    previous = {k: os.environ.get(k) for k in ("TASKKIT_HOME", "TASKKIT_DATABASE_URL")}
    os.environ["TASKKIT_HOME"] = str(home)
    os.environ.pop("TASKKIT_DATABASE_URL", None)
    reset_settings()
    yield home
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    reset_settings()


def with_search_path(url: str, schema: str) -> str:
    """``url`` with every connection's search_path set to ``schema`` (psycopg ``options``)."""
    updated = make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
    return updated.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL server's URL, checked to answer; no schema of its own (see pg_schema)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except sqlalchemy.exc.OperationalError:
        _service_missing(f"PostgreSQL at {POSTGRES_URL}", PG_START)
    finally:
        engine.dispose()
    return POSTGRES_URL


@contextlib.contextmanager
def pg_schema(admin_url: str, prefix: str = "taskkit_test") -> Iterator[str]:
    """A URL into a new, empty PostgreSQL schema, dropped (with what is in it) afterwards."""
    import sqlalchemy

    schema = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(admin_url)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(admin_url, schema)
    finally:
        from taskkit.db.session import dispose_engines

        dispose_engines()  # no pooled connection may keep the schema busy
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.dispose()


@pytest.fixture(scope="session")
def pg_schema_url(postgres_url: str) -> Iterator[str]:
    """A URL whose connections live in a schema of this test run, migrated to head."""
    with pg_schema(postgres_url) as url:
        _migrate(url)
        yield url


def _migrate(url: str) -> None:
    from taskkit.db.migrate import upgrade
    from taskkit.db.session import create_engine_for

    engine = create_engine_for(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An embedded SQLite database file of this test run, migrated to head."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'taskkit.db'}"
    _migrate(url)
    return url


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each database test runs on the embedded SQLite default and on PostgreSQL."""
    return str(
        request.getfixturevalue(f"{'pg_schema' if request.param == 'postgresql' else 'sqlite'}_url")
    )


TABLES = (
    "dead_letters",
    "batch_chunks",
    "batch_item_rows",
    "batches",
    "checkpoint_chunks",
    "checkpoints",
    "predictions",
    "datasets",
    "training_epochs",
    "training_progress",
    "model_runs",
)


def empty_tables(engine: Engine) -> None:
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        else:
            for table in TABLES:
                connection.execute(text(f"DELETE FROM {table}"))


def _emptied_after(url: str) -> Iterator[Engine]:
    from taskkit.db.session import get_engine

    engine = get_engine(url)
    yield engine
    empty_tables(engine)


def _session_for(url: str) -> Iterator[Session]:
    from taskkit.db.session import get_sessionmaker

    session = get_sessionmaker(url)()
    yield session
    session.close()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """taskkit's engine for ``db_url``; the tables are emptied after the test."""
    yield from _emptied_after(db_url)


@pytest.fixture
def db(engine: Engine, db_url: str) -> Iterator[Session]:
    """A session from taskkit's session factory for ``db_url``."""
    yield from _session_for(db_url)


@pytest.fixture
def default_database(db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Make ``db_url`` the process's default database (``TASKKIT_DATABASE_URL``)."""
    from taskkit.config import reset_settings

    monkeypatch.setenv("TASKKIT_DATABASE_URL", db_url)
    reset_settings()
    yield db_url
    monkeypatch.delenv("TASKKIT_DATABASE_URL")
    reset_settings()


@pytest.fixture
def pg_engine(pg_schema_url: str) -> Iterator[Engine]:
    """taskkit's engine for this run's PostgreSQL schema, for PostgreSQL-only behaviour."""
    yield from _emptied_after(pg_schema_url)


@pytest.fixture
def pg_db(pg_engine: Engine, pg_schema_url: str) -> Iterator[Session]:
    yield from _session_for(pg_schema_url)


class PrivatePostgres:
    """A PostgreSQL server of the test's own (initdb in a temporary directory, a free port),
    that the test may stop, crash and restart; the shared server is never touched."""

    def __init__(self, root: pathlib.Path) -> None:
        binaries = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        found = shutil.which("initdb")
        initdb = pathlib.Path(found) if found else (binaries[-1] if binaries else None)
        if initdb is None:
            pytest.fail("PostgreSQL's initdb is not installed; the outage tests need it", False)
        self.bin = initdb.parent
        self.root = root
        self.data = root / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        root.chmod(0o777)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )

    def crash(self) -> None:
        """Stop at once, as a crash would: no checkpoint, clients cut off mid-transaction."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as
    # the postgres user when the tests run as root.
    root = pathlib.Path(tempfile.mkdtemp(prefix="taskkit-pg-"))
    try:
        server = PrivatePostgres(root)
        server.start()
        yield server
        if server.running():
            server.crash()
    finally:
        shutil.rmtree(root, ignore_errors=True)
