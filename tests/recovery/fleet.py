"""A worker process of the fleet tests: ``python -m tests.recovery.fleet <scenario> ...``.

Each process builds its own breaker or budget with the same name as its siblings, runs the
scenario, and prints one JSON line of what it saw. Times are Redis server times, so processes
compare them on one clock.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import redis

from taskkit.recovery import CircuitBreaker, RedisCircuitStorage, RedisRetryBudget, retry


def hammer(args: argparse.Namespace) -> dict[str, object]:
    client = redis.Redis.from_url(args.url)
    seconds, micros = client.time()
    offset = seconds + micros / 1e6 - time.time()  # local clock -> Redis server clock
    storage = RedisCircuitStorage(client, prefix=args.prefix)
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

    calls = rejections = 0
    while time.time() + offset < args.until:
        calls += 1
        try:
            breaker.call(protected)
        except Exception as exc:  # rejections and the probe's own failure
            if type(exc).__name__ == "CircuitBreakerError":
                rejections += 1
        time.sleep(0.002)
    return {"calls": calls, "rejections": rejections}


def budget(args: argparse.Namespace) -> dict[str, object]:
    shared = RedisRetryBudget(
        args.url, args.name, ratio=0.1, min_per_second=0.0, max_tokens=5, prefix=args.prefix
    )
    attempts = 0

    @retry(max_attempts=5, delay=0, budget=shared)
    def always_fails() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("dependency down")

    for _ in range(args.calls):
        try:
            always_fails()
        except ConnectionError:
            pass
    return {"calls": args.calls, "attempts": attempts}


def main() -> None:
    logging.disable(logging.CRITICAL)  # each retry would log a warning
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["hammer", "budget"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--until", type=float, default=0.0)
    parser.add_argument("--recovery", type=float, default=1.0)
    parser.add_argument("--call-seconds", type=float, default=0.3)
    parser.add_argument("--outcome", choices=["fail", "succeed"], default="fail")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    result = hammer(args) if args.scenario == "hammer" else budget(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
