"""Signing keys: checked, read from a file, or made once under ``TASKKIT_HOME``; a ``KeyRing``.

Checkpoints and stored models are always signed (HMAC-SHA256). The key comes from
``TASKKIT_SECRET_KEY``, else ``TASKKIT_SECRET_KEY_FILE``, else a random key taskkit makes once
in ``$TASKKIT_HOME/secret.key`` (mode 0600; created atomically, so processes racing to make
it agree on one). Older keys (``TASKKIT_SECRET_KEYS_OLD``) still verify; the first key signs.
The decisions are in ``docs/security.md``.

Nothing here ever puts a key into a message, a repr or a log line.

Example::

    ring = KeyRing((check_key(b"a-key-of-at-least-16-bytes", "secret_key"),), "secret_key=")
    signature = ring.sign(b"message")
    ring.verify(b"message", signature)   # True
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from taskkit._utils import fsync_dir
from taskkit.errors import ConfigurationError

__all__ = ["KEY_FILE_NAME", "MIN_KEY_BYTES", "KeyRing", "check_key", "home_key", "read_key_file"]

#: Shortest key accepted (HMAC-SHA256 keys should have at least 128 bits).
MIN_KEY_BYTES = 16
#: The key taskkit makes when none is configured, under ``TASKKIT_HOME``.
KEY_FILE_NAME = "secret.key"
_MAKE_A_KEY = "python -c 'import secrets; print(secrets.token_hex(32))'"


@dataclass(frozen=True, repr=False)
class KeyRing:
    """Accepted keys, newest first: ``keys[0]`` signs, every one of them verifies.

    ``source`` says where the signing key came from (never the key itself).
    """

    keys: tuple[bytes, ...]
    source: str

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigurationError("a key ring needs at least one key")

    def __repr__(self) -> str:
        return f"KeyRing({len(self.keys)} key(s), signing key from {self.source})"

    def sign(self, message: bytes) -> str:
        """HMAC-SHA256 of ``message`` with the signing key, as hex."""
        return hmac.new(self.keys[0], message, hashlib.sha256).hexdigest()

    def verify(self, message: bytes, signature: str) -> bool:
        """Whether ``signature`` is the HMAC-SHA256 of ``message`` under any accepted key."""
        found = False
        for key in self.keys:  # no early exit: the time taken does not say which key matched
            expected = hmac.new(key, message, hashlib.sha256).hexdigest()
            found |= hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))
        return found


def check_key(key: bytes, setting: str) -> bytes:
    """``key`` if it is long enough; else a ``ConfigurationError`` naming ``setting`` (and the
    key's length, never the key)."""
    if len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(
            f"{setting} is {len(key)} bytes long; a signing key needs at least {MIN_KEY_BYTES} "
            f"bytes (make one with: {_MAKE_A_KEY})"
        )
    return key


def read_key_file(
    path: Path, setting: str, *, follow_symlinks: bool = True, private: bool = False
) -> bytes:
    """The key in ``path`` (surrounding whitespace stripped), checked by ``check_key``.

    A missing or unreadable file is a ``ConfigurationError`` naming ``setting`` and the path.
    ``private``: the file must belong to this process's user and be readable by nobody else
    (the key taskkit made itself): whoever could plant or read it could sign checkpoints.
    """
    flags = os.O_RDONLY | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
        try:
            if private:
                _check_private(os.fstat(fd), path, setting)
            data = os.read(fd, 64 * 1024)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigurationError(
            f"{setting}: cannot read the key file {str(path)!r} ({exc.strerror or exc})"
        ) from None
    return check_key(data.strip(), f"{setting} ({path})")


def _check_private(stat: os.stat_result, path: Path, setting: str) -> None:
    if os.name == "nt":  # no POSIX owner and mode bits to check
        return
    if stat.st_uid != os.geteuid() or stat.st_mode & 0o077:
        raise ConfigurationError(
            f"{setting}: the key file {str(path)!r} must belong to this user and be readable by "
            f"nobody else (it is mode {stat.st_mode & 0o777:o}, owner uid {stat.st_uid}); "
            "remove it to have a new key made, or set TASKKIT_SECRET_KEY_FILE"
        )


def home_key(home: Path) -> bytes:
    """The key in ``home / "secret.key"``, made (32 random bytes, as hex) if there is none.

    The new file is written in full to a temp file (mode 0600, ``O_EXCL``), fsynced, then
    hard-linked to its name: the link fails if another process got there first, and then its
    key is used. So processes racing agree on one key, and nobody ever reads half a key.
    """
    path = home / KEY_FILE_NAME
    setting = "the key taskkit made in TASKKIT_HOME"
    try:
        return read_key_file(path, setting, follow_symlinks=False, private=True)
    except FileNotFoundError:
        pass
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        temp = home / f".{KEY_FILE_NAME}.{os.getpid()}.{secrets.token_hex(6)}.new"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            try:
                os.write(fd, secrets.token_hex(32).encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):  # another process made it first:
                os.link(temp, path)  # its key is the key
        finally:
            temp.unlink(missing_ok=True)
        fsync_dir(home)
    except OSError as exc:
        raise ConfigurationError(
            f"no signing key is configured and taskkit cannot make one in {str(home)!r} "
            f"({exc.strerror or exc}): set TASKKIT_SECRET_KEY or TASKKIT_SECRET_KEY_FILE, or "
            "make TASKKIT_HOME writable"
        ) from None
    return read_key_file(path, setting, follow_symlinks=False, private=True)
