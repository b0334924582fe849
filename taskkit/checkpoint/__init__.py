"""Checkpoints of long runs: saved durably, verified before unpickling, pruned by retention.

``CheckpointStore(run_id)`` keeps one run's checkpoints in a ``CheckpointStorage``: files under
``TASKKIT_CHECKPOINT_DIR`` (``DirectoryStorage``, the default) or taskkit's database
(``DatabaseStorage``, ``TASKKIT_CHECKPOINT_STORAGE=database``). Each checkpoint is the
serialised state plus a JSON manifest (``CheckpointInfo``: step, size, SHA-256, format,
compression, time, Python/numpy/scikit-learn versions, metrics, best flag, signature).

Decisions:

- A checkpoint exists once its manifest does, and the manifest is written last, atomically and
  durably (temp file, fsync, rename, directory fsync; or one database transaction), so a crash
  leaves the previous checkpoints loadable. Old checkpoints are deleted only after the new one
  is durable. What a crash leaves behind (temp files, data without a manifest) is removed when
  a store is next opened for the run, but never while its writer is alive.
- Nothing is unpickled before it is verified: size and SHA-256 of the stored bytes always;
  with ``TASKKIT_SECRET_KEY``, an HMAC-SHA256 signature over the manifest (which holds the
  data's SHA-256, the run id and the step, so data, step or run cannot be swapped). A corrupt
  newest checkpoint is skipped with a ``CheckpointWarning``; a tampered or unsigned one raises
  ``CheckpointTampered`` and is never loaded nor skipped. Without a key, one warning per process
  says checkpoints are only checksummed.
- "Newest" is the highest step. Retention keeps the ``keep_last`` newest, the ``keep_best``
  newest saved with ``is_best=True``, and steps passed to ``protect()``.
- Fast for large numpy states: pickle protocol 5 with out-of-band buffers, so array memory is
  written from the arrays and read back into one buffer the arrays then share (no extra
  copies); the SHA-256 is computed on a second thread while the data is written.
- Run ids name directories, so they are checked (``validate_run_id``): letters, digits, ``.``,
  ``_``, ``-``, at most 128 characters, no ``..``; an int is taken as its decimal string.

Example::

    from taskkit.checkpoint import CheckpointStore

    with CheckpointStore(run.id, keep_last=3) as store:
        checkpoint = store.load_latest()              # None on the first attempt
        start = 0 if checkpoint is None else checkpoint.info.step + 1
        if checkpoint is not None:
            state = checkpoint.state
            store.protect(checkpoint.info.step)
        for epoch in range(start, epochs):
            state = train_one_epoch(state)
            store.save(state, step=epoch, metrics={"loss": state["loss"]})
"""

from taskkit.checkpoint._database import DatabaseStorage
from taskkit.checkpoint._info import Checkpoint, CheckpointInfo, validate_run_id
from taskkit.checkpoint._storage import CheckpointStorage, DirectoryStorage
from taskkit.checkpoint._store import CheckpointStore, storage_from_settings

__all__ = [
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointStorage",
    "CheckpointStore",
    "DatabaseStorage",
    "DirectoryStorage",
    "storage_from_settings",
    "validate_run_id",
]
