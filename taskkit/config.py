"""``Settings``: the one place taskkit's URLs, paths and limits come from.

Every field is read from a ``TASKKIT_``-prefixed environment variable (or a ``.env`` file in
the working directory); nothing else in taskkit reads the environment for these.

Every setting, its variable and its default are listed in ``docs/configuration.md`` (a test
checks that page against the fields below).

Decisions: the embedded defaults live in the project's ``.taskkit`` folder (found like git
finds ``.git``; the rule is in ``Settings``), never in a shared ``/tmp``, so a worker and a
command started anywhere in the project agree. Other relative paths
(``TASKKIT_CHECKPOINT_DIR``) are resolved against the working directory when settings are
read. A malformed value raises a ``ConfigurationError`` that names the variable, instead of
failing later with a driver error.

Example::

    from taskkit.config import get_settings

    settings = get_settings()      # read once, cached
    print(settings.database_url)   # sqlite:////home/me/project/.taskkit/taskkit.db
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from urllib.request import url2pathname

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from taskkit._keys import KeyRing, check_key, home_key, read_key_file
from taskkit._utils import mask_password
from taskkit.errors import ConfigurationError

__all__ = ["Settings", "find_home", "get_settings", "load_settings", "reset_settings"]

ENV_PREFIX = "TASKKIT_"

#: The folder of the embedded defaults inside a project; it also marks the project's root.
HOME_DIR = ".taskkit"
#: A file that marks a project's root (where ``.taskkit`` goes when there is none yet).
PROJECT_FILE = "pyproject.toml"


def find_home(start: Path | None = None) -> Path:
    """The default ``TASKKIT_HOME``: ``.taskkit`` in the nearest folder, from ``start`` (the
    working directory) upwards, that holds a ``.taskkit/`` folder or a ``pyproject.toml``;
    else ``start / ".taskkit"``. A folder that cannot be read does not mark a project.

    Example::

        find_home(Path("/home/me/project/notebooks"))
        # Path('/home/me/project/.taskkit') when /home/me/project has a pyproject.toml
    """
    here = (start or Path.cwd()).expanduser().absolute()
    for folder in (here, *here.parents):
        try:
            if (folder / HOME_DIR).is_dir() or (folder / PROJECT_FILE).is_file():
                return folder / HOME_DIR
        except OSError:  # a parent folder we may not read: it is not our project
            continue
    return here / HOME_DIR


class Settings(BaseSettings):
    """taskkit's settings, from ``TASKKIT_*`` environment variables (see the module docs).

    ``home`` (``TASKKIT_HOME``) resolves once per project: an explicit value wins (relative:
    against the working directory); else ``.taskkit`` in the nearest folder, from the working
    directory upwards, holding a ``.taskkit/`` folder or a ``pyproject.toml``; else
    ``.taskkit`` in the working directory (``find_home``). The embedded database, broker,
    results, leases and checkpoints all live under it.

    Build one directly to override fields in code (``Settings(database_url=...)``); use
    ``get_settings()`` for the process-wide, environment-derived one.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", frozen=True
    )

    #: Directory of the embedded defaults: SQLite database, broker and results; lease files;
    #: checkpoints. Default: the project's ``.taskkit`` (``find_home``).
    home: Path = Field(default_factory=find_home)
    #: SQLAlchemy database URL; empty means the embedded SQLite file under ``home``.
    database_url: str = ""
    #: Seconds to wait when opening a new database connection.
    db_connect_timeout: float = Field(10.0, gt=0)
    #: Connections kept open per process (PostgreSQL and other server databases).
    db_pool_size: int = Field(5, ge=1)
    #: Connections opened beyond ``db_pool_size`` under load.
    db_max_overflow: int = Field(10, ge=0)
    #: Seconds after which a pooled connection is replaced (firewalls drop idle ones).
    db_pool_recycle: int = Field(1800, ge=-1)
    #: Seconds SQLite waits on a locked database before "database is locked".
    sqlite_busy_timeout: float = Field(30.0, ge=0)
    #: Celery broker URL; empty means the embedded SQLite broker under ``home``.
    broker_url: str = ""
    #: Celery result backend; empty means the Redis broker itself, or a SQLite file.
    result_backend: str = ""
    #: Seconds after which the Redis transport (and the embedded ``taskkit+sqlite`` broker)
    #: redelivers an unacknowledged message. Short, so a dead worker's tasks are taken over
    #: quickly; live workers extend it (next setting).
    visibility_timeout: float = Field(30.0, ge=5)
    #: Workers refresh the delivery time of every message they hold, so a running or waiting
    #: task is never redelivered while its worker lives.
    extend_visibility: bool = True
    #: Where task leases live; empty: the Redis broker, a Redis result backend, or lock files.
    lease_url: str = ""
    #: Seconds a task lease survives without a heartbeat (heartbeats come every third of it).
    lease_ttl: float = Field(15.0, ge=1)
    #: Least seconds between two progress writes of one task (first and last always written).
    progress_interval: float = Field(1.0, ge=0)
    #: Directory of checkpoint files, one directory per run; default ``home / "checkpoints"``.
    #: An object-storage URL (``s3://bucket/prefix``, ``gs://...``; ``taskkit[s3]``) stays a
    #: string and is opened with fsspec; ``file:///path`` is the folder ``/path``.
    checkpoint_dir: Path | str = Path("checkpoints")
    #: Where ``CheckpointStore`` keeps checkpoints: files, or the database (in chunks).
    checkpoint_storage: Literal["directory", "database"] = "directory"
    #: Newest checkpoints a run keeps (older ones are deleted once a newer one is durable).
    checkpoint_keep_last: int = Field(3, ge=1)
    #: Checkpoints saved with ``is_best=True`` a run keeps besides the newest ones.
    checkpoint_keep_best: int = Field(1, ge=0)
    #: HMAC key (at least 16 bytes) that signs checkpoints and stored models. Unset (and no
    #: ``secret_key_file``): taskkit makes a random key once in ``home / "secret.key"``.
    secret_key: SecretStr | None = None
    #: A file holding the signing key (instead of ``secret_key``; not both).
    secret_key_file: Path | None = None
    #: Older keys, comma-separated, still accepted when verifying (key rotation); never used to
    #: sign.
    secret_keys_old: SecretStr | None = None
    #: A starting worker re-enqueues training runs left running by a worker that died. None:
    #: on with the embedded SQLite broker, where it resumes the run at once rather than after
    #: the visibility timeout (the redelivered old copy then drops itself); off on Redis and
    #: RabbitMQ, which redeliver promptly by themselves.
    resume_orphaned_runs: bool | None = None
    #: Tasks store their terminal failures (batch tasks: their failed items) in the
    #: dead-letter queue; a task's own ``dead_letter`` option wins.
    dead_letter: bool = True
    #: Days a dead letter is kept; ``taskkit dlq purge`` with no other filter deletes older ones.
    dead_letter_retention_days: float = Field(30.0, gt=0)
    #: Also publish every new dead letter (JSON) to this broker queue, for consumers. None: off.
    dead_letter_queue: str | None = None
    #: Workers send task events (``celery worker -E``) and clients send ``task-sent``, so
    #: Flower and ``celery events`` see every task; ``task-progress`` events go with them.
    worker_events: bool = False
    #: RabbitMQ: seconds a worker may hold a running task's message unacknowledged, asked for
    #: with the ``x-consumer-timeout`` consumer argument (RabbitMQ 3.12+; older ones apply
    #: their node-wide ``consumer_timeout``). 0: ask for nothing, the broker's own applies.
    consumer_timeout: float = Field(86400.0, ge=0, le=2_000_000)
    #: Bearer token for the HTTP service's mutating endpoints (``taskkit serve``). Unset: they
    #: answer 401, and ``taskkit serve`` binds only a loopback address.
    api_token: SecretStr | None = None
    #: Largest request body the HTTP service reads, in bytes (larger: 413).
    api_max_body_bytes: int = Field(1_000_000, ge=1024)
    #: Origins allowed to call the HTTP service from a browser (comma-separated). Empty: CORS off.
    api_cors_origins: str = ""
    #: The external predictor ``POST /predict`` calls first (its ``/predict`` endpoint); unset:
    #: the latest completed local model answers every request.
    predictor_url: str | None = None
    #: Port on which every worker serves Prometheus ``/metrics`` (all its pool processes in one
    #: answer). None: workers serve none (``taskkit serve`` still answers ``/metrics``).
    metrics_port: int | None = Field(None, ge=0, le=65535)
    #: Directory of prometheus_client's multiprocess files; default ``home / "metrics"``. A
    #: worker empties it at start.
    metrics_dir: Path | None = None
    #: ``text`` (one line per record) or ``json`` (one JSON object per record, with ``task``,
    #: ``task_id``, ``run_id``, ``attempt``, ``layer`` as fields) for taskkit's log records.
    log_format: Literal["text", "json"] = "text"
    #: One log record per retry (inner and outer) of a taskkit task or recovery primitive.
    log_retry_attempts: bool = True
    #: One log record per circuit-breaker state change.
    log_circuit_state_changes: bool = True
    #: A breaker that opens calls the alert notifiers (an ERROR log record, and a POST to
    #: ``alert_webhook_url`` when set).
    alert_on_circuit_open: bool = True
    #: URL the alert notifier POSTs a JSON message to (Slack-style ``{"text": ...}``). Unset: no
    #: webhook. Treated as a secret (its path often holds a token).
    alert_webhook_url: SecretStr | None = None
    #: OpenTelemetry spans per task attempt when ``opentelemetry-api`` is installed
    #: (``taskkit[otel]``); they go wherever the process's tracer provider exports them.
    tracing: bool = True

    @field_validator("home", "checkpoint_dir")
    @classmethod
    def _absolute_home(cls, value: Path | str) -> Path | str:
        return value if isinstance(value, str) else value.expanduser().absolute()

    @field_validator("checkpoint_dir", mode="before")
    @classmethod
    def _folder_or_url(cls, value: object) -> object:
        # A URL with a scheme is object storage (kept as given); anything else is a folder.
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("file://"):
                return Path(url2pathname(urlsplit(value).path))
            if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]+://\S+", value):
                return value
            return Path(value)
        return value

    @field_validator("metrics_dir", "metrics_port", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("metrics_dir")
    @classmethod
    def _absolute_metrics_dir(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().absolute()

    @field_validator("secret_key_file", mode="before")
    @classmethod
    def _no_empty_path(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("secret_key_file")
    @classmethod
    def _absolute_key_file(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().absolute()

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr() and str() end up in logs and tracebacks: never with a URL's password
        for name, value in super().__repr_args__():
            masked = name in _URL_FIELDS and isinstance(value, str) and value
            yield name, mask_password(value) if masked else value

    @field_validator("secret_key", "secret_keys_old", "api_token", "alert_webhook_url")
    @classmethod
    def _no_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        # TASKKIT_SECRET_KEY= (set but empty) must not sign with an empty key.
        return value if value is not None and value.get_secret_value() else None

    @field_validator("database_url")
    @classmethod
    def _parseable_url(cls, value: str) -> str:
        value = value.strip()
        if value:
            try:
                make_url(value)
            except ArgumentError as exc:
                # The URL itself may hold a password: name the problem, not the value.
                raise ValueError(
                    "not a database URL (expected dialect+driver://user@host:port/name, "
                    "for example postgresql+psycopg://app@db:5432/app or sqlite:///path.db)"
                ) from exc
        return value

    @field_validator("broker_url", "result_backend", "lease_url")
    @classmethod
    def _url_with_scheme(cls, value: str) -> str:
        value = value.strip()
        if value and "://" not in value:
            # Celery would read a bare word as a transport alias and fail much later.
            raise ValueError("not a URL (expected scheme://..., for example redis://host:6379/0)")
        return value

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        # frozen: fields are set through __dict__ once, while the instance is being built
        if not self.database_url:
            self.__dict__["database_url"] = f"sqlite:///{self.home / 'taskkit.db'}"
        if "checkpoint_dir" not in self.model_fields_set:
            # under home (resolved like it), never a shared /tmp
            self.__dict__["checkpoint_dir"] = self.home / "checkpoints"
        if not self.broker_url:
            # taskkit's own SQLite transport (taskkit.broker): it redelivers the messages of a
            # killed worker. Not broker.db: kombu's SQLAlchemy tables there are incompatible.
            self.__dict__["broker_url"] = f"taskkit+sqlite:///{self.home / 'queue.db'}"
        if not self.result_backend:
            self.__dict__["result_backend"] = (
                self.broker_url
                if self.broker_uses_redis
                else f"db+sqlite:///{self.home / 'results.db'}"
            )
        if not self.lease_url:
            # Leases must be shared by every worker: the Redis broker, else a Redis result
            # backend (a RabbitMQ fleet with Redis results), else lock files on this one host.
            shared = [u for u in (self.broker_url, self.result_backend) if _is_redis(u)]
            self.__dict__["lease_url"] = shared[0] if shared else (self.home / "leases").as_uri()
        return self

    def signing_keys(self) -> KeyRing:
        """The keys that sign and verify checkpoints and stored models (``KeyRing``).

        ``secret_key``, else ``secret_key_file``, else the key taskkit makes once under
        ``home``; then ``secret_keys_old``. A key shorter than 16 bytes, or both a key and a
        key file, is a ``ConfigurationError`` naming the variable (never showing the key).
        The keys are read once per combination of these settings in a process (a checkpoint
        store, a sealed model and a load each need them): restart workers to rotate.

        Example::

            ring = get_settings().signing_keys()
        """
        return _signing_keys(self.secret_key, self.secret_key_file, self.home, self.secret_keys_old)

    @property
    def broker_uses_redis(self) -> bool:
        """Whether the broker is Redis (``redis://``, ``rediss://``, ``sentinel://``)."""
        return _scheme(self.broker_url) in {"redis", "rediss", "sentinel", "redis+socket"}

    @property
    def embedded_broker(self) -> bool:
        """Whether the broker is an SQLite file on this host (nothing else running).

        True for taskkit's own ``taskkit+sqlite://`` (the default) and for kombu's
        ``sqla+sqlite://``, which still works but never redelivers a killed worker's messages.
        """
        return self.broker_url.startswith(("taskkit+sqlite://", "sqla+sqlite://"))


@functools.lru_cache(maxsize=8)
def _signing_keys(
    secret_key: SecretStr | None,
    secret_key_file: Path | None,
    home: Path,
    secret_keys_old: SecretStr | None,
) -> KeyRing:
    if secret_key is not None and secret_key_file is not None:
        raise ConfigurationError(
            f"{ENV_PREFIX}SECRET_KEY and {ENV_PREFIX}SECRET_KEY_FILE are both set: set one"
        )
    if secret_key is not None:
        source = f"{ENV_PREFIX}SECRET_KEY"
        current = check_key(secret_key.get_secret_value().encode(), source)
    elif secret_key_file is not None:
        source = f"{ENV_PREFIX}SECRET_KEY_FILE"
        try:
            current = read_key_file(secret_key_file, source)
        except FileNotFoundError:
            raise ConfigurationError(
                f"{source}: the key file {str(secret_key_file)!r} does not exist"
            ) from None
    else:
        source = f"the key made in {home}"
        current = home_key(home)
    old = []
    if secret_keys_old is not None:
        for text in secret_keys_old.get_secret_value().split(","):
            if text.strip():
                old.append(check_key(text.strip().encode(), f"{ENV_PREFIX}SECRET_KEYS_OLD"))
    return KeyRing((current, *old), source)


_URL_FIELDS = frozenset(
    {"database_url", "broker_url", "result_backend", "lease_url", "predictor_url", "checkpoint_dir"}
)


def _scheme(url: str) -> str:
    return url.split("://", 1)[0]


def _is_redis(url: str) -> bool:
    return _scheme(url) in {"redis", "rediss"}


def load_settings(**overrides: object) -> Settings:
    """``Settings`` from the environment (and ``overrides``); a bad value is a clear error."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{'_'.join(str(p) for p in error['loc']).upper()}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigurationError(f"invalid taskkit settings: {problems}") from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use and then cached.

    Example::

        engine_url = get_settings().database_url
    """
    return load_settings()


def reset_settings() -> None:
    """Forget the cached settings, so the next ``get_settings()`` reads the environment again."""
    get_settings.cache_clear()
