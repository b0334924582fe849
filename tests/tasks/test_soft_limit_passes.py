"""A soft time limit strikes wherever the task's main thread is, and it must reach the task:
these raise Celery's ``SoftTimeLimitExceeded`` (what its signal handler raises) from inside the
best-effort writes around a task body (progress state, the progress event, checkpoint
retention), which catch and log their own failures, and check it is not swallowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from taskkit.checkpoint import CheckpointStore, DirectoryStorage
from taskkit.tasks import ResilientTask, create_app

app = create_app("soft-limit", broker_url="memory://", result_backend="cache+memory://")


@app.task(base=ResilientTask, bind=True, name="soft_limit.reports", max_retries=2)
def reports(self: ResilientTask) -> str:
    self.progress(1, 2, "half")
    return "finished"


def test_a_soft_limit_inside_the_progress_state_write_reaches_the_task(monkeypatch):
    def struck(*args: Any, **kwargs: Any) -> None:
        raise SoftTimeLimitExceeded("soft time limit (in update_state)")

    monkeypatch.setattr(reports, "update_state", struck)

    result = reports.apply()

    assert isinstance(result.result, SoftTimeLimitExceeded)


def test_a_soft_limit_inside_the_progress_event_reaches_the_task_and_events_stay_on(
    monkeypatch,
):
    def struck(*args: Any, **kwargs: Any) -> None:
        raise SoftTimeLimitExceeded("soft time limit (in send_event)")

    monkeypatch.setattr(reports, "update_state", lambda *a, **k: None)
    monkeypatch.setattr(reports, "send_event", struck)
    monkeypatch.setattr(reports, "progress_events", True)
    monkeypatch.setattr(ResilientTask, "_events_broken", False)

    result = reports.apply()

    assert isinstance(result.result, SoftTimeLimitExceeded)
    assert ResilientTask._events_broken is False


class _ListingStruck(DirectoryStorage):
    """Lists fine until armed, then the soft limit strikes inside the listing."""

    armed = False

    def infos(self, run_id: str) -> list[Any]:
        if self.armed:
            raise SoftTimeLimitExceeded("soft time limit (in retention's listing)")
        return super().infos(run_id)


def test_a_soft_limit_inside_checkpoint_retention_reaches_the_caller(tmp_path: Path):
    storage = _ListingStruck(tmp_path)
    store = CheckpointStore("soft", storage=storage, keep_last=1, secret_key="soft-limit-tests-key")
    store.save({"epoch": 0}, step=0)
    storage.armed = True

    with pytest.raises(SoftTimeLimitExceeded):
        store.save({"epoch": 1}, step=1)


def test_an_ordinary_retention_failure_is_still_only_a_warning(tmp_path: Path):
    class Broken(DirectoryStorage):
        armed = False

        def infos(self, run_id: str) -> list[Any]:
            if self.armed:
                raise OSError("listing failed")
            return super().infos(run_id)

    storage = Broken(tmp_path)
    store = CheckpointStore(
        "plain", storage=storage, keep_last=1, secret_key="soft-limit-tests-key"
    )
    store.save({"epoch": 0}, step=0)
    storage.armed = True

    with pytest.warns(Warning, match="could not be deleted"):
        info = store.save({"epoch": 1}, step=1)
    assert info.step == 1
