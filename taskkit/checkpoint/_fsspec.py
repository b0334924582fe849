"""``FsspecStorage``: checkpoints in object storage (S3, GCS, ...) or any fsspec filesystem."""

from __future__ import annotations

import contextlib
import errno
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from taskkit.checkpoint._codec import (
    _THREAD_MIN,
    DIGEST,
    Buffer,
    Hashed,
    StreamDigest,
    writable_buffer,
)
from taskkit.checkpoint._info import CheckpointInfo, validate_run_id
from taskkit.errors import CheckpointWarning, ConfigurationError
from taskkit.recovery import Retrying

__all__ = ["FsspecStorage", "is_transient"]

# Multipart part size: S3 wants at least 5 MiB per part (the last excepted) and at most
# 10,000 parts (640 GiB at 64 MiB). s3fs puts an object below two parts in one PUT. Measured on
# moto (docs/benchmarks.md), one 100 MB PUT took 1.6 s, 7 parallel 16 MiB parts 2.4 s, and 7
# parallel ranged GETs 1.3 s against 0.46 s for one GET; on AWS, parallel parts are faster per
# object (about 100 MB/s per connection): pass a smaller part_size there.
DEFAULT_PART_SIZE = 64 << 20
DEFAULT_CONCURRENCY = 8
# A data object without a manifest this much older than the newest object we can see is an
# orphan of a crashed write (a live writer puts its manifest right after its data).
DEFAULT_ORPHAN_GRACE = 600.0
# Bytes taken from the GET's stream at a time while loading (each hashed while the next comes).
_READ_STEP = 1 << 20
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN",
        "EBUSY",  # s3fs: 503 SlowDown / ServiceUnavailable, 409, OperationAborted
        "EREMOTEIO",  # s3fs: 500 InternalError
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EPIPE",
        "ENETUNREACH",
        "EHOSTUNREACH",
    )
    if hasattr(errno, name)
)
_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether an object-storage error may go away by itself (retried), or never (raised).

    Transient: connection failures and timeouts (refused, reset, closed mid-response, the
    endpoint unreachable), HTTP 5xx, 408 and 429 (S3's ``SlowDown``, ``InternalError``,
    ``ServiceUnavailable``). Never retried: a missing object or bucket, a refused permission
    or signature, a bad request (4xx), and anything that is not an I/O error.

    Example::

        is_transient(ConnectionResetError())        # True
        is_transient(FileNotFoundError("s3://b/k"))  # False
    """
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    status = _http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return isinstance(exc, _transport_errors())


def _http_status(exc: BaseException) -> int | None:
    for error in (exc, exc.__cause__):
        response = getattr(error, "response", None)
        if isinstance(response, Mapping):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
    return None


_TRANSPORT: tuple[type[BaseException], ...] | None = None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP clients' own connection errors (not OSError subclasses), when installed."""
    global _TRANSPORT  # computed once, the imports are slow
    if _TRANSPORT is None:
        found: list[type[BaseException]] = []
        try:
            from botocore.exceptions import (  # type: ignore[import-untyped]  # noqa: PLC0415
                ConnectionError as BotoConnectionError,
            )
            from botocore.exceptions import (  # noqa: PLC0415
                HTTPClientError,
                IncompleteReadError,
                ResponseStreamingError,
            )

            found += [BotoConnectionError, HTTPClientError, IncompleteReadError]
            found.append(ResponseStreamingError)
        except ImportError:
            pass
        try:
            from aiohttp import ClientConnectionError, ClientPayloadError  # noqa: PLC0415

            found += [ClientConnectionError, ClientPayloadError]
        except ImportError:
            pass
        try:
            from fsspec.exceptions import FSTimeoutError  # type: ignore[import-untyped]  # noqa: PLC0415

            found.append(FSTimeoutError)
        except ImportError:
            pass
        _TRANSPORT = tuple(found)
    return _TRANSPORT


def _data_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def _manifest_name(step: int) -> str:
    return f"step-{step:08d}.json"


def _warn(message: str) -> None:
    warnings.warn(CheckpointWarning(message), stacklevel=3)


class FsspecStorage:
    """Checkpoints as objects: ``<url>/<run_id>/step-00000042.ckpt`` (data) and ``.json``.

    ``url`` is anything fsspec opens: ``s3://bucket/prefix`` (``pip install taskkit[s3]``;
    credentials and ``AWS_ENDPOINT_URL`` from the environment as boto3 reads them),
    ``gs://bucket/prefix`` (gcsfs), ``file:///path``, ``memory://``. Nothing is kept on the
    local host, so any host with the same URL and signing key resumes a run.

    **Atomicity without rename.** Object stores have no rename, but a PUT is atomic: an object
    is visible whole or not at all, and a multipart upload only once it is completed. The data
    object is uploaded first; the manifest object is put only after the data upload completed;
    ``infos`` lists manifests only. A write that dies (the process, the server, the network)
    before its manifest leaves at most a data object nobody lists (or an unfinished multipart
    upload, invisible; a bucket lifecycle rule ``AbortIncompleteMultipartUpload`` reclaims its
    parts), and the earlier checkpoints as they were. Replacing a step deletes its old
    manifest first. ``remove_orphans`` deletes data objects without a manifest once they are
    ``orphan_grace`` seconds older than the newest object of the run (server clocks, not ours),
    and on S3 aborts the run's multipart uploads begun ``orphan_grace`` seconds ago (a writer
    whose own abort failed because the server was gone); a failed write deletes its own data
    object at once.

    **Multipart and retries.** On S3 a checkpoint of at least two ``part_size`` parts (128 MiB
    by default) is uploaded as a multipart upload of ``part_size`` parts, ``concurrency`` at a
    time (aborted if a part fails), and read back with parallel ranged GETs of two parts each;
    a smaller one is one PUT and one GET. Each object operation is retried
    by taskkit's ``Retrying`` (``retry=``; default 5 attempts, 0.2 s doubling to 5 s, jittered)
    when ``is_transient`` says so; s3fs's and botocore's own retries are turned off unless
    ``storage_options`` set them, so one policy decides.

    Example::

        storage = FsspecStorage("s3://ml-checkpoints/prod")
        store = CheckpointStore("exp-1", storage=storage)
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        orphan_grace: float = DEFAULT_ORPHAN_GRACE,
        retry: Retrying | None = None,
    ) -> None:
        try:
            import fsspec  # type: ignore[import-untyped]  # noqa: PLC0415
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError(
                f"checkpoints at {_safe(url)!r} need fsspec: pip install 'taskkit[s3]'"
            ) from exc
        if part_size < 5 << 20:
            raise ConfigurationError(f"part_size must be at least 5 MiB, got {part_size}")
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, got {concurrency}")
        options = dict(storage_options or {})
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        if protocol in ("s3", "s3a"):
            # One retry policy (ours): s3fs retries 5 times and botocore up to 5 more by default.
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
            options["config_kwargs"] = config
            options.setdefault("max_concurrency", concurrency)
        # A listing cached by fsspec would hide other hosts' checkpoints.
        options.setdefault("use_listings_cache", False)
        options.setdefault("skip_instance_cache", True)
        try:
            fs, root = fsspec.core.url_to_fs(url, **options)
        except (ImportError, ValueError) as exc:
            raise ConfigurationError(
                f"checkpoint storage {_safe(url)!r} cannot be opened: {exc}"
            ) from exc
        if protocol in ("s3", "s3a"):
            fs.retries = 1  # s3fs's own retry loop: one attempt (a class attribute, not an option)
        #: The fsspec filesystem.
        self.fs = fs
        #: The path under which each run has a prefix of its own (no scheme).
        self.root = root.rstrip("/")
        self.url = url
        self._s3 = protocol in ("s3", "s3a")
        self.part_size = part_size
        self.concurrency = concurrency
        self.orphan_grace = orphan_grace
        self.retry = retry or Retrying(
            max_attempts=5,
            delay=0.2,
            backoff=2.0,
            max_delay=5.0,
            jitter=0.5,
            exceptions=(Exception,),
            retry_if=is_transient,
        )

    def __repr__(self) -> str:
        return f"FsspecStorage({_safe(self.url)!r})"

    def _run_path(self, run_id: str) -> str:
        return f"{self.root}/{validate_run_id(run_id)}"

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.retry.call(fn, *args, **kwargs)

    def _rm(self, path: str) -> bool:
        try:
            self._call(self.fs.rm_file, path)
        except FileNotFoundError:
            return False
        return True

    # -- writing --------------------------------------------------------------------------

    def write(
        self,
        run_id: str,
        step: int,
        data: Sequence[Buffer],
        manifest: Callable[[], CheckpointInfo],
    ) -> None:
        """Upload the data object (multipart when large), then the manifest object."""
        directory = self._run_path(run_id)
        data_path = f"{directory}/{_data_name(step)}"
        manifest_path = f"{directory}/{_manifest_name(step)}"
        # Replacing a step: its old manifest goes first, so none describes other data.
        self._rm(manifest_path)
        if not self._s3:
            self._call(self.fs.makedirs, directory, exist_ok=True)
        body = _joined(data)
        placed = False
        try:
            self._put(data_path, body)
            placed = True
            info = manifest()
            self._put(manifest_path, info.to_json())
        except BaseException:
            if placed:
                with contextlib.suppress(Exception):  # else remove_orphans takes it later
                    self._rm(data_path)  # its manifest was never written
            raise

    def _put(self, path: str, body: bytes | bytearray | memoryview) -> None:
        if self._s3:
            self._call(
                self.fs.pipe_file,
                path,
                body,
                chunksize=self.part_size,
                max_concurrency=self.concurrency,
            )
        else:
            self._call(
                self.fs.pipe_file, path, bytes(body) if isinstance(body, memoryview) else body
            )

    # -- reading --------------------------------------------------------------------------

    def _list(self, path: str) -> list[dict[str, Any]]:
        try:
            entries: list[dict[str, Any]] = self._call(self.fs.ls, path, detail=True)
        except FileNotFoundError:
            return []
        return entries

    def infos(self, run_id: str) -> list[CheckpointInfo]:
        """The run's manifests, oldest step first; an unreadable one, or one whose step is not
        its name's, is skipped with a warning."""
        directory = self._run_path(run_id)
        found = []
        for entry in self._list(directory):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            step = _step_of(name, ".json")
            if step is None:
                continue
            try:
                text = self._call(self.fs.cat_file, f"{directory}/{name}")
            except FileNotFoundError:
                continue  # deleted since the listing
            try:
                info = CheckpointInfo.from_json(text)
            except ValueError as exc:
                _warn(f"checkpoint manifest {directory}/{name} is unreadable, ignored: {exc}")
                continue
            if info.step != step:
                _warn(
                    f"checkpoint manifest {directory}/{name} describes step {info.step}, not "
                    "the step of its name (copied or renamed?); ignored"
                )
                continue
            found.append(info)
        return sorted(found, key=lambda info: info.step)

    def read(self, run_id: str, step: int) -> Buffer:
        """The data object's bytes (parallel ranged GETs on S3 when large);
        ``FileNotFoundError`` if there is none."""
        path = f"{self._run_path(run_id)}/{_data_name(step)}"
        if self._s3:
            result: Buffer = self._call(
                self.fs.cat_file,
                path,
                chunksize=2 * self.part_size,
                max_concurrency=self.concurrency,
            )
        else:
            result = self._call(self.fs.cat_file, path)
        return result

    def read_hashed(self, run_id: str, step: int, algorithm: str = DIGEST) -> Buffer | Hashed:
        """``read``, and on S3 the digest (``algorithm``: BLAKE3 unless the manifest names
        another) of the bytes, hashed on a second thread while the next piece of the GET
        arrives (one GET streamed into one buffer, no copy after)."""
        if not self._s3:
            return self.read(run_id, step)
        path = f"{self._run_path(run_id)}/{_data_name(step)}"
        result: Hashed = self._call(self._sync, self._stream, path, algorithm)
        return result

    def _sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        from fsspec.asyn import sync  # type: ignore[import-untyped]  # noqa: PLC0415

        return sync(self.fs.loop, fn, *args)

    async def _stream(self, path: str, algorithm: str = DIGEST) -> Hashed:
        bucket, key, _ = self.fs.split_path(path)
        response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            size = int(response["ContentLength"])
            view = writable_buffer(size)
            digest = StreamDigest(threaded=size >= _THREAD_MIN, algorithm=algorithm)
            done = 0
            try:
                while done < size:
                    piece = await body.read(min(_READ_STEP, size - done))
                    if not piece:
                        break
                    view[done : done + len(piece)] = piece
                    digest.update(view[done : done + len(piece)])
                    done += len(piece)
            except BaseException:
                digest.close()
                raise
            hexdigest = digest.hexdigest()
        finally:
            body.close()
        # shorter than announced (cut): what is there, the size check refuses it
        return Hashed(view[:done] if done < size else view, hexdigest, algorithm)

    # -- deleting -------------------------------------------------------------------------

    def delete(self, run_id: str, step: int) -> None:
        """Delete the manifest object, then the data object."""
        directory = self._run_path(run_id)
        self._rm(f"{directory}/{_manifest_name(step)}")
        self._rm(f"{directory}/{_data_name(step)}")

    def runs(self) -> list[str]:
        """Run ids that have objects under the root, sorted; ``FileNotFoundError`` when the
        bucket does not exist."""
        names = set()
        entries = self._list(self.root)
        if not entries and self._s3:
            bucket = self.root.split("/", 1)[0]
            if not self._call(self.fs.exists, bucket):
                # No checkpoints yet is normal; no bucket is a configuration to fix.
                raise FileNotFoundError(errno.ENOENT, "the bucket does not exist", bucket)
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") == "directory" and _is_run_id(name):
                names.add(name)
        return sorted(names)

    def remove_orphans(self, run_id: str) -> int:
        """Delete data objects without a manifest that are ``orphan_grace`` seconds older than
        the run's newest object (a live writer puts its manifest right after its data)."""
        directory = self._run_path(run_id)
        entries = self._list(directory)
        manifests, data = set(), {}
        times = []
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            modified = _modified(entry)
            if modified is not None:
                times.append(modified)
            if (step := _step_of(name, ".json")) is not None:
                manifests.add(step)
            elif (step := _step_of(name, ".ckpt")) is not None:
                data[step] = modified
        newest = max(times, default=None)
        removed = 0
        for step in sorted(set(data) - manifests):
            modified = data[step]
            if newest is not None and modified is not None:
                if newest - modified < self.orphan_grace:
                    continue
            elif self.orphan_grace > 0:
                continue  # no times to tell by: only an explicit grace of 0 deletes
            removed += self._rm(f"{directory}/{_data_name(step)}")
        if self._s3:
            removed += self._abort_uploads(directory)
        return removed

    def _abort_uploads(self, directory: str) -> int:
        """Abort the run's unfinished multipart uploads begun ``orphan_grace`` seconds ago or
        more (a writer whose abort failed: the server was gone), so their parts stop costing."""
        bucket, _, prefix = directory.partition("/")
        listed = self._call(
            self.fs.call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=f"{prefix}/"
        )
        aborted = 0
        now = time.time()
        for upload in listed.get("Uploads", []):
            began = _modified({"LastModified": upload.get("Initiated")})
            if began is not None and now - began < self.orphan_grace:
                continue
            try:
                self._call(
                    self.fs.call_s3,
                    "abort_multipart_upload",
                    Bucket=bucket,
                    Key=upload["Key"],
                    UploadId=upload["UploadId"],
                )
            except FileNotFoundError:
                continue  # completed or aborted since the listing
            aborted += 1
        return aborted


def _joined(data: Sequence[Buffer]) -> bytes | bytearray | memoryview:
    """One bytes-like body for the upload (a single chunk is not copied)."""
    if len(data) == 1 and isinstance(data[0], bytes | bytearray):
        return data[0]
    return b"".join(data)


def _step_of(name: str, suffix: str) -> int | None:
    if not (name.startswith("step-") and name.endswith(suffix)):
        return None
    digits = name[len("step-") : -len(suffix)]
    return int(digits) if digits.isdigit() else None


def _modified(entry: Mapping[str, Any]) -> float | None:
    value = entry.get("LastModified", entry.get("mtime", entry.get("updated")))
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _is_run_id(name: str) -> bool:
    try:
        validate_run_id(name)
    except ValueError:
        return False
    return True


def _safe(url: str) -> str:
    """The URL without credentials (``s3://key:secret@bucket`` is accepted by fsspec)."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
