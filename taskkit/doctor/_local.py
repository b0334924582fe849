"""Checks of this host: the effective settings and where each came from, ``TASKKIT_HOME``, the
signing key against the newest checkpoint, and the checkpoint storage's room."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from taskkit._utils import did_you_mean, mask_password
from taskkit.config import ENV_PREFIX, Settings
from taskkit.doctor._context import Context, one_line
from taskkit.doctor._model import Check, no_settings

__all__ = [
    "check_checkpoint_storage",
    "check_home",
    "check_secret_key",
    "check_settings",
    "setting_sources",
    "shown_value",
]

#: ``TASKKIT_*`` variables that are not settings but are read by taskkit's commands.
OTHER_VARIABLES = frozenset({"TASKKIT_APP"})
#: Settings that hold URLs (their passwords are masked).
URL_FIELDS = frozenset(
    {"database_url", "broker_url", "result_backend", "lease_url", "predictor_url"}
)
#: Folders shared by every user of a host and cleaned by the system.
SHARED_TEMP = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))


def shown_value(name: str, value: Any) -> Any:
    """A setting as it may be shown: secrets as ``***`` (or null), URL passwords masked."""
    if isinstance(value, SecretStr):
        return "***"
    if value is None:
        return None
    if name in URL_FIELDS:
        return mask_password(str(value))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def setting_sources(settings: Settings) -> dict[str, str]:
    """Where each field of ``settings`` came from: ``env`` (a ``TASKKIT_*`` variable), ``.env``
    (the file in the working directory), ``code`` (given to ``Settings(...)``) or ``default``
    (pydantic-settings' own sources decide what env and ``.env`` hold)."""
    from pydantic_settings import DotEnvSettingsSource, EnvSettingsSource  # noqa: PLC0415

    try:
        from_env = set(EnvSettingsSource(Settings)())
    except Exception:
        from_env = set()
    try:
        from_dotenv = set(DotEnvSettingsSource(Settings)())
    except Exception:
        from_dotenv = set()
    sources = {}
    for name in type(settings).model_fields:
        if name in from_env:
            sources[name] = "env"
        elif name in from_dotenv:
            sources[name] = ".env"
        elif name in settings.model_fields_set:
            sources[name] = "code"
        else:
            sources[name] = "default"
    return sources


def _unknown_variables() -> list[tuple[str, str]]:
    """``TASKKIT_*`` names in the environment (and ``.env``) that are no setting: typos."""
    known = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields} | OTHER_VARIABLES
    names = {k.upper() for k in os.environ if k.upper().startswith(ENV_PREFIX)}
    dotenv = Path(".env")
    if dotenv.is_file():
        try:
            for line in dotenv.read_text(errors="replace").splitlines():
                key = line.strip().removeprefix("export ").split("=", 1)[0].strip().upper()
                if key.startswith(ENV_PREFIX):
                    names.add(key)
        except OSError:
            pass
    return [(name, did_you_mean(name, known)) for name in sorted(names - known)]


def check_settings(ctx: Context) -> Check:
    if ctx.settings is None:
        return Check(
            "settings",
            "error",
            ctx.settings_error or "the settings could not be read",
            "fix the variable named (in the environment or .env); docs/configuration.md lists "
            "every setting",
        )
    sources = setting_sources(ctx.settings)
    values = {
        name: {"value": shown_value(name, getattr(ctx.settings, name)), "source": sources[name]}
        for name in type(ctx.settings).model_fields
    }
    changed = sorted(name for name, source in sources.items() if source != "default")
    details: dict[str, Any] = {"settings": values}
    unknown = _unknown_variables()
    if unknown:
        details["unknown_variables"] = [name for name, _ in unknown]
        return Check(
            "settings",
            "warning",
            "these TASKKIT_ variables are not taskkit settings and are ignored: "
            + ", ".join(name + (f" ({hint[2:]})" if hint else "") for name, hint in unknown),
            "rename or remove them (docs/configuration.md lists every setting)",
            details,
        )
    where = ", ".join(f"{name} ({sources[name]})" for name in changed) or "none"
    return Check(
        "settings",
        "ok",
        f"{len(values)} settings read; not at their defaults: {where}",
        None,
        details,
    )


def _uses_home(settings: Settings) -> list[str]:
    """What lives under ``home`` with these settings."""
    home = str(settings.home)
    used = []
    if settings.embedded_broker:
        used.append("the broker")
    for label, url in (
        ("the database", settings.database_url),
        ("the results", settings.result_backend),
        ("the leases", settings.lease_url),
    ):
        if home in url:
            used.append(label)
    if (
        settings.checkpoint_storage == "directory"
        and isinstance(settings.checkpoint_dir, Path)
        and settings.checkpoint_dir.is_relative_to(settings.home)
    ):
        used.append("the checkpoints")
    if settings.secret_key is None and settings.secret_key_file is None:
        used.append("the signing key")
    return used


def _writable(folder: Path) -> bool:
    """Whether a file can be made in ``folder`` (tried for real: root passes ``os.access``)."""
    probe = folder / f".taskkit-doctor-{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink(missing_ok=True)
    return True


def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_home(ctx: Context) -> Check:
    if ctx.settings is None:
        return no_settings("home")
    settings = ctx.settings
    home = settings.home
    source = setting_sources(settings)["home"]
    how = (
        "TASKKIT_HOME"
        if source in {"env", ".env"}
        else "given in code"
        if source == "code"
        else f"found from the working directory {os.getcwd()}"
    )
    used = _uses_home(settings)
    details: dict[str, Any] = {
        "home": str(home),
        "source": source,
        "exists": home.is_dir(),
        "holds": used,
    }
    if home.exists() and not home.is_dir():
        return Check(
            "home",
            "error",
            f"TASKKIT_HOME {home} ({how}) is not a folder",
            "set TASKKIT_HOME to a folder",
            details,
        )
    folder = home if home.is_dir() else _existing(home)
    if used and not _writable(folder):
        return Check(
            "home",
            "error",
            f"TASKKIT_HOME {home} ({how}) holds {', '.join(used)}, but this user cannot write "
            f"{folder}",
            "make it writable for the workers' user, or set TASKKIT_HOME to a folder that is",
            details,
        )
    shared = [t for t in SHARED_TEMP if home == t or home.is_relative_to(t)]
    if used and shared:
        return Check(
            "home",
            "warning",
            f"TASKKIT_HOME {home} ({how}) is under {shared[0]}, which the system cleans and "
            f"every user shares, and it holds {', '.join(used)}",
            "set TASKKIT_HOME to a folder of the project (the default: .taskkit next to "
            "pyproject.toml)",
            details,
        )
    reason = f"TASKKIT_HOME is {home} ({how})"
    reason += f"; it holds {', '.join(used)}" if used else "; nothing taskkit uses lives there"
    if not home.is_dir():
        reason += " (made at first use)"
    return Check("home", "ok", reason, None, details)


def _key_configured(settings: Settings) -> str | None:
    if settings.secret_key is not None:
        return f"{ENV_PREFIX}SECRET_KEY"
    if settings.secret_key_file is not None:
        return f"{ENV_PREFIX}SECRET_KEY_FILE ({settings.secret_key_file})"
    if (settings.home / "secret.key").exists():
        return f"the key taskkit made in {settings.home / 'secret.key'}"
    return None


class _Verified(Exception):
    """Raised instead of reading the data: the manifest's signature was accepted."""


def _verify(info: Any, run_key: str, keys: Any) -> str | None:
    """None when ``info`` is signed by one of ``keys``; else why not (nothing is unpickled:
    ``unseal`` checks the signature before it asks for the data, and the data is never read)."""
    from taskkit.checkpoint import unseal  # noqa: PLC0415
    from taskkit.errors import CheckpointTampered  # noqa: PLC0415

    def stop() -> bytes:
        raise _Verified

    try:
        unseal(info, stop, run_id=run_key, kind="checkpoint", keys=keys)
    except _Verified:
        return None
    except CheckpointTampered as exc:
        return exc.reason if hasattr(exc, "reason") else str(exc)
    return None


def check_secret_key(ctx: Context) -> Check:
    if ctx.settings is None:
        return no_settings("secret_key")
    settings = ctx.settings
    source = _key_configured(settings)
    newest = ctx.newest_checkpoint()
    details: dict[str, Any] = {"key_source": source, "checkpoints_seen_in_runs": newest.runs}
    where = (
        f"run {newest.run_key} step {newest.info.step} ({newest.info.created_at})"
        if newest.info is not None
        else None
    )
    details["newest_checkpoint"] = where
    fleet = not settings.embedded_broker
    if source is None:
        if newest.info is not None:
            return Check(
                "secret_key",
                "error",
                f"no signing key on this host, but checkpoints exist (newest: {where}): they "
                "were signed with a key this host does not have, so no worker here can resume "
                "them (a new key would be made at the first save)",
                "set TASKKIT_SECRET_KEY (or TASKKIT_SECRET_KEY_FILE) to the key that signed "
                "them, the same on every host",
                details,
            )
        if fleet:
            return Check(
                "secret_key",
                "warning",
                "no signing key is set: each host makes its own in its TASKKIT_HOME at the first "
                "checkpoint, so a run resumed on another host cannot load its checkpoints",
                "set TASKKIT_SECRET_KEY (at least 16 bytes) to the same value on every host",
                details,
            )
        return Check(
            "secret_key",
            "ok",
            f"no signing key yet: taskkit makes one in {settings.home / 'secret.key'} at the "
            "first checkpoint (one host: the embedded broker)",
            None,
            details,
        )
    try:
        keys = settings.signing_keys()
    except Exception as exc:
        return Check(
            "secret_key",
            "error",
            f"the signing key cannot be used: {one_line(exc)}",
            "fix the key setting named above",
            details,
        )
    if newest.error is not None:
        return Check(
            "secret_key",
            "warning",
            f"the key from {source} is usable, but the checkpoints could not be read to compare: "
            f"{newest.error}",
            "see the checkpoint_storage check",
            details,
        )
    made_here = settings.secret_key is None and settings.secret_key_file is None
    if newest.info is None and fleet and made_here:
        return Check(
            "secret_key",
            "warning",
            f"the signing key is the one taskkit made on this host ({source}): a worker on "
            "another host makes its own, and cannot resume runs checkpointed here",
            "set TASKKIT_SECRET_KEY (or TASKKIT_SECRET_KEY_FILE) to one key on every host",
            details,
        )
    if newest.info is None:
        return Check(
            "secret_key",
            "ok",
            f"the signing key comes from {source}; no checkpoint to compare it with yet",
            None,
            details,
        )
    problem = _verify(newest.info, newest.run_key or "", keys)
    if problem is not None:
        return Check(
            "secret_key",
            "error",
            f"the newest checkpoint ({where}) does not verify with this host's key from "
            f"{source}: {problem}",
            "use the key that signed it on every host (TASKKIT_SECRET_KEY), or list that key in "
            "TASKKIT_SECRET_KEYS_OLD while rotating",
            details,
        )
    if fleet and made_here:
        return Check(
            "secret_key",
            "warning",
            f"the signing key is the one taskkit made on this host ({source}); the newest "
            f"checkpoint ({where}) verifies with it, but a worker on another host made its own, "
            "so it cannot resume runs checkpointed here",
            "set TASKKIT_SECRET_KEY (or TASKKIT_SECRET_KEY_FILE) to this key on every host",
            details,
        )
    return Check(
        "secret_key",
        "ok",
        f"the signing key comes from {source}, and the newest checkpoint ({where}) verifies "
        "with it",
        None,
        details,
    )


def check_checkpoint_storage(ctx: Context) -> Check:
    if ctx.settings is None:
        return no_settings("checkpoint_storage")
    settings = ctx.settings
    newest = ctx.newest_checkpoint()
    last = int(newest.info.size) if newest.info is not None else None
    details: dict[str, Any] = {"storage": settings.checkpoint_storage, "last_size_bytes": last}
    if settings.checkpoint_storage == "database":
        reason = "checkpoints are stored in the database (see the database check for its state)"
        if newest.error is not None:
            return Check(
                "checkpoint_storage",
                "error",
                f"the checkpoints in the database cannot be read: {newest.error}",
                "see the database check",
                details,
            )
        return Check("checkpoint_storage", "ok", reason, None, details)
    folder = settings.checkpoint_dir
    details["folder"] = str(folder)
    if isinstance(folder, str):  # object storage (s3://, gs://): nothing local to check
        if newest.error is not None:
            return Check(
                "checkpoint_storage",
                "error",
                f"the checkpoints at {folder} cannot be read: {newest.error}",
                "check the URL, the credentials and that the bucket exists",
                details,
            )
        return Check(
            "checkpoint_storage", "ok", f"checkpoints are stored at {folder}", None, details
        )
    existing = _existing(folder)
    if existing.exists() and not existing.is_dir():
        return Check(
            "checkpoint_storage",
            "error",
            f"the checkpoint folder {folder} cannot be made: {existing} is not a folder",
            "set TASKKIT_CHECKPOINT_DIR to a folder",
            details,
        )
    if not _writable(existing):
        return Check(
            "checkpoint_storage",
            "error",
            f"this user cannot write the checkpoint folder {existing}",
            "make it writable for the workers' user, or set TASKKIT_CHECKPOINT_DIR",
            details,
        )
    free = shutil.disk_usage(existing).free
    details["free_bytes"] = free
    if newest.error is not None:
        return Check(
            "checkpoint_storage",
            "warning",
            f"the checkpoint folder {folder} is writable, but its checkpoints could not be read: "
            f"{newest.error}",
            "check its permissions",
            details,
        )
    if last is not None and free < last:
        return Check(
            "checkpoint_storage",
            "error",
            f"{_size(free)} free under {folder}, less than the last checkpoint ({_size(last)}): "
            "the next save fails",
            "free space, or move TASKKIT_CHECKPOINT_DIR to a larger disk",
            details,
        )
    if last is not None and free < 3 * last:
        return Check(
            "checkpoint_storage",
            "warning",
            f"{_size(free)} free under {folder}: room for fewer than 3 checkpoints of the last "
            f"one's size ({_size(last)})",
            "free space, or move TASKKIT_CHECKPOINT_DIR to a larger disk",
            details,
        )
    size = f"; the last checkpoint is {_size(last)}" if last is not None else ""
    return Check(
        "checkpoint_storage",
        "ok",
        f"the checkpoint folder {folder} is writable, {_size(free)} free{size}",
        None,
        details,
    )


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"
