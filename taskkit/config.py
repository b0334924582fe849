"""``Settings``: the one place taskkit's URLs, paths and limits come from.

Every field is read from a ``TASKKIT_``-prefixed environment variable (or a ``.env`` file in
the working directory); nothing else in taskkit reads the environment for these.

==========================  ===============================================  ====================
variable                    meaning                                          default
==========================  ===============================================  ====================
``TASKKIT_HOME``            directory of the embedded defaults               ``./.taskkit``
``TASKKIT_DATABASE_URL``    SQLAlchemy URL; ``postgresql+psycopg://...``     SQLite file
                            in production                                    ``$HOME/taskkit.db``
``TASKKIT_DB_CONNECT_TIMEOUT``  seconds to wait for a new connection         ``10``
``TASKKIT_DB_POOL_SIZE``    connections kept per process (not SQLite)         ``5``
``TASKKIT_DB_MAX_OVERFLOW``  extra connections under load (not SQLite)        ``10``
``TASKKIT_DB_POOL_RECYCLE``  seconds before a pooled connection is replaced    ``1800``
``TASKKIT_SQLITE_BUSY_TIMEOUT``  seconds SQLite waits for a lock               ``30``
==========================  ===============================================  ====================

Decisions: the embedded default lives under the working directory (like ``.git``), never in a
shared ``/tmp``; relative paths are resolved against the working directory when settings are
read, so a worker and a CLI started in the same directory agree. A malformed value raises a
``ConfigurationError`` that names the variable, instead of failing later with a driver error.

Example::

    from taskkit.config import get_settings

    settings = get_settings()      # read once, cached
    print(settings.database_url)   # sqlite:////home/me/project/.taskkit/taskkit.db
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from taskkit.errors import ConfigurationError

__all__ = ["Settings", "get_settings", "load_settings", "reset_settings"]

ENV_PREFIX = "TASKKIT_"


class Settings(BaseSettings):
    """taskkit's settings, from ``TASKKIT_*`` environment variables (see the module docs).

    Build one directly to override fields in code (``Settings(database_url=...)``); use
    ``get_settings()`` for the process-wide, environment-derived one.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", frozen=True
    )

    #: Directory of the embedded defaults (SQLite database; later: broker files, checkpoints).
    home: Path = Path(".taskkit")
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

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().absolute()

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

    @model_validator(mode="after")
    def _embedded_database(self) -> Settings:
        if not self.database_url:
            # frozen: set through __dict__ once, while the instance is being built
            self.__dict__["database_url"] = f"sqlite:///{self.home / 'taskkit.db'}"
        return self


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
