"""``CheckpointInfo`` (the manifest), ``Checkpoint`` and ``validate_run_id``."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from taskkit.checkpoint._codec import DIGESTS as _DIGESTS
from taskkit.errors import CheckpointFormatError, InvalidRunId

__all__ = ["FORMATS", "Checkpoint", "CheckpointInfo", "plain_metrics", "validate_run_id"]

#: Serialisation formats a checkpoint can be written in.
FORMATS = ("pickle", "joblib")

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_MAX_RUN_ID = 128


def validate_run_id(run_id: object) -> str:
    """``run_id`` as a string, if it is a safe directory name; else ``InvalidRunId`` saying why.

    Allowed: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` without ``..``; an ``int`` (a ``ModelRun`` id)
    becomes its decimal string. Refused with the reason: empty, NUL, ``/`` or ``\\``, absolute
    paths, ``..``, too long, other characters.

    Example::

        validate_run_id(42)          # "42"
        validate_run_id("exp-1.a")   # "exp-1.a"
        validate_run_id("../etc")    # InvalidRunId: ... contains '..' ...
    """
    if isinstance(run_id, bool) or not isinstance(run_id, str | int):
        # Kept as is when JSON can carry it (Celery results), else as its repr.
        shown = run_id if run_id is None or isinstance(run_id, bool | float) else repr(run_id)
        raise InvalidRunId(shown, f"must be a str or an int, not {type(run_id).__name__}")
    text = str(run_id)
    if not text:
        raise InvalidRunId(text, "is empty")
    if "\x00" in text:
        raise InvalidRunId(text, "contains a NUL byte")
    if text.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", text):
        raise InvalidRunId(text, "is an absolute path; a run id names one directory")
    if ".." in text:
        raise InvalidRunId(text, "contains '..' (a parent directory)")
    if "/" in text or "\\" in text:
        raise InvalidRunId(text, "contains a path separator ('/' or '\\'); use '-' or '_'")
    if len(text) > _MAX_RUN_ID:
        raise InvalidRunId(text, f"is {len(text)} characters long; at most {_MAX_RUN_ID}")
    if not text[0].isascii() or not text[0].isalnum():
        raise InvalidRunId(text, "must start with a letter or a digit")
    if not _RUN_ID.fullmatch(text):
        bad = sorted({c for c in text if not (c.isascii() and (c.isalnum() or c in "._-"))})
        raise InvalidRunId(
            text, f"contains {''.join(bad)!r}; only letters, digits, '.', '_' and '-' are allowed"
        )
    return text


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's manifest: what was saved, when, with what, and how to verify it.

    It is JSON (``to_dict()``/``from_dict()``), written after the data, so a checkpoint exists
    only once its manifest does. ``size`` and the digest are those of the stored bytes (after
    compression): exactly one of ``blake3`` (what taskkit writes) and ``sha256`` (manifests
    written before BLAKE3, still verified with SHA-256) is set, ``algorithm`` and ``digest``
    name it; ``signature`` is the HMAC-SHA256 of every other field (see ``signed_bytes``),
    or None when no secret key was set.

    Example::

        info = store.save(state, step=3, metrics={"loss": 0.4}, is_best=True)
        info.step, info.size, info.metrics["loss"]
        info.algorithm, info.digest  # ("blake3", "9f86...")
        CheckpointInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info  # True
    """

    run_id: str
    step: int
    size: int
    #: SHA-256 (hex) of the stored bytes: manifests written before BLAKE3; None otherwise.
    sha256: str | None = None
    format: str = "pickle"
    compression: str | None = None
    #: ISO-8601, UTC (``2026-11-29T10:00:00.000000+00:00``).
    created_at: str = ""
    python: str | None = None
    numpy: str | None = None
    sklearn: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    is_best: bool = False
    #: The identity of the run it belongs to (``ModelRun.uid``), when the store has one; a
    #: store of another identity never restores it.
    run_uid: str | None = None
    #: The fencing token of the lease its writer held (``CheckpointStore.fence``), if any: a
    #: writer with a smaller token never deletes or replaces it, and ``load_latest`` prefers
    #: the largest token.
    fence: int | None = None
    #: BLAKE3 (hex, 32 bytes) of the stored bytes: what taskkit writes; None in older manifests.
    blake3: str | None = None
    signature: str | None = None

    def __post_init__(self) -> None:
        present = [name for name in _DIGESTS if getattr(self, name) is not None]
        if len(present) != 1:
            raise CheckpointFormatError(
                f"a manifest has exactly one digest of {_DIGESTS}, not {present or 'none'}"
            )

    @property
    def algorithm(self) -> str:
        """The digest's algorithm: ``"blake3"`` or ``"sha256"`` (the manifest key it is in)."""
        return "blake3" if self.blake3 is not None else "sha256"

    @property
    def digest(self) -> str:
        """The digest of the stored bytes (hex), of ``algorithm``."""
        value = self.blake3 if self.blake3 is not None else self.sha256
        assert value is not None  # __post_init__
        return value

    def to_dict(self) -> dict[str, Any]:
        """The manifest as a JSON-ready dict (a copy).

        Example::

            json.dumps(info.to_dict())
        """
        fields = asdict(self)
        # A manifest written without a lease, or with SHA-256, reads (and signs) as it always
        # did; one with BLAKE3 has no "sha256" key.
        for name in ("fence", *_DIGESTS):
            if fields[name] is None:
                del fields[name]
        return fields

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointInfo:
        """The info in ``data`` (a parsed manifest), checked field by field;
        ``CheckpointFormatError`` (a ``ValueError``) if not.

        Unknown keys are ignored (they are not signed, so they cannot change what is loaded).

        Example::

            info = CheckpointInfo.from_dict(json.loads(path.read_text()))
        """
        if not isinstance(data, dict):
            raise CheckpointFormatError(f"a manifest is a JSON object, not {type(data).__name__}")

        def get(name: str, kinds: tuple[type, ...], optional: bool = False) -> Any:
            if name not in data:
                if optional:
                    return None
                raise CheckpointFormatError(f"manifest has no {name!r}")
            value = data[name]
            if value is None and optional:
                return None
            # bool is an int: a step of True is not a step
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise CheckpointFormatError(
                    f"manifest field {name!r} has the wrong type: {value!r}"
                )
            return value

        digests = {name: get(name, (str,), optional=True) for name in _DIGESTS}
        present = {name: value for name, value in digests.items() if value is not None}
        if len(present) != 1:
            raise CheckpointFormatError(
                f"a manifest has exactly one digest of {_DIGESTS}, not {sorted(present) or 'none'}"
            )
        for name, value in present.items():
            if not _HEX_DIGEST.fullmatch(value):
                raise CheckpointFormatError(
                    f"manifest field {name!r} is not a hex {name.upper()} digest: {value!r}"
                )
        step, size = get("step", (int,)), get("size", (int,))
        if step < 0 or size < 0:
            raise CheckpointFormatError(f"manifest has a negative step or size: {step}, {size}")
        return cls(
            run_id=get("run_id", (str,)),
            step=step,
            size=size,
            sha256=digests["sha256"],
            blake3=digests["blake3"],
            format=get("format", (str,)),
            compression=get("compression", (str,), optional=True),
            created_at=get("created_at", (str,)),
            python=get("python", (str,), optional=True),
            numpy=get("numpy", (str,), optional=True),
            sklearn=get("sklearn", (str,), optional=True),
            metrics=dict(get("metrics", (dict,))),
            is_best=get("is_best", (bool,)),
            run_uid=get("run_uid", (str,), optional=True),
            fence=get("fence", (int,), optional=True),
            signature=get("signature", (str,), optional=True),
        )

    def to_json(self) -> bytes:
        """The manifest file's content: indented JSON, UTF-8."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> CheckpointInfo:
        """Parse a manifest file's content; ``CheckpointFormatError`` (a ``ValueError``) when it
        is not a valid manifest (not UTF-8, not JSON, too deeply nested, wrong fields)."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise CheckpointFormatError(f"a manifest is JSON: {exc}") from None
        return cls.from_dict(data)

    def signed_bytes(self) -> bytes:
        """What the signature covers: canonical JSON of every field except ``signature``.

        Sorted keys, no whitespace, ASCII: the same bytes on every machine, and the same after
        a JSON round trip. It includes ``run_id``, ``run_uid``, ``step``, ``size`` and the
        digest under its algorithm's name (``blake3`` or ``sha256``), so neither the data, nor
        the algorithm it is verified with, nor the checkpoint's place (run, identity, step) can
        be swapped. A manifest without ``run_uid``, or with ``sha256``, signs the bytes it
        always did.
        """
        fields = self.to_dict()  # without a fence when there is none: old signatures hold
        del fields["signature"]
        if fields["run_uid"] is None:
            del fields["run_uid"]  # signatures made before run identities stay valid
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return b"taskkit-checkpoint-v1\n" + canonical.encode("ascii")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the saved ``state`` and its verified ``info``.

    Example::

        checkpoint = store.load_latest()
        if checkpoint is not None:
            model = checkpoint.state["model"]
            start = checkpoint.info.step + 1
    """

    state: Any
    info: CheckpointInfo


def plain_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """``metrics`` as plain JSON values (numpy scalars become Python numbers), or TypeError.

    Normalised through a JSON round trip, so the info returned by ``save()`` equals the one read
    back later (tuples become lists, keys become strings).
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict, not {type(metrics).__name__}")

    def plain(value: Any) -> Any:
        item = getattr(value, "item", None)  # numpy scalars, 0-d arrays
        if callable(item):
            result = item()
            if isinstance(result, bool | int | float | str) or result is None:
                return result
        raise TypeError(
            f"metrics must be JSON values (numbers, strings, lists, dicts); "
            f"got {type(value).__name__}"
        )

    result: dict[str, Any] = json.loads(json.dumps(metrics, default=plain))
    return result
