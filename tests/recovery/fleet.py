"""A worker process of the fleet tests: ``python -m tests.recovery.fleet <scenario> ...``.

Each process builds its own retry budget with the same name as its siblings, runs the
scenario, and prints one JSON line of what it saw. (The shared breaker's fleet is
``tests.recovery.circuit_fleet``, behind a start barrier.)
"""

from __future__ import annotations

import argparse
import json
import logging

from taskkit.recovery import RedisRetryBudget, retry


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
    parser.add_argument("scenario", choices=["budget"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    result = budget(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
