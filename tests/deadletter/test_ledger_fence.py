"""The chunk fence of ``ItemLedger`` (issue 19), on SQLite and PostgreSQL: after a ``fenced``
claim, the delivery's writes land only while no later claim of the chunk came; a refused write
leaves neither flags nor dead letters, and raises ``LeaseLost``. The two-host test
(``tests/fleet_hosts/test_partition_batch.py``) shows why: a partitioned host's stale write."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import Engine, delete

from taskkit.db.models import BatchChunk
from taskkit.deadletter import BatchProgress, ItemLedger, batch_progress
from taskkit.errors import LeaseLost
from tests.deadletter.test_ledger import dead, letters, rows

KEYS = ["a", "b", "c", "d"]


@pytest.fixture
def batch_id() -> str:
    return f"batch-{uuid.uuid4().hex[:12]}"


def statuses(engine: Engine, batch_id: str) -> dict[str, str]:
    return {key: status for key, (status, _) in rows(engine, batch_id).items()}


@pytest.mark.parametrize("later_fenced", [True, False], ids=["fenced", "unfenced"])
def test_a_stale_fenced_delivery_writes_nothing_once_another_claimed_the_chunk(
    engine: Engine, batch_id: str, db_url: str, later_fenced: bool
):
    stale = ItemLedger(batch_id, engine)
    stale.claim(KEYS, durable=False, fenced=True)
    stale.finish(done=["a"], durable=False)  # before the takeover: it lands
    # Another delivery takes the chunk over (a fenced one under the lease, or the unfenced
    # claim of a chunk that failed for good), and finishes it.
    newer = ItemLedger(batch_id, engine)
    assert newer.claim(KEYS, fenced=later_fenced) == {"a": "done"}
    newer.finish(done=["b", "c"], dead=dead(batch_id, "d"))

    # The stale delivery's writes, as they arrive late: a flush, and its end of chunk that
    # holds "c" as dead (it failed there, where B did it) and "d" dead too.
    with pytest.raises(LeaseLost):
        stale.finish(done=["b"], durable=False)
    with pytest.raises(LeaseLost):
        stale.finish(done=["b"], dead=dead(batch_id, "c", "d"))

    assert statuses(engine, batch_id) == {"a": "done", "b": "done", "c": "done", "d": "dead"}
    assert {key: attempts for key, (_, _, attempts) in letters(engine, batch_id).items()} == {
        "d": 3
    }
    assert batch_progress(batch_id, db_url) == BatchProgress(batch_id, None, 3, 1, 0)


def test_an_unfenced_claim_writes_whatever_claimed_after_it(engine: Engine, batch_id: str):
    first = ItemLedger(batch_id, engine)
    first.claim(KEYS)
    ItemLedger(batch_id, engine).claim(KEYS)
    first.finish(done=["a"], dead=dead(batch_id, "b"))
    assert statuses(engine, batch_id) == {"a": "done", "b": "dead", "c": "claimed", "d": "claimed"}


def test_a_fenced_delivery_writes_on_while_it_is_the_last_claim(engine: Engine, batch_id: str):
    ledger = ItemLedger(batch_id, engine)
    ledger.claim(KEYS, durable=False, fenced=True)
    ledger.finish(done=["a"], durable=False)
    # A crash of the server lost the row (the claim is not durable): written again, whole.
    with engine.begin() as connection:
        connection.execute(delete(BatchChunk).where(BatchChunk.batch_id == batch_id))
    ledger.finish(done=["b", "c"], dead=dead(batch_id, "d"))
    assert statuses(engine, batch_id) == {"a": "done", "b": "done", "c": "done", "d": "dead"}
