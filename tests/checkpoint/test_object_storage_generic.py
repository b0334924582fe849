"""The storage-generic checkpoint tests (tests/checkpoint/test_store.py), run on ``FsspecStorage``
against moto's S3 server (a subprocess on 127.0.0.1): the same guarantees as the directory and
database storages. ``backend`` here overrides the conftest's files/SQLite/PostgreSQL one.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from typing import Any

import pytest

from taskkit.checkpoint import FsspecStorage
from tests._support.s3 import MotoServer, new_bucket
from tests.checkpoint.conftest import Raw
from tests.checkpoint.test_store import *  # noqa: F403 - the generic tests, collected here too
from tests.checkpoint.test_store import (
    test_a_new_process_loads_what_this_one_saved_and_the_other_way_round as _cross_process,
)

# It spells the storage for a subprocess (files or a database URL); test_object_storage.py has
# its own cross-host test.
del _cross_process
del test_a_new_process_loads_what_this_one_saved_and_the_other_way_round  # noqa: F821


class RawObjects(Raw):
    """What ``FsspecStorage`` stored, reached with boto3 directly."""

    def __init__(self, storage: FsspecStorage, server: MotoServer, bucket: str) -> None:
        self.storage = storage
        self.client = server.client()
        self.bucket = bucket

    def _key(self, run_id: str, step: int, kind: str) -> str:
        return f"prefix/{run_id}/step-{step:08d}.{kind}"

    def data(self, run_id: str, step: int) -> bytes:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(run_id, step, "ckpt"))
        return body["Body"].read()

    def manifest(self, run_id: str, step: int) -> dict[str, Any]:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(run_id, step, "json"))
        return json.loads(body["Body"].read())

    def put(self, run_id: str, step: int, data: bytes, manifest: dict[str, Any]) -> None:
        put = self.client.put_object
        put(Bucket=self.bucket, Key=self._key(run_id, step, "ckpt"), Body=data)
        put(Bucket=self.bucket, Key=self._key(run_id, step, "json"), Body=json.dumps(manifest))

    def drop_data(self, run_id: str, step: int) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(run_id, step, "ckpt"))

    def fail_writes(self, monkeypatch: pytest.MonkeyPatch, after_bytes: int) -> None:
        # The bucket "fills up": an upload that would pass after_bytes in all is refused (S3
        # has no ENOSPC; a quota proxy or a full MinIO disk answers like this).
        fs = self.storage.fs
        real = fs._call_s3
        written = 0

        async def call_s3(method: str, *args: Any, **kwargs: Any) -> Any:
            nonlocal written
            if method in ("put_object", "upload_part"):
                size = len(kwargs["Body"])
                if written + size > after_bytes:
                    raise OSError(errno.ENOSPC, "No space left on device")
                written += size
            return await real(method, *args, **kwargs)

        monkeypatch.setattr(fs, "_call_s3", call_s3)

    def leftovers(self, run_id: str) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"prefix/{run_id}/")
        names = {o["Key"].rsplit("/", 1)[-1] for o in listed.get("Contents", [])}
        complete = {n for n in names if n.endswith(".json")}
        complete |= {n[: -len(".json")] + ".ckpt" for n in complete}
        uploads = self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        return sorted(names - complete) + [f"upload {u['Key']}" for u in uploads]


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def backend(moto_server: MotoServer) -> tuple[FsspecStorage, Raw]:
    bucket = new_bucket(moto_server)
    storage = FsspecStorage(f"s3://{bucket}/prefix", storage_options=moto_server.options())
    return storage, RawObjects(storage, moto_server, bucket)
