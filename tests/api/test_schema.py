"""schemathesis against ``create_api()``'s OpenAPI schema (issue 16, must-show "schemathesis").

Every operation of the schema, with schema-conforming (positive) and schema-violating (negative)
requests, in process (ASGI) on a migrated SQLite database under a temp ``TASKKIT_HOME``: the
Celery app sends to the embedded broker there and nothing consumes it. Checked for every answer:

- no 5xx, and no exception out of the app (the generic handler would answer 500);
- the answer conforms to the schema (body and content type, for the documented status codes);
- every 4xx says why: ``detail`` is a non-empty string, or a non-empty list of validation errors
  each with a non-empty ``msg``;
- a rejected request changes nothing: for a 4xx, every row of every table is as before, and
  so are the embedded broker's queue (its SQLite file: messages, bindings, queues), the result
  backend's SQLite file and the checkpoint folder (each file's path, size and time);
- a mutating request without a token, or with a wrong one, is refused (401 for a well-formed
  one) and changes nothing, before the same request is sent with the valid token.

Bounded: ``TASKKIT_SCHEMATHESIS_EXAMPLES`` examples per operation and mode (default 25), no
shrinking (a failure is reported as generated, with a curl line to replay it), a read timeout on
every call (an event stream of a run that never ends is cut there, as a browser would leave).
Ids of seeded rows are used as path parameters for part of the examples, so the found paths
(replay a dead letter, resume a failed run, fork from a checkpoint) are reached, not only 404s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.errors import FailureGroup
from schemathesis.generation.modes import GenerationMode
from sqlalchemy import text

from taskkit.api import create_api
from taskkit.config import Settings, get_settings, reset_settings

EXAMPLES = int(os.environ.get("TASKKIT_SCHEMATHESIS_EXAMPLES", "25"))
TOKEN = "schemathesis-token-5f1c0e7a"
SECRET_KEY = "schemathesis-secret-key-16b"
#: Seconds a call may take; an event stream is cut there (its events so far are kept).
READ_TIMEOUT = 5.0
STREAM_TIMEOUT = 1.0
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.content_type_conformance,
]


def _guarded(dependant: Any) -> bool:
    from taskkit.api._auth import require_token

    return any(d.call is require_token or _guarded(d) for d in dependant.dependencies)


def _violable(operation: dict[str, Any]) -> bool:
    # Any string is a valid path segment: a path of string parameters alone cannot be violated.
    return "requestBody" in operation or any(
        p["in"] != "path" or p.get("schema", {}).get("type") != "string"
        for p in operation.get("parameters", [])
    )


def _cases() -> list[Any]:
    """(method, path, guarded, mode) of every operation of the app itself, so an endpoint added
    later is covered without editing this; negative mode only where there is something to
    violate (a parameter or a body)."""
    from fastapi.routing import APIRoute

    def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
        for route in routes:
            if isinstance(route, APIRoute):
                yield route
            inner = getattr(route, "original_router", None)  # FastAPI 0.16x includes lazily
            if inner is not None:
                yield from api_routes(inner.routes)

    api = create_api(Settings(api_token=TOKEN))
    spec = api.openapi()
    cases = []
    for route in api_routes(api.routes):
        if not route.include_in_schema:
            continue
        for method in sorted(route.methods):
            operation = spec["paths"].get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            modes = [GenerationMode.POSITIVE]
            if _violable(operation):
                modes.append(GenerationMode.NEGATIVE)
            guarded = _guarded(route.dependant)
            cases += [
                pytest.param(method, route.path_format, guarded, mode,
                             id=f"{method} {route.path_format} {mode}")
                for mode in modes
            ]  # fmt: skip
    return cases


@dataclass
class Service:
    api: Any
    settings: Settings
    schema: Any
    #: Values of seeded rows by path parameter type, to reach found paths.
    known: dict[str, list[Any]] = field(default_factory=dict)


def _settle_env(home: Path) -> dict[str, str]:
    return {
        "TASKKIT_HOME": str(home),
        "TASKKIT_CHECKPOINT_DIR": str(home / "checkpoints"),
        "TASKKIT_SECRET_KEY": SECRET_KEY,
        "TASKKIT_API_TOKEN": TOKEN,
    }


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from taskkit.db.migrate import upgrade
    from taskkit.db.session import dispose_engines

    home = tmp_path_factory.mktemp("schemathesis-home")
    with pytest.MonkeyPatch.context() as env:
        for name in (
            "TASKKIT_DATABASE_URL",
            "TASKKIT_BROKER_URL",
            "TASKKIT_RESULT_BACKEND",
            "TASKKIT_LEASE_URL",
            "TASKKIT_PREDICTOR_URL",
            "TASKKIT_API_CORS_ORIGINS",
        ):
            env.delenv(name, raising=False)
        for name, value in _settle_env(home).items():
            env.setenv(name, value)
        reset_settings()
        try:
            settings = get_settings()
            upgrade(settings.database_url)
            celery_app = _celery_app(settings)
            known = _seed(settings, celery_app)
            seeded = _snapshot(settings)
            assert seeded["broker messages"], "no message waits in the embedded broker"
            assert seeded["checkpoint folder"], "no checkpoint file to watch"
            api = create_api(settings, celery_app)
            schema = schemathesis.openapi.from_asgi("/openapi.json", api)
            yield Service(api=api, settings=settings, schema=schema, known=known)
        finally:
            dispose_engines()
            reset_settings()


def _celery_app(settings: Settings) -> Any:
    from taskkit.tasks import ResilientTask, TrainingTask, create_app

    app = create_app("tkschema", settings=settings)

    @app.task(base=ResilientTask, bind=True, name="tkschema.work")
    def work(self: Any, item: Any = None) -> Any:  # pragma: no cover - nothing consumes
        return item

    @app.task(base=TrainingTask, bind=True, name="tkschema.train")
    def train(self: Any, model_run_id: int, config: dict[str, Any]) -> Any:  # pragma: no cover
        return None

    return app


def _seed(settings: Settings, celery_app: Any) -> dict[str, list[Any]]:
    """Terminal runs (one completed with a model and checkpoints, one failed), dead letters of
    a registered task (one per batch item and one of a whole task), a batch."""
    from taskkit.checkpoint import CheckpointStore
    from taskkit.db.models import Batch, BatchItemRow, DeadLetter, ModelRun, TrainingProgress
    from taskkit.db.session import session_scope
    from taskkit.tasks._runs import mark_completed

    now = datetime.now(UTC)
    with session_scope(settings.database_url) as db:
        runs = [
            ModelRun(
                name="baseline",
                model_type="sgd",
                config={"epochs": 3, "learning_rate": 0.1},
                status="completed",
                task_name="tkschema.train",
                accuracy=0.91,
                started_at=now - timedelta(minutes=5),
            ),
            ModelRun(
                name="broken",
                model_type="sgd",
                config={"epochs": 3},
                status="failed",
                task_name="tkschema.train",
                error_message="ValueError: bad learning rate",
                started_at=now - timedelta(minutes=4),
                completed_at=now - timedelta(minutes=3),
            ),
        ]
        db.add_all(runs)
        db.flush()
        for run, epoch in zip(runs, (3, 1), strict=True):
            db.add(
                TrainingProgress(
                    model_run_id=run.id,
                    status="completed" if epoch == 3 else "failed",
                    current_epoch=epoch,
                    total_epochs=3,
                    progress_percentage=100.0 * epoch / 3,
                    metrics={"loss": 0.5 / epoch, "epoch": epoch},
                )
            )
        run_ids, uids = [r.id for r in runs], [r.uid for r in runs]
        db.add(Batch(id="batch-1", task_name="tkschema.work", total=2, chunks=1))
        db.add_all(
            [
                BatchItemRow(batch_id="batch-1", item_key="a", status="done"),
                BatchItemRow(batch_id="batch-1", item_key="b", status="dead"),
            ]
        )
        letters = [
            DeadLetter(
                task_name="tkschema.work",
                batch_id="batch-1",
                item_key="b",
                payload={"id": "b"},
                error_type="KeyError",
                error_message="'price'",
                traceback="Traceback (most recent call last):\nKeyError: 'price'\n",
                attempts=3,
            ),
            DeadLetter(
                task_name="tkschema.work",
                payload={"args": [1], "kwargs": {}},
                error_type="ValueError",
                error_message="no such thing",
                traceback="Traceback (most recent call last):\nValueError: no such thing\n",
                attempts=1,
            ),
        ]
        db.add_all(letters)
        db.flush()
        letter_ids = [letter.id for letter in letters]
    for step in range(3):
        with CheckpointStore(run_ids[0], run_uid=uids[0], keep_last=5) as store:
            store.save({"weights": [0.1 * step] * 4}, step=step, metrics={"loss": 1.0 / (step + 1)})
    mark_completed(run_ids[0], _model(), 0.91, database_url=settings.database_url)
    # A message waiting in the embedded broker: a request that took or purged it would show.
    celery_app.send_task("tkschema.work", args=["seeded"])
    return {"integer": sorted({*run_ids, *letter_ids}), "string": ["batch-1", "tkschema.work"]}


def _model() -> Any:
    """A fitted scikit-learn model on 4 features: what the local fallback of /predict loads."""
    import numpy as np
    from sklearn.linear_model import LinearRegression

    features = np.arange(40, dtype=float).reshape(10, 4)
    return LinearRegression().fit(features, features.sum(axis=1))


def _snapshot(settings: Settings) -> dict[str, Any]:
    """Everything a request could write: every row of every table of the models, every row of
    the embedded broker's queue file and of the result backend's file, and the checkpoint
    folder (each file's path, size and modification time)."""
    from taskkit.db.models import Base
    from taskkit.db.session import get_engine

    # Every table of the models (a table added later is watched too): a rejected request must
    # leave each row as it was.
    with get_engine(settings.database_url).connect() as connection:
        state: dict[str, Any] = {
            f"table {table.name}": sorted(
                (
                    tuple(map(repr, row))
                    for row in connection.execute(text(f"SELECT * FROM {table.name}"))
                ),
            )
            for table in Base.metadata.sorted_tables
        }
    for what, path in _sqlite_files(settings):
        state.update({f"{what} {name}": rows for name, rows in _sqlite_rows(path).items()})
    state["checkpoint folder"] = _files(Path(settings.checkpoint_dir))
    return state


def _sqlite_files(settings: Settings) -> list[tuple[str, Path]]:
    """The SQLite files of the embedded broker (``taskkit+sqlite:///…/queue.db``: messages,
    bindings, queues) and of the result backend (``db+sqlite:///…/results.db``)."""
    files = []
    for what, url, scheme in (
        ("broker", settings.broker_url, "taskkit+sqlite:///"),
        ("results", settings.result_backend or "", "db+sqlite:///"),
    ):
        assert url.startswith(scheme), f"the schema test expects the embedded {what}, got {url}"
        files.append((what, Path(url[len(scheme) :].split("?", 1)[0])))
    return files


def _sqlite_rows(path: Path) -> dict[str, list[tuple[str, ...]]]:
    """Every row of every table of an SQLite file, read only (a missing file: no tables; one
    made later shows as new tables)."""
    import sqlite3

    if not path.exists():
        return {}
    connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        names = [
            name
            for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        return {
            name: sorted(
                tuple(map(repr, row)) for row in connection.execute(f'SELECT * FROM "{name}"')
            )
            for name in names
        }
    finally:
        connection.close()


def _files(folder: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under ``folder``."""
    if not folder.exists():
        return []
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    )


def _changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [name for name in before.keys() | after.keys() if before.get(name) != after.get(name)]


def _clear_message(response: Any) -> str | None:
    """Why a 4xx answer does not say why it refused, or None when it does."""
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:200]!r}"
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str) and detail.strip():
        return None
    if (
        isinstance(detail, list)
        and detail
        and all(isinstance(e, dict) and str(e.get("msg", "")).strip() for e in detail)
    ):
        return None
    return f"no clear detail: {json.dumps(body)[:300]}"


def _unrouted(response: Any) -> bool:
    # A path no route matches (the router's own 404, e.g. a newline in a path segment: the
    # schema allows any string) never reaches the endpoint, nor its token check.
    return bool(response.status_code == 404 and response.text == '{"detail":"Not Found"}')


def _strategy(operation: Any, mode: GenerationMode, known: dict[str, list[Any]]) -> Any:
    """The operation's cases, and as many again whose path parameters name seeded rows."""
    generated = operation.as_strategy(mode)
    names = {p.name: p.definition.get("schema", {}).get("type") for p in operation.path_parameters}
    if not names or mode is GenerationMode.NEGATIVE:
        return generated
    choices = [known.get(kind or "string", []) for kind in names.values()]
    if not all(choices):
        return generated
    fixed = st.fixed_dictionaries(
        {name: st.sampled_from(values) for name, values in zip(names, choices, strict=True)}
    )
    return st.one_of(
        generated, fixed.flatmap(lambda params: operation.as_strategy(mode, path_parameters=params))
    )


class Findings:
    """Failures of one operation, one line each, de-duplicated by what went wrong."""

    def __init__(self) -> None:
        self.lines: dict[str, str] = {}
        self.statuses: dict[int, int] = {}

    def add(self, kind: str, case: Any, answer: str) -> None:
        if kind in self.lines:
            return
        try:
            curl = case.as_curl_command(headers={"Authorization": "Bearer $TOKEN"})
        except Exception:  # the case itself may be what cannot be written as a command
            curl = f"{case.method} {case.formatted_path} body={case.body!r}"
        self.lines[kind] = f"{kind}: {answer}\n    {curl}"


def _call(case: Any, headers: dict[str, str], findings: Findings, label: str) -> Any:
    timeout = STREAM_TIMEOUT if case.path.endswith("/events") else READ_TIMEOUT
    try:
        return case.call(headers=headers, timeout=timeout)
    except Exception as exc:  # what the app raised: its generic handler answered 500
        findings.add(f"{label}: raised {type(exc).__name__}", case, str(exc).splitlines()[0][:300])
        return None


def _exercise(
    case: Any, service: Service, findings: Findings, mode: GenerationMode, *, guarded: bool
) -> None:
    if guarded:
        for label, headers in (
            ("no token", {}),
            ("wrong token", {"Authorization": "Bearer not-" + TOKEN}),
        ):
            before = _snapshot(service.settings)
            response = _call(case, headers, findings, label)
            if response is None:
                continue
            changed = _changed(before, _snapshot(service.settings))
            if changed:
                findings.add(f"{label}: wrote {changed}", case, str(response.status_code))
            expected = {401} if mode is GenerationMode.POSITIVE else set(range(400, 500))
            if response.status_code not in expected and not _unrouted(response):
                findings.add(f"{label}: answered {response.status_code}", case, response.text[:300])
    before = _snapshot(service.settings)
    response = _call(case, {"Authorization": f"Bearer {TOKEN}"}, findings, "token")
    if response is None:
        return
    status = response.status_code
    findings.statuses[status] = findings.statuses.get(status, 0) + 1
    try:
        case.validate_response(response, checks=CHECKS)
    except FailureGroup as group:
        for failure in group.exceptions:
            summary = " ".join(str(failure.message).split())[:400]
            findings.add(
                f"{status}: {failure.title}", case, f"{summary}; body {response.text[:200]}"
            )
    if 400 <= status < 500:
        reason = _clear_message(response)
        if reason:
            findings.add(f"{status} without a message", case, reason)
        changed = _changed(before, _snapshot(service.settings))
        if changed:
            findings.add(f"{status} but wrote {changed}", case, response.text[:300])


@pytest.mark.parametrize(("method", "path", "guarded", "mode"), _cases())
def test_schema(
    service: Service, method: str, path: str, guarded: bool, mode: GenerationMode
) -> None:
    operation = service.schema[path][method]
    findings = Findings()

    @given(case=_strategy(operation, mode, service.known))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )
    def exercise(case: Any) -> None:
        _exercise(case, service, findings, mode, guarded=guarded)

    exercise()
    assert not findings.lines, (
        f"{method} {path} ({mode}), answers {findings.statuses}:\n"
        + "\n".join(findings.lines.values())
    )
