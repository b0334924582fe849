"""The seed's snippets run as a user would run them under test: with taskkit's test mode on, so
their real delays (5 s, 60 s...) are not slept through. The snippets themselves are unchanged."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_waits(taskkit_no_waits):
    return
