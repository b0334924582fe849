"""The report's pure parts: verdicts and exit codes, the JSON schema, the scrubber, where each
setting came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskkit.config import Settings
from taskkit.doctor import EXIT_CODES, Check, Report
from taskkit.doctor._local import setting_sources, shown_value
from taskkit.doctor._model import Scrubber


def test_the_overall_verdict_is_the_worst_and_sets_the_exit_code():
    ok = Check("a", "ok", "fine")
    warned = Check("b", "warning", "hm", "do x")
    failed = Check("c", "error", "bad", "do y")

    assert Report((ok,)).exit_code == 0
    assert Report((ok, warned)).exit_code == 1
    assert Report((warned, failed, ok)).exit_code == 2
    assert Report(()).verdict == "ok"
    assert EXIT_CODES == {"ok": 0, "warning": 1, "error": 2}


def test_the_json_schema():
    check = Check("a", "warning", "why", "fix it", {"paths": (Path("/x"),), "n": 1})

    data = json.loads(Report((check,)).to_json())

    assert data == {
        "verdict": "warning",
        "exit_code": 1,
        "checks": [
            {
                "name": "a",
                "verdict": "warning",
                "reason": "why",
                "fix": "fix it",
                "details": {"paths": ["/x"], "n": 1},
            }
        ],
    }


def test_the_scrubber_replaces_every_secret_everywhere():
    scrub = Scrubber(["hunter2-pass", "", "abc"])  # too short to scrub safely: left alone
    check = Check(
        "x", "error", "redis://:hunter2-pass@h", "set hunter2-pass", {"k": ["hunter2-pass"]}
    )

    clean = scrub.check(check)

    assert "hunter2-pass" not in json.dumps(clean.to_dict())
    assert clean.reason == "redis://:***@h"


def test_secrets_are_masked_and_urls_lose_their_password():
    settings = Settings(
        secret_key="k" * 20, broker_url="redis://:pw-123@cache:6379/0", api_token="t" * 10
    )

    assert shown_value("secret_key", settings.secret_key) == "***"
    assert shown_value("api_token", settings.api_token) == "***"
    assert shown_value("broker_url", settings.broker_url) == "redis://:***@cache:6379/0"
    assert shown_value("secret_keys_old", settings.secret_keys_old) is None


def test_where_each_setting_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, project: Path
):
    (project / ".env").write_text("TASKKIT_LEASE_TTL=20\n")
    monkeypatch.setenv("TASKKIT_PROGRESS_INTERVAL", "2")

    sources = setting_sources(Settings(dead_letter=False))

    assert sources["progress_interval"] == "env"
    assert sources["lease_ttl"] == ".env"
    assert sources["dead_letter"] == "code"
    assert sources["visibility_timeout"] == "default"
