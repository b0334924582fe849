"""``GET /doctor``: the report of ``taskkit doctor --json``, behind the bearer token when
``TASKKIT_API_TOKEN`` is set, open (on loopback) when it is not; never a secret in it."""

from __future__ import annotations

import uuid
from pathlib import Path

from fastapi.testclient import TestClient

from taskkit.api import create_api
from taskkit.config import Settings
from taskkit.doctor import CHECK_NAMES
from taskkit.tasks import ResilientTask, create_app

TOKEN = "doctor-api-token-6b3e9f"
KEY = "doctor-api-key-ddddddddddddddddd"


def _service(tmp_path: Path, token: str | None) -> TestClient:
    settings = Settings(
        home=tmp_path / "home",
        api_token=token,
        secret_key=KEY,
        broker_url="redis://:api-broker-pw-1@127.0.0.1:6406/0",  # nothing listens there
    )
    app = create_app("dkapi", settings=settings)

    @app.task(base=ResilientTask, bind=True, name=f"dkapi.work-{uuid.uuid4().hex[:8]}")
    def work(self: object) -> int:
        return 1

    return TestClient(create_api(settings, celery_app=app))


def test_get_doctor_needs_the_token_when_one_is_set(project: Path, tmp_path: Path):
    client = _service(tmp_path, TOKEN)

    without = client.get("/doctor")
    wrong = client.get("/doctor", headers={"Authorization": "Bearer not-the-token"})
    right = client.get("/doctor", headers={"Authorization": f"Bearer {TOKEN}"})

    assert without.status_code == 401
    assert wrong.status_code == 401
    assert right.status_code == 200
    report = right.json()
    assert [c["name"] for c in report["checks"]] == list(CHECK_NAMES)
    assert report["verdict"] == "error"
    assert report["exit_code"] == 2
    broker = next(c for c in report["checks"] if c["name"] == "broker")
    assert broker["verdict"] == "error"
    assert "redis://:***@127.0.0.1:6406/0" in broker["reason"]
    app = next(c for c in report["checks"] if c["name"] == "app")
    assert any(name.startswith("dkapi.work-") for name in app["details"]["taskkit_tasks"])
    for secret in (TOKEN, KEY, "api-broker-pw-1"):
        assert secret not in right.text


def test_get_doctor_without_a_configured_token_answers_without_one(project: Path, tmp_path: Path):
    client = _service(tmp_path, None)

    answer = client.get("/doctor")

    assert answer.status_code == 200
    assert answer.json()["checks"][0]["name"] == "settings"
    assert KEY not in answer.text
