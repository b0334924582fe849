"""The HTTP service's answer times (issue 16), from an in-process client: ``InProcess``
(httpx's ASGITransport; its docstring says why not Starlette's TestClient).

1. ``POST /predict`` through taskkit's client, breaker and fallback against a bare FastAPI
   endpoint (the seed's ``request: dict``) in a FastAPI app of its own (that endpoint alone),
   doing the same work with the same model: the newest completed run's scikit-learn
   classifier (``predict`` and ``predict_proba``). Two paths: the breaker open, so the local
   model answers (no network): issue 16's target; and the external predictor answering, a
   uvicorn server on 127.0.0.1 serving the same model, which the bare endpoint calls with one
   plain ``httpx.Client``. Requests alternate between the apps, one by one, so a busy moment
   of the machine costs each the same. Target: under 10% overhead at p50.
2. ``GET /runs`` over 10,000 runs (each with its progress row), on SQLite and PostgreSQL: the
   first page, a deep page (the cursor of page 190 of 200), a status filter and a name filter
   deep in the table. Target: p99 under 50 ms.

``python -m benchmarks.bench_api`` runs this section alone and replaces it in
docs/benchmarks.md; ``make bench`` runs it with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks._harness import commit, replace_section, say, table
from benchmarks.bench_checkpoint import environment, postgres_schema

ROOT = Path(__file__).resolve().parent.parent
#: Requests per contestant for /predict.
PREDICT_REQUESTS = 5_000
#: Runs in the database for /runs, and requests per page kind.
RUNS = 10_000
RUNS_REQUESTS = 500
PAGE = 50
FEATURES = 10
TARGET_OVERHEAD = 0.10
TARGET_RUNS_P99_MS = 50.0
SECRET_KEY = "bench-api-secret-key-16b"


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-quantile (0-1) of ``samples`` by the nearest-rank method."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- /predict ------------------------------------------------------------------------------------


def _train_model() -> Any:
    import numpy as np
    from sklearn.datasets import make_classification
    from sklearn.linear_model import SGDClassifier

    X, y = make_classification(n_samples=500, n_features=FEATURES, random_state=0)
    return SGDClassifier(loss="log_loss", random_state=0).fit(X, y), np.asarray(X)


def _bare_app(answer: Callable[[list[float]], dict[str, Any]], app: Any = None) -> Any:
    """The seed's endpoint: ``async def``, a dict in, a dict out, no validation, no breaker,
    the work done in the event loop (the seed even calls its predictor there, blocking). At
    ``/predict`` of a new app, or at ``/bare/predict`` of ``app``."""
    from fastapi import FastAPI

    async def predict(request: dict) -> dict:  # type: ignore[type-arg]
        return answer(request["features"])

    bare = FastAPI() if app is None else app
    bare.add_api_route("/predict" if app is None else "/bare/predict", predict, methods=["POST"])
    return bare


def _model_answer(model: Any) -> Callable[[list[float]], dict[str, Any]]:
    def answer(features: list[float]) -> dict[str, Any]:
        rows = [features]
        return {
            "prediction": model.predict(rows)[0].tolist(),
            "confidence": float(max(model.predict_proba(rows)[0])),
            "source": "local",
        }

    return answer


def predictor_app() -> Any:
    """The external predictor: ``/predict`` with the benchmark's model, and ``/health``."""
    app = _bare_app(_model_answer(_train_model()[0]))  # random_state=0: the same model

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "healthy"}

    return app


@contextlib.contextmanager
def _predictor() -> Iterator[str]:
    """A uvicorn process on 127.0.0.1 serving ``predictor_app`` (a process of its own, as a
    real predictor is: in a thread of this one it would take the GIL from the contestants)."""
    import httpx

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "benchmarks.bench_api:predictor_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
         "--lifespan", "off"],
        cwd=ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/health", timeout=1.0).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the benchmark's predictor did not start in 30 s") from None
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(10)


class InProcess:
    """``get``/``post`` to an ASGI app through ``httpx.ASGITransport``, on an event loop of this
    thread: the app runs in the caller's thread, so a request costs no thread handoff (an
    ``async def`` endpoint) or one (a ``def`` endpoint, in the thread pool). Starlette's
    TestClient hands every request to an event loop thread and back, and on a busy machine
    each handoff can wait for a time slice: milliseconds that belong to neither contestant."""

    def __init__(self, app: Any) -> None:
        import httpx

        self.loop = asyncio.new_event_loop()
        transport = httpx.ASGITransport(app=app)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://bench")

    def get(self, url: str) -> Any:
        return self.loop.run_until_complete(self.client.get(url))

    def post(self, url: str, json: Any) -> Any:
        return self.loop.run_until_complete(self.client.post(url, json=json))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


def _alternate(contestants: dict[str, Callable[[], Any]], requests: int) -> dict[str, list[float]]:
    """Seconds of each call, the contestants taking turns (the first of each pair alternates)."""
    times: dict[str, list[float]] = {name: [] for name in contestants}
    order = list(contestants.items())
    for i in range(requests):
        for name, call in order if i % 2 == 0 else reversed(order):
            began = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - began)
    return times


def _check(response: Any, **expected: Any) -> Any:
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.url}: {response.status_code} {response.text}")
    body = response.json()
    for key, value in expected.items():
        if body.get(key) != value:
            raise RuntimeError(f"{response.request.url}: {key}={body.get(key)!r}, not {value!r}")
    return body


def measure_predict() -> list[tuple[str, str, dict[str, list[float]]]]:
    """[(scenario, what taskkit's answer says, {contestant: seconds per request})]."""
    import httpx

    from taskkit.api import create_api
    from taskkit.config import get_settings
    from taskkit.db.migrate import upgrade
    from taskkit.db.models import ModelRun
    from taskkit.db.session import dispose_engines, session_scope
    from taskkit.tasks import load_model
    from taskkit.tasks._runs import mark_completed

    model, X = _train_model()
    rng = random.Random(0)
    bodies = [{"features": [float(v) for v in X[rng.randrange(len(X))]]} for _ in range(64)]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-api-") as home:
        variables = {"TASKKIT_HOME": home, "TASKKIT_SECRET_KEY": SECRET_KEY}
        with (
            environment(**variables),
            _predictor() as predictor_url,
            contextlib.ExitStack() as clients,
        ):

            def client(app: Any) -> InProcess:
                made = InProcess(app)
                clients.callback(made.close)
                return made

            settings = get_settings()
            upgrade(settings.database_url)
            with session_scope(settings.database_url) as db:
                run = ModelRun(name="bench", model_type="sgd", config={}, status="running")
                db.add(run)
                db.flush()
                run_id = run.id
            mark_completed(run_id, model, 0.9, database_url=settings.database_url)
            local = load_model(run_id, database_url=settings.database_url)
            counter = iter(range(10**9))

            def body() -> dict[str, Any]:
                return bodies[next(counter) % len(bodies)]

            plain = clients.enter_context(httpx.Client(base_url=predictor_url, timeout=5.0))

            def bare_call(features: list[float]) -> dict[str, Any]:
                answer = plain.post("/predict", json={"features": features})
                answer.raise_for_status()
                return {**answer.json(), "source": "external"}

            def race(service: Any, bare: Callable[[list[float]], dict[str, Any]]) -> Any:
                """taskkit's /predict, the bare endpoint in an app of its own, the bare
                endpoint added to taskkit's app (information: the same routing and middleware)
                and, for the external path, the bare one in an app of its own calling off the
                event loop as taskkit does (thread pool), taking turns."""
                from fastapi import FastAPI
                from fastapi.concurrency import run_in_threadpool

                ours, seeds = client(service), client(_bare_app(bare))
                _bare_app(bare, service)
                contestants = {
                    "taskkit": lambda: ours.post("/predict", json=body()),
                    "bare": lambda: seeds.post("/predict", json=body()),
                    "bare, same app": lambda: ours.post("/bare/predict", json=body()),
                }
                if bare is bare_call:

                    async def pooled(request: dict) -> dict:  # type: ignore[type-arg]
                        return await run_in_threadpool(bare, request["features"])

                    alone = FastAPI()
                    alone.add_api_route("/predict", pooled, methods=["POST"])
                    pool = client(alone)
                    contestants["bare, thread pool"] = lambda: pool.post("/predict", json=body())
                return _alternate(contestants, PREDICT_REQUESTS), ours

            # (a) The breaker open: the fallback answers from the local model.
            dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens: connection refused
            refused = create_api(settings.model_copy(update={"predictor_url": dead}))
            opener = client(refused)
            for _ in range(20):  # the refused calls open the breaker
                state = _check(opener.post("/predict", json=bodies[0]))["circuit_status"]
                if state == "open":
                    break
            else:
                raise RuntimeError("the predictor's breaker did not open after 20 refusals")
            say(f"  /predict, breaker open: {PREDICT_REQUESTS} requests each")
            times, ours = race(refused, _model_answer(local))
            _check(ours.post("/predict", json=body()), source="local_fallback")
            results.append(("breaker open: the local model answers", "local_fallback", times))

            # (b) The external predictor answers (a real server on 127.0.0.1, same model).
            served = create_api(settings.model_copy(update={"predictor_url": predictor_url}))
            _check(client(served).post("/predict", json=body()), source="external")
            say(f"  /predict, external predictor: {PREDICT_REQUESTS} requests each")
            times, ours = race(served, bare_call)
            _check(ours.post("/predict", json=body()), source="external", circuit_status="closed")
            results.append(("external predictor answers (127.0.0.1)", "external", times))
            dispose_engines()
    return results


CONTESTANTS = {
    "bare": "bare, in an app of its own (the seed's)",
    "bare, thread pool": "bare, in an app of its own, calling from the thread pool",
    "bare, same app": "bare, added to taskkit's app (information)",
    "taskkit": "taskkit `/predict`",
}


# -- GET /runs -----------------------------------------------------------------------------------

STATUSES = ["completed"] * 7 + ["failed", "queued", "running"]
NAMES = [f"experiment-{i}" for i in range(20)]


def _seed_runs(url: str) -> None:
    from sqlalchemy import insert, select

    from taskkit.db.models import ModelRun, TrainingProgress
    from taskkit.db.session import get_engine

    start = datetime.now(UTC) - timedelta(days=30)
    rng = random.Random(1)
    runs = [
        {
            "uid": f"{i:032x}",
            "name": NAMES[i % len(NAMES)],
            "model_type": "sgd",
            "config": {"epochs": 20, "alpha": 1e-4, "seed": i},
            "status": rng.choice(STATUSES),
            "task_name": "workers.training.train_model",
            "usage_count": 0,
            "created_at": start + timedelta(minutes=4 * i),
            "updated_at": start + timedelta(minutes=4 * i + 3),
            "version": 1,
        }
        for i in range(RUNS)
    ]
    engine = get_engine(url)
    with engine.begin() as connection:
        connection.execute(insert(ModelRun), runs)
        ids = list(connection.scalars(select(ModelRun.id)))
        connection.execute(
            insert(TrainingProgress),
            [
                {
                    "model_run_id": run_id,
                    "status": "running",
                    "current_epoch": run_id % 20,
                    "total_epochs": 20,
                    "progress_percentage": 5.0 * (run_id % 20),
                    "metrics": {"loss": 1.0 / (1 + run_id % 20), "accuracy": 0.9},
                    "version": 1,
                }
                for run_id in ids
            ],
        )
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("ANALYZE model_runs")
            connection.exec_driver_sql("ANALYZE training_progress")


def _deep_cursor(client: Any, query: str, pages: int) -> tuple[str, int]:
    """The cursor of page ``pages`` + 1 of ``/runs?{query}``, found by following next_cursor,
    and how many pages were followed (fewer when the listing ends first)."""
    cursor, followed = None, 0
    for _ in range(pages):
        url = f"/runs?{query}" + (f"&cursor={cursor}" if cursor else "")
        following = _check(client.get(url))["next_cursor"]
        if following is None:
            break
        cursor, followed = following, followed + 1
    if cursor is None:
        raise RuntimeError(f"/runs?{query} has a single page")
    return cursor, followed


def measure_runs(url: str) -> list[tuple[str, list[float]]]:
    """[(request, seconds per request)] for ``/runs`` over ``RUNS`` runs in ``url``."""
    from taskkit.api import create_api
    from taskkit.config import get_settings

    _seed_runs(url)
    client = InProcess(create_api(get_settings().model_copy(update={"database_url": url})))
    try:
        return _time_pages(client)
    finally:
        client.close()


def _time_pages(client: Any) -> list[tuple[str, list[float]]]:
    """Seconds per request of each page kind, after finding the deep pages' cursors."""
    first = _check(client.get(f"/runs?limit={PAGE}"))
    if len(first["runs"]) != PAGE:
        raise RuntimeError(f"/runs gave {len(first['runs'])} runs, not {PAGE}")
    deep, deep_pages = _deep_cursor(client, f"limit={PAGE}", RUNS // PAGE - 10)
    failed, failed_pages = _deep_cursor(client, f"status=failed&limit={PAGE}", 15)
    name, name_pages = _deep_cursor(client, f"name={NAMES[3]}&limit={PAGE}", 8)
    requests = {
        f"first page (limit {PAGE})": f"/runs?limit={PAGE}",
        f"deep page: page {deep_pages + 1} of {RUNS // PAGE}": f"/runs?limit={PAGE}&cursor={deep}",
        f"status=failed, page {failed_pages + 1}":
            f"/runs?status=failed&limit={PAGE}&cursor={failed}",
        f"name=..., page {name_pages + 1}": f"/runs?name={NAMES[3]}&limit={PAGE}&cursor={name}",
    }  # fmt: skip
    for path in requests.values():  # warm: the page cache and the connection pool
        _check(client.get(path))
    times = _alternate({label: (lambda p=path: client.get(p)) for label, path in requests.items()},
                       RUNS_REQUESTS)  # fmt: skip
    return list(times.items())


def measure_all_runs() -> dict[str, list[tuple[str, list[float]]]]:
    from taskkit.db.migrate import upgrade
    from taskkit.db.session import dispose_engines

    results = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-api-runs-") as home,
        environment(TASKKIT_HOME=home, TASKKIT_SECRET_KEY=SECRET_KEY),
    ):
        url = f"sqlite:///{home}/runs.db"
        upgrade(url)
        say(f"  GET /runs on SQLite: {RUNS} runs, {RUNS_REQUESTS} requests per page kind")
        results["SQLite"] = measure_runs(url)
        dispose_engines()
        try:
            with postgres_schema("taskkit_bench_api") as pg_url:
                say(f"  GET /runs on PostgreSQL: {RUNS} runs")
                results["PostgreSQL"] = measure_runs(pg_url)
        except RuntimeError as exc:
            say(f"  GET /runs on PostgreSQL skipped: {exc}")
    return results


# -- report --------------------------------------------------------------------------------------


def run() -> str:
    started = time.perf_counter()
    loads = [os.getloadavg()[0]]
    predict = measure_predict()
    loads.append(os.getloadavg()[0])
    runs = measure_all_runs()
    loads.append(os.getloadavg()[0])
    load = " / ".join(f"{value:.1f}" for value in loads) + " (start / middle / end)"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    say(f"  bench_api took {time.perf_counter() - started:.0f} s")
    predict_rows = []
    verdicts = []
    for scenario, _, times in predict:
        # Judged against the bare endpoint in a FastAPI app of its own (issue 16's "bare FastAPI
        # endpoint"); for the external path the one calling off the event loop, as taskkit does.
        fair = "bare, thread pool" if "bare, thread pool" in times else "bare"
        ours = statistics.median(times["taskkit"])
        overhead = ours / statistics.median(times[fair]) - 1
        verdicts.append(
            f"- {scenario}: taskkit's `/predict` {overhead:+.1%} at p50 against "
            f"{CONTESTANTS[fair]}: "
            + ("under the target" if overhead < TARGET_OVERHEAD else "**over the target**")
        )
        for name in ["bare", "bare, thread pool", "bare, same app", "taskkit"]:
            if name not in times:
                continue
            p50 = statistics.median(times[name])
            overhead = ours / p50 - 1
            shown = f"{overhead:+.1%}"
            if name == fair:
                shown = f"**{shown}**" + ("" if overhead < TARGET_OVERHEAD else " (over target)")
            predict_rows.append(
                [
                    scenario,
                    CONTESTANTS[name],
                    _ms(p50),
                    _ms(percentile(times[name], 0.99)),
                    "-" if name == "taskkit" else shown,
                ]
            )
    runs_rows = []
    for database, measured in runs.items():
        for label, samples in measured:
            p99 = percentile(samples, 0.99)
            runs_rows.append(
                [
                    database,
                    label,
                    _ms(statistics.median(samples)),
                    f"**{_ms(p99)}**" + ("" if p99 * 1000 < TARGET_RUNS_P99_MS else " (over)"),
                    _ms(max(samples)),
                ]
            )
    predict_table = table(
        ["path", "endpoint", "p50", "p99", "taskkit's overhead at p50 (target: bold)"],
        predict_rows,
    )
    verdict = "\n".join(verdicts)
    runs_table = table(["database", "request", "p50", "p99", "max"], runs_rows)
    return f"""## HTTP service: `/predict` overhead and `/runs` paging

`benchmarks/bench_api.py` (`python -m benchmarks.bench_api` runs this section alone). Every
request goes through an in-process client (`httpx.AsyncClient` on `httpx.ASGITransport`, the
app running in the caller's thread: no socket, no thread handoff but the thread pool of `def`
endpoints), one at a time; a time includes the client's side.

- Run alone at commit {commit()}, {when}
- Load average of the machine (2 cores, shared) during the run: {load}

### `POST /predict` against a bare FastAPI endpoint

{PREDICT_REQUESTS:,} requests to each contestant, taking turns one by one. The bare endpoint is
the seed's (`async def`, `request: dict` in, a dict out: no validation, no breaker, the work done
in the event loop), in a FastAPI app of its own (that endpoint alone), and does the same work with
the same model, a scikit-learn `SGDClassifier` on {FEATURES} features (`predict` and
`predict_proba`). taskkit's `/predict` validates the features (finite numbers, bounded length),
goes through the predictor's circuit breaker and `taskkit.http.ResilientClient`, and falls back to
the newest completed run's model (`load_model`, verified, then cached), in taskkit's app (~30
routes, the body size limit, the error handlers). "Breaker open": the predictor URL refuses
connections, the breaker has opened, and the local model answers (a health probe at most every
5 s, in the thread pool): issue 16's target. "External predictor": a uvicorn server on 127.0.0.1
(a process of its own) answers with the same model; the bare endpoint calls it with one
`httpx.Client`, blocking the event loop as the seed's `requests.post` does (which stalls every
other request of the service meanwhile), and, like for like, from the thread pool, where
taskkit's `/predict` sends its call. For information, the bare endpoint also runs added to
taskkit's app, behind its routing and middleware. Target (issue 16): overhead under
{TARGET_OVERHEAD:.0%} at p50 against the bare endpoint in an app of its own (bold).

{predict_table}

{verdict}

### `GET /runs` over {RUNS:,} runs

{RUNS:,} runs (each with its progress row) in the database, {RUNS_REQUESTS} requests per kind,
taking turns. Pages of {PAGE}, newest first, cursor paging (`id < cursor`, on the primary key and
the `(name, id)` index), so a deep page costs what the first does. Target (issue 16): p99 under
{TARGET_RUNS_P99_MS:.0f} ms.

{runs_table}
"""


def main() -> None:
    """``python -m benchmarks.bench_api``: run this section alone and replace it in
    docs/benchmarks.md (added at the end when missing)."""
    replace_section(run())


if __name__ == "__main__":
    main()
