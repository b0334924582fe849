"""``CheckpointStore``: save, verify and load a run's checkpoints; retention; background writes."""

from __future__ import annotations

import builtins
import hmac
import logging
import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from pydantic import SecretStr

from taskkit._keys import KeyRing, check_key
from taskkit._utils import is_control_flow
from taskkit.checkpoint._codec import (
    DIGEST,
    Digest,
    Payload,
    digest_of,
    encode,
    library_versions,
)
from taskkit.checkpoint._database import DatabaseStorage
from taskkit.checkpoint._fsspec import FsspecStorage
from taskkit.checkpoint._info import FORMATS, Checkpoint, CheckpointInfo, plain_metrics
from taskkit.checkpoint._info import validate_run_id as _validate_run_id
from taskkit.checkpoint._seal import sign_info, unseal, verify_info
from taskkit.checkpoint._storage import CheckpointStorage, DirectoryStorage, read_hashed
from taskkit.config import Settings, get_settings
from taskkit.errors import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointWarning,
    ConfigurationError,
    LeaseLost,
)
from taskkit.recovery import events

__all__ = ["CheckpointStore", "storage_from_settings"]

logger = logging.getLogger("taskkit.checkpoint")

#: zlib level of ``compress=True``: joblib's choice; model weights barely compress at any level,
#: so a higher one mostly costs time.
DEFAULT_ZLIB_LEVEL = 3

_RUN_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{7,63}")


def storage_from_settings(settings: Settings | None = None) -> CheckpointStorage:
    """The storage ``TASKKIT_CHECKPOINT_STORAGE`` names: files under ``TASKKIT_CHECKPOINT_DIR``
    (``directory``, the default; an ``s3://``/``gs://`` URL there: ``FsspecStorage``) or
    taskkit's database (``database``).

    Example::

        storage = storage_from_settings()           # from the environment
        storage.runs()                              # ['exp-1', 'exp-2']
    """
    settings = settings or get_settings()
    if settings.checkpoint_storage == "database":
        return DatabaseStorage(settings.database_url)
    if isinstance(settings.checkpoint_dir, str):
        return FsspecStorage(settings.checkpoint_dir)
    return DirectoryStorage(settings.checkpoint_dir)


class CheckpointStore:
    """The checkpoints of one run: ``save`` them durably, ``load_latest`` the newest valid one.

    - **Durable and atomic.** ``save`` returns once the checkpoint is on disk (or committed):
      data, then manifest, each written to a temp file, fsynced, renamed, directory fsynced
      (``DirectoryStorage``), or one transaction (``DatabaseStorage``). A failed save (a full
      disk) leaves the earlier checkpoints as they were, removes its temp files and raises
      ``CheckpointError`` naming the run and step.
    - **Signed, and verified before unpickling.** Every manifest carries an HMAC-SHA256
      signature; loading checks it, then size and digest of the stored bytes (BLAKE3, or
      SHA-256 in manifests written before BLAKE3), before anything is unpickled
      (``taskkit.checkpoint.unseal``). Loading fails closed: an unsigned or
      wrongly signed checkpoint raises ``CheckpointTampered`` (no silent fallback past it);
      ``load_latest`` skips only a corrupt (truncated, missing) newest checkpoint, with a
      ``CheckpointWarning``, and takes the newest valid one.
    - **Retention.** After each durable save the run keeps its ``keep_last`` newest
      checkpoints, its ``keep_best`` newest ones saved with ``is_best=True``, and any step passed
      to ``protect`` (the one the run resumed from); the rest are deleted.
    - **Background writes.** With ``background=True``, ``save`` serialises and checksums the
      state at once (a later change to it cannot leak into the checkpoint) and returns; one
      writer thread stores it. The next ``save``, ``wait``, ``close`` wait for it, and the first
      ``save``/``wait`` after a failed background write raises its error.
    - **Events.** Once a checkpoint is durable (with background writes: when its write ends, on
      the writer thread) a ``CheckpointSaved`` event goes to ``taskkit.recovery.events`` while
      someone listens: the run id as given, step, size in bytes, seconds spent serialising and
      writing, ``is_best``, and ``task`` (the task that trains the run, when known).

    ``None`` arguments come from ``settings`` (default ``get_settings()``): the storage
    (``storage_from_settings``), ``checkpoint_keep_last``, ``checkpoint_keep_best``, and the
    keys (``settings.signing_keys()``: ``TASKKIT_SECRET_KEY``, ``TASKKIT_SECRET_KEY_FILE`` or
    the key taskkit makes once under ``TASKKIT_HOME``, plus ``TASKKIT_SECRET_KEYS_OLD``). A
    ``secret_key`` given here (at least 16 bytes) signs instead, and ``old_keys`` still verify.
    ``compress`` is False, True (zlib level 3) or a zlib level 1-9. Opening a store removes
    what crashed writes of the run left behind.

    Example::

        with CheckpointStore(run_id, keep_last=3) as store:
            checkpoint = store.load_latest()
            start = 0
            if checkpoint is not None:
                model, rng = checkpoint.state["model"], checkpoint.state["rng"]
                start = checkpoint.info.step + 1
                store.protect(checkpoint.info.step)
            for epoch in range(start, epochs):
                loss = train_one_epoch(model, rng)
                store.save({"model": model, "rng": rng}, step=epoch, metrics={"loss": loss},
                           is_best=loss < best_loss)
        store.cleanup()   # once the run has succeeded: keep only the final checkpoint
    """

    def __init__(
        self,
        run_id: str | int,
        *,
        storage: CheckpointStorage | None = None,
        format: str = "pickle",
        compress: bool | int = False,
        keep_last: int | None = None,
        keep_best: int | None = None,
        secret_key: str | bytes | SecretStr | KeyRing | None = None,
        old_keys: Sequence[str | bytes | SecretStr] = (),
        background: bool = False,
        settings: Settings | None = None,
        run_uid: str | None = None,
        task: str | None = None,
    ) -> None:
        #: The run's identity (``ModelRun.uid``): part of the storage key and of every manifest.
        self.run_uid = _check_run_uid(run_uid)
        #: The name of the task that trains the run, if known (``CheckpointSaved`` carries it).
        self.task = task
        self._given_run_id = run_id
        key = run_id if run_uid is None else f"{_validate_run_id(run_id)}-{run_uid}"
        self._run_id = _validate_run_id(key)
        settings = settings or get_settings()
        if format not in FORMATS:
            raise ConfigurationError(f"format must be one of {FORMATS}, got {format!r}")
        self.format: str = format
        self.compress_level = _zlib_level(compress)
        self.keep_last = settings.checkpoint_keep_last if keep_last is None else keep_last
        self.keep_best = settings.checkpoint_keep_best if keep_best is None else keep_best
        if isinstance(self.keep_last, bool) or self.keep_last < 1:
            raise ConfigurationError(f"keep_last must be >= 1, got {self.keep_last!r}")
        if isinstance(self.keep_best, bool) or self.keep_best < 0:
            raise ConfigurationError(f"keep_best must be >= 0, got {self.keep_best!r}")
        self._keys = _key_ring(secret_key, old_keys, settings)
        self.storage: CheckpointStorage = (
            storage if storage is not None else storage_from_settings(settings)
        )
        self.background = background
        self._protected: set[int] = set()
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: builtins.list[Future[None]] = []
        #: Steps retention has decided to delete and not yet deleted.
        self._doomed: set[int] = set()
        #: The fencing token of the lease the writer holds (a ``TrainingRun`` sets it): every
        #: manifest records it; a checkpoint with a larger token (a newer holder's) is never
        #: replaced or deleted by this store, and a save finding one raises ``LeaseLost``.
        self.fence: int | None = None
        #: Called before each write and deletion (``Lease.check``: raises ``LeaseLost`` once
        #: the lease is lost, also when the write was stalled past it).
        self.guard: Callable[[], None] | None = None
        self._closed = False
        removed = self.storage.remove_orphans(self._run_id)
        if removed:
            logger.info(
                "taskkit: removed %d item(s) left by an interrupted checkpoint write of run %r",
                removed,
                self._run_id,
            )

    def __repr__(self) -> str:
        return f"CheckpointStore({self._run_id!r}, storage={self.storage!r})"

    @property
    def run_id(self) -> str:
        """The run's key in the storage: its id as a string, then ``-<run_uid>`` if it has one."""
        return self._run_id

    @property
    def signed(self) -> bool:
        """Always True: every checkpoint is signed and verified (kept for older callers)."""
        return True

    # -- saving -----------------------------------------------------------------------------

    def save(
        self,
        state: Any,
        step: int,
        metrics: dict[str, Any] | None = None,
        is_best: bool = False,
    ) -> CheckpointInfo:
        """Save ``state`` as checkpoint ``step``; return its manifest (retention runs after).

        ``metrics`` are JSON values kept in the manifest (numpy scalars are converted). Saving a
        step that exists replaces it. In background mode it returns once the state is
        serialised; the write happens on the writer thread.

        Example::

            info = store.save({"model": model, "rng": rng.bit_generator.state}, step=epoch,
                              metrics={"val_loss": val_loss}, is_best=val_loss < best)
        """
        if self._closed:
            raise CheckpointError("the store is closed", self._run_id, None)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigurationError(f"step must be an int >= 0, got {step!r}")
        metrics = plain_metrics(metrics)
        with self._lock:
            doomed = step in self._doomed
        if self.background or doomed:
            # The previous background write must be done (one state copy in memory at most),
            # and a deletion of this very step must not race with writing it again.
            self.wait()
        else:
            self._raise_finished()
        started = time.perf_counter()
        try:
            payload = encode(state, self.format, self.compress_level)
        except Exception as exc:
            raise CheckpointError(
                f"the state could not be serialised with {self.format}: {exc}", self._run_id, step
            ) from exc
        template = self._template(step, metrics, is_best, payload.size)
        self._check_fence(step)
        if not self.background:
            digest = Digest(payload.chunks)  # hashes while the storage writes
            holder: list[CheckpointInfo] = []

            def manifest() -> CheckpointInfo:
                self._guard()  # the data may have been stalled past the lease: no manifest
                holder.append(self._finish(template, digest.hexdigest(), digest.algorithm))
                return holder[0]

            self._write(step, payload, manifest)
            if not holder:
                raise CheckpointError(
                    f"{self.storage!r} returned without asking for the manifest", self._run_id, step
                )
            self._saved(holder[0], time.perf_counter() - started)
            self._retain(holder[0], inline=False)
            return holder[0]
        # Background: copy what still belongs to the caller (array memory) while hashing it,
        # so save() returns a complete manifest and later changes to `state` cannot leak in.
        digest = Digest(payload.chunks)
        owned = payload.owned()
        info = self._finish(template, digest.hexdigest(), digest.algorithm)
        del payload
        self._submit(self._write_and_retain, step, owned, info, time.perf_counter() - started)
        return info

    def _submit(self, work: Callable[..., None], *args: Any) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="taskkit-checkpoint")
        self._pending.append(self._executor.submit(work, *args))

    def _template(
        self, step: int, metrics: dict[str, Any], is_best: bool, size: int
    ) -> CheckpointInfo:
        python, numpy, sklearn = library_versions()
        return CheckpointInfo(
            run_id=self._run_id,
            step=step,
            size=size,
            blake3="0" * 64,  # the digest is set once the data is hashed (_finish)
            format=self.format,
            compression=None if self.compress_level is None else "zlib",
            created_at=datetime.now(UTC).isoformat(timespec="microseconds"),
            python=python,
            numpy=numpy,
            sklearn=sklearn,
            metrics=metrics,
            is_best=bool(is_best),
            run_uid=self.run_uid,
            fence=self.fence,
        )

    def _guard(self) -> None:
        if self.guard is not None:
            self.guard()

    def _newer(self, info: CheckpointInfo) -> bool:
        """Whether ``info`` was written under a larger fencing token than this store's."""
        return self.fence is not None and info.fence is not None and info.fence > self.fence

    def _check_fence(self, step: int) -> None:
        """Before a fenced write: the lease still holds, and no newer holder has written a
        checkpoint of the run (else ``LeaseLost``: this writer was taken over)."""
        if self.fence is None:
            return
        self._guard()
        newer = [info.step for info in self.storage.infos(self._run_id) if self._newer(info)]
        if newer:
            logger.error(
                "taskkit: checkpoint run %r, step %d refused: steps %s were written under a "
                "newer fencing token than %d; this writer stops",
                self._run_id,
                step,
                newer,
                self.fence,
            )
            raise LeaseLost(self._run_id, self.fence)

    def _finish(
        self, template: CheckpointInfo, digest: str, algorithm: str = DIGEST
    ) -> CheckpointInfo:
        """``template`` with the digest of its data (under ``algorithm``'s key), signed."""
        digests: dict[str, str | None] = {"blake3": None, "sha256": None, algorithm: digest}
        return sign_info(_replace(template, **digests), self._keys)

    def _write(self, step: int, payload: Payload, manifest: Callable[[], CheckpointInfo]) -> None:
        try:
            self.storage.write(self._run_id, step, payload.chunks, manifest)
        except (CheckpointError, LeaseLost):
            raise
        except Exception as exc:
            raise CheckpointError(
                f"could not be written ({type(exc).__name__}: {exc}); the earlier checkpoints "
                f"are unchanged",
                self._run_id,
                step,
            ) from exc

    def _write_and_retain(
        self, step: int, payload: Payload, info: CheckpointInfo, serialising: float
    ) -> None:
        started = time.perf_counter()
        self._check_fence(step)

        def manifest() -> CheckpointInfo:
            self._guard()
            return info

        self._write(step, payload, manifest)
        self._saved(info, serialising + time.perf_counter() - started)
        self._retain(info, inline=True)

    def _saved(self, info: CheckpointInfo, seconds: float) -> None:
        """Checkpoint ``info`` is durable: its ``CheckpointSaved`` event."""
        if events.active():
            events.emit(
                events.CheckpointSaved(
                    self._given_run_id, info.step, info.size, seconds, info.is_best, self.task
                )
            )

    def _retain(self, saved: CheckpointInfo, *, inline: bool) -> None:
        """Decide what retention deletes, now that ``saved`` is durable, and delete it.

        Not ``inline``: the deleting happens on the writer thread (freeing a large file takes
        tens of milliseconds); the next ``save`` of a step being deleted, and every read, wait
        for it.
        """
        try:
            infos = self.storage.infos(self._run_id)
        except Exception as exc:
            if is_control_flow(exc):  # a soft time limit struck here: it is the task's
                raise
            self._warn_retention(saved.step, exc)
            return
        keep = {saved.step}
        keep.update(info.step for info in infos if self._newer(info))  # a newer holder's
        keep.update(info.step for info in infos[-self.keep_last :])
        if self.keep_best:
            best = [info.step for info in reversed(infos) if info.is_best]
            keep.update(best[: self.keep_best])
        with self._lock:
            doomed = [i.step for i in infos if i.step not in keep and i.step not in self._protected]
            self._doomed.update(doomed)
        if not doomed:
            return
        try:
            self._guard()  # a writer that lost its lease deletes nothing
        except LeaseLost:
            with self._lock:
                self._doomed.difference_update(doomed)
            return
        if inline:
            self._delete_steps(saved.step, doomed)
        else:
            self._submit(self._delete_steps, saved.step, doomed)

    def _delete_steps(self, saved_step: int, steps: builtins.list[int]) -> None:
        failure: Exception | None = None
        for step in steps:
            try:
                with self._lock:
                    if step in self._protected:  # protected since the decision
                        continue
                self.storage.delete(self._run_id, step)
            except Exception as exc:
                failure = exc
            finally:
                with self._lock:
                    self._doomed.discard(step)
        if failure is not None:
            self._warn_retention(saved_step, failure)

    def _warn_retention(self, step: int, exc: Exception) -> None:
        # The new checkpoint is saved; what was not deleted now is deleted on a later save.
        warnings.warn(
            CheckpointWarning(
                f"checkpoint run {self._run_id!r}, step {step} was saved, but old checkpoints "
                f"could not be deleted: {type(exc).__name__}: {exc}"
            ),
            stacklevel=4,
        )

    def protect(self, step: int) -> None:
        """Never let retention delete checkpoint ``step`` (for this store's lifetime).

        Call it with the step a run resumed from: should the new checkpoints turn out bad, the
        one known to work is still there.

        Example::

            checkpoint = store.load_latest()
            if checkpoint is not None:
                store.protect(checkpoint.info.step)
        """
        with self._lock:
            self._protected.add(int(step))

    # -- background -------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the background write (and deletions) in progress; raise a write's error.

        ``TimeoutError`` when work is still running after ``timeout`` seconds (it goes on). An
        error is raised once: by this call or by the next ``save``.

        Example::

            store.save(state, step=10)
            store.wait()        # durable now, or the write's CheckpointError is raised
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending:
            future = self._pending[0]
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                future.result(left)
            except TimeoutError:
                if not future.done():
                    raise  # still running: waited for again next time
                self._pending.pop(0)
                raise
            except BaseException:
                self._pending.pop(0)  # raised once, here
                raise
            self._pending.pop(0)

    def _raise_finished(self) -> None:
        """Forget finished work, raising the first error among it; never blocks."""
        while self._pending and self._pending[0].done():
            self._pending.pop(0).result()

    def _settle(self) -> None:
        """Let pending work finish before reading, without raising its error here."""
        futures.wait(self._pending)

    def close(self) -> None:
        """Wait for the background write (raising its error), then stop the writer thread.

        Example::

            store = CheckpointStore("exp-1", background=True)
            try:
                ...
            finally:
                store.close()
        """
        try:
            self.wait()
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception:
            # Do not hide the error that is already on its way out.
            logger.exception("taskkit: background checkpoint write of run %r failed", self._run_id)

    # -- reading ----------------------------------------------------------------------------

    def list(self) -> builtins.list[CheckpointInfo]:
        """Manifests of the run's complete checkpoints, oldest step first (data not verified).

        With a ``run_uid``, a manifest of another run identity (copied in, or left by another
        database's run of the same id) is skipped with a ``CheckpointWarning``: never restored.

        Example::

            for info in store.list():
                print(info.step, info.metrics, info.is_best)
        """
        self._settle()
        infos = self.storage.infos(self._run_id)
        if self.run_uid is None:
            return infos
        mine = [info for info in infos if info.run_uid == self.run_uid]
        for info in infos:
            if info.run_uid != self.run_uid:
                warnings.warn(
                    CheckpointWarning(
                        f"checkpoint run {self._run_id!r}, step {info.step} belongs to another "
                        f"run (identity {info.run_uid!r}, not {self.run_uid!r}); it is never "
                        "restored: the run starts without it"
                    ),
                    stacklevel=3,
                )
        return mine

    def latest(self) -> CheckpointInfo | None:
        """The newest manifest, or None (the data is not verified: see ``load_latest``).

        Example::

            info = store.latest()
            next_epoch = 0 if info is None else info.step + 1
        """
        infos = self.list()
        return max(infos, key=_recency) if infos else None

    def load(self, step: int) -> Checkpoint:
        """Checkpoint ``step``, verified; ``CheckpointCorrupt``, ``CheckpointTampered``, or
        ``CheckpointError`` when there is no such checkpoint.

        Example::

            state = store.load(10).state
        """
        for info in self.list():
            if info.step == step:
                return self._load(info)
        raise CheckpointError("no such checkpoint", self._run_id, step)

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; None when the run has none.

        A corrupt one (data missing, truncated, checksum wrong) is skipped with a
        ``CheckpointWarning`` naming its step and what is wrong. A tampered one (signature wrong
        or missing) raises ``CheckpointTampered``: no silent fallback past it.

        Example::

            checkpoint = store.load_latest()
            start = 0 if checkpoint is None else checkpoint.info.step + 1
        """
        for info in sorted(self.list(), key=_recency, reverse=True):
            try:
                return self._load(info)
            except CheckpointCorrupt as exc:
                warnings.warn(
                    CheckpointWarning(
                        f"checkpoint run {self._run_id!r}, step {info.step} is unusable "
                        f"({exc.reason}); falling back to an older checkpoint"
                    ),
                    stacklevel=2,
                )
        return None

    def _load(self, info: CheckpointInfo) -> Checkpoint:
        step = info.step
        state = unseal(
            info,
            lambda: read_hashed(self.storage, self._run_id, step, info.algorithm),
            run_id=self._run_id,
            kind="checkpoint",
            keys=self._keys,
        )
        return Checkpoint(state=state, info=info)

    def copy_from(self, source: CheckpointStore, step: int) -> CheckpointInfo:
        """Copy ``source``'s checkpoint ``step`` into this run as its checkpoint ``step``.

        The source is verified first, exactly as a load would (its signature under
        ``source``'s keys, its run, then the size and digest of its bytes:
        ``CheckpointTampered``, ``CheckpointCorrupt``, ``CheckpointError`` when there is no such
        step), but never unpickled: the same bytes are written under this run, with a manifest
        of this run's identity signed by this store's key. Used to fork a run from a checkpoint
        of another (``taskkit.tasks.fork_run``); the fork verifies it again when it loads it.

        Example::

            fork_store.copy_from(parent_store, 9)
            fork_store.load_latest().info.step      # 9
        """
        info = next((i for i in source.list() if i.step == step), None)
        if info is None:
            raise CheckpointError("no such checkpoint", source.run_id, step)
        verify_info(info, source._keys, source.run_id)
        try:
            raw = source.storage.read(source.run_id, step)
        except FileNotFoundError as exc:
            raise CheckpointCorrupt("its data is missing", source.run_id, step) from exc
        size = memoryview(raw).nbytes
        if size != info.size or not hmac.compare_digest(
            digest_of(raw, info.algorithm), info.digest
        ):
            raise CheckpointCorrupt(
                "its data does not match the size and digest in its manifest",
                source.run_id,
                step,
            )
        template = _replace(
            info,
            run_id=self._run_id,
            run_uid=self.run_uid,
            signature=None,
            created_at=datetime.now(UTC).isoformat(timespec="microseconds"),
        )
        copied = self._finish(template, info.digest, info.algorithm)
        self.wait()
        self._write(step, Payload([raw], [False], size), lambda: copied)
        return copied

    # -- deleting ---------------------------------------------------------------------------

    def cleanup(self, keep_final: bool = True, *, keep_best: int | None = None) -> None:
        """After a run succeeded: keep what retention says a finished run needs, the final
        checkpoint and the ``keep_best`` newest saved with ``is_best=True`` (default: the
        store's ``keep_best``), and delete the rest; ``keep_final=False`` deletes them all.

        Protection and ``keep_last`` do not apply: the run is over.

        Example::

            result = train()
            store.cleanup()                  # the final checkpoint and the best one(s)
            store.cleanup(keep_best=0)       # the final checkpoint only
            store.cleanup(keep_final=False)  # or nothing at all
        """
        if keep_best is None:
            keep_best = self.keep_best if keep_final else 0
        if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
            raise ConfigurationError(f"keep_best must be >= 0, got {keep_best!r}")
        self.wait()
        infos = self.storage.infos(self._run_id)
        keep: set[int] = set()
        if keep_final and infos:
            keep.add(max(infos, key=_recency).step)
        if keep_best:
            keep.update([info.step for info in reversed(infos) if info.is_best][:keep_best])
        keep.update(info.step for info in infos if self._newer(info))
        if self.fence is not None:
            self._guard()
        for info in infos:
            if info.step not in keep:
                self.storage.delete(self._run_id, info.step)

    def delete_all(self) -> None:
        """Delete every checkpoint of the run (to start it over from scratch).

        Example::

            store.delete_all()
            assert store.list() == []
        """
        self.wait()
        for info in self.storage.infos(self._run_id):
            self.storage.delete(self._run_id, info.step)
        with self._lock:
            self._protected.clear()


def _recency(info: CheckpointInfo) -> tuple[int, int]:
    """Newest first by fencing token (a newer lease holder's checkpoints win over a stale
    writer's, whatever their steps), then by step."""
    return (-1 if info.fence is None else info.fence, info.step)


def _replace(info: CheckpointInfo, **changes: Any) -> CheckpointInfo:
    fields = info.to_dict()
    fields.update(changes)
    return CheckpointInfo(**fields)


def _key_ring(
    secret_key: str | bytes | SecretStr | KeyRing | None,
    old_keys: Sequence[str | bytes | SecretStr],
    settings: Settings,
) -> KeyRing:
    """The keys of a store: ``secret_key`` (and ``old_keys``) when given, else the settings'."""
    if isinstance(secret_key, KeyRing):
        return secret_key
    if secret_key is None:
        ring = settings.signing_keys()
        extra = tuple(_key_bytes(k, "old_keys") for k in old_keys)
        return KeyRing(ring.keys + extra, ring.source) if extra else ring
    current = _key_bytes(secret_key, "secret_key")
    return KeyRing((current, *(_key_bytes(k, "old_keys") for k in old_keys)), "secret_key=")


def _key_bytes(key: object, name: str) -> bytes:
    if isinstance(key, SecretStr):
        key = key.get_secret_value()
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes):
        raise ConfigurationError(f"{name} must be str or bytes, not {type(key).__name__}")
    return check_key(key, name)


def _check_run_uid(run_uid: object) -> str | None:
    if run_uid is None:
        return None
    if not isinstance(run_uid, str) or not _RUN_UID.fullmatch(run_uid):
        raise ConfigurationError(
            f"run_uid must be 8-64 letters, digits or '-' (a ModelRun.uid), got {run_uid!r}"
        )
    return run_uid


def _zlib_level(compress: bool | int) -> int | None:
    if compress is True:
        return DEFAULT_ZLIB_LEVEL
    if compress is False or compress == 0:
        return None
    if isinstance(compress, int) and 1 <= compress <= 9:
        return compress
    raise ConfigurationError(f"compress must be True, False or a zlib level 1-9, got {compress!r}")
