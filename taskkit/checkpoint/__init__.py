"""Checkpoints of long runs: saved durably, verified before unpickling, pruned by retention.

``CheckpointStore(run_id)`` keeps one run's checkpoints in a ``CheckpointStorage``: files under
``TASKKIT_CHECKPOINT_DIR`` (``DirectoryStorage``, the default) or taskkit's database
(``DatabaseStorage``). Each checkpoint is the serialised state plus a JSON manifest
(``CheckpointInfo``), written last. The layout, the integrity and signing rules and retention
are decided in ``docs/checkpoint.md``.

Example::

    from taskkit.checkpoint import CheckpointStore

    with CheckpointStore(run.id, keep_last=3) as store:
        checkpoint = store.load_latest()              # None on the first attempt
        start = 0 if checkpoint is None else checkpoint.info.step + 1
        for epoch in range(start, epochs):
            state = train_one_epoch(state)
            store.save(state, step=epoch, metrics={"loss": state["loss"]})
"""

from taskkit.checkpoint._database import DatabaseStorage
from taskkit.checkpoint._fsspec import FsspecStorage
from taskkit.checkpoint._info import Checkpoint, CheckpointInfo, validate_run_id
from taskkit.checkpoint._seal import seal, unseal
from taskkit.checkpoint._storage import CheckpointStorage, DirectoryStorage
from taskkit.checkpoint._store import CheckpointStore, storage_from_settings

__all__ = [
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointStorage",
    "CheckpointStore",
    "DatabaseStorage",
    "DirectoryStorage",
    "FsspecStorage",
    "seal",
    "storage_from_settings",
    "unseal",
    "validate_run_id",
]
