"""schemathesis on the accepted paths ``tests/api/test_schema.py`` does not reach (issue 16 audit).

In that test every schema-valid ``POST /train`` names a task the schema test's app does not
have (the default ``workers.training.train_model``, or a random name): all 422. Every
schema-valid ``POST /dead-letters/replay`` lacks a selection (422), and no breaker is known, so
``POST /breakers/{name}/reset`` is always 404. So a run made over HTTP, a replay by filter and a
reset were never generated there, and their 2xx answers never checked against the schema.

Here the same service (its fixture, seeded rows and checks) gets schema-valid requests that
are accepted: ``/train`` bodies as generated (any name, model type and extra config keys) with
the app's training task; replay bodies that select letters (all, a batch, a task, an error
type, ids); the reset of a breaker the service knows. Checked as there: no 5xx, the answer
matches the schema, a 4xx says why and writes nothing; and some answers are 2xx.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from taskkit.api._breakers import register
from taskkit.recovery import CircuitBreaker
from tests.api.test_schema import EXAMPLES, Findings, Service, _exercise, service

__all__ = ["service"]  # the module-scoped fixture of test_schema, seeded anew for this module

TRAIN_TASK = "tkschema.train"
BREAKER = "schemathesis-guarded"


def _train(operation: Any) -> Any:
    def named(case: Any) -> Any:
        if isinstance(case.body, dict):
            case.body = {**case.body, "task": TRAIN_TASK}
        return case

    return operation.as_strategy(GenerationMode.POSITIVE).map(named)


def _replay(operation: Any, known: dict[str, list[Any]]) -> Any:
    selections = st.sampled_from(
        [
            {"all": True},
            {"batch_id": "batch-1"},
            {"task": "tkschema.work"},
            {"error_type": "ValueError"},
            {"ids": known["integer"][:8]},
        ]
    )

    def select(pair: tuple[Any, Any]) -> Any:
        case, body = pair
        case.body = body
        return case

    return st.tuples(operation.as_strategy(GenerationMode.POSITIVE), selections).map(select)


def _reset(operation: Any) -> Any:
    return operation.as_strategy(GenerationMode.POSITIVE, path_parameters={"name": BREAKER})


@pytest.mark.parametrize("path", ["/train", "/dead-letters/replay", "/breakers/{name}/reset"])
def test_accepted_requests(service: Service, path: str) -> None:
    breaker = CircuitBreaker(failure_threshold=1, name=BREAKER)
    register(service.api, breaker)
    operation = service.schema[path]["POST"]
    strategy = {
        "/train": lambda: _train(operation),
        "/dead-letters/replay": lambda: _replay(operation, service.known),
        "/breakers/{name}/reset": lambda: _reset(operation),
    }[path]()
    findings = Findings()

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )
    def exercise(case: Any) -> None:
        if path.startswith("/breakers/"):
            with contextlib.suppress(Exception):  # open it: the reset has something to do
                breaker.call(lambda: 1 / 0)
        _exercise(case, service, findings, GenerationMode.POSITIVE, guarded=True)

    exercise()
    assert not findings.lines, f"POST {path}, answers {findings.statuses}:\n" + "\n".join(
        findings.lines.values()
    )
    accepted = sum(n for status, n in findings.statuses.items() if 200 <= status < 300)
    assert accepted, f"POST {path}: no request was accepted ({findings.statuses})"
