"""``FsspecStorage``: checkpoints in object storage (S3, GCS, ...) or any fsspec filesystem."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
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
# 10,000 parts (640 GiB at 64 MiB). An object below two parts is one PUT. Measured on
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
# Bytes handed to the hashing thread at a time (fewer, larger hand-overs: less GIL ping-pong).
_HASH_STEP = 4 << 20
# How much of a GET aiohttp may hold unread before it stops reading the socket (twice this).
_RECEIVE_BUFFER = 8 << 20
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

    **Uploads, reads, retries.** On S3 a checkpoint below two ``part_size`` parts (128 MiB by
    default) is one PUT; a larger one a multipart upload of ``part_size`` parts,
    ``concurrency`` at a time (aborted if a part fails). Either sends the payload's chunks as
    they are (the arrays' own memory, never joined into one copy first). A load lists the
    run once, GETs its manifests concurrently (no HEAD first) and the data with one GET
    streamed into one buffer while a second thread hashes it; on a plain-HTTP endpoint
    (MinIO or Ceph in a cluster, no proxy) that GET is a presigned URL read straight into
    the buffer, past aiohttp's copies. botocore's CRC32 of each object is off (unless
    ``storage_options`` ask for it): the checkpoint's own digest is verified on every load.
    Each object operation is retried by taskkit's ``Retrying`` (``retry=``; default 5
    attempts, 0.2 s doubling to 5 s, jittered) when ``is_transient`` says so; s3fs's and
    botocore's own retries are turned off unless ``storage_options`` set them, so one policy
    decides. An upload cut midway is started again from its first byte.

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
            # No CRC32 of each object on top of the checkpoint's own digest, which a load
            # verifies before unpickling: two passes over the bytes (client and server) less
            # per save and per load. TLS (or, over plain HTTP, the SigV4-signed payload hash)
            # still guards the transfer.
            config.setdefault("request_checksum_calculation", "when_required")
            config.setdefault("response_checksum_validation", "when_required")
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
        self._direct: bool | None = None if self._s3 else False
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
        placed = False
        try:
            self._put(data_path, data)
            placed = True
            info = manifest()
            self._put(manifest_path, [info.to_json()])
        except BaseException:
            if placed:
                with contextlib.suppress(Exception):  # else remove_orphans takes it later
                    self._rm(data_path)  # its manifest was never written
            raise

    def _put(self, path: str, chunks: Sequence[Buffer]) -> None:
        """One object of ``chunks``' bytes in order (retried whole when transient)."""
        if self._s3:
            self._call(self._sync, self._upload, path, chunks)
        else:
            self._call(self.fs.pipe_file, path, _joined(chunks))

    async def _upload(self, path: str, chunks: Sequence[Buffer]) -> None:
        """One PUT of the chunks as they are, or a multipart upload of ``part_size`` parts,
        ``concurrency`` at a time, from two parts on (aborted if a part fails).

        The chunks are never joined: the body (``_Body``) sends memoryview slices of them, so a
        checkpoint is not copied in memory first (s3fs's ``pipe_file`` needs one ``bytes``,
        which botocore wraps in a ``BytesIO`` that aiohttp copies again).
        """
        bucket, key, _ = self.fs.split_path(path)
        views = [view for view in map(_byte_view, chunks) if view.nbytes]
        size = sum(view.nbytes for view in views)
        call = self.fs._call_s3
        if size < 2 * self.part_size:
            await call("put_object", Bucket=bucket, Key=key, Body=_Body(views))
            return
        upload = await call("create_multipart_upload", Bucket=bucket, Key=key)
        upload_id = upload["UploadId"]
        gate = asyncio.Semaphore(self.concurrency)

        async def put_part(number: int, start: int) -> dict[str, Any]:
            body = _Body(_sliced(views, start, min(start + self.part_size, size)))
            async with gate:
                out = await call(
                    "upload_part",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                )
            return {"PartNumber": number, "ETag": out["ETag"]}

        starts = range(0, size, self.part_size)
        tasks = [asyncio.ensure_future(put_part(i + 1, s)) for i, s in enumerate(starts)]
        try:
            parts = await asyncio.gather(*tasks)
            await call(
                "complete_multipart_upload",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": list(parts)},
            )
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):  # else remove_orphans aborts it later
                await call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            raise

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
        steps = {}
        for entry in self._list(directory):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            step = _step_of(name, ".json")
            if step is not None:
                steps[f"{directory}/{name}"] = step
        found = []
        for path, text in self._call(self._cat_all, list(steps)).items():
            step, name = steps[path], path.rsplit("/", 1)[-1]
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

    def _cat_all(self, paths: list[str]) -> dict[str, bytes]:
        """The objects at ``paths``, fetched concurrently (one GET each, no HEAD first); those
        deleted since they were listed are left out."""
        if not paths:
            return {}
        # s3fs reads an object of unknown size with a HEAD first unless max_concurrency is 1
        options = {"max_concurrency": 1} if self._s3 else {}
        fetched = self.fs.cat(paths, on_error="return", **options)
        out = {}
        for path in paths:
            value = fetched.get(self.fs._strip_protocol(path), fetched.get(path))
            if isinstance(value, FileNotFoundError) or value is None:
                continue  # deleted since the listing
            if isinstance(value, BaseException):
                raise value
            out[path] = value
        return out

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
        if self._plain_http():
            result: Hashed = self._call(self._get_direct, path, algorithm)
        else:
            result = self._call(self._sync, self._stream, path, algorithm)
        return result

    def _plain_http(self) -> bool:
        """Whether the data GET may bypass aiohttp (``_get_direct``): a plain-HTTP endpoint
        (MinIO, Ceph or moto inside a cluster), no proxy, no per-request options (requester
        pays, SSE-C) that a presigned URL would need sent as headers. Decided once."""
        if self._direct is None:
            self._sync(self.fs.set_session)
            endpoint = str(self.fs.s3.meta.endpoint_url or "")
            self._direct = (
                endpoint.startswith("http://")
                and not self.fs.req_kw
                and not getattr(self.fs, "s3_additional_kwargs", None)
                and not self.fs.config_kwargs.get("proxies")
                and not urllib.request.getproxies()
            )
        return self._direct

    def _get_direct(self, path: str, algorithm: str = DIGEST) -> Hashed:
        """The data object by one blocking GET of a presigned URL, read (``readinto``) straight
        into the checkpoint's buffer, hashed on a second thread as it fills.

        aiohttp hands a body over as 256 KiB ``bytes`` that must then be copied into place:
        about 80 ms of CPU per 100 MB more than this, on the core the hashing needs.
        """
        bucket, key, version = self.fs.split_path(path)
        params = {"Bucket": bucket, "Key": key, **({"VersionId": version} if version else {})}
        url = urllib.parse.urlsplit(self._sync(self._presign, params))
        timeout = self.fs.config_kwargs.get("read_timeout", 60)
        connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
        try:
            connection.request("GET", f"{url.path}?{url.query}")
            response = connection.getresponse()
            if response.status != 200:
                raise _status_error(response.status, response.read(4096), path)
            size = int(response.getheader("Content-Length") or 0)
            view = writable_buffer(size)
            digest = StreamDigest(threaded=size >= _THREAD_MIN, algorithm=algorithm)
            done = hashed = 0
            try:
                while done < size:
                    got = response.readinto(view[done : min(size, done + _HASH_STEP)])
                    if not got:
                        break
                    done += got
                    if done - hashed >= _HASH_STEP or done == size:
                        digest.update(view[hashed:done])  # while the next bytes come in
                        hashed = done
            except http.client.IncompleteRead as exc:  # cut mid-body: retried, as aiohttp's
                digest.close()
                raise ConnectionResetError(errno.ECONNRESET, f"GET {path} cut short") from exc
            except BaseException:
                digest.close()
                raise
            hexdigest = digest.hexdigest()
        finally:
            connection.close()
        # shorter than announced (cut): what is there, the size check refuses it
        return Hashed(view[:done] if done < size else view, hexdigest, algorithm)

    async def _presign(self, params: dict[str, str]) -> str:
        await self.fs.set_session()
        url: str = await self.fs.s3.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=900
        )
        return url

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
            read = _reader(body, size)
            done = hashed = 0
            try:
                while done < size:
                    piece = await read()
                    if not piece:
                        break
                    end = min(size, done + len(piece))
                    view[done:end] = piece[: end - done]
                    done = end
                    if done - hashed >= _HASH_STEP or done == size:
                        digest.update(view[hashed:done])  # while the next pieces come in
                        hashed = done
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


# The pieces in which ``_Body`` hands the upload to aiohttp (each sent from the chunk's memory).
_SEND_STEP = 1 << 20


class _Body:
    """An upload body over byte views in order, never joined into one copy.

    botocore reads it as a file (``read``, ``seek``, ``tell``, ``len``: the SigV4 payload hash
    over plain HTTP, a CRC32 if asked) in small pieces; aiohttp, which takes any async
    iterable (with botocore's ``Content-Length``), sends it as memoryview slices of the views
    themselves. Not an ``io.IOBase``: aiobotocore would wrap that in a payload aiohttp reads
    through a thread pool.
    """

    def __init__(self, views: Sequence[memoryview]) -> None:
        self._views = list(views)
        self._size = sum(view.nbytes for view in self._views)
        self._pos = 0

    def __len__(self) -> int:
        return self._size

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._size)[whence]
        self._pos = max(0, min(self._size, base + offset))
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        pieces = _sliced(self._views, self._pos, end)
        self._pos = end
        return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)

    async def __aiter__(self) -> AsyncIterator[memoryview]:
        for view in _sliced(self._views, self._pos, self._size):
            for start in range(0, view.nbytes, _SEND_STEP):
                yield view[start : start + _SEND_STEP]
        self._pos = self._size


def _status_error(status: int, text: bytes, path: str) -> OSError:
    """The error s3fs would raise for a GET answered ``status`` (``is_transient`` reads it)."""
    message = f"HTTP {status} for {path}: {text[:300].decode(errors='replace')}"
    if status == 404:
        return FileNotFoundError(errno.ENOENT, message, path)
    if status == 403:
        return PermissionError(errno.EACCES, message, path)
    if status in (429, 503):
        return OSError(errno.EBUSY, message, path)
    if status == 408:
        return TimeoutError(errno.ETIMEDOUT, message, path)
    return OSError(
        getattr(errno, "EREMOTEIO", errno.EAGAIN) if status >= 500 else errno.EIO, message, path
    )


def _reader(body: Any, size: int) -> Callable[[], Awaitable[bytes]]:
    """How ``_stream`` takes the GET's bytes: each piece aiohttp received as it is (no join
    into larger reads) when the body is aiohttp's stream unwrapped; through the body's own
    ``read`` when botocore wraps it (to validate a response checksum, if configured)."""
    try:
        from aiobotocore.response import AioStreamingBody  # type: ignore[import-untyped]  # noqa: PLC0415
    except ImportError:  # pragma: no cover - s3fs brings it
        AioStreamingBody = None
    if AioStreamingBody is not None and type(body) is AioStreamingBody:  # not a checksum wrapper
        content = body.raw_stream.content
        # aiohttp pauses the socket whenever 128 KiB wait unread: let more in per wakeup
        set_size = getattr(content, "set_read_chunk_size", None)
        if callable(set_size):
            set_size(min(size, _RECEIVE_BUFFER))
        readany: Callable[[], Awaitable[bytes]] = content.readany
        return readany

    async def read() -> bytes:
        piece: bytes = await body.read(_READ_STEP)
        return piece

    return read


def _byte_view(chunk: Buffer) -> memoryview:
    view = memoryview(chunk)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _sliced(views: Sequence[memoryview], start: int, end: int) -> list[memoryview]:
    """The bytes ``start:end`` of ``views`` taken in order, as slices of them (no copy)."""
    out = []
    offset = 0
    for view in views:
        if offset >= end:
            break
        following = offset + view.nbytes
        if following > start:
            out.append(view[max(0, start - offset) : min(view.nbytes, end - offset)])
        offset = following
    return out


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
