"""Fixtures for the training tests: this run's Redis keys go when the session ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def _delete_this_runs_keys() -> Iterator[None]:
    """Queue, counters, bindings and leases of this test run (results expire by themselves)."""
    yield
    from tests.training import apps

    keys = [
        *apps.counter.scan_iter(f"{apps.PREFIX}*"),
        *apps.counter.scan_iter("taskkit:*:tktrain.*"),
    ]
    if keys:
        apps.counter.delete(*keys)
