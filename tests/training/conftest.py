"""Fixtures for the training tests: the app the shared ``worker`` fixture (tests/conftest.py)
runs."""

from __future__ import annotations

import pytest

from tests._support.apps import RedisTestApp


@pytest.fixture(scope="module")
def worker_app() -> RedisTestApp:
    from tests.training import apps

    return apps.kit
