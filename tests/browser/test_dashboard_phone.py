"""Every dashboard page at a phone's width and without colour, in Chromium (issue 16 audit).

``test_dashboard_browser.py`` measures the runs and run pages at 390 px; this one loads all four
(runs, a failed run, dead letters with a traceback open, breakers) at a phone's width, with
rows written straight to the database, and checks that none scrolls sideways, and that every
status on them is a symbol and a word (readable without colour: the page is also rendered
with a grayscale filter for the screenshots ``dashboard-*-phone-gray.png``).

Found by it: a dead letter whose task name is one long word (a deep module path) made the dead
letters page scroll sideways at 390 px (``long-task-name``); the style sheet now breaks such
words.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from taskkit.db.models import ModelRun
from taskkit.db.session import create_engine_for
from taskkit.deadletter import DeadLetterEntry, DeadLetterStore
from tests._support.workers import REPO
from tests.browser.test_dashboard_browser import (
    PHONE,
    Service,
    chromium,
    free_port,
    home,
    shots,
)

__all__ = ["home", "shots"]  # the fixtures of test_dashboard_browser

pytestmark = pytest.mark.timeout(180)

#: A status label: one symbol, a space, a word (``✓ completed``, ``⚠ running (stale)``).
LABEL = re.compile(r"^[^\w\s] \w")

TRACEBACK = """Traceback (most recent call last):
  File "/srv/app/.venv/lib/python3.11/site-packages/celery/app/trace.py", line 453, in trace_task
    R = retval = fun(*args, **kwargs)
  File "/srv/app/workers/batch.py", line 88, in predict_rows
    features = [row[f"f{i}"] for i in range(self.n_features)]
KeyError: 'f7'
"""


def _seed(url: str, task_name: str) -> int:
    from sqlalchemy.orm import Session

    engine = create_engine_for(url)
    try:
        with Session(engine) as session, session.begin():
            run = ModelRun(
                name="nightly-churn-model-with-a-rather-long-name",
                model_type="sgd",
                config={"epochs": 40, "alpha": 1e-4},
                status="failed",
                task_name="workers.training.train_model",
                error_message="ValueError: Input contains NaN, infinity or a value too large "
                "for dtype('float64').",
            )
            session.add(run)
            session.flush()
            run_id = run.id
    finally:
        engine.dispose()
    DeadLetterStore(url, queue="").record(
        [
            DeadLetterEntry(
                task_name=task_name,
                payload={"id": "row-17", "run_id": run_id, **{f"f{i}": i / 3 for i in range(7)}},
                error_type="KeyError",
                error_message="'f7'",
                traceback=TRACEBACK,
                attempts=3,
                batch_id="batch-2026-12-01T17:12:11-nightly",
                item_key="row-17",
            )
        ]
    )
    return run_id


def _open_a_breaker(service: str) -> None:
    """Two /predict calls to a predictor that is down: the breaker of its host is made (and
    counts them); without a local model each answer is a 503."""
    for _ in range(2):
        request = urllib.request.Request(
            f"{service}/predict",
            data=json.dumps({"features": [1.0, 2.0]}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=30).close()
        assert answer.value.code == 503, answer.value.read()


#: A task name as long as a project's module path makes it: one word, 66 characters.
LONG_TASK = "myproject.pipelines.customer_scoring.predict_rows_for_every_segment"


@pytest.mark.parametrize(
    "task_name",
    [
        "workers.batch.predict_rows",
        pytest.param(LONG_TASK, id="long-task-name"),
    ],
)
def test_every_page_fits_a_phone_and_says_its_statuses_in_words(
    tmp_path: Path, home: dict[str, str], shots: Path, task_name: str
) -> None:
    from playwright.sync_api import sync_playwright

    executable = chromium()
    run_id = _seed(home["TASKKIT_DATABASE_URL"], task_name)
    predictor = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, **home, "TASKKIT_PREDICTOR_URL": predictor, "PYTHONPATH": str(REPO)}
    service = Service(env, tmp_path)
    problems: list[str] = []
    try:
        service.wait_ready()
        _open_a_breaker(service.url)
        pages = {
            "runs": "/",
            "run": f"/ui/runs/{run_id}",
            "dead-letters": "/ui/dead-letters",
            "breakers": "/ui/breakers",
        }
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, headless=True)
            try:
                page = browser.new_page(viewport=PHONE)
                page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
                for name, path in pages.items():
                    page.goto(service.url + path)
                    if name == "dead-letters":
                        page.locator("tr[data-letter] summary").first.click()
                    labels = page.locator(".status").all_inner_texts()
                    assert labels, f"{name}: no status shown"
                    for label in labels:
                        assert LABEL.match(label.strip()), f"{name}: status {label!r}"
                    width = page.evaluate("document.documentElement.scrollWidth")
                    assert width <= PHONE["width"], f"the {name} page scrolls sideways ({width} px)"
                    if task_name != LONG_TASK:
                        page.evaluate("document.documentElement.style.filter = 'grayscale(1)'")
                        page.screenshot(
                            path=str(shots / f"dashboard-{name}-phone-gray.png"), full_page=True
                        )
            finally:
                browser.close()
    finally:
        service.stop()
    assert not problems, problems
    assert "Traceback" not in service.log(), service.log()[-3000:]
