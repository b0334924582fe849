"""``taskkit doctor`` as a user runs it (the console script, in a project folder): a healthy
setup exits 0, ``--json`` parses to the stable schema, a broken one exits 2, and no secret (a
password in a URL, the signing key, the API token, the webhook URL) is ever printed."""

from __future__ import annotations

import json
from pathlib import Path

from taskkit.checkpoint import CheckpointStore
from taskkit.config import Settings
from taskkit.doctor import CHECK_NAMES
from tests._support.commands import clean_env, taskkit

KEY = "doctor-cli-key-cccccccccccccccc"

HEALTHY_APP = """
from taskkit.tasks import ResilientTask, create_app

app = create_app("happy")


@app.task(base=ResilientTask, bind=True, name="happy.work")
def work(self, item):
    return item
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return clean_env(
        TASKKIT_HOME=str(tmp_path / "home"),
        TASKKIT_CHECKPOINT_DIR=str(tmp_path / "checkpoints"),
        **extra,
    )


def test_a_healthy_setup_exits_0(tmp_path: Path, redis_url: str, pg_schema_url: str):
    (tmp_path / "happyapp.py").write_text(HEALTHY_APP)
    settings = Settings(secret_key=KEY, checkpoint_dir=tmp_path / "checkpoints")
    with CheckpointStore("run-1", settings=settings) as store:
        store.save({"w": [0.5]}, step=0)
    env = _env(
        tmp_path,
        TASKKIT_BROKER_URL=redis_url,
        TASKKIT_DATABASE_URL=pg_schema_url,
        TASKKIT_SECRET_KEY=KEY,
    )

    done = taskkit("doctor", "--app", "happyapp", "--json", cwd=tmp_path, env=env)

    report = json.loads(done.stdout)
    problems = [c for c in report["checks"] if c["verdict"] != "ok"]
    assert problems == [], problems
    assert done.returncode == 0, done.stderr
    assert report["verdict"] == "ok"
    assert report["exit_code"] == 0
    assert [c["name"] for c in report["checks"]] == list(CHECK_NAMES)
    for check in report["checks"]:
        assert set(check) == {"name", "verdict", "reason", "fix", "details"}
        assert check["fix"] is None
        assert check["reason"]
    assert report["checks"][CHECK_NAMES.index("app")]["details"]["taskkit_tasks"] == ["happy.work"]
    sources = report["checks"][0]["details"]["settings"]
    assert sources["broker_url"]["source"] == "env"
    assert sources["lease_ttl"] == {"value": 15.0, "source": "default"}

    table = taskkit("doctor", "--app", "happyapp", cwd=tmp_path, env=env)
    assert table.returncode == 0, table.stdout
    assert "every check is ok (exit 0)" in table.stdout


def test_warnings_exit_1_and_errors_exit_2(tmp_path: Path):
    (tmp_path / "happyapp.py").write_text(HEALTHY_APP)
    (tmp_path / ".env").write_text("TASKKIT_VISIBILTY_TIMEOUT=60\nTASKKIT_LEASE_TTL=20\n")
    env = _env(tmp_path, TASKKIT_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}")

    missing_db = taskkit("doctor", "--app", "happyapp", "--json", cwd=tmp_path, env=env)
    report = json.loads(missing_db.stdout)
    by_name = {c["name"]: c for c in report["checks"]}

    assert missing_db.returncode == 2
    assert by_name["database"]["verdict"] == "error"
    settings = by_name["settings"]
    assert settings["verdict"] == "warning"
    assert (
        "TASKKIT_VISIBILTY_TIMEOUT (did you mean 'TASKKIT_VISIBILITY_TIMEOUT'?)"
        in (settings["reason"])
    )
    assert settings["details"]["settings"]["lease_ttl"] == {"value": 20.0, "source": ".env"}

    upgraded = taskkit("db", "upgrade", cwd=tmp_path, env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    warned = taskkit("doctor", "--app", "happyapp", cwd=tmp_path, env=env)
    assert warned.returncode == 1, warned.stdout
    assert "warnings (exit 1)" in warned.stdout


SECRETS = {
    "broker_password": "brokerpw-7c1d9e",
    "database_password": "dbpw-5a8f3b",
    "secret_key": "signing-key-4e6a2c9d1b7f",
    "api_token": "api-token-9d2e4f6a8b",
    "webhook": "T000/B000/hookpath-3f8e1a",
}


def test_no_secret_is_ever_printed(tmp_path: Path, own_redis):
    server = own_redis(6404)
    (tmp_path / "happyapp.py").write_text(HEALTHY_APP)
    env = _env(
        tmp_path,
        TASKKIT_BROKER_URL=f"redis://:{SECRETS['broker_password']}@127.0.0.1:6405/0",
        TASKKIT_RESULT_BACKEND=f"redis://:{SECRETS['broker_password']}@127.0.0.1:{server.port}/1",
        TASKKIT_DATABASE_URL=(
            f"postgresql+psycopg://postgres:{SECRETS['database_password']}@127.0.0.1:5432/test"
        ),
        TASKKIT_SECRET_KEY=SECRETS["secret_key"],
        TASKKIT_API_TOKEN=SECRETS["api_token"],
        TASKKIT_ALERT_WEBHOOK_URL=f"https://hooks.example.com/services/{SECRETS['webhook']}",
    )

    outputs = [
        taskkit("doctor", "--app", "happyapp", *flags, cwd=tmp_path, env=env)
        for flags in ((), ("--json",))
    ]

    for done in outputs:
        assert done.returncode == 2  # the broker (port 6405) does not answer
        text = done.stdout + done.stderr
        for name, secret in SECRETS.items():
            assert secret not in text, name
    report = json.loads(outputs[1].stdout)
    shown = report["checks"][0]["details"]["settings"]
    assert shown["secret_key"] == {"value": "***", "source": "env"}
    assert shown["api_token"]["value"] == "***"
    assert shown["broker_url"]["value"] == "redis://:***@127.0.0.1:6405/0"
