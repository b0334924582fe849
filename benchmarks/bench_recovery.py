"""Per-call overhead of retry and circuit breakers: taskkit against the floor and other libraries.

The floor is the least a decorator can do: a hand-written try/except loop (retry) or a
failure counter with an open flag (breaker). Every library is configured to wait zero seconds,
so the "fails twice" rows measure the machinery of a retry, not a sleep. Logging is disabled
for all of them while measuring (taskkit logs each retry at WARNING by default; with a handler
attached that costs what the handler costs).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import backoff
import circuitbreaker
import pybreaker
import stamina
import tenacity

from benchmarks._harness import per_call_ns, say, table
from taskkit.recovery import CircuitBreaker, RedisCircuitStorage, retry

ATTEMPTS = 3


def target(x: int) -> int:
    return x


def make_flaky() -> Callable[[int], int]:
    """Fails twice, then succeeds, then fails twice again..."""
    count = [0]

    def flaky(x: int) -> int:
        count[0] += 1
        if count[0] % 3:
            raise ConnectionError("transient")
        return x

    return flaky


# -- the floors ---------------------------------------------------------------------------------


def floor_retry(fn: Callable[..., Any]) -> Callable[..., Any]:
    # The first attempt outside the loop: the cheapest happy path a hand-written retry can have.
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception:
            pass
        for attempt in range(2, ATTEMPTS + 1):
            try:
                return fn(*args, **kwargs)
            except Exception:
                if attempt == ATTEMPTS:
                    raise
        return None

    return wrapper


def floor_breaker(fn: Callable[..., Any]) -> Callable[..., Any]:
    state = {"failures": 0, "open": False}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if state["open"]:
            raise RuntimeError("open")
        try:
            result = fn(*args, **kwargs)
        except Exception:
            state["failures"] += 1
            if state["failures"] >= 5:
                state["open"] = True
            raise
        state["failures"] = 0
        return result

    return wrapper


# -- the contestants ----------------------------------------------------------------------------

RETRIES: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "hand-written try/except (floor)": floor_retry,
    "taskkit.retry": retry(max_attempts=ATTEMPTS, delay=0),
    "tenacity": tenacity.retry(
        stop=tenacity.stop_after_attempt(ATTEMPTS), wait=tenacity.wait_none(), reraise=True
    ),
    "backoff": backoff.on_exception(
        backoff.constant, Exception, max_tries=ATTEMPTS, interval=0, jitter=None
    ),
    "stamina": stamina.retry(
        on=Exception, attempts=ATTEMPTS, wait_initial=0, wait_max=0, wait_jitter=0
    ),
}


def breakers() -> dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]]:
    # Fresh breakers for every scenario, each able to absorb two failures without opening.
    return {
        "hand-written counter (floor)": floor_breaker,
        "taskkit.CircuitBreaker": CircuitBreaker(failure_threshold=5, recovery_timeout=60),
        "pybreaker": pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60),
        "circuitbreaker": circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=60),
    }


def _three_calls(wrapped: Callable[[int], int]) -> Callable[[], None]:
    def run() -> None:
        for _ in range(3):
            try:  # noqa: SIM105 - contextlib.suppress would add its own cost to every row
                wrapped(1)
            except ConnectionError:
                pass

    return run


Results = dict[str, dict[str, float]]


#: Every contestant is measured once per round, round-robin, and keeps its best round: a burst
#: of load from elsewhere on a shared machine then spoils one round, not one contestant.
ROUNDS = 3


def measure() -> tuple[float, float, Results, Results]:
    cases: dict[tuple[str, str, str], Callable[[], object]] = {
        ("bare", "bare", "happy"): lambda: target(1),
        ("bare", "bare", "flaky"): _three_calls(make_flaky()),
    }
    for name, decorate in RETRIES.items():
        happy, flaky = decorate(target), decorate(make_flaky())
        cases["retry", name, "happy"] = lambda happy=happy: happy(1)
        cases["retry", name, "flaky"] = lambda flaky=flaky: flaky(1)
    for name in breakers():
        happy, flaky = breakers()[name](target), breakers()[name](make_flaky())
        cases["breaker", name, "happy"] = lambda happy=happy: happy(1)
        cases["breaker", name, "flaky"] = _three_calls(flaky)
    best: dict[tuple[str, str, str], float] = {}
    for round_number in range(1, ROUNDS + 1):
        say(f"  round {round_number}/{ROUNDS}")
        for key, case in cases.items():
            best[key] = min(best.get(key, float("inf")), per_call_ns(case, repeat=3))
    retry_rows: Results = {}
    breaker_rows: Results = {}
    for (section, name, scenario), value in best.items():
        if section == "retry":
            retry_rows.setdefault(name, {})[scenario] = value
        elif section == "breaker":
            breaker_rows.setdefault(name, {})[scenario] = value
    bare = best["bare", "bare", "happy"]
    bare_three = best["bare", "bare", "flaky"]
    redis_url = os.environ.get("TASKKIT_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        storage = RedisCircuitStorage(redis_url)
        storage.link.client.ping()
    except Exception as exc:  # the row is optional; say why it is missing
        say(f"  breaker: Redis row skipped ({exc})")
    else:
        name = f"bench-{uuid.uuid4().hex[:8]}"
        shared = CircuitBreaker(
            failure_threshold=5, recovery_timeout=60, name=name, storage=storage
        )
        happy = shared(target)
        say("  breaker: taskkit + RedisCircuitStorage")
        breaker_rows["taskkit.CircuitBreaker + RedisCircuitStorage (1 round trip)"] = {
            "happy": per_call_ns(lambda: happy(1), target_seconds=0.3, repeat=3),
            "flaky": float("nan"),
        }
        storage.link.client.delete(*storage.keys(name))
    # The flaky scenario's bare cost: three calls of the bare function, two of them raising.
    return bare, bare_three, retry_rows, breaker_rows


def _rows(results: Results, floor: str, bare_happy: float, bare_flaky: float) -> list[list[str]]:
    floor_happy = results[floor]["happy"] - bare_happy
    floor_flaky = results[floor]["flaky"] - bare_flaky
    rows = []
    for name, r in results.items():
        happy_over = r["happy"] - bare_happy
        flaky_over = r["flaky"] - bare_flaky
        flaky_cells = (
            ["-", "-"]
            if r["flaky"] != r["flaky"]  # NaN: not measured
            else [f"{r['flaky']:,.0f}", f"{flaky_over / floor_flaky:.1f}x"]
        )
        rows.append(
            [
                name,
                f"{r['happy']:,.0f}",
                f"{happy_over:,.0f}",
                f"**{happy_over / floor_happy:.1f}x**",
                *flaky_cells,
            ]
        )
    return rows


def run() -> str:
    logging.disable(logging.CRITICAL)
    try:
        bare, bare_three, retry_results, breaker_results = measure()
    finally:
        logging.disable(logging.NOTSET)
    headers = [
        "library",
        "happy path, ns/call",
        "overhead over a bare call, ns",
        "overhead vs floor",
        "fails twice then succeeds, ns",
        "its overhead vs floor",
    ]
    retry_table = table(
        headers, _rows(retry_results, "hand-written try/except (floor)", bare, bare_three)
    )
    breaker_table = table(
        headers, _rows(breaker_results, "hand-written counter (floor)", bare, bare_three)
    )
    return f"""## Recovery primitives: per-call overhead

A bare call of the target function costs {bare:,.0f} ns; the "fails twice then succeeds"
scenario costs {bare_three:,.0f} ns bare (three calls, two of which raise). Overhead is the time
above the bare cost; "vs floor" divides it by the floor's overhead. Each figure is the best of
{ROUNDS} round-robin rounds (each itself the best of timeit repeats). Target (issue 2): taskkit
within 3x of the floor on the happy path, for retry and for the breaker.

### retry (3 attempts, zero wait)

{retry_table}

For retry, "fails twice then succeeds" is one decorated call making three attempts.

### circuit breaker (threshold 5, so it never opens here)

{breaker_table}

For breakers, "fails twice then succeeds" is three decorated calls: two failures are counted,
and the success resets the count. The Redis row is one admission script per call against the
local Redis server (a network round trip, not comparable to in-process state); it shows what
sharing state across a fleet costs.
"""
