"""``CheckpointStorage`` (where checkpoints live) and ``DirectoryStorage`` (files)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
import stat
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from taskkit._utils import fsync_dir
from taskkit.checkpoint._codec import (
    _THREAD_MIN,
    DIGEST,
    Buffer,
    Hashed,
    StreamDigest,
    writable_buffer,
)
from taskkit.checkpoint._info import CheckpointInfo, validate_run_id
from taskkit.errors import CheckpointCorrupt, CheckpointError, CheckpointWarning, ConfigurationError

_flock: Callable[[int, int], None] | None
try:
    import fcntl

    _flock, _LOCK_EX, _LOCK_NB = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_NB
except ImportError:  # pragma: no cover - Windows: no flock; writers are told apart by age only
    _flock, _LOCK_EX, _LOCK_NB = None, 0, 0

__all__ = ["CheckpointStorage", "DirectoryStorage"]


@runtime_checkable
class CheckpointStorage(Protocol):
    """Where a ``CheckpointStore`` keeps checkpoints: bytes and manifests, nothing more.

    A storage checks nothing and unpickles nothing; ``CheckpointStore`` verifies sizes,
    checksums and signatures. What a storage must guarantee:

    - ``write`` is all or nothing: a checkpoint is listed by ``infos`` only once its data is
      completely and durably stored, and a failed or interrupted write leaves the other
      checkpoints as they were. ``manifest()`` is called once, after all of ``data`` has been
      handed over (it may wait for the checksum, which is computed while the data is written);
      the storage stores what it returns as the manifest. Writing a step that exists replaces it.
    - ``infos`` lists the run's complete checkpoints, oldest step first.
    - ``read`` returns the stored bytes, or raises ``FileNotFoundError`` when there is no data
      for that step. Return a writable buffer (a ``bytearray``) if you can: numpy arrays are
      loaded as views of it (read-only bytes are copied into one first, so arrays are writable).

    A storage that keeps everything in memory (``write`` is trivially atomic there).

    Example::

        class MemoryStorage:
            def __init__(self):
                self.data, self.manifests = {}, {}

            def write(self, run_id, step, data, manifest):
                blob = b"".join(data)
                self.manifests[run_id, step] = manifest()
                self.data[run_id, step] = blob

            def infos(self, run_id):
                found = [i for (r, _), i in self.manifests.items() if r == run_id]
                return sorted(found, key=lambda i: i.step)

            def read(self, run_id, step):
                try:
                    return bytearray(self.data[run_id, step])
                except KeyError:
                    raise FileNotFoundError(step) from None

            def delete(self, run_id, step):
                self.manifests.pop((run_id, step), None)
                self.data.pop((run_id, step), None)

            def runs(self):
                return sorted({r for r, _ in self.manifests})

            def remove_orphans(self, run_id):
                return 0

        store = CheckpointStore("exp-1", storage=MemoryStorage())
    """

    def write(
        self,
        run_id: str,
        step: int,
        data: Sequence[Buffer],
        manifest: Callable[[], CheckpointInfo],
    ) -> None:
        """Store ``data`` (the concatenation of the buffers), then ``manifest()``, atomically."""
        ...

    def infos(self, run_id: str) -> list[CheckpointInfo]:
        """Manifests of the run's complete checkpoints, oldest step first."""
        ...

    def read(self, run_id: str, step: int) -> Buffer:
        """The stored data of a step; ``FileNotFoundError`` when there is none."""
        ...

    def delete(self, run_id: str, step: int) -> None:
        """Delete a step's checkpoint (manifest first); nothing happens when it does not exist."""
        ...

    def runs(self) -> list[str]:
        """Run ids that have something stored, sorted."""
        ...

    def remove_orphans(self, run_id: str) -> int:
        """Remove what crashed writes of the run left behind; return how many items."""
        ...


def _data_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def _manifest_name(step: int) -> str:
    return f"step-{step:08d}.json"


_STORED = re.compile(r"step-(\d+)\.(ckpt|json)")
# A temp file: .<final name>~<host>~<pid>~<token>.tmp. Host and pid are for people reading the
# folder; whether the writer is alive is told by its lock file (below), never by the pid, which
# means nothing in another PID namespace (containers sharing a volume and a host name).
_TEMP = re.compile(
    r"\.step-(?P<step>\d+)\.(?:ckpt|json)~(?P<host>[^~]*)~(?P<pid>\d+)~(?P<token>\w+)\.tmp"
)
# A writer's lock file: .step-<step>~<host>~<pid>~<token>.lock, flock()ed by the writer from
# before its first temp file exists until after its last one is gone; the OS releases the lock
# when the writer dies, however it dies.
_LOCK = re.compile(r"\.step-(?P<step>\d+)~(?P<host>[^~]*)~(?P<pid>\d+)~(?P<token>\w+)\.lock")
_HOST = re.sub(r"[~/\\\s]", "_", socket.gethostname()) or "localhost"
# Without flock (Windows), a temp file is an orphan once it has not changed for this long.
_UNLOCKED_GRACE = 3600.0
# Bytes read per readinto when loading: small enough that the hashing thread finds each piece
# still in the CPU cache (L3) and that the last piece, hashed after the read, is a few ms,
# large enough that reading in pieces costs little: 1 MiB pieces were measured at ~0.65x of
# one readinto of the whole file, 8 MiB at 0.8-0.9x (page cache, 100 MB, benchmarks/
# bench_checkpoint.py's machine).
_READ_STEP = 8 << 20
# Largest single os.write: some platforms refuse writes of 2 GiB or more.
_MAX_WRITE = 1 << 30
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_BINARY = getattr(os, "O_BINARY", 0)


class DirectoryStorage:
    """Checkpoints as files: ``<root>/<run_id>/step-00000042.ckpt`` (data) and ``.json``.

    Each file is written durably and atomically: into a temp file in the same directory,
    ``fsync``, ``os.replace`` onto its name, ``fsync`` of the directory; data first, the
    manifest last, so a crash at any point leaves either the whole checkpoint or none (plus
    temp files or a data file without manifest, which ``remove_orphans`` deletes).

    Hygiene: folders are created ``0700`` and files ``0600``; a run folder, a data file or a
    manifest that is a symbolic link is refused, never followed (``O_NOFOLLOW``); a manifest
    whose step differs from its file name is skipped with a ``CheckpointWarning``. A writer holds
    an ``flock`` on a lock file of its own for as long as its temp files exist, and
    ``remove_orphans`` removes only taskkit's own temp files whose writer's lock is free (the OS
    frees it when the writer dies, in any container), so a store opened by a CLI while a worker
    writes does not delete the worker's temp files. The folder itself may be a symbolic link.

    Example::

        storage = DirectoryStorage("/var/lib/ml/checkpoints")
        store = CheckpointStore("exp-1", storage=storage)
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        #: The directory under which each run has a directory of its own.
        self.root = Path(root).expanduser().absolute()
        _check_root(self.root)

    def __repr__(self) -> str:
        return f"DirectoryStorage({str(self.root)!r})"

    def run_dir(self, run_id: str) -> Path:
        """The directory of a run (which may not exist yet)."""
        return self.root / validate_run_id(run_id)

    def _open_run_dir(self, run_id: str) -> int | None:
        """An fd of the run's directory (None when it does not exist); a symlink is refused."""
        directory = self.run_dir(run_id)
        try:
            return os.open(directory, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            _refuse_run_dir(directory, run_id, exc)
            raise

    # -- writing --------------------------------------------------------------------------

    def write(
        self,
        run_id: str,
        step: int,
        data: Sequence[Buffer],
        manifest: Callable[[], CheckpointInfo],
    ) -> None:
        """Write data, then manifest, each via temp file + fsync + rename + directory fsync."""
        directory = self.run_dir(run_id)
        _check_root(self.root)
        for _ in range(2):  # before creating it (a dangling link) and after (a link to a folder)
            fd = self._open_run_dir(run_id)  # refuses a symlinked run folder
            if fd is not None:
                os.close(fd)
                break
            _makedirs_durably(directory)
        data_path = directory / _data_name(step)
        manifest_path = directory / _manifest_name(step)
        if _lexists(manifest_path) or _lexists(data_path):
            # Replacing a step: the old manifest goes first, so no manifest ever describes
            # data other than its own, even after a crash in between.
            _unlink(manifest_path)
            _unlink(data_path)
            fsync_dir(directory)
        token = secrets.token_hex(6)
        lock = _hold_lock(directory, step, token)
        temp_data: Path | None = None
        temp_manifest: Path | None = None
        data_placed = False
        try:
            temp_data = _write_temp(directory, data_path.name, token, data)
            info = manifest()
            temp_manifest = _write_temp(directory, manifest_path.name, token, [info.to_json()])
            os.replace(temp_data, data_path)
            temp_data, data_placed = None, True
            fsync_dir(directory)  # the data's name is durable before the manifest names it
            os.replace(temp_manifest, manifest_path)
            temp_manifest, data_placed = None, False
            fsync_dir(directory)
        except BaseException:
            for path in (temp_data, temp_manifest):
                if path is not None:
                    _unlink(path)
            if data_placed:
                _unlink(data_path)  # its manifest was never written
            raise
        finally:
            _release_lock(*lock)

    # -- reading --------------------------------------------------------------------------

    def infos(self, run_id: str) -> list[CheckpointInfo]:
        """The run's manifests, oldest step first; an unreadable one, a symbolic link, or one
        whose step is not its file name's, is skipped with a warning."""
        dir_fd = self._open_run_dir(run_id)
        if dir_fd is None:
            return []
        directory = self.run_dir(run_id)
        found = []
        try:
            for name in os.listdir(dir_fd):
                match = _STORED.fullmatch(name)
                if match is None or match[2] != "json":
                    continue
                path = directory / name
                try:
                    text = _read_file(name, dir_fd)
                except FileNotFoundError:
                    continue  # deleted since the listing
                except OSError as exc:
                    problem = (
                        "is a symbolic link, not followed"
                        if exc.errno == errno.ELOOP
                        else f"could not be read ({exc.strerror})"
                    )
                    _warn(f"checkpoint manifest {path} {problem}; ignored")
                    continue
                try:
                    info = CheckpointInfo.from_json(text)
                except ValueError as exc:
                    # Manifests are replaced atomically, so this is disk damage or a hand edit.
                    _warn(f"checkpoint manifest {path} is unreadable, ignored: {exc}")
                    continue
                if info.step != int(match[1]):
                    _warn(
                        f"checkpoint manifest {path} describes step {info.step}, not the step "
                        f"of its name (copied or renamed?); ignored"
                    )
                    continue
                found.append(info)
        finally:
            os.close(dir_fd)
        return sorted(found, key=lambda info: info.step)

    def read(self, run_id: str, step: int) -> Buffer:
        """The data file's bytes, read into one writable buffer; ``FileNotFoundError`` if none,
        ``CheckpointCorrupt`` if it is a symbolic link."""
        return self._read(run_id, step, None)

    def read_hashed(self, run_id: str, step: int, algorithm: str = DIGEST) -> Hashed:
        """``read``, and the digest (``algorithm``: BLAKE3 unless the manifest names another)
        of the bytes, hashed on a second thread while the next piece is read (as ``write``
        hashes while writing): about the longer of reading and hashing, not their sum."""
        fd, size = self._open_data(run_id, step)
        digest = StreamDigest(threaded=size >= _THREAD_MIN, algorithm=algorithm)
        try:
            data = self._read_fd(fd, size, digest)
        finally:
            digest.close()
        return Hashed(data, digest.hexdigest(), algorithm)

    def _read(self, run_id: str, step: int, digest: StreamDigest | None) -> Buffer:
        fd, size = self._open_data(run_id, step)
        return self._read_fd(fd, size, digest)

    def _open_data(self, run_id: str, step: int) -> tuple[int, int]:
        """An fd of the step's data file (never a symbolic link) and its size."""
        dir_fd = self._open_run_dir(run_id)
        name = _data_name(step)
        if dir_fd is None:
            raise FileNotFoundError(errno.ENOENT, "no checkpoint data", str(self.run_dir(run_id)))
        try:
            try:
                fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _BINARY, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise CheckpointCorrupt(
                    "its data file is a symbolic link; refusing to follow it", run_id, step
                ) from exc
        finally:
            os.close(dir_fd)
        try:
            return fd, os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _read_fd(fd: int, size: int, digest: StreamDigest | None) -> Buffer:
        """Read ``fd`` (closed after) into one preallocated buffer, ``_READ_STEP`` bytes at a
        time, each piece handed to ``digest`` once it is in."""
        with open(fd, "rb", buffering=0) as file:
            view = writable_buffer(size)
            done = 0
            while done < size:
                n = file.readinto(view[done : min(size, done + _READ_STEP)])
                if not n:
                    break
                if digest is not None:
                    digest.update(view[done : done + n])
                done += n
        if done < size:  # shrank while being read: return what is there, the checksum decides
            return view[:done]
        return view

    # -- deleting -------------------------------------------------------------------------

    def delete(self, run_id: str, step: int) -> None:
        """Delete the manifest, then the data; the run's directory too once it is empty."""
        dir_fd = self._open_run_dir(run_id)  # refuses a symlinked run folder
        if dir_fd is None:
            return
        os.close(dir_fd)
        directory = self.run_dir(run_id)
        removed = _unlink(directory / _manifest_name(step))
        removed = _unlink(directory / _data_name(step)) or removed
        if removed:
            fsync_dir(directory)
        with contextlib.suppress(OSError):
            directory.rmdir()  # only succeeds when nothing is left

    def runs(self) -> list[str]:
        """Names of the run directories under ``root`` (symbolic links are not runs)."""
        try:
            entries = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(
            e.name for e in entries if e.is_dir(follow_symlinks=False) and _is_run_id(e.name)
        )

    def remove_orphans(self, run_id: str) -> int:
        """Delete taskkit's temp files whose writer is gone, and data files without a manifest;
        return the count. Files of other names are never touched.

        A writer is gone when its lock file is missing or can be locked (the OS released it).
        A data file without a manifest is kept while a live writer's temp files for its step
        exist (it is between its two renames).
        """
        dir_fd = self._open_run_dir(run_id)  # refuses a symlinked run folder
        if dir_fd is None:
            return 0
        os.close(dir_fd)
        directory = self.run_dir(run_id)
        names = os.listdir(directory)
        writers: dict[str, list[str]] = {}  # token -> its temp and lock files
        for name in names:
            match = _TEMP.fullmatch(name) or _LOCK.fullmatch(name)
            if match is not None:
                writers.setdefault(match["token"], []).append(name)
        removed = 0
        for files in writers.values():
            locks = [name for name in files if _LOCK.fullmatch(name)]
            dead, fd = _lock_if_dead(directory, locks[0] if locks else None, files[0])
            if not dead:
                continue
            try:
                # Temp files first, the lock file last, while holding it.
                for name in sorted(files, key=lambda n: n in locks):
                    removed += _unlink(directory / name)
            finally:
                if fd is not None:
                    os.close(fd)
        manifests: set[int] = set()
        data: set[int] = set()
        for name in names:
            match = _STORED.fullmatch(name)
            if match is not None:
                (manifests if match[2] == "json" else data).add(int(match[1]))
        for step in sorted(data - manifests):
            # Look for a live writer first and for the manifest second: a writer renames its
            # temp manifest onto the manifest, so one of the two is always there to be seen.
            if self._live_writer(directory, step) or _lexists(directory / _manifest_name(step)):
                continue
            removed += _unlink(directory / _data_name(step))
        if removed:
            fsync_dir(directory)
        return removed

    @staticmethod
    def _live_writer(directory: Path, step: int) -> bool:
        for name in os.listdir(directory):
            match = _LOCK.fullmatch(name)
            if match and int(match["step"]) == step:
                dead, fd = _lock_if_dead(directory, name, name)
                if fd is not None:
                    os.close(fd)
                if not dead:
                    return True
        return False


def read_hashed(
    storage: CheckpointStorage, run_id: str, step: int, algorithm: str = DIGEST
) -> Buffer | Hashed:
    """The step's data, with its digest of ``algorithm`` (the manifest's) when the storage
    hashes while reading (``read_hashed``); a storage without one is only read (``unseal``
    hashes it then)."""
    method = getattr(storage, "read_hashed", None)
    if callable(method):
        result: Buffer | Hashed = method(run_id, step, algorithm)
        return result
    return storage.read(run_id, step)


def _check_root(root: Path) -> None:
    """``ConfigurationError`` naming the path when ``root`` is, or lies under, a file."""
    path = root
    while True:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            if path.parent == path:
                return
            path = path.parent
            continue
        except NotADirectoryError:
            path = path.parent
            continue
        except OSError:
            return  # no permission to look: the first write says what is wrong
        if stat.S_ISDIR(mode):
            return
        raise ConfigurationError(
            f"checkpoint folder {str(root)!r} cannot be used: {str(path)!r} is not a directory "
            "(set TASKKIT_CHECKPOINT_DIR to a folder)"
        )


def _refuse_run_dir(directory: Path, run_id: str, exc: OSError) -> None:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        try:
            is_link = stat.S_ISLNK(os.lstat(directory).st_mode)
        except OSError:
            is_link = False
        what = "is a symbolic link" if is_link else "is not a directory"
        raise CheckpointError(
            f"its folder {str(directory)!r} {what}; refusing to follow or use it", run_id
        ) from exc


def _warn(message: str) -> None:
    warnings.warn(CheckpointWarning(message), stacklevel=3)


def _read_file(name: str, dir_fd: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _BINARY, dir_fd=dir_fd)
    with open(fd, "rb") as file:
        return file.read()


def _is_run_id(name: str) -> bool:
    try:
        validate_run_id(name)
    except ValueError:
        return False
    return True


def _lock_name(step: int, token: str) -> str:
    return f".step-{step:08d}~{_HOST}~{os.getpid()}~{token}.lock"


def _hold_lock(directory: Path, step: int, token: str) -> tuple[int, Path]:
    """Create and ``flock`` this write's lock file; held until ``_release_lock``.

    A cleaner may delete a lock file it could lock (between our open and our flock): then the
    file we hold is no longer the one named, and we make it again.
    """
    path = directory / _lock_name(step, token)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
        try:
            if _flock is not None:
                _flock(fd, _LOCK_EX)
            held = os.fstat(fd)
            try:
                named = os.lstat(path)
            except FileNotFoundError:
                named = None
        except BaseException:
            os.close(fd)
            raise
        if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
            return fd, path
        os.close(fd)


def _release_lock(fd: int, path: Path) -> None:
    try:
        _unlink(path)  # while still held: no cleaner can think this writer dead before
    finally:
        os.close(fd)


def _lock_if_dead(directory: Path, lock: str | None, temp: str) -> tuple[bool, int | None]:
    """Whether the writer of ``lock`` (its lock file's name; None: there is none) is gone, and
    then its lock, held (an fd to close once its files are deleted).

    No lock file means its writer finished or died: a writer locks before its first temp file
    exists and unlinks the lock after its last one is gone. Without ``flock`` (Windows), a
    writer is taken for gone once ``temp`` has not changed for an hour.
    """
    if _flock is None:
        try:
            age = time.time() - (directory / temp).stat().st_mtime
        except FileNotFoundError:
            return True, None
        return age >= _UNLOCKED_GRACE, None
    if lock is None:
        return True, None
    try:
        fd = os.open(directory / lock, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        return True, None
    except OSError:
        return False, None  # cannot tell: keep
    try:
        _flock(fd, _LOCK_EX | _LOCK_NB)
    except OSError:
        os.close(fd)
        return False, None  # held: the writer lives
    return True, fd


def _write_temp(directory: Path, final_name: str, token: str, chunks: Sequence[Buffer]) -> Path:
    path = directory / f".{final_name}~{_HOST}~{os.getpid()}~{token}.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o600)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            while view:
                written = os.write(fd, view[:_MAX_WRITE])
                view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(path)
        raise
    os.close(fd)
    return path


def _lexists(path: Path) -> bool:
    return os.path.lexists(path)


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _makedirs_durably(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each entry made durable in its parent."""
    missing = []
    path = directory
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            if not path.is_dir():
                raise
        fsync_dir(path.parent)
