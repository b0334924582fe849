"""A worker process of the shared-breaker fleet tests: ``python -m tests.recovery.circuit_fleet``.

Each process builds its own ``RedisCircuitStorage`` (own connection, own cache of the shared
state) and breaker with the same name as its siblings, says it is ready, and waits for the
test to hand it the end time (a start barrier: a slow interpreter start-up cannot make it miss
the open period). Then it calls through the breaker until that Redis server time and prints
one JSON line of what it saw. Executions are logged in Redis with server times, so the test
compares every process on one clock.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import redis

from taskkit.recovery import CircuitBreaker, RedisCircuitStorage


def main() -> None:
    logging.disable(logging.CRITICAL)
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--recovery", type=float, required=True)
    parser.add_argument("--max-staleness", type=float, required=True)
    parser.add_argument("--call-seconds", type=float, default=0.3)
    parser.add_argument("--outcome", choices=["fail", "succeed"], default="fail")
    args = parser.parse_args()

    client = redis.Redis.from_url(args.url)
    storage = RedisCircuitStorage(client, prefix=args.prefix, max_staleness=args.max_staleness)
    breaker = CircuitBreaker(
        failure_threshold=3,
        recovery_timeout=args.recovery,
        expected_exception=ConnectionError,
        name=args.name,
        storage=storage,
    )
    log = f"{args.prefix}executions"

    def protected() -> str:
        started = client.time()
        time.sleep(args.call_seconds)
        ended = client.time()
        client.rpush(log, json.dumps([os.getpid(), list(started), list(ended)]))
        if args.outcome == "fail":
            raise ConnectionError("still down")
        return "ok"

    client.rpush(f"{args.prefix}ready", os.getpid())
    handed = client.blpop([f"{args.prefix}go"], timeout=60)
    assert handed is not None, "the test never said go"
    until = float(handed[1])

    def server_now() -> float:
        seconds, micros = client.time()
        return seconds + micros / 1e6

    calls = rejections = 0
    while server_now() < until:
        calls += 1
        try:
            breaker.call(protected)
        except Exception as exc:  # rejections and the probe's own failure
            if type(exc).__name__ == "CircuitBreakerError":
                rejections += 1
        time.sleep(0.002)
    print(json.dumps({"calls": calls, "rejections": rejections}), flush=True)


if __name__ == "__main__":
    main()
