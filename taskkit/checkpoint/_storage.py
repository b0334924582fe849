"""``CheckpointStorage`` (where checkpoints live) and ``DirectoryStorage`` (files)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from taskkit.checkpoint._codec import Buffer, writable_buffer
from taskkit.checkpoint._info import CheckpointInfo, validate_run_id
from taskkit.errors import CheckpointWarning

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
# A temp file: .<final name>~<host>~<pid>~<token>.tmp (the writer, so a cleaner can tell
# whether it is still alive; the token pairs the data and manifest temps of one write).
_TEMP = re.compile(
    r"\.step-(?P<step>\d+)\.(?:ckpt|json)~(?P<host>[^~]*)~(?P<pid>\d+)~(?P<token>\w+)\.tmp"
)
_HOST = re.sub(r"[~/\\\s]", "_", socket.gethostname()) or "localhost"
# Temp files of another host cannot be checked for a live writer: they are orphans once they
# have not changed for this long.
_FOREIGN_GRACE = 3600.0
# Largest single os.write: some platforms refuse writes of 2 GiB or more.
_MAX_WRITE = 1 << 30

# Tokens of the writes in progress in this process (a temp file of this pid with another
# token is left from a failed write of this process).
_active: set[str] = set()
_active_lock = threading.Lock()


class DirectoryStorage:
    """Checkpoints as files: ``<root>/<run_id>/step-00000042.ckpt`` (data) and ``.json``.

    Each file is written durably and atomically: into a temp file in the same directory,
    ``fsync``, ``os.replace`` onto its name, ``fsync`` of the directory; data first, the
    manifest last, so a crash at any point leaves either the whole checkpoint or none (plus
    temp files or a data file without manifest, which ``remove_orphans`` deletes).

    Temp files are named after their writer (host, pid), and ``remove_orphans`` removes only
    those whose writer is gone (a dead pid on this host; unchanged for an hour on another), so
    a store opened by a CLI while a worker writes does not delete the worker's temp files.

    Example::

        storage = DirectoryStorage("/var/lib/ml/checkpoints")
        store = CheckpointStore("exp-1", storage=storage)
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        #: The directory under which each run has a directory of its own.
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"DirectoryStorage({str(self.root)!r})"

    def run_dir(self, run_id: str) -> Path:
        """The directory of a run (which may not exist yet)."""
        return self.root / validate_run_id(run_id)

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
        _makedirs_durably(directory)
        data_path = directory / _data_name(step)
        manifest_path = directory / _manifest_name(step)
        if manifest_path.exists() or data_path.exists():
            # Replacing a step: the old manifest goes first, so no manifest ever describes
            # data other than its own, even after a crash in between.
            _unlink(manifest_path)
            _unlink(data_path)
            _fsync_dir(directory)
        token = secrets.token_hex(6)
        with _active_lock:
            _active.add(token)
        temp_data: Path | None = None
        temp_manifest: Path | None = None
        data_placed = False
        try:
            temp_data = _write_temp(directory, data_path.name, token, data)
            info = manifest()
            temp_manifest = _write_temp(directory, manifest_path.name, token, [info.to_json()])
            os.replace(temp_data, data_path)
            temp_data, data_placed = None, True
            _fsync_dir(directory)  # the data's name is durable before the manifest names it
            os.replace(temp_manifest, manifest_path)
            temp_manifest, data_placed = None, False
            _fsync_dir(directory)
        except BaseException:
            for path in (temp_data, temp_manifest):
                if path is not None:
                    _unlink(path)
            if data_placed:
                _unlink(data_path)  # its manifest was never written
            raise
        finally:
            with _active_lock:
                _active.discard(token)

    # -- reading --------------------------------------------------------------------------

    def infos(self, run_id: str) -> list[CheckpointInfo]:
        """The run's manifests, oldest step first; an unreadable one is skipped with a warning."""
        directory = self.run_dir(run_id)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            match = _STORED.fullmatch(name)
            if match is None or match[2] != "json":
                continue
            path = directory / name
            try:
                text = path.read_bytes()
            except FileNotFoundError:
                continue  # deleted since the listing
            try:
                found.append(CheckpointInfo.from_json(text))
            except ValueError as exc:
                # Manifests are replaced atomically, so this is disk damage or a hand edit.
                warnings.warn(
                    CheckpointWarning(f"checkpoint manifest {path} is unreadable, ignored: {exc}"),
                    stacklevel=2,
                )
        return sorted(found, key=lambda info: info.step)

    def read(self, run_id: str, step: int) -> Buffer:
        """The data file's bytes, read into one writable buffer; ``FileNotFoundError`` if none."""
        path = self.run_dir(run_id) / _data_name(step)
        with open(path, "rb", buffering=0) as file:
            size = os.fstat(file.fileno()).st_size
            view = writable_buffer(size)
            done = 0
            while done < size:
                n = file.readinto(view[done:])
                if not n:
                    break
                done += n
        if done < size:  # shrank while being read: return what is there, the checksum decides
            return view[:done]
        return view

    # -- deleting -------------------------------------------------------------------------

    def delete(self, run_id: str, step: int) -> None:
        """Delete the manifest, then the data; the run's directory too once it is empty."""
        directory = self.run_dir(run_id)
        removed = _unlink(directory / _manifest_name(step))
        removed = _unlink(directory / _data_name(step)) or removed
        if removed:
            _fsync_dir(directory)
        with contextlib.suppress(OSError):
            directory.rmdir()  # only succeeds when nothing is left

    def runs(self) -> list[str]:
        """Names of the run directories under ``root``."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(e.name for e in entries if e.is_dir() and _is_run_id(e.name))

    def remove_orphans(self, run_id: str) -> int:
        """Delete temp files of dead writers and data files without a manifest; return the count.

        A data file without a manifest is kept while a live writer's temp files for its step
        exist (it is between its two renames).
        """
        directory = self.run_dir(run_id)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return 0
        removed = 0
        for name in names:
            if name.endswith(".tmp"):
                match = _TEMP.fullmatch(name)
                if match is None or not _writer_alive(match, directory / name):
                    removed += _unlink(directory / name)
        manifests: set[int] = set()
        data: set[int] = set()
        for name in names:
            match = _STORED.fullmatch(name)
            if match is not None:
                (manifests if match[2] == "json" else data).add(int(match[1]))
        for step in sorted(data - manifests):
            # Look for a live writer first and for the manifest second: a writer renames its
            # temp manifest onto the manifest, so one of the two is always there to be seen.
            if self._live_writer(directory, step) or (directory / _manifest_name(step)).exists():
                continue
            removed += _unlink(directory / _data_name(step))
        if removed:
            _fsync_dir(directory)
        return removed

    @staticmethod
    def _live_writer(directory: Path, step: int) -> bool:
        for name in os.listdir(directory):
            match = _TEMP.fullmatch(name)
            if match and int(match["step"]) == step and _writer_alive(match, directory / name):
                return True
        return False


def _is_run_id(name: str) -> bool:
    try:
        validate_run_id(name)
    except ValueError:
        return False
    return True


def _writer_alive(match: re.Match[str], path: Path) -> bool:
    """Whether the process that is writing this temp file may still be running."""
    pid = int(match["pid"])
    if match["host"] != _HOST:
        try:
            return time.time() - path.stat().st_mtime < _FOREIGN_GRACE
        except FileNotFoundError:
            return False
    if pid == os.getpid():
        with _active_lock:
            return match["token"] in _active
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by another user
    return True


def _write_temp(directory: Path, final_name: str, token: str, chunks: Sequence[Buffer]) -> Path:
    path = directory / f".{final_name}~{_HOST}~{os.getpid()}~{token}.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
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


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened (nor need to be synced) on Windows
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise
        _fsync_dir(path.parent)
