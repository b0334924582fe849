"""Turning a state into stored bytes and back: framing, compression, checksum, versions.

The ``"pickle"`` format is a small frame around a protocol-5 pickle and its out-of-band
buffers::

    b"TKCKPT\\x00\\x01"  u64 buffer count  u64 pickle length  u64 length of each buffer
    pickle bytes
    (zero padding to a multiple of 64) buffer 0  (padding) buffer 1 ...

so a numpy array's memory is written straight from the array (no copy into a pickle string)
and, on load, becomes an array over the bytes read (no copy out of one either), aligned for
any dtype. ``"joblib"`` is ``joblib.dump`` into memory. Either may be zlib-compressed; size and
digest are always those of the stored bytes, so nothing is decompressed or parsed before it
is verified.

The digest of new checkpoints is BLAKE3 (``DIGEST``; about 3x SHA-256's speed on one core,
so hashing hides under the read or the write it overlaps); a manifest names its algorithm
(``"blake3"`` or, written before, ``"sha256"``) and is verified with that one. Every storage
hashes through ``new_hash``/``Digest``/``StreamDigest`` here.
"""

from __future__ import annotations

import functools
import hashlib
import io
import mmap
import pickle
import platform
import queue
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol, TypeAlias

import blake3

from taskkit.errors import CheckpointFormatError, TaskkitError

__all__ = [
    "DIGEST",
    "DIGESTS",
    "Buffer",
    "Digest",
    "Hashed",
    "Payload",
    "StreamDigest",
    "decode",
    "digest_of",
    "encode",
    "library_versions",
    "new_hash",
    "writable_buffer",
]

#: What a storage is handed to write: bytes, or views of them (``memoryview`` slices).
Buffer: TypeAlias = bytes | bytearray | memoryview

_MAGIC = b"TKCKPT\x00\x01"
_HEADER = struct.Struct("<8sQQ")
_ALIGN = 64
# Pieces smaller than this are copied together, so a state of many small arrays is written
# in a few system calls instead of one per array.
_SMALL = 64 * 1024
# Below this, hashing on a thread costs more than it saves.
_THREAD_MIN = 4 * 1024 * 1024
_INFLATE_STEP = 16 * 1024 * 1024

#: The digest algorithm new checkpoints and models are written with.
DIGEST = "blake3"
#: Every algorithm a manifest may name (its key in the manifest): BLAKE3, and SHA-256 for
#: manifests written before BLAKE3 (still verified, with SHA-256).
DIGESTS = ("blake3", "sha256")
#: Threads one BLAKE3 hash may use. One: the hash already runs beside the read or the write it
#: overlaps, and the all-core mode (``blake3.AUTO``, a Rayon thread pool) is not fork-safe: a
#: process forked after using it (Celery's prefork pool, ``multiprocessing``) hangs the first
#: time it hashes with it (tested: tests/checkpoint/test_digest.py). On 2 shared cores it
#: loaded a 100 MB checkpoint from 3% slower to 13% faster than one thread (docs/benchmarks.md).
_BLAKE3_THREADS = 1


class _Hash(Protocol):
    def update(self, data: Buffer, /) -> object: ...

    def hexdigest(self) -> str: ...


def new_hash(algorithm: str = DIGEST) -> _Hash:
    """A new hash object of ``algorithm`` (one of ``DIGESTS``); ``CheckpointFormatError``
    for any other name. Both release the GIL while hashing large buffers."""
    if algorithm == "blake3":
        return blake3.blake3(max_threads=_BLAKE3_THREADS)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise CheckpointFormatError(f"unknown digest algorithm {algorithm!r}; known: {DIGESTS}")


@dataclass
class Payload:
    """A serialised state: ``chunks`` to be written in order, ``size`` bytes in all.

    ``borrowed[i]`` is True when ``chunks[i]`` is a view of the caller's own objects (an
    array's memory): it must be copied (``owned()``) before the caller may change them.
    """

    chunks: list[Buffer]
    borrowed: list[bool]
    size: int

    def owned(self) -> Payload:
        """The same bytes, with every borrowed chunk copied."""
        chunks = [bytes(c) if b else c for c, b in zip(self.chunks, self.borrowed, strict=True)]
        return Payload(chunks, [False] * len(chunks), self.size)


class _Builder:
    def __init__(self) -> None:
        self.chunks: list[Buffer] = []
        self.borrowed: list[bool] = []
        self.size = 0
        self._small = bytearray()

    def add(self, data: Buffer, borrowed: bool = False) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n < _SMALL:
            self._small += data
        else:
            self._flush()
            self.chunks.append(data)
            self.borrowed.append(borrowed)
        self.size += n

    def pad_to(self, alignment: int) -> None:
        padding = -self.size % alignment
        if padding:
            self.add(bytes(padding))

    def _flush(self) -> None:
        if self._small:
            self.chunks.append(bytes(self._small))
            self.borrowed.append(False)
            self._small = bytearray()

    def finish(self) -> Payload:
        self._flush()
        return Payload(self.chunks, self.borrowed, self.size)


def encode(state: Any, fmt: str, level: int | None) -> Payload:
    """``state`` serialised in ``fmt`` (``"pickle"``/``"joblib"``), zlib-compressed at ``level``."""
    builder = _Builder()
    if fmt == "pickle":
        buffers: list[pickle.PickleBuffer] = []
        head = pickle.dumps(state, protocol=5, buffer_callback=buffers.append)
        raws = [b.raw() for b in buffers]
        builder.add(_HEADER.pack(_MAGIC, len(raws), len(head)))
        builder.add(struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws)))
        builder.add(head)
        for raw in raws:
            builder.pad_to(_ALIGN)
            builder.add(raw, borrowed=True)
    elif fmt == "joblib":
        import joblib  # type: ignore[import-untyped]  # noqa: PLC0415 - 0.3 s; only if used

        out = io.BytesIO()
        joblib.dump(state, out, compress=0)
        builder.add(out.getbuffer())
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    payload = builder.finish()
    return payload if level is None else _deflate(payload, level)


def _deflate(payload: Payload, level: int) -> Payload:
    compressor = zlib.compressobj(level)
    builder = _Builder()
    for chunk in payload.chunks:
        builder.add(compressor.compress(chunk))
    builder.add(compressor.flush())
    return builder.finish()


def decode(data: bytearray | memoryview, fmt: str, compression: str | None) -> Any:
    """The state stored in ``data`` (already verified). Arrays are views of ``data`` when possible.

    ``CheckpointFormatError`` (a ``ValueError``) when the bytes are not what ``fmt``/
    ``compression`` say, whatever is wrong with them (tested by fuzzing: tests/checkpoint/
    test_fuzz.py); the unpickler's own error, if any, is its ``__cause__``.
    """
    try:
        view = memoryview(data)
        if compression == "zlib":
            view = memoryview(_inflate(view))
        elif compression is not None:
            raise CheckpointFormatError(f"unknown compression {compression!r}")
        if fmt == "pickle":
            return _unframe(view)
        if fmt == "joblib":
            import joblib  # noqa: PLC0415

            return joblib.load(io.BytesIO(view))
        raise CheckpointFormatError(f"unknown checkpoint format {fmt!r}")
    except TaskkitError:
        raise
    except Exception as exc:  # zlib.error, UnpicklingError, EOFError, ... from bad bytes
        raise CheckpointFormatError(
            f"the stored bytes cannot be decoded as {fmt}"
            f"{'' if compression is None else ' + ' + compression}: {type(exc).__name__}: {exc}"
        ) from exc


def _inflate(view: memoryview) -> bytearray:
    # Into a bytearray, not bytes: arrays made over it must be writable.
    decompressor = zlib.decompressobj()
    out = bytearray()
    for start in range(0, view.nbytes, _INFLATE_STEP):
        out += decompressor.decompress(view[start : start + _INFLATE_STEP])
    out += decompressor.flush()
    if not decompressor.eof or decompressor.unused_data:
        raise CheckpointFormatError("the zlib stream is truncated or followed by other bytes")
    return out


def _unframe(view: memoryview) -> Any:
    if view.nbytes < _HEADER.size:
        raise CheckpointFormatError("too short for a taskkit checkpoint frame")
    magic, count, head_len = _HEADER.unpack_from(view, 0)
    if magic != _MAGIC:
        raise CheckpointFormatError("not a taskkit checkpoint frame (wrong magic bytes)")
    offset = _HEADER.size
    # every length is checked against the bytes there are before it is used
    if count > view.nbytes or offset + 8 * count > view.nbytes:
        raise CheckpointFormatError("frame header is cut short")
    lengths = struct.unpack_from(f"<{count}Q", view, offset)
    offset += 8 * count
    if head_len > view.nbytes - offset:
        raise CheckpointFormatError("frame length mismatch: the pickle is cut short")
    head = view[offset : offset + head_len]
    offset += head_len
    buffers = []
    for length in lengths:
        offset += -offset % _ALIGN
        if length > view.nbytes - offset:
            raise CheckpointFormatError("frame length mismatch: a buffer is cut short")
        buffers.append(view[offset : offset + length])
        offset += length
    if offset != view.nbytes:
        raise CheckpointFormatError(
            f"frame length mismatch: {offset} bytes described, {view.nbytes} stored"
        )
    return pickle.loads(head, buffers=buffers)


_THREAD_NAME = "taskkit-checkpoint-digest"


class Digest:
    """The digest (``algorithm``, BLAKE3 by default) of ``chunks``; computed on a thread for
    large payloads, so it overlaps the write.

    The hash releases the GIL on large buffers, as ``os.write`` does, so hashing and writing
    the same (unchanging) memory run in parallel. ``hexdigest()`` waits for the result.
    """

    def __init__(self, chunks: Sequence[Buffer], algorithm: str = DIGEST) -> None:
        self.algorithm = algorithm
        self._hash = new_hash(algorithm)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        total = sum(c.nbytes if isinstance(c, memoryview) else len(c) for c in chunks)
        if total < _THREAD_MIN:
            self._run(chunks)
        else:
            self._thread = threading.Thread(
                target=self._run, args=(chunks,), name=_THREAD_NAME, daemon=True
            )
            self._thread.start()

    def _run(self, chunks: Sequence[Buffer]) -> None:
        try:
            for chunk in chunks:
                self._hash.update(chunk)
        except BaseException as exc:  # handed to hexdigest()'s caller
            self._error = exc

    def hexdigest(self) -> str:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()


class StreamDigest:
    """The digest (``algorithm``, BLAKE3 by default) of pieces handed over one at a time,
    hashed on a thread while the next is read.

    A storage reads a checkpoint piece by piece into one buffer and passes each piece, once
    read, to ``update``; the thread hashes it while the storage reads the next (``readinto``
    and the hash both release the GIL), so a load costs about the longer of the two, not
    their sum. ``threaded=False`` hashes in the caller's thread (small data). ``hexdigest()``
    waits for the last piece; ``close()`` stops the thread without a result (a failed read).
    The pieces must not change until ``hexdigest()`` or ``close()`` returns.
    """

    def __init__(self, threaded: bool = True, algorithm: str = DIGEST) -> None:
        self.algorithm = algorithm
        self._hash = new_hash(algorithm)
        self._error: BaseException | None = None
        self._queue: queue.SimpleQueue[Buffer | None] | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name=_THREAD_NAME, daemon=True)
            self._thread.start()

    def update(self, piece: Buffer) -> None:
        """Hash ``piece`` next (on the thread, or now when not threaded)."""
        if self._queue is None:
            self._hash.update(piece)
        else:
            self._queue.put(piece)

    def _run(self) -> None:
        assert self._queue is not None
        while (piece := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._hash.update(piece)
                except BaseException as exc:  # handed to hexdigest()'s caller
                    self._error = exc

    def close(self) -> None:
        """Stop the thread once the pieces handed over are done (idempotent)."""
        if self._thread is not None:
            assert self._queue is not None
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def hexdigest(self) -> str:
        self.close()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()


@dataclass(frozen=True)
class Hashed:
    """Bytes a storage read and their digest (hex, of ``algorithm``), computed while they were
    read.

    ``read_hashed`` of ``DirectoryStorage``, ``DatabaseStorage`` and ``FsspecStorage`` (S3)
    return one; ``unseal`` compares ``digest`` with the manifest's instead of hashing ``data``
    again (when ``algorithm`` is the manifest's).
    """

    data: Buffer
    digest: str
    algorithm: str = DIGEST


def writable_buffer(size: int) -> memoryview:
    """``size`` writable bytes to read a checkpoint into; numpy arrays are loaded as views of it.

    Large ones are anonymous memory maps: page-aligned, and not zero-filled first (a
    ``bytearray`` is, which costs a pass over the memory before the read fills it).
    """
    if size < _THREAD_MIN:
        return memoryview(bytearray(size))
    return memoryview(mmap.mmap(-1, size))


def digest_of(data: Buffer, algorithm: str = DIGEST) -> str:
    """The digest of ``data`` as hex, BLAKE3 unless ``algorithm`` says otherwise (GIL released
    while hashing large buffers)."""
    hasher = new_hash(algorithm)
    hasher.update(data)
    return hasher.hexdigest()


@functools.cache
def library_versions() -> tuple[str, str | None, str | None]:
    """(Python, numpy, scikit-learn) versions, for the manifest; None when not installed.

    Read from package metadata, so saving does not import scikit-learn.
    """

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return platform.python_version(), version("numpy"), version("scikit-learn")
