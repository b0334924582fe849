"""The doctor's verdicts on the broker's redelivery rules, which it takes from ``taskkit.tasks``
(``uses_visibility_timeout``, ``extends_visibility``, ``effective_consumer_timeout``...): the
worker and the doctor answer from one home, so they cannot disagree."""

from __future__ import annotations

import time
import warnings

import pytest

from taskkit.doctor._celery import check_visibility_timeout
from taskkit.doctor._context import AppLoad, Context
from taskkit.tasks import (
    VISIBILITY_SAFE_SHARE,
    consumer_timeout_supported,
    create_app,
    effective_consumer_timeout,
    extends_visibility,
    rabbitmq_version,
    task_time_limits,
    uses_amqp,
    uses_visibility_timeout,
    visibility_timeout,
)
from taskkit.tasks._visibility import VisibilityKeeper, check_visibility


def _app(url: str, **conf):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_app("rules", broker_url=url, result_backend="cache+memory://", **conf)


def _verdict(app):
    # Only this module's tasks: Celery copies every shared task other test modules declared
    # into each app it finalizes, and one with a long time limit would change the verdict.
    own = frozenset(name for name in app.tasks if name.startswith("rules."))
    for name in set(app.tasks) - own:
        if not name.startswith("celery."):
            app.tasks.pop(name)
    load = AppLoad("rules:app", app=app, registered=own)
    ctx = Context(None, None, load, (), time.time)
    return check_visibility_timeout(ctx)


@pytest.mark.parametrize(
    ("url", "by_age", "keeper", "amqp"),
    [
        ("redis://127.0.0.1:6379/0", True, True, False),
        ("rediss://cache:6380/0", True, True, False),
        ("sentinel://a:26379", True, True, False),
        ("sqs://", True, False, False),
        ("taskkit+sqlite:////tmp/q.db", True, True, False),
        ("amqp://guest@rabbit//", False, False, True),
        ("pyamqp://guest@rabbit//", False, False, True),
        ("sqla+sqlite:////tmp/b.db", False, False, False),
        ("memory://", False, False, False),
    ],
)
def test_which_brokers_redeliver_by_age_and_which_the_keeper_extends(url, by_age, keeper, amqp):
    app = _app(url)

    assert uses_visibility_timeout(app) is by_age
    assert extends_visibility(app) is keeper
    assert uses_amqp(app) is amqp
    assert (_verdict(app).details.get("keeper", False)) is keeper


def test_on_sqs_the_worker_starts_no_keeper_and_warns_like_the_doctor():
    """SQS redelivers by age but the keeper cannot re-stamp its messages: the worker neither
    starts one nor trusts it (it clamps the countdowns), as the doctor says."""
    app = _app("sqs://", task_soft_time_limit=7200)

    @app.task(name="rules.long")
    def long() -> None:
        return None

    assert not VisibilityKeeper.include_if(VisibilityKeeper.__new__(VisibilityKeeper), _Parent(app))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problems = check_visibility(app)
    assert any("task_soft_time_limit=7200s" in p for p in problems)
    verdict = _verdict(app)
    assert verdict.verdict == "error"
    assert "the sqs transport has no keeper" in verdict.reason


class _Parent:
    def __init__(self, app) -> None:
        self.app = app


def test_a_missing_or_zero_visibility_timeout_is_celerys_hour():
    app = _app("redis://x:6379/0", broker_transport_options={"visibility_timeout": 0})

    assert visibility_timeout(app) == 3600.0


def test_the_doctor_clamps_countdowns_at_the_tasks_share():
    app = _app("redis://x:6379/0", taskkit_extend_visibility=False)
    from taskkit.tasks import ResilientTask

    @app.task(base=ResilientTask, name="rules.slow", outer_max_delay=28, soft_time_limit=5)
    def slow():
        return None

    assert 30 * VISIBILITY_SAFE_SHARE < 28
    verdict = _verdict(app)
    assert verdict.verdict == "warning"
    assert f"clamped to {30 * VISIBILITY_SAFE_SHARE:g}s" in verdict.reason
    assert task_time_limits(app, slow) == {"soft_time_limit": 5.0}


def test_the_consumer_timeout_that_applies():
    app = _app("amqp://guest@rabbit//", taskkit_consumer_timeout=7200)

    assert rabbitmq_version({"version": b"3.13.7"}) == (3, 13, 7)
    assert consumer_timeout_supported(rabbitmq_version({"version": "3.11.0"})) is False
    assert effective_consumer_timeout(app, (3, 13, 7)) == 7200.0
    assert effective_consumer_timeout(app, (3, 11, 0)) == 1800.0
    assert effective_consumer_timeout(app, None) == 1800.0
