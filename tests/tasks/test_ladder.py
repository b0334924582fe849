"""The retry ladder on a real worker and a real Redis broker: runs are counted in Redis."""

from __future__ import annotations

import logging

import pytest
from celery.exceptions import Retry

from taskkit.errors import ConfigurationError, PermanentError
from taskkit.tasks import ResilientTask, TaskFailure, create_app
from tests._support.workers import wait_for
from tests.tasks import apps


def test_two_connection_errors_are_absorbed_in_process_without_a_requeue(worker):
    result = apps.flaky.delay("inner", 2)
    assert result.get(timeout=30) == 3
    assert apps.retries_seen("inner") == [0, 0, 0]  # three runs, all in the first delivery


def test_failing_past_the_inner_ladder_requeues_and_then_succeeds(worker):
    result = apps.flaky.delay("outer", 4)
    assert result.get(timeout=30) == 5
    # 3 in-process attempts in delivery 0, then the re-queued delivery 1 fails once more
    # and succeeds on its second in-process attempt.
    assert apps.retries_seen("outer") == [0, 0, 0, 1, 1]


def test_a_value_error_is_not_retried_at_all(worker):
    result = apps.flaky.delay("invalid", 10, "ValueError")
    with pytest.raises(ValueError, match="run 1 of invalid fails"):
        result.get(timeout=30)
    assert apps.runs("invalid") == 1
    assert result.state == "FAILURE"


def test_unknown_errors_go_to_the_outer_ladder_only_and_stop_at_max_retries(worker):
    result = apps.flaky.delay("unknown", 100, "KeyError")
    with pytest.raises(KeyError):
        result.get(timeout=30)
    # No in-process retry for an unclassified error: one run per delivery, 1 + max_retries.
    assert apps.retries_seen("unknown") == [0, 1, 2, 3]


def test_the_seeds_explicit_self_retry_still_works(worker):
    result = apps.seed_style.delay("seed")
    assert result.get(timeout=30) == "ok"
    assert apps.retries_seen("seed") == [0, 1]


def test_terminal_failures_are_recorded_with_name_args_error_traceback_and_attempts(worker, caplog):
    recorded: list[TaskFailure] = []
    original = apps.flaky.record_failure
    apps.flaky.__class__.record_failure = lambda self, failure: recorded.append(failure)
    try:
        with caplog.at_level(logging.ERROR, logger="taskkit.tasks"):
            result = apps.flaky.delay("recorded", 100, "KeyError")
            with pytest.raises(KeyError):
                result.get(timeout=30)
            # Celery stores the failure, then sends task_failure (which calls record_failure):
            # the result can reach this thread before the worker thread records it.
            wait_for(lambda: recorded, 10, "record_failure to be called")
    finally:
        apps.flaky.__class__.record_failure = original
    (failure,) = recorded
    assert failure.task_name == apps.flaky.name
    assert failure.task_id == result.id
    assert failure.args == ("recorded", 100, "KeyError")
    assert failure.error_type == "KeyError"
    assert "run 4 of recorded fails" in failure.error
    assert "Traceback" in failure.traceback
    assert failure.attempts == 4
    assert any("failed for good after 4 attempt(s)" in r.getMessage() for r in caplog.records)
    # and the result backend keeps it, with the arguments (result_extended)
    assert result.args == ["recorded", 100, "KeyError"]
    assert result.traceback
    assert "KeyError" in result.traceback


# -- ladder logic, run eagerly with an injected sleep ------------------------------------------


def make_app(**config):
    return create_app("unit", broker_url="memory://", result_backend="cache+memory://", **config)


def test_inner_waits_follow_the_configured_schedule_without_sleeping():
    waits: list[float] = []
    app = make_app()
    calls = {"n": 0}

    @app.task(
        base=ResilientTask,
        bind=True,
        shared=False,
        inner_max_attempts=4,
        inner_delay=1.0,
        inner_max_delay=3.0,
        sleep=waits.append,
    )
    def fetch(self):
        calls["n"] += 1
        if calls["n"] < 4:
            raise TimeoutError("slow")
        return "done"

    assert fetch.apply().get() == "done"
    assert len(waits) == 3
    # exponential 1, 2, 4 capped at 3, each with half jitter
    for wait, base in zip(waits, [1.0, 2.0, 3.0], strict=True):
        assert base / 2 <= wait <= base


@pytest.mark.parametrize("retries", range(8))
def test_outer_countdown_is_full_jitter_under_the_cap(retries):
    app = make_app()

    @app.task(base=ResilientTask, bind=True, shared=False, outer_delay=2.0, outer_max_delay=60.0)
    def job(self):
        return None

    ceiling = min(60.0, 2.0 * 2**retries)
    waits = [job.outer_countdown(retries) for _ in range(200)]
    assert all(0 <= w <= ceiling for w in waits)
    assert max(waits) > ceiling * 0.5  # spread over the range, not a constant


def test_outer_countdown_honours_retry_after():
    app = make_app()

    @app.task(base=ResilientTask, bind=True, shared=False, outer_delay=1.0)
    def job(self):
        return None

    class Throttled(Exception):
        retry_after = 42.0

    assert job.outer_countdown(0, Throttled()) == 42.0


def test_permanent_and_transient_classification():
    app = make_app()

    class Quota(Exception):
        pass

    class Flaky(Exception):
        pass

    @app.task(
        base=ResilientTask,
        bind=True,
        shared=False,
        permanent_errors=(Quota,),
        transient_errors=Flaky,
    )
    def job(self):
        return None

    assert job.is_permanent(PermanentError("x"))
    assert job.is_permanent(ValueError("x"))
    assert job.is_permanent(TypeError("x"))
    assert job.is_permanent(Quota())
    assert job.is_transient(Flaky())
    assert not job.is_permanent(Flaky())
    assert job.is_transient(ConnectionResetError())
    assert job.is_transient(TimeoutError())
    import redis.exceptions
    from sqlalchemy.exc import IntegrityError, OperationalError

    assert job.is_transient(redis.exceptions.ConnectionError("down"))
    assert job.is_transient(
        OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    )
    assert not job.is_transient(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert job.is_permanent(IntegrityError("INSERT", {}, Exception("duplicate key")))


def test_control_flow_passes_through_the_ladder():
    app = make_app(task_always_eager=False)
    runs = {"n": 0}

    @app.task(base=ResilientTask, bind=True, shared=False)
    def job(self):
        runs["n"] += 1
        raise Retry("asked for", None)

    with pytest.raises(Retry):
        job()
    assert runs["n"] == 1


def test_options_resolve_from_class_then_app_config_then_default():
    app = make_app(taskkit_inner_max_attempts=7, taskkit_outer_delay=9.0)

    @app.task(base=ResilientTask, bind=True, shared=False, outer_delay=1.5)
    def job(self):
        return None

    assert job.inner_max_attempts == 7  # app config
    assert job.outer_delay == 1.5  # decorator keyword
    assert job.outer_max_delay == 600.0  # default


def test_a_misspelt_option_is_refused_naming_the_right_one():
    app = make_app()
    with pytest.raises(ConfigurationError, match="did you mean 'outer_max_delay'"):

        @app.task(base=ResilientTask, bind=True, shared=False, outer_max_dalay=5)
        def job(self):
            return None

        job.name  # noqa: B018 - the app builds the task on first use


def test_a_bad_option_value_is_refused_naming_the_task_and_option():
    app = make_app()
    with pytest.raises(ConfigurationError, match="inner_max_attempts must be an integer >= 1"):

        @app.task(base=ResilientTask, bind=True, shared=False, inner_max_attempts=0)
        def job(self):
            return None

        job.name  # noqa: B018


def test_a_misspelt_app_setting_is_refused():
    with pytest.raises(ConfigurationError, match="did you mean 'taskkit_inner_delay'"):
        make_app(taskkit_iner_delay=1.0)


def test_a_subclass_works_like_the_decorator():
    app = make_app()

    class Ingest(ResilientTask):
        name = "unit.ingest"
        inner_max_attempts = 2
        permanent_errors = (KeyError,)

        def run(self, path: str) -> str:
            return path.upper()

    task = app.register_task(Ingest())
    assert task.apply(args=("a",)).get() == "A"
    assert task.inner_max_attempts == 2
    assert task.is_permanent(KeyError())


def test_a_hook_that_raises_never_fails_the_task(caplog):
    app = make_app()

    class Noisy(ResilientTask):
        name = "unit.noisy"

        def on_success(self, retval, task_id, args, kwargs):
            raise RuntimeError("metrics server down")

        def on_progress(self, report):
            raise RuntimeError("progress hook down")

        def run(self) -> int:
            self.progress(1, 1)
            return 1

    task = app.register_task(Noisy())
    with caplog.at_level(logging.ERROR, logger="taskkit.tasks"):
        assert task.apply().get() == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("on_success raised; ignored" in m for m in messages)
    assert any("on_progress raised; ignored" in m for m in messages)


def test_a_task_redelivered_more_than_max_retries_times_fails_instead_of_looping(worker):
    """As if its whole worker died each time: the broker hands the same message out again."""
    import uuid

    task_id = str(uuid.uuid4())
    for delivery in range(5):
        result = apps.flaky.apply_async(
            ("redelivered", 100, "ValueError"),
            task_id=task_id,
            headers={"redelivered": True} if delivery else {},
        )
        with pytest.raises((ValueError, PermanentError)):
            result.get(timeout=30)
        if delivery < 4:
            result.forget()  # so the next get() waits for the next copy's outcome
    # max_retries=3: the first delivery and three redeliveries ran; the fifth was refused.
    assert apps.runs("redelivered") == 4
    with pytest.raises(PermanentError, match="delivered again 4 times"):
        result.get(timeout=30)
    apps.counter.delete(f"taskkit:redeliveries:{task_id}")
