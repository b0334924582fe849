"""Two simulated hosts (``tests/_support/netns.py``) and the services they reach over their
links: a Redis of the test's own and a forwarder to the shared PostgreSQL. Tests here fail
under ``CI=true`` when namespaces cannot be made, and skip otherwise, with the reason.

One fleet for the session: ``tests.fleet_hosts.apps`` reads its Redis address once, when it is
first imported, so every module must find the same Redis there."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests._support.netns import Forwarder, Hosts, RedisOnLinks, unavailable


@dataclass
class Fleet:
    hosts: Hosts
    redis: RedisOnLinks
    postgres: Forwarder
    directory: pathlib.Path

    def database_url(self, schema_url: str, address: str) -> str:
        """``schema_url`` reached through the forwarder on ``address``."""
        url = make_url(schema_url).set(host=address, port=self.postgres.port)
        return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def fleet(redis_url: str, postgres_url: str) -> Iterator[Fleet]:
    reason = unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"two simulated hosts need network namespaces: {reason}", pytrace=False)
        pytest.skip(f"two simulated hosts need network namespaces: {reason}")
    pg = make_url(postgres_url)
    directory = pathlib.Path(tempfile.mkdtemp(prefix="tk-hosts-"))
    hosts = Hosts.create(2)
    stops: list[Callable[[], None]] = []
    try:
        server = RedisOnLinks(hosts.root_ips(), directory)
        stops.append(server.stop)
        forwarder = Forwarder(hosts.root_ips(), (pg.host or "127.0.0.1", pg.port or 5432))
        stops.append(forwarder.close)
        yield Fleet(hosts, server, forwarder, directory)
    finally:
        for stop in reversed(stops):
            stop()
        hosts.destroy()
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class ObjectStore:
    """The S3 server (moto, on 127.0.0.1) and a forwarder to it on the hosts' links."""

    server: Any
    forwarder: Forwarder
    bucket: str

    def env(self, address: str | None = None) -> dict[str, str]:
        """What a process needs to keep checkpoints there (through ``address``'s forwarder)."""
        from tests._support.s3 import KEY, REGION

        endpoint = self.server.url if address is None else f"http://{address}:{self.forwarder.port}"
        return {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": KEY,
            "AWS_DEFAULT_REGION": REGION,
            "TASKKIT_CHECKPOINT_DIR": f"s3://{self.bucket}/hosts",
        }

    def objects(self) -> list[tuple[str, str]]:
        listed = self.server.client().list_objects_v2(Bucket=self.bucket)
        return sorted((o["Key"], o["ETag"]) for o in listed.get("Contents", []))


@pytest.fixture(scope="module")
def object_store(fleet: Fleet) -> Iterator[ObjectStore]:
    from tests._support.s3 import MotoServer, new_bucket

    server = MotoServer()
    try:
        port = int(server.url.rsplit(":", 1)[1])
        forwarder = Forwarder(fleet.hosts.root_ips(), ("127.0.0.1", port))
        try:
            yield ObjectStore(server, forwarder, new_bucket(server))
        finally:
            forwarder.close()
    finally:
        server.close()
