"""``taskkit.api``: taskkit's HTTP service and dashboard (extra ``taskkit[api]``).

``create_api()`` builds a FastAPI app whose every answer comes from the database, Redis and the
broker, so restarting it loses nothing: training runs (submit with an ``Idempotency-Key``,
list, follow over Server-Sent Events, resume, stop, fork), dead letters (list, replay,
discard), circuit breakers, ``/predict`` through the resilient client with a local fallback,
health probes for a load balancer, and an HTML dashboard at ``/``. Mutating endpoints need
``Authorization: Bearer $TASKKIT_API_TOKEN``. ``taskkit serve`` runs it with uvicorn.

``PredictRequest`` and ``PredictResponse`` are ``/predict``'s bodies (the seed's
``app.schemas.prediction``); ``LocalModel`` is its fallback, the newest completed run's model
(``local_predictor``: the default database's, the seed's ``app.ml_engine.inference``).

Example::

    from taskkit.api import create_api

    api = create_api()          # settings from TASKKIT_*, the Celery app from TASKKIT_APP
    # uvicorn.run(api, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

from taskkit.api._app import create_api
from taskkit.api._predict import LocalModel, PredictRequest, PredictResponse, local_predictor

__all__ = ["LocalModel", "PredictRequest", "PredictResponse", "create_api", "local_predictor"]
