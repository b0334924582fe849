"""docs/alerts/taskkit.rules.yml: valid for Prometheus (``promtool check rules``), each alert
fires and stays quiet as its unit tests say (``promtool test rules``), and every metric it
names is one taskkit exports.

promtool comes from Debian's ``prometheus`` package (``make promtool`` unpacks just the
binary); under CI (``CI=true``) a missing promtool fails these tests, elsewhere it skips them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from taskkit.recovery import events
from taskkit.telemetry import metrics

ALERTS = Path(__file__).resolve().parents[2] / "docs" / "alerts"
RULES = ALERTS / "taskkit.rules.yml"
RULE_TESTS = ALERTS / "taskkit.rules.test.yml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is not installed (make promtool: Debian's prometheus package)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message)
        pytest.skip(message)
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=ALERTS, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_accepts_the_rules() -> None:
    result = run("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_the_rules_unit_tests_pass() -> None:
    result = run("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    alerts = {rule["alert"] for group in _load(RULES)["groups"] for rule in group["rules"]}
    tested = {
        case["alertname"]
        for test in _load(RULE_TESTS)["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert (
        alerts
        == tested
        == {
            "TaskkitCircuitBreakerOpen",
            "TaskkitDeadLettersGrowing",
            "TaskkitStaleRuns",
            "TaskkitLeaseTakeovers",
        }
    )


def test_the_rules_name_only_metrics_taskkit_exports(db_url: str, engine: object) -> None:
    metrics.uninstall()
    metrics.install()
    try:
        events.emit(events.LeaseTakenOver("t", "id", "k", None, 1))
        events.emit(events.CircuitStateChanged("b", "closed", "open"))
        body = metrics.render(extra=[metrics.DatabaseCollector(db_url)]).decode()
    finally:
        metrics.uninstall()
    exported = set(re.findall(r"^([a-z_]+)(?:\{| )", body, flags=re.MULTILINE))
    expressions = " ".join(
        rule["expr"] for group in _load(RULES)["groups"] for rule in group["rules"]
    )
    named = set(re.findall(r"\b(taskkit_[a-z_]+)\b", expressions))
    assert named
    assert named <= exported, named - exported


def _load(path: Path) -> dict:  # type: ignore[type-arg]
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict)
    return loaded
