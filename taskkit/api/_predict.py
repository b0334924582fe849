"""POST /predict: the external predictor through the resilient client, the local model as the
fallback (the seed's "Complete Application Example").

Decisions:

- The external predictor is ``TASKKIT_PREDICTOR_URL`` + ``/predict``, called with
  ``{"features": [...]}`` through ``taskkit.http.ResilientClient``, whose per-host breaker
  (``http:<host>``, shared in Redis when the service has one: ``shared_redis_url``) is the
  one ``/health`` and ``/breakers`` show. Its answer must be a JSON object with a
  ``prediction`` whose other fields fit ``PredictResponse`` (``confidence`` a number...);
  anything else is answered by the local model, with the reason.
- While the breaker is open, the predictor's ``/health`` is probed at most once every
  ``PROBE_INTERVAL`` seconds (``app.state.predict_probe_interval``): a healthy answer closes
  the breaker early (the seed's ``ExternalMLService``) and this request goes out again.
  Otherwise an open breaker costs no network call at all.
- The fallback is the final model of the newest completed training run (``load_model``:
  verified before unpickling), cached and looked for again at most every
  ``LOCAL_MODEL_REFRESH`` seconds (``LocalModel``, kept in ``app.state.local_model``), so
  answering from it reads no database. Its answer: ``prediction`` (the model's
  ``predict``), ``confidence`` (the top ``predict_proba``, when it has one),
  ``model_run_id``, ``source: "local_fallback"``, ``circuit_status`` and
  ``fallback_reason`` (why the external predictor did not answer). With no predictor
  configured the local model answers every request and ``circuit_status`` is ``"none"``.
- Features: 1 to ``MAX_FEATURES`` finite numbers (no strings, booleans, NaN or infinities):
  anything else is a 422 naming the problem. A count the local model was not trained on is a
  422 too. No external answer and no local model: 503 saying both.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal, Protocol, cast

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from taskkit._utils import mask_password
from taskkit.api._breakers import SOURCES, register, shared_redis_url
from taskkit.recovery import CircuitBreaker, CircuitState

__all__ = [
    "LOCAL_MODEL_REFRESH",
    "MAX_FEATURES",
    "PROBE_INTERVAL",
    "LocalModel",
    "PredictRequest",
    "PredictResponse",
    "local_predictor",
    "router",
]

logger = logging.getLogger("taskkit.api")

router = APIRouter(tags=["predict"])

#: Most features a request may carry.
MAX_FEATURES = 10_000
#: Seconds between two looks for a newer completed local model.
LOCAL_MODEL_REFRESH = 30.0
#: Least seconds between two health probes of an open predictor.
PROBE_INTERVAL = 5.0
#: Seconds the external predictor has to answer one attempt.
PREDICT_TIMEOUT = 5.0

Feature = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class PredictRequest(BaseModel):
    """The body of ``POST /predict``: the seed's ``{"features": [...]}``.

    Example::

        PredictRequest(features=[5.1, 3.5, 1.4, 0.2])
    """

    model_config = ConfigDict(extra="forbid")

    features: list[Feature] = Field(min_length=1, max_length=MAX_FEATURES)


class PredictResponse(BaseModel):
    """A prediction and where it came from. ``source``, ``circuit_status`` and
    ``fallback_reason`` are always set by taskkit's ``/predict`` (optional here so the seed's
    own endpoints can answer with this model); an external predictor's extra fields are kept.

    Example::

        PredictResponse(prediction=1, source="local_fallback", circuit_status="open",
                        fallback_reason="Circuit breaker is OPEN ...", confidence=0.91)
    """

    model_config = ConfigDict(extra="allow")

    prediction: JsonValue
    source: Literal["external", "local_fallback"] | None = None
    circuit_status: Literal["closed", "open", "half_open", "none"] | None = None
    fallback_reason: str | None = None
    confidence: float | None = None
    model: str | None = None
    model_run_id: int | None = None


class _PredictorClient(Protocol):
    breaker: CircuitBreaker

    def post(self, endpoint: str, data: dict[str, Any], use_circuit: bool = True) -> Any: ...

    def probe(self, path: str = "/health") -> bool: ...


class _NoLocalModel(Exception):
    pass


async def predict(body: PredictRequest, request: Request) -> Response:
    """Predict with circuit breaker and fallback."""
    # The answer is rendered here, validated once (``response_model`` documents it): FastAPI
    # would validate the returned dict against PredictResponse again, and for the local model's
    # answer, built here from known types, that was most of /predict's own cost (issue 16).
    app = request.app
    features = body.features
    client = _client(app)
    if client is None:
        return await _local(app, features, "none", "no external predictor (TASKKIT_PREDICTOR_URL)")
    breaker = client.breaker
    if breaker.state is CircuitState.OPEN and not await _probe(app, client):
        reason = f"circuit breaker {breaker.name} is open"
        return await _local(app, features, "open", reason)
    try:
        result = await run_in_threadpool(client.post, "/predict", {"features": features})
        if not isinstance(result, dict) or "prediction" not in result:
            raise ValueError("the external predictor's answer has no 'prediction'")
        answer = {**result, "source": "external", "circuit_status": breaker.state.value}
        checked = PredictResponse.model_validate(answer)
    except ValidationError as exc:
        # Answering it would be a 500: it counts as a failed call (not against the breaker).
        problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        reason = f"the external predictor's answer does not fit: {problem}"
        return await _local(app, features, breaker.state.value, reason)
    except Exception as exc:
        reason = mask_password(" ".join(str(exc).split()) or type(exc).__name__)
        return await _local(app, features, breaker.state.value, reason)
    return _render(checked)


#: ``POST /predict`` as ``router`` has it (for an app of the seed's) and ``create_api`` adds it:
#: on the app's own router, ahead of the others (a route of an included router is matched
#: through it, which costs /predict ~25 us a request).
ROUTE: dict[str, Any] = {
    "path": "/predict",
    "endpoint": predict,
    "methods": ["POST"],
    "tags": ["predict"],
    "response_model": PredictResponse,
    "response_model_exclude_none": True,
    "responses": {
        422: {"description": "Bad features"},
        503: {"description": "Neither the external predictor nor a local model answered"},
    },
}
router.add_api_route(**ROUTE)


#: A local model raising one of these refuses the features (422); anything else is a 503.
_FEATURE_ERRORS = (ValueError, TypeError, LookupError)


async def _local(app: Any, features: list[float], circuit: str, reason: str) -> Response:
    try:
        run_id, model = await _local_model(app)
    except _NoLocalModel as exc:
        raise HTTPException(
            503, f"no prediction: the external predictor did not answer ({reason}) and {exc}"
        ) from None
    try:
        # Inline, as a bare endpoint would: for the models this serves (scikit-learn, a
        # fraction of a millisecond) a thread-pool hop costs more than the prediction
        # (measured: +45% at p50 with it, +5% without; docs/benchmarks.md). A model slow
        # enough to stall the event loop belongs behind TASKKIT_PREDICTOR_URL.
        prediction, confidence = _predict_with(model, features)
    except _FEATURE_ERRORS as exc:  # what numpy/sklearn raise for a wrong count, shape or type
        raise HTTPException(
            422, f"the local model (run {run_id}) cannot use these features: {_first_line(exc)}"
        ) from None
    except Exception as exc:  # the model itself is broken: no usable model, not bad input
        raise HTTPException(
            503,
            f"no prediction: the local model (run {run_id}) failed: "
            f"{type(exc).__name__}: {mask_password(_first_line(exc))}",
        ) from None
    answer: dict[str, Any] = {
        "prediction": prediction,
        "source": "local_fallback",
        "circuit_status": circuit,
        "fallback_reason": reason,
    }
    if confidence is not None:
        answer["confidence"] = confidence
    answer["model"] = "local_fallback"
    answer["model_run_id"] = run_id
    if type(prediction) in _SCALARS or (type(prediction) is float and math.isfinite(prediction)):
        # One number or string (a classifier's label, a regressor's value): nothing to
        # validate, so JSON at once, as FastAPI writes it (compact, no NaN).
        return JSONResponse(answer)
    # Anything else as FastAPI did with the response model: a list or an object is checked as
    # JSON (a value that is not is a 500), NaN and infinities become null, None is left out.
    return _render(PredictResponse.model_validate(answer))


#: Types of a prediction answered without validation (and a finite ``float``).
_SCALARS = (int, str, bool)


def _render(answer: PredictResponse) -> Response:
    """``answer`` as JSON, ``None`` fields left out (``response_model_exclude_none``)."""
    return Response(answer.model_dump_json(exclude_none=True), media_type="application/json")


def _predict_with(model: Any, features: list[float]) -> tuple[Any, float | None]:
    rows = [features]
    prediction = _plain(model.predict(rows)[0])
    confidence = None
    if hasattr(model, "predict_proba"):
        try:
            confidence = float(max(model.predict_proba(rows)[0]))
        except Exception:  # a model that only predicts (or whose probabilities fail)
            confidence = None
    return prediction, confidence if confidence is None or math.isfinite(confidence) else None


def _plain(value: Any) -> Any:
    """A numpy scalar or array as a JSON-ready Python value."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- the external client ---------------------------------------------------------------------

_lock = threading.Lock()


def _client(app: Any) -> _PredictorClient | None:
    """The service's predictor client, made on first use (None without TASKKIT_PREDICTOR_URL)."""
    state = app.state
    if hasattr(state, "predictor_client"):
        return cast("_PredictorClient | None", state.predictor_client)
    with _lock:
        if not hasattr(state, "predictor_client"):
            settings = state.settings
            made = None
            if settings.predictor_url:
                made = _make_client(settings.predictor_url, shared_redis_url(settings))
                register(app, made.breaker)
            state.predictor_client = made
    return cast("_PredictorClient | None", state.predictor_client)


def _make_client(url: str, redis_url: str | None) -> _PredictorClient:
    from taskkit.http import ResilientClient  # noqa: PLC0415 - httpx: only with a predictor

    # Two attempts, as the seed's predict: a request waits for one retry at most (a POST is
    # retried only when it never reached the predictor).
    client: _PredictorClient = ResilientClient(
        url, timeout=PREDICT_TIMEOUT, max_attempts=2, redis_url=redis_url
    )
    return client


def _predictor_breakers(app: Any) -> dict[str, CircuitBreaker]:
    client = _client(app)
    return {} if client is None else {client.breaker.name: client.breaker}


def _http_breakers(app: Any) -> dict[str, CircuitBreaker]:
    """The per-host breakers of every ``taskkit.http`` client of this process."""
    from taskkit.http import breakers  # noqa: PLC0415 - httpx: loaded by a client already

    return {breaker.name: breaker for breaker in breakers()}


SOURCES.extend([_http_breakers, _predictor_breakers])


async def _probe(app: Any, client: _PredictorClient) -> bool:
    """Whether the open breaker closed after a health probe (at most one per interval)."""
    interval = getattr(app.state, "predict_probe_interval", PROBE_INTERVAL)
    now = time.monotonic()
    last = getattr(app.state, "predict_probed_at", None)
    if last is not None and now - last < interval:
        return False
    app.state.predict_probed_at = now
    try:
        healthy = await run_in_threadpool(client.probe)
    except Exception:  # a probe that fails says the predictor is not back
        return False
    return bool(healthy) and client.breaker.state is not CircuitState.OPEN


# -- the local model ---------------------------------------------------------------------------


class LocalModel:
    """The final model of the newest completed training run, as a local predictor.

    ``predict(features)`` answers with it; the model is loaded once (``load_model``: verified
    before unpickling; a run whose model does not verify is skipped for the next newest) and
    the database is asked for a newer run at most every ``refresh`` seconds (``clock`` is
    injectable), so a prediction reads no database. ``RuntimeError`` when no completed run
    has a model.

    Example::

        from taskkit.api import LocalModel

        local = LocalModel()                 # TASKKIT_DATABASE_URL
        local.predict([5.1, 3.5, 1.4, 0.2])  # 0
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        refresh: float = LOCAL_MODEL_REFRESH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.database_url = database_url
        self.refresh = refresh
        self.clock = clock
        #: (when, database url, run id, model) of the last look in the database.
        self._loaded: tuple[float, str, int | None, Any] | None = None
        self._lock = threading.Lock()

    def current(self) -> tuple[int, Any]:
        """``(run id, model)`` of the newest completed run (cached, see the class)."""
        url = self.database_url or _default_database()
        loaded = self._loaded
        now = self.clock()
        if not self._usable(loaded, url, now):
            with self._lock:
                loaded = self._loaded
                if not self._usable(loaded, url, now):
                    same = loaded if loaded is not None and loaded[1] == url else None
                    run_id, model = _load_newest(url, None if same is None else same[2:])
                    loaded = self._loaded = (now, url, run_id, model)
        assert loaded is not None
        if loaded[2] is None:
            raise RuntimeError("no completed training run has a model")
        return loaded[2], loaded[3]

    def forget(self) -> None:
        """Drop the cached model: the next prediction looks in the database again."""
        self._loaded = None

    def _usable(self, loaded: tuple[Any, ...] | None, url: str, now: float) -> bool:
        return loaded is not None and loaded[1] == url and now - loaded[0] < self.refresh

    def fresh(self) -> tuple[int, Any] | None:
        """``(run id, model)`` when the cached model needs no look in the database, else None."""
        loaded = self._loaded
        if loaded is None or loaded[2] is None or self.clock() - loaded[0] >= self.refresh:
            return None
        if self.database_url is not None and loaded[1] != self.database_url:
            return None
        return loaded[2], loaded[3]

    def predict(self, features: list[float]) -> Any:
        """The model's prediction for one row of features (a plain Python value)."""
        return self.predict_with_confidence(features)[0]

    def predict_with_confidence(self, features: list[float]) -> tuple[Any, float | None]:
        """``(prediction, confidence)``: confidence is the top ``predict_proba``, or None."""
        return _predict_with(self.current()[1], features)


#: The seed's ``app.ml_engine.inference.local_predictor``: the default database's newest model.
local_predictor = LocalModel()


async def _local_model(app: Any) -> tuple[int, Any]:
    local: LocalModel | None = getattr(app.state, "local_model", None)
    if local is None:
        local = app.state.local_model = LocalModel(app.state.settings.database_url)
    fresh = local.fresh()
    if fresh is not None:  # no thread hop for the common case: a cached model
        return fresh
    try:
        return await run_in_threadpool(local.current)
    except RuntimeError as exc:
        raise _NoLocalModel(str(exc)) from None


def _default_database() -> str:
    from taskkit.config import get_settings  # noqa: PLC0415

    return get_settings().database_url


def _load_newest(database_url: str, cached: tuple[Any, ...] | None) -> tuple[int | None, Any]:
    from sqlalchemy import select  # noqa: PLC0415

    from taskkit.db.models import ModelRun  # noqa: PLC0415
    from taskkit.db.session import session_scope  # noqa: PLC0415
    from taskkit.tasks import load_model  # noqa: PLC0415

    query = (
        select(ModelRun.id)
        .where(ModelRun.status == "completed", ModelRun.model_object.is_not(None))
        .order_by(ModelRun.completed_at.desc(), ModelRun.id.desc())
    )
    with session_scope(database_url, readonly=True) as session:
        candidates = list(session.scalars(query.limit(5)))
    if cached is not None and cached[0] is not None and candidates[:1] == [cached[0]]:
        return cached[0], cached[1]
    for run_id in candidates:
        try:
            return run_id, load_model(run_id, database_url=database_url)
        except Exception as exc:  # tampered, or unsigned: the next newest one answers
            logger.warning("taskkit api: the model of run %s cannot be used: %s", run_id, exc)
    return None, None
