"""Fixtures for the fleet tests: this session's fleet keys are deleted at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._support.apps import RedisTestApp


@pytest.fixture(scope="module")
def fleet_app() -> Iterator[RedisTestApp]:
    from tests.fleet import apps

    yield apps.kit
    client = apps.kit.counter
    keys = [
        *client.scan_iter(f"taskkit:fleet:*{apps.kit.prefix}*", count=1000),
        *client.scan_iter(f"taskkit:idempotency:{apps.kit.prefix}*", count=1000),
    ]
    if keys:
        client.delete(*keys)
