"""``FsspecStorage`` on a real S3-protocol server: moto's standalone server, a subprocess on
127.0.0.1 (tests/_support/s3.py). Save, load, retention, tampering, resuming on another "host"
(a second storage object sharing nothing with the first but the URL and the key), the server
dying mid-upload, transient errors retried through taskkit's retry, crash orphans cleaned.

The server "dies" as its clients see it: a proxy subprocess in front of moto SIGKILLs itself
once a given number of upload bytes went through (connections reset, new ones refused). Killing
moto itself would also lose, from memory, the earlier checkpoints this test must find intact.
"""

from __future__ import annotations

import asyncio
import errno
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from taskkit.checkpoint import CheckpointStore, FsspecStorage, storage_from_settings
from taskkit.checkpoint._fsspec import is_transient
from taskkit.config import Settings
from taskkit.errors import CheckpointError, CheckpointTampered, CheckpointWarning
from taskkit.recovery import Retrying
from tests._support.s3 import KEY, REGION, MotoServer, Proxy, new_bucket

SECRET = "test-secret-key-16b"
MiB = 1 << 20


@pytest.fixture(scope="module")
def server() -> Iterator[MotoServer]:
    with MotoServer() as moto:
        yield moto


@pytest.fixture
def bucket(server: MotoServer) -> str:
    return new_bucket(server)


def storage_on(server: MotoServer, bucket: str, url: str | None = None, **kw: Any) -> FsspecStorage:
    return FsspecStorage(f"s3://{bucket}/ckpt", storage_options=server.options(url), **kw)


def keys(server: MotoServer, bucket: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def big_state(seed: int, mib: int = 24) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(mib * MiB // 8), "seed": seed}


def test_save_load_and_retention_on_s3(server, bucket):
    store = CheckpointStore(
        "run-1", storage=storage_on(server, bucket), secret_key=SECRET, keep_last=2
    )
    for step in range(4):
        store.save({"step": step, "w": np.full(1000, step)}, step=step, is_best=step == 0)
    checkpoint = store.load_latest()
    assert checkpoint.info.step == 3
    assert np.array_equal(checkpoint.state["w"], np.full(1000, 3))
    # keep_last=2 plus the best (step 0): the data of steps 1 is deleted with its manifest
    assert [i.step for i in store.list()] == [0, 2, 3]
    assert keys(server, bucket) == [
        f"ckpt/run-1/step-{s:08d}.{kind}" for s in (0, 2, 3) for kind in ("ckpt", "json")
    ]
    assert store.storage.runs() == ["run-1"]
    store.close()


def test_another_host_resumes_with_nothing_local(server, bucket):
    """A second storage object (no shared cache, no local file) sees what the first wrote."""
    first = CheckpointStore("run-x", storage=storage_on(server, bucket), secret_key=SECRET)
    assert first.load_latest() is None  # listed once: a cached listing would hide the save
    second = CheckpointStore("run-x", storage=storage_on(server, bucket), secret_key=SECRET)
    assert second.load_latest() is None
    first.save({"epoch": 7}, step=7)
    assert second.load_latest().state == {"epoch": 7}
    second.save({"epoch": 8}, step=8)
    assert first.load_latest().state == {"epoch": 8}


def test_a_large_checkpoint_goes_up_in_parts_and_comes_back_whole(server, bucket):
    storage = storage_on(server, bucket, part_size=5 * MiB, concurrency=3)
    calls: list[str] = []
    client_call = storage.fs._call_s3

    async def spy(method: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(method)
        return await client_call(method, *args, **kwargs)

    storage.fs._call_s3 = spy
    state = big_state(1, mib=16)
    store = CheckpointStore("big", storage=storage, secret_key=SECRET, background=True)
    store.save(state, step=1)
    store.wait()
    assert calls.count("upload_part") == 4  # 16 MiB + pickle header in 5 MiB parts
    assert "complete_multipart_upload" in calls
    loaded = store.load_latest()
    assert np.array_equal(loaded.state["w"], state["w"])
    store.close()


def test_a_save_sends_the_arrays_own_memory_and_a_load_lists_once(server, bucket):
    """The requests of a save and a load: no HEAD before a GET, one LIST, and the data PUT's
    body is the array's memory itself (not a joined copy of the checkpoint)."""
    storage = storage_on(server, bucket)
    calls: list[tuple[str, str]] = []
    bodies: list[Any] = []
    real = storage.fs._call_s3

    async def spy(method: str, *args: Any, **kwargs: Any) -> Any:
        calls.append((method, kwargs.get("Key", "").rsplit("/", 1)[-1]))
        if method == "put_object":
            bodies.append(kwargs["Body"])
        return await real(method, *args, **kwargs)

    storage.fs._call_s3 = spy
    store = CheckpointStore("calls", storage=storage, secret_key=SECRET, keep_last=1)
    state = {"w": np.arange(MiB // 8, dtype=np.float64)}
    calls.clear()
    store.save(state, step=1)
    assert calls == [
        ("delete_object", "step-00000001.json"),  # a replaced step loses its manifest first
        ("put_object", "step-00000001.ckpt"),
        ("put_object", "step-00000001.json"),
        ("list_objects_v2", ""),  # retention
        ("get_object", "step-00000001.json"),
    ]
    assert not isinstance(bodies[0], bytes | bytearray)
    assert any(np.shares_memory(np.asarray(view), state["w"]) for view in bodies[0]._views)
    calls.clear()
    loaded = store.load_latest()
    assert np.array_equal(loaded.state["w"], state["w"])
    # the data GET: one presigned GET on a plain-HTTP endpoint, not through aiobotocore
    assert calls == [("list_objects_v2", ""), ("get_object", "step-00000001.json")]
    store.close()


@pytest.mark.parametrize("direct", [True, False], ids=["presigned-get", "aiohttp"])
def test_a_load_reads_the_data_whole_either_way(server, bucket, direct):
    storage = storage_on(server, bucket)
    store = CheckpointStore("paths", storage=storage, secret_key=SECRET)
    state = big_state(5, mib=9)  # hashed on a thread, in several pieces
    store.save(state, step=1)
    storage._direct = direct
    assert np.array_equal(store.load_latest().state["w"], state["w"])
    with pytest.raises(FileNotFoundError):
        storage.read_hashed("paths", 2)
    store.close()


def test_an_upload_body_reads_and_iterates_its_chunks_without_joining_them():
    from taskkit.checkpoint._fsspec import _Body, _byte_view

    chunks = [b"head", bytearray(b"-middle-"), memoryview(np.arange(5, dtype=np.int64))]
    views = [_byte_view(chunk) for chunk in chunks]
    whole = b"".join(bytes(view) for view in views)
    body = _Body(views)
    assert len(body) == len(whole) == 52
    assert body.read(3) + body.read(10) + body.read() == whole
    assert body.read(5) == b""
    assert body.seek(-5, 2) == body.tell() == 47
    assert body.read() == whole[-5:]
    body.seek(0)

    async def sent() -> list[Any]:
        return [piece async for piece in body]

    pieces = asyncio.run(sent())
    assert all(isinstance(piece, memoryview) for piece in pieces)
    assert b"".join(bytes(piece) for piece in pieces) == whole
    assert np.shares_memory(np.asarray(pieces[-1]), np.asarray(views[-1]))


def test_tampered_manifest_is_refused_and_changed_data_falls_back(server, bucket):
    store = CheckpointStore("tamper", storage=storage_on(server, bucket), secret_key=SECRET)
    store.save({"v": 1}, step=1)
    store.save({"v": 2}, step=2)
    client = server.client()
    data_key = "ckpt/tamper/step-00000002.ckpt"
    body = bytearray(client.get_object(Bucket=bucket, Key=data_key)["Body"].read())
    body[-5] ^= 0xFF
    client.put_object(Bucket=bucket, Key=data_key, Body=bytes(body))
    with pytest.warns(CheckpointWarning, match="step 2"):
        assert store.load_latest().state == {"v": 1}  # checksum fails before unpickling
    manifest_key = "ckpt/tamper/step-00000001.json"
    text = client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()
    client.put_object(Bucket=bucket, Key=manifest_key, Body=text.replace(b'"pickle"', b'"joblib"'))
    with pytest.raises(CheckpointTampered), warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        store.load_latest()


def fast_retry(sleep: Any = lambda _: None, attempts: int = 3) -> Retrying:
    return Retrying(
        max_attempts=attempts,
        delay=0.01,
        exceptions=(Exception,),
        retry_if=is_transient,
        sleep=sleep,
    )


def test_server_killed_mid_upload_keeps_the_previous_checkpoint(server, bucket):
    with Proxy(int(server.port)) as proxy:
        storage = storage_on(
            server, bucket, proxy.url, part_size=5 * MiB, concurrency=2, retry=fast_retry()
        )
        store = CheckpointStore("crash", storage=storage, secret_key=SECRET)
        before = big_state(1)
        store.save(before, step=1)
        # The next upload kills the "server" after 12 MiB of its 24 MiB went through.
        proxy.restart(die_after=12 * MiB)
        with pytest.raises(CheckpointError, match="run 'crash', step 2: could not be written"):
            store.save(big_state(2), step=2)
        assert proxy.process.poll() is not None  # it died mid-upload
        # What the server holds: the first checkpoint whole, nothing of step 2 that is listed
        assert keys(server, bucket) == [
            "ckpt/crash/step-00000001.ckpt",
            "ckpt/crash/step-00000001.json",
        ]
        proxy.restart()
        # Any host, fresh: the previous checkpoint, never a partial one
        other = CheckpointStore("crash", storage=storage_on(server, bucket), secret_key=SECRET)
        assert [i.step for i in other.list()] == [1]
        loaded = other.load_latest()
        assert loaded.info.step == 1
        assert np.array_equal(loaded.state["w"], before["w"])


def test_a_transient_cut_is_retried_through_taskkits_retry(server, bucket):
    """The server dies mid-upload and is back before the retry: the save succeeds, once."""
    with Proxy(int(server.port)) as proxy:
        waits: list[float] = []

        def sleep(seconds: float) -> None:
            waits.append(seconds)
            if proxy.process.poll() is not None:
                proxy.restart()  # back up while we wait

        storage = storage_on(
            server, bucket, proxy.url, part_size=5 * MiB, concurrency=2, retry=fast_retry(sleep)
        )
        store = CheckpointStore("flaky", storage=storage, secret_key=SECRET)
        proxy.restart(die_after=8 * MiB)
        state = big_state(3, mib=16)
        store.save(state, step=1)
        assert len(waits) == 1  # one cut, one retry
        assert np.array_equal(store.load_latest().state["w"], state["w"])
    # The cut upload's abort could not reach the server: its parts stay until an orphan sweep
    uploads = server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["ckpt/flaky/step-00000001.ckpt"]
    direct = storage_on(server, bucket, orphan_grace=0)
    assert direct.remove_orphans("flaky") == 1
    assert server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert [i.step for i in direct.infos("flaky")] == [1]


def test_a_crashed_writers_data_object_is_removed_as_an_orphan(server, bucket):
    client = server.client()
    store = CheckpointStore("orphans", storage=storage_on(server, bucket), secret_key=SECRET)
    store.save({"v": 1}, step=1)
    # A writer died between its data object and its manifest:
    client.put_object(Bucket=bucket, Key="ckpt/orphans/step-00000002.ckpt", Body=b"half")
    assert [i.step for i in store.list()] == [1]  # listed by manifest only
    # Within the grace it may be a live writer's: kept
    assert storage_on(server, bucket).remove_orphans("orphans") == 0
    reopened = CheckpointStore(
        "orphans", storage=storage_on(server, bucket, orphan_grace=0), secret_key=SECRET
    )
    assert keys(server, bucket) == [
        "ckpt/orphans/step-00000001.ckpt",
        "ckpt/orphans/step-00000001.json",
    ]
    assert reopened.load_latest().state == {"v": 1}


def test_a_failed_manifest_put_deletes_its_data_object(server, bucket, monkeypatch):
    storage = storage_on(server, bucket, retry=fast_retry())
    store = CheckpointStore("half", storage=storage, secret_key=SECRET)
    real = storage.fs._call_s3

    async def call_s3(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "put_object" and kwargs["Key"].endswith(".json"):
            raise PermissionError(errno.EACCES, "AccessDenied")  # as s3fs raises a 403
        return await real(method, *args, **kwargs)

    monkeypatch.setattr(storage.fs, "_call_s3", call_s3)
    with pytest.raises(CheckpointError):
        store.save({"v": 1}, step=1)
    assert keys(server, bucket) == []


def test_settings_url_makes_an_object_storage(server, bucket, monkeypatch):
    for name, value in {
        "AWS_ENDPOINT_URL": server.url,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": KEY,
        "AWS_DEFAULT_REGION": REGION,
        "TASKKIT_CHECKPOINT_DIR": f"s3://{bucket}/from-env",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.checkpoint_dir == f"s3://{bucket}/from-env"
    storage = storage_from_settings(settings)
    assert isinstance(storage, FsspecStorage)
    CheckpointStore("env-run", storage=storage, secret_key=SECRET).save({"v": 1}, step=0)
    assert "from-env/env-run/step-00000000.json" in " ".join(keys(server, bucket))


def test_file_urls_are_folders_and_other_schemes_stay_urls(tmp_path):
    assert Settings(checkpoint_dir=f"file://{tmp_path}/c").checkpoint_dir == tmp_path / "c"
    assert Settings(checkpoint_dir="gs://b/p").checkpoint_dir == "gs://b/p"
    assert Settings(checkpoint_dir="rel").checkpoint_dir.is_absolute()
    memory = storage_from_settings(Settings(checkpoint_dir="memory://taskkit-test/ck"))
    store = CheckpointStore("m", storage=memory, secret_key=SECRET)
    store.save({"v": 1}, step=0)
    assert CheckpointStore("m", storage=memory, secret_key=SECRET).load_latest().state == {"v": 1}


def test_which_errors_are_transient():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(status: int, code: str) -> ClientError:
        response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(response, "PutObject")  # type: ignore[arg-type]

    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(OSError(errno.EBUSY, "SlowDown"))
    for status, code in [(500, "InternalError"), (503, "SlowDown"), (429, "TooMany")]:
        assert is_transient(client_error(status, code))
    wrapped = OSError(errno.EIO, "odd")
    wrapped.__cause__ = client_error(502, "BadGateway")
    assert is_transient(wrapped)
    assert not is_transient(FileNotFoundError("s3://b/k"))
    assert not is_transient(PermissionError("AccessDenied"))
    assert not is_transient(client_error(400, "InvalidArgument"))
    assert not is_transient(ValueError("x"))


def test_background_writes_to_s3_are_serialised_before_returning(server, bucket):
    storage = storage_on(server, bucket)
    gate = threading.Event()
    real_put = storage._put

    def slow_put(path: str, body: Any) -> None:
        gate.wait(30)
        real_put(path, body)

    storage._put = slow_put  # type: ignore[method-assign]
    store = CheckpointStore("bg", storage=storage, secret_key=SECRET, background=True)
    state = {"w": np.zeros(10)}
    store.save(state, step=1)  # returns while the upload waits
    state["w"][:] = 1  # a later change cannot leak into the checkpoint
    assert store.storage.infos("bg") == []
    gate.set()
    store.wait()
    assert np.array_equal(store.load_latest().state["w"], np.zeros(10))
    store.close()


def test_doctor_reports_an_object_storage_and_its_newest_checkpoint(server, bucket, monkeypatch):
    from taskkit.doctor import diagnose

    for name, value in {
        "AWS_ENDPOINT_URL": server.url,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": KEY,
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings(secret_key=SECRET, checkpoint_dir=f"s3://{bucket}/doc")
    CheckpointStore("r", storage=storage_from_settings(settings), secret_key=SECRET).save(
        {"v": 1}, step=3
    )
    report = diagnose(settings)
    check = report.check("checkpoint_storage")
    assert check.verdict == "ok", check
    assert f"s3://{bucket}/doc" in check.reason
    assert report.check("secret_key").verdict == "ok", report.check("secret_key")
    missing = diagnose(Settings(secret_key=SECRET, checkpoint_dir="s3://no-such-bucket-x/p"))
    assert missing.check("checkpoint_storage").verdict == "error"
