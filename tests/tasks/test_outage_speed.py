"""Issue 15's must-show for hole 3, asserted: with the result backend down, ``submit_run``
raises ``BrokerUnavailable`` in under 2 s and leaves no run.

``tests/tasks/test_outage.py`` proves the error and that nothing is half-made, but only stops a
hang (``timeout`` 15 s); the seconds are measured in ``benchmarks/bench_outage.py`` (1.01 s
worst for a hung backend). This asserts the issue's bound on each kind of outage, with the same
redis-servers of the test's own (``OwnRedis``). The bound is wall-clock but not CPU-bound: a
hung server costs the connect/read timeouts (about 1 s), the others next to nothing.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine

from taskkit.db.models import ModelRun
from taskkit.errors import BrokerUnavailable
from taskkit.tasks._runs import submit_run
from tests.conftest import REDIS_URL
from tests.tasks.test_outage import (  # noqa: F401 - fixtures used by name
    OUTAGES,
    OutageApp,
    OwnRedis,
    _count,
    _unreachable,
    cleanup_queues,
    own_redis,
)

pytestmark = pytest.mark.redis

#: The issue's bound (seconds) from the call to the error.
BOUND = 2.0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", OUTAGES)
def test_submit_run_with_the_result_backend_down_fails_in_under_two_seconds(
    how: str,
    own_redis: OwnRedis,  # noqa: F811
    db_url: str,
    engine: Engine,
    cleanup_queues: list[str],  # noqa: F811
) -> None:
    backend = _unreachable(how, own_redis)
    kit = OutageApp(db_url, broker=REDIS_URL, backend=backend)
    cleanup_queues.append(kit.queue)

    began = time.monotonic()
    with pytest.raises(BrokerUnavailable) as caught:
        submit_run(kit.train, {"epochs": 1}, name="outage-speed", database_url=db_url)
    took = time.monotonic() - began

    print(f"\nresult backend {how}: BrokerUnavailable after {took:.2f} s")
    assert caught.value.service == "result backend"
    assert took < BOUND, f"submit_run took {took:.2f} s to give up (result backend {how})"
    assert _count(engine, ModelRun) == 0
