"""Per-item overhead of batch_with_retry against a bare loop, and parallel_batch_process.

The floor is the loop a user would write without taskkit: ``for item in items:
out.append(fn(item))``. ``batch_with_retry`` runs the same trivial function over the same items
with no failures, so the difference is what its bookkeeping costs per item (the try/except
around each call, the batch boundaries, the progress and retry checks after each batch, and
the fixed cost of setting up one call, spread over all items). ``parallel_batch_process``
with 4 threads is shown for information: with a function this cheap, threads only add the cost
of starting them and of contending for the GIL; they pay off when the function waits on I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from benchmarks._harness import per_call_ns, say, table
from taskkit.recovery import batch_with_retry, parallel_batch_process

ITEMS = 100_000
BATCH_SIZE = 100
WORKERS = 4
#: Target (issue): batch_with_retry adds less than 1 µs per item over a bare loop.
TARGET_NS = 1_000.0
#: Every contestant is measured once per round, round-robin, and keeps its best round.
ROUNDS = 3


def double(item: int) -> int:
    return item * 2


def bare_loop(items: list[int], fn: Callable[[int], int]) -> list[int]:
    out = []
    for item in items:
        out.append(fn(item))
    return out


def per_item_overhead_ns(bare_ns_per_item: float, batched_ns_per_item: float) -> float:
    """What ``batch_with_retry`` adds to each item: its time per item minus the bare loop's."""
    return batched_ns_per_item - bare_ns_per_item


def measure() -> dict[str, float]:
    """ns per item for each contestant, best of ``ROUNDS`` round-robin rounds."""
    items = list(range(ITEMS))
    cases: dict[str, Callable[[], object]] = {
        "bare loop (floor)": lambda: bare_loop(items, double),
        f"batch_with_retry (batch_size={BATCH_SIZE})": lambda: batch_with_retry(
            items, double, batch_size=BATCH_SIZE
        ),
        f"parallel_batch_process ({WORKERS} threads)": lambda: parallel_batch_process(
            items, double, num_workers=WORKERS, batch_size=BATCH_SIZE
        ),
    }
    best: dict[str, float] = {}
    for round_number in range(1, ROUNDS + 1):
        say(f"  round {round_number}/{ROUNDS}")
        for name, case in cases.items():
            per_item = per_call_ns(case, repeat=3) / ITEMS
            best[name] = min(best.get(name, float("inf")), per_item)
    return best


def overhead_section() -> str:
    logging.disable(logging.CRITICAL)
    try:
        results = measure()
    finally:
        logging.disable(logging.NOTSET)
    names = list(results)
    bare, batched = results[names[0]], results[names[1]]
    overhead = per_item_overhead_ns(bare, batched)
    verdict = "met" if overhead < TARGET_NS else "**not met**"
    rows = [
        [name, f"{value:,.1f}", f"{per_item_overhead_ns(bare, value):,.1f}"]
        for name, value in results.items()
    ]
    return f"""## batch_with_retry per-item overhead

{ITEMS:,} items, a trivial function (`item * 2`) that never fails, no waits. The floor is the
bare loop `for item in items: out.append(fn(item))`; `batch_with_retry` runs the same function
over the same list with `batch_size={BATCH_SIZE}`. Its per-item overhead is its time per item
minus the floor's: the try/except around each call, the batch boundaries and the per-batch
retry and progress checks, plus the fixed cost of one call spread over all items. Each figure is
the best of {ROUNDS} round-robin rounds (each itself the best of timeit repeats).
`parallel_batch_process` with {WORKERS} threads is for information only: a function this cheap
holds the GIL, so threads add their start-up and contention and cannot run faster; they pay
off for functions that wait on I/O.

{table(["contestant", "ns per item", "overhead over the bare loop, ns per item"], rows)}

Target: batch_with_retry's overhead < 1 µs (1000 ns) per item. Measured: {overhead:,.1f} ns
per item, target {verdict}.
"""


def run() -> str:
    return "\n".join([overhead_section()])
