"""Sign, verify, then unpickle: the one path every checkpoint and stored model goes through.

``unseal`` checks, in this order and before anything is decompressed or unpickled: the
manifest's HMAC-SHA256 signature under one of the accepted keys, that the manifest belongs to
the expected run, the size and the digest of the stored bytes (BLAKE3, or SHA-256 for a
manifest written before BLAKE3: the algorithm the signed manifest names). ``CheckpointStore`` loads
checkpoints with it and ``taskkit.tasks.load_model`` the final model of a run, so a forged
model row is refused exactly like a forged checkpoint. ``kind`` keeps the two apart: a signed
checkpoint is never accepted as a model, or the reverse.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from taskkit._keys import KeyRing
from taskkit.checkpoint._codec import (
    Buffer,
    Hashed,
    decode,
    digest_of,
    encode,
    library_versions,
)
from taskkit.checkpoint._info import CheckpointInfo
from taskkit.config import get_settings
from taskkit.errors import CheckpointCorrupt, CheckpointError, CheckpointTampered

__all__ = ["Kind", "seal", "sign_info", "unseal", "verify_info"]

Kind = Literal["checkpoint", "model"]

# What the signature covers besides the manifest: a checkpoint signs the manifest bytes as they
# always were (signatures made before this module stay valid), a model is domain-separated.
_DOMAIN: dict[str, bytes] = {"checkpoint": b"", "model": b"taskkit-model-v1\n"}


#: How an error names a digest algorithm.
_NAMES = {"blake3": "BLAKE3 digest", "sha256": "SHA-256"}


def _message(info: CheckpointInfo, kind: Kind) -> bytes:
    return _DOMAIN[kind] + info.signed_bytes()


def _error(
    cls: type[CheckpointError], reason: str, run_id: str, step: int, kind: Kind
) -> CheckpointError:
    """``cls`` naming the checkpoint (run, step), or the final model of the run."""
    if kind == "checkpoint":
        return cls(reason, run_id, step)
    return cls(f"the final model of run {run_id}: {reason}")


def sign_info(info: CheckpointInfo, keys: KeyRing, kind: Kind = "checkpoint") -> CheckpointInfo:
    """``info`` with its signature (HMAC-SHA256 of its other fields, by ``keys``' first key)."""
    fields = info.to_dict()
    fields["signature"] = keys.sign(_message(info, kind))
    return CheckpointInfo(**fields)


def verify_info(
    info: CheckpointInfo, keys: KeyRing, run_id: str, kind: Kind = "checkpoint"
) -> None:
    """``CheckpointTampered`` unless ``info`` is signed by an accepted key and is ``run_id``'s."""
    if not info.signature:
        raise _error(
            CheckpointTampered,
            "it is not signed: refusing to unpickle it (it was written by something other than "
            "taskkit, or by a taskkit that did not sign, or its signature was removed)",
            run_id,
            info.step,
            kind,
        )
    if not keys.verify(_message(info, kind), info.signature):
        raise _error(
            CheckpointTampered,
            "its signature does not match: the manifest or the data was changed, or it was "
            f"signed with another key (this process signs with {keys.source}); refusing to "
            "unpickle it",
            run_id,
            info.step,
            kind,
        )
    if info.run_id != run_id:
        raise _error(
            CheckpointTampered,
            f"its manifest belongs to run {info.run_id!r}; refusing to load it",
            run_id,
            info.step,
            kind,
        )


def seal(
    obj: Any, run_id: str, *, kind: Kind = "model", keys: KeyRing | None = None
) -> tuple[bytes, CheckpointInfo]:
    """``obj`` serialised (taskkit's pickle frame) and its signed manifest, for ``unseal``.

    ``keys`` default to ``get_settings().signing_keys()``.

    Example::

        data, info = seal(model, "7")
        model = unseal(info, data, run_id="7")
    """
    keys = keys or get_settings().signing_keys()
    payload = encode(obj, "pickle", None)
    data = b"".join(bytes(chunk) for chunk in payload.chunks)
    python, numpy, sklearn = library_versions()
    info = CheckpointInfo(
        run_id=run_id,
        step=0,
        size=len(data),
        blake3=digest_of(data, "blake3"),
        format="pickle",
        compression=None,
        created_at=datetime.now(UTC).isoformat(timespec="microseconds"),
        python=python,
        numpy=numpy,
        sklearn=sklearn,
    )
    return data, sign_info(info, keys, kind)


def unseal(
    info: CheckpointInfo,
    data: Buffer | Hashed | Callable[[], Buffer | Hashed],
    *,
    run_id: str,
    kind: Kind = "model",
    keys: KeyRing | None = None,
) -> Any:
    """The object stored in ``data``, once ``info`` is verified (signature, run, size,
    digest); ``CheckpointTampered`` or ``CheckpointCorrupt`` otherwise, and nothing unpickled.

    The digest is of the algorithm the signed manifest names (``info.algorithm``: BLAKE3, or
    SHA-256 for manifests written before). ``data`` may be a callable, called only once the
    manifest is verified (so an unsigned checkpoint's data is not even read). It may give a
    ``Hashed`` (the bytes and the digest the storage computed while reading them): that digest
    is compared, not recomputed, when it is of the manifest's algorithm.
    ``keys`` default to ``get_settings().signing_keys()``.
    A verified object that cannot be decoded is a ``CheckpointError`` naming the versions it
    was saved with and the ones of this process.
    """
    keys = keys or get_settings().signing_keys()
    step = info.step
    verify_info(info, keys, run_id, kind)
    try:
        raw = data() if callable(data) else data
    except FileNotFoundError as exc:
        raise _error(CheckpointCorrupt, "its data is missing", run_id, step, kind) from exc
    digest: str | None = None
    if isinstance(raw, Hashed):
        if raw.algorithm == info.algorithm:
            digest = raw.digest
        raw = raw.data
    if isinstance(raw, bytes) or memoryview(raw).readonly:
        raw = bytearray(raw)  # arrays made over it must be writable
    size = memoryview(raw).nbytes
    if size != info.size:
        what = "truncated" if size < info.size else "longer than recorded"
        raise _error(
            CheckpointCorrupt,
            f"its data is {what}: {size} bytes, the manifest says {info.size}",
            run_id,
            step,
            kind,
        )
    if digest is None:
        digest = digest_of(raw, info.algorithm)
    if not hmac.compare_digest(digest, info.digest):
        raise _error(
            CheckpointCorrupt,
            f"its data does not match the {_NAMES[info.algorithm]} in its manifest",
            run_id,
            step,
            kind,
        )
    try:
        return decode(raw, info.format, info.compression)
    except Exception as exc:
        python, numpy, sklearn = library_versions()
        raise _error(
            CheckpointError,
            f"verified, but could not be loaded ({type(exc).__name__}: {exc}); saved with "
            f"Python {info.python}, numpy {info.numpy}, scikit-learn {info.sklearn}; this "
            f"process has Python {python}, numpy {numpy}, scikit-learn {sklearn}",
            run_id,
            step,
            kind,
        ) from exc
