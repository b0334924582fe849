"""taskkit's kombu transport over SQLite: the embedded broker that redelivers.

``taskkit+sqlite:///<path>`` is the default broker when ``TASKKIT_BROKER_URL`` is not set
(``$TASKKIT_HOME/queue.db``). Importing this package registers the ``taskkit`` transport alias
with kombu; ``taskkit.tasks`` imports it, so every process that loads a taskkit app (a worker,
``celery inspect``, Flower) understands the URL.

What it guarantees (see docs/tasks.md, "The embedded broker"):

- A delivered message stays in the file, invisible, until it is acknowledged (acknowledge =
  delete). If its taker dies, it becomes visible again once ``visibility_timeout`` has passed,
  and another worker takes it; the worker's ``VisibilityKeeper`` extends the timeout of every
  message a live worker holds, so a busy worker never sees its messages delivered twice.
- A rejected-with-requeue or recovered message goes back to the front of its queue at once.
- Taking a message is one ``BEGIN IMMEDIATE`` transaction: several worker processes on the same
  host never take the same message. WAL and ``synchronous=NORMAL``: a killed process loses
  nothing; a power loss may lose the last commits.
- One host only (SQLite over a network file system is not safe).
- Fanout and topic exchanges work across processes (bindings live in the file), so ``celery
  inspect``/``control`` and events work.

This package imports kombu, not Celery or SQLAlchemy.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

from taskkit.broker._transport import Channel, Transport

__all__ = ["SCHEME", "Channel", "Transport"]

#: The transport alias: ``taskkit+sqlite:///<path>`` resolves to :class:`Transport`.
#:
#: Example::
#:
#:     from kombu import Connection
#:     from taskkit.broker import SCHEME
#:
#:     Connection(f"{SCHEME}+sqlite:////tmp/queue.db")
SCHEME = "taskkit"

TRANSPORT_ALIASES.setdefault(SCHEME, "taskkit.broker:Transport")
