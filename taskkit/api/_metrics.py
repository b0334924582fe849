"""Prometheus metrics of the service: GET /metrics.

Decisions:

- No token: the exposition holds counts by task name, breaker, budget and status, never an id,
  a URL or a secret, and a Prometheus server scrapes without one.
- It shows this process's own families (the first scrape subscribes the process to the event
  bus, so transitions of the service's breakers are counted from then on), the state of every
  breaker ``GET /breakers`` lists, the retry budgets given to ``track_budget``, and the
  database's ``taskkit_dead_letters{status}`` and ``taskkit_runs{status,stale}`` (cached a few
  seconds). With ``TASKKIT_METRICS_DIR`` set it also aggregates the multiprocess files there
  (a worker on the same host writing to that directory): scrape either the worker's port or
  the service for those counters, not both, or they count twice.
- Without prometheus_client (``taskkit[metrics]``) the answer is 501 saying what to install.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response

from taskkit.api._breakers import known_breakers

__all__ = ["router"]

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition"},
        501: {"description": "prometheus_client is not installed"},
    },
)
def prometheus_metrics(request: Request) -> Response:
    """Prometheus text exposition: taskkit's counters, breakers, budgets, dead letters, runs."""
    try:
        from taskkit.telemetry import metrics  # noqa: PLC0415
    except ImportError as exc:
        raise HTTPException(
            501, "metrics need prometheus_client: pip install 'taskkit[metrics]'"
        ) from exc
    app = request.app
    metrics.install()
    extra: list[Any] = _collectors(app, metrics)
    settings = app.state.settings
    body = metrics.render(multiprocess=settings.metrics_dir, extra=extra)
    return Response(content=body, media_type=metrics.CONTENT_TYPE)


def _collectors(app: Any, metrics: Any) -> list[Any]:
    found: list[Any] | None = getattr(app.state, "metrics_collectors", None)
    if found is None:
        found = [
            metrics.DatabaseCollector(app.state.settings.database_url),
            metrics.BreakerCollector(lambda: known_breakers(app)),
            metrics.BudgetCollector(),
        ]
        app.state.metrics_collectors = found
    return found
