"""Every Python example in README.md runs and its assertions hold."""

from __future__ import annotations

import pathlib
import re

import pytest
import redis

from tests.conftest import REDIS_URL

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_an_example_per_primitive():
    text = "\n".join(BLOCKS)
    for name in (
        "@retry",
        "delays(",
        "@timeout",
        "CircuitBreaker(",
        "RedisCircuitStorage(",
        "RedisRetryBudget(",
        "@fallback",
        "safe_execute(",
        "batch_with_retry(",
        "TransactionManager(",
        "no_waits(",
        "@db_retry",
        "@ensure_connection",
        "atomic_update(",
        "safe_bulk_insert(",
        "upgrade(",
        "ResilientTask",
        "create_app(",
        "TrainingTask",
        "CheckpointStore(",
        "load_model(",
    ):
        assert name in text, f"README has no example of {name}"


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, request, unique):
    if "redis" in code:
        # Point the example at the test database, under a name no one else uses.
        request.getfixturevalue("redis_url")
        code = code.replace("redis://127.0.0.1:6379/0", REDIS_URL).replace("feature-store", unique)
    try:
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    finally:
        if "redis" in code:
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"*{unique}*"))
            if keys:
                client.delete(*keys)
