"""The dashboard in a real browser (issue 16): Playwright drives Debian's Chromium against the
service (uvicorn in a subprocess, with a token) and a worker (a subprocess), on the embedded
defaults in a temp ``TASKKIT_HOME``.

From the pages alone, as an operator would: a New run without the token sends nothing, with
a wrong one shows the service's 401 and makes no run; with the token, submit a run with the
form and watch its progress bar move over the event stream; the worker is SIGKILLed as a whole
mid-run and the row turns stale; the run is resumed with its Resume button, a new worker takes
it and the page shows it completed, with its curve; a dead letter is replayed with its Replay
button and the worker stores the prediction it had failed to make; the predictor's breaker,
opened by a predictor that is down, is reset with its Reset button. No script error and no
4xx/5xx on any page (but the one refused on purpose); the token never appears in a URL the
browser asked for, nor does the service log a traceback.

Screenshots of every page at 1280x800 and at a phone width go to ``TASKKIT_SCREENSHOTS``
(``docs/img`` regenerates the docs' pictures) or the test's temp folder. Chromium is
``/usr/bin/chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it): missing, the
test fails, unless ``TASKKIT_REQUIRE_SERVICES=0`` lets it skip.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from taskkit.db.models import ModelRun, Prediction
from taskkit.db.session import create_engine_for
from taskkit.deadletter import DeadLetterEntry, DeadLetterStore
from tests._support.commands import clean_env, taskkit
from tests._support.workers import REPO, WorkerProcess, wait_for

CHROMIUM = os.environ.get("TASKKIT_CHROMIUM", "/usr/bin/chromium")
TOKEN = "browser-test-token-7d3a9f"
TTL = 3
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
#: Milliseconds the browser waits for what a page should show.
SHOWN = 60_000

pytestmark = pytest.mark.timeout(420)


def chromium() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    message = f"Chromium is not at {CHROMIUM}: apt-get install -y chromium (as .ci/run does)"
    if os.environ.get("TASKKIT_REQUIRE_SERVICES", "1") == "0":
        pytest.skip(message + " (skipped: TASKKIT_REQUIRE_SERVICES=0)")
    pytest.fail(message, pytrace=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Service:
    """``uvicorn taskkit.api:create_api --factory`` in its own process group."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / "service.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "taskkit.api:create_api",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the service exited:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/ui/static/dashboard.css", timeout=2):
                    return True
            except OSError:
                return False

        wait_for(answers, 60, "the service to answer", step=0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self._log.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("TASKKIT_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of the worker, the service and this test: embedded defaults."""
    for name in [k for k in os.environ if k.startswith("TASKKIT_") and k != "TASKKIT_SCREENSHOTS"]:
        monkeypatch.delenv(name)  # subprocesses inherit this process's environment
    folder = tmp_path / "home"
    values = {
        "TASKKIT_HOME": str(folder),
        "TASKKIT_DATABASE_URL": f"sqlite:///{folder / 'taskkit.db'}",
        "TASKKIT_LEASE_TTL": str(TTL),
        "TASKKIT_SECRET_KEY": "browser-test-key-0123456",
        "TASKKIT_API_TOKEN": TOKEN,
    }
    env = clean_env(**values, PYTHONPATH=str(REPO))
    upgraded = taskkit("db", "upgrade", cwd=tmp_path, env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    return values


def run_row(url: str, run_id: int) -> ModelRun:
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            return connection.execute(select(ModelRun).where(ModelRun.id == run_id)).one()  # type: ignore[return-value]
    finally:
        engine.dispose()


def run_count(url: str) -> int:
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(ModelRun)).scalar_one())
    finally:
        engine.dispose()


def predictions(url: str, run_id: int, key: str) -> int:
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            query = select(func.count()).where(
                Prediction.model_run_id == run_id, Prediction.item_key == key
            )
            return int(connection.execute(query).scalar_one())
    finally:
        engine.dispose()


def test_an_operator_runs_kills_resumes_and_replays_from_the_dashboard(
    tmp_path: Path, home: dict[str, str], shots: Path
) -> None:
    from playwright.sync_api import Page, expect, sync_playwright

    executable = chromium()
    url = home["TASKKIT_DATABASE_URL"]
    # Nothing listens there: the predictor is down, and its breaker opens.
    predictor = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, **home, "TASKKIT_PREDICTOR_URL": predictor, "PYTHONPATH": str(REPO)}
    problems: list[str] = []
    asked: list[str] = []

    def watch(page: Page) -> Page:
        page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
        page.on(
            "console",
            lambda message: message.type == "error" and problems.append(message.text),
        )
        page.on("request", lambda request: asked.append(request.url))
        page.on(
            "response",
            lambda answer: (
                answer.status >= 400
                and problems.append(f"{answer.status} {answer.request.method} {answer.url}")
            ),
        )
        return page

    workers: list[WorkerProcess] = []
    service = Service(env, tmp_path)
    try:
        workers.append(WorkerProcess("dash1", tmp_path, app="workers.app", env=home))
        service.wait_ready()
        workers[0].wait_ready()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, headless=True)
            try:
                page = watch(browser.new_page(viewport=DESKTOP))
                page.goto(service.url + "/")

                # -- a run submitted from the page, followed live -------------------------
                page.click("#new-run-panel summary")
                page.fill("#new-run input[name=name]", "browser-run")
                page.fill("#new-run input[name=epochs]", "40")
                page.fill("#new-run textarea[name=config]", '{"seed": 3, "epoch_pause": 0.25}')
                page.click("#new-run button[type=submit]")  # no token yet: nothing is sent
                expect(page.locator("#notice")).to_contain_text("Type the API token")
                page.fill("#token", "not-the-token")
                page.click("#new-run button[type=submit]")
                expect(page.locator("#notice")).to_contain_text(
                    "✗ 401: missing or wrong bearer token"
                )
                refused = [p for p in problems if "401" in p]
                assert refused, problems  # the refused POST /train, and nothing else
                problems[:] = [p for p in problems if p not in refused]
                assert run_count(url) == 0
                page.fill("#token", TOKEN)
                page.click("#new-run button[type=submit]")
                expect(page.locator("#notice")).to_contain_text("queued", timeout=SHOWN)
                notice = page.locator("#notice").inner_text()
                found = re.search(r"Run (\d+) queued", notice)
                assert found, notice
                run_id = int(found.group(1))
                row = page.locator(f'tr[data-run="{run_id}"]')
                expect(row).to_contain_text("▶ running", timeout=SHOWN)
                bar = row.locator('[data-field="bar"]')
                wait_for(
                    lambda: float(bar.get_attribute("aria-valuenow") or 0) >= 10,
                    60,
                    "the progress bar to pass 10%",
                    step=0.1,
                )
                assert any(f"/runs/{run_id}/events" in asked_url for asked_url in asked)
                page.screenshot(path=str(shots / "dashboard-runs.png"))

                # -- the worker dies: the row turns stale ---------------------------------
                workers[0].kill()
                expect(row).to_contain_text("⚠ running (stale)", timeout=SHOWN)
                assert row.get_attribute("data-stale") == "1"
                assert run_row(url, run_id).status == "running"  # only the page says so

                # -- resumed from its page; a new worker finishes it ----------------------
                page.click(f'tr[data-run="{run_id}"] a')
                expect(page.locator("h1")).to_contain_text(f"Run #{run_id}")
                page.screenshot(path=str(shots / "dashboard-run-stale.png"))
                page.click("button[data-post$='/resume']")
                expect(page.locator("#notice")).to_contain_text("✓ resume requested", timeout=SHOWN)
                workers.append(WorkerProcess("dash2", tmp_path, app="workers.app", env=home))
                workers[1].wait_ready()
                expect(page.locator(".actions .status")).to_contain_text(
                    "✓ completed", timeout=SHOWN * 2
                )
                assert run_row(url, run_id).status == "completed"
                # The curve grew with the stream's epochs while the page was open: loss and
                # score, each with a point per epoch seen (more than the kept checkpoints).
                expect(page.locator("#curve svg")).to_have_count(2)
                dots = page.locator("#curve svg circle").count()
                assert dots >= 2 * 8, f"{dots} points on the live curves"
                page.screenshot(path=str(shots / "dashboard-run.png"), full_page=True)
                page.reload()
                expect(page.locator("#curve svg")).to_have_count(2)  # drawn from the database

                # -- a dead letter replayed from the page ---------------------------------
                row_item = {"id": "row-1", "run_id": run_id, **_first_row()}
                store = DeadLetterStore(url, queue="")
                store.record(
                    [
                        DeadLetterEntry(
                            task_name="workers.batch.predict_rows",
                            payload=row_item,
                            error_type="RunNotResumable",
                            error_message=f"run {run_id} has no model yet",
                            traceback="Traceback (most recent call last):\n"
                            "RunNotResumable: no model yet\n",
                            attempts=1,
                            batch_id="batch-dash",
                            item_key="row-1",
                        )
                    ]
                )
                (letter,) = store.list()
                page.click("nav >> text=Dead letters")
                letter_row = page.locator(f'tr[data-letter="{letter.id}"]')
                expect(letter_row).to_contain_text("RunNotResumable")
                letter_row.locator("summary").click()
                page.screenshot(path=str(shots / "dashboard-dead-letters.png"))
                letter_row.locator("button", has_text="Replay").click()
                expect(page.locator("#notice")).to_contain_text(
                    f"✓ letter {letter.id} replayed", timeout=SHOWN
                )
                expect(page.locator(f'tr[data-letter="{letter.id}"]')).to_have_count(0)
                wait_for(
                    lambda: predictions(url, run_id, "row-1") == 1,
                    60,
                    "the replayed row's prediction",
                    step=0.2,
                )
                assert store.get(letter.id).status == "replayed"

                # -- the predictor's breaker, opened by a predictor that is down, reset -----
                opened = open_predictor_breaker(service.url, _first_row())
                page.click("nav >> text=Breakers")
                breaker = page.locator(f'tr[data-breaker="{opened}"]')
                expect(breaker).to_contain_text("✗ open")
                page.screenshot(path=str(shots / "dashboard-breakers.png"))
                page.once("dialog", lambda dialog: dialog.accept())
                breaker.locator("button", has_text="Reset").click()
                expect(page.locator("#notice")).to_contain_text(f"✓ breaker {opened} reset")
                expect(breaker).to_contain_text("✓ closed", timeout=SHOWN)

                # -- a phone's width --------------------------------------------------------
                phone = watch(browser.new_page(viewport=PHONE))
                phone.goto(service.url + "/")
                expect(phone.locator(f'tr[data-run="{run_id}"]')).to_contain_text("✓ completed")
                phone.screenshot(path=str(shots / "dashboard-runs-phone.png"))
                width = phone.evaluate("document.documentElement.scrollWidth")
                assert width <= PHONE["width"], f"the runs page scrolls sideways ({width} px)"
                phone.goto(f"{service.url}/ui/runs/{run_id}")
                phone.screenshot(path=str(shots / "dashboard-run-phone.png"), full_page=True)
                width = phone.evaluate("document.documentElement.scrollWidth")
                assert width <= PHONE["width"], f"the run page scrolls sideways ({width} px)"
            finally:
                browser.close()
    finally:
        for worker in workers:
            worker.stop()
        service.stop()

    assert not problems, problems
    assert not [asked_url for asked_url in asked if TOKEN in asked_url]
    assert "Traceback" not in service.log(), service.log()[-3000:]


def open_predictor_breaker(service: str, row: dict[str, float]) -> str:
    """POST /predict until the predictor's breaker is open (each answered by the local model);
    returns the breaker's name."""
    features = [row[f"f{i}"] for i in range(len(row))]
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    for _ in range(30):
        request = urllib.request.Request(
            f"{service}/predict",
            data=json.dumps({"features": features}).encode(),
            headers=headers,
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.load(answer)["source"] == "local_fallback"
        with urllib.request.urlopen(f"{service}/breakers", timeout=30) as answer:
            states = {b["name"]: b["state"] for b in json.load(answer)["breakers"]}
        opened = [name for name, state in states.items() if state == "open"]
        if opened:
            return opened[0]
    raise AssertionError(f"the predictor's breaker never opened: {states}")


def _first_row() -> dict[str, Any]:
    """The features of the example dataset's first row (what predict_rows scores)."""
    header, first = (REPO / "workers" / "data" / "classification.csv").read_text().splitlines()[:2]
    values = dict(zip(header.split(","), first.split(","), strict=True))
    values.pop("target")
    return {name: float(value) for name, value in values.items()}
