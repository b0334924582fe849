"""Broker client processes for tests/broker: ``python -m tests.broker.consumer MODE DB OUT [...]``.

- ``take-one DB OUT TIMEOUT``: take one message from queue ``q`` (visibility timeout TIMEOUT s),
  write its delivery tag and body to OUT, then wait to be killed.
- ``drain DB OUT GO``: wait for the file GO, then take and acknowledge messages from ``q``,
  appending each body to OUT, until ``q`` has stayed empty for a second.
- ``bind DB QUEUE``: declare QUEUE, bind it to the fanout exchange ``fx``, and exit.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from kombu import Connection, Exchange, Queue

import taskkit.broker  # noqa: F401  (registers taskkit+sqlite://)

EXCHANGE = Exchange("x", type="direct")
QUEUE = Queue("q", EXCHANGE, routing_key="q")
FANOUT = Exchange("fx", type="fanout")


def main(mode: str, db: str, *args: str) -> None:
    options = {"visibility_timeout": float(args[1])} if mode == "take-one" else {}
    with Connection(f"taskkit+sqlite:///{db}", transport_options=options) as conn:
        channel = conn.default_channel
        if mode == "take-one":
            message = QUEUE(channel).get()
            assert message is not None
            Path(args[0]).write_text(json.dumps([message.delivery_tag, message.payload]))
            time.sleep(120)
        elif mode == "drain":
            out, go = Path(args[0]), Path(args[1])
            while not go.exists():
                time.sleep(0.01)
            queue = QUEUE(channel)
            taken = []
            last = time.monotonic()
            while time.monotonic() - last < 1.0:
                message = queue.get()
                if message is None:
                    time.sleep(0.01)
                    continue
                taken.append(message.payload)
                message.ack()
                last = time.monotonic()
            out.write_text(json.dumps(taken))
        elif mode == "bind":
            Queue(args[0], FANOUT)(channel).declare()
        else:
            raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(*sys.argv[1:])
