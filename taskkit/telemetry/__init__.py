"""What taskkit shows of itself: Prometheus metrics, structured logs, alerts and traces.

Every part is a subscriber of one event bus, ``taskkit.recovery.events``: the recovery
primitives, taskkit's tasks, checkpoints and dead letters emit events there, and the modules of
this package turn them into metrics (``taskkit.telemetry.metrics``), log records
(``taskkit.telemetry.logs``), alert notifications (``taskkit.telemetry.alerts``) and
OpenTelemetry spans (``taskkit.telemetry.tracing``). Nothing here imports Celery: the worker
wiring lives in ``taskkit.tasks``.
"""

from __future__ import annotations

__all__: list[str] = []
