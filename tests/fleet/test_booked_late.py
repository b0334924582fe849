"""A delivery that booked its fleet rate slot runs then without asking again, unless it comes
late: more than ``FLEET_BOOKED_GRACE`` past its slot (its worker was cut off and the message came
back to another worker, or its worker was busy), it asks the limit again. Before, it ran at
once, ahead of the calls that had booked the slots after its own: held by a host that was cut
off, such deliveries came back together and ran as one burst."""

from __future__ import annotations

import pathlib
from datetime import UTC, datetime, timedelta

from taskkit.tasks._base import FLEET_BOOKED_GRACE, FLEET_RESERVE
from tests._support.apps import RedisTestApp
from tests._support.workers import WorkerProcess

#: Slots other callers book ahead of the late delivery (at the task's 20/s: 5 s of them).
BOOKED_AHEAD = 100


def test_a_booked_delivery_that_comes_back_late_asks_the_rate_limit_again(
    fleet_app: RedisTestApp, tmp_path: pathlib.Path
) -> None:
    from tests.fleet.apps import rated

    assert FLEET_BOOKED_GRACE < 10  # the delivery below comes back 10 s after its slot
    worker = WorkerProcess("booked", tmp_path, app="tests.fleet.apps", queue=fleet_app.queue)
    try:
        worker.wait_ready()
        limit, _ = rated._fleet_limits()
        assert limit is not None
        for _ in range(BOOKED_AHEAD):  # other callers book the next 5 s of slots
            assert limit.acquire(reserve=FLEET_RESERVE).wait < FLEET_RESERVE
        sent = datetime.now(UTC)
        # A delivery that booked its slot 10 s ago and comes back only now, as one a cut-off
        # host held: its countdown long past, its booking header still on.
        late = rated.apply_async(
            (7,), eta=sent - timedelta(seconds=10), headers={"taskkit_fleet_booked": "0"}
        )
        assert late.get(timeout=60) == 7
        # It asked again and was booked after the slots booked before it came back.
        assert late.date_done - sent >= timedelta(seconds=BOOKED_AHEAD / limit.per_second - 1)
        log = worker.log()
        assert "after its booked fleet rate slot; asking again" in log
        assert f"rated[{late.id}] over its fleet rate limit; re-queued" in log
    finally:
        worker.stop()
