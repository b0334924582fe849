"""docs/testing.md's example project runs as written: its files are taken from the page and
run by pytest in a subprocess, where the plugin loads from its entry point as a user's does."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tests._support.commands import clean_env, run_command

PAGE = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
BLOCK = re.compile(r'```python title="(?P<path>[^"]+)"\n(?P<code>.*?)```', re.DOTALL)


def example_files() -> dict[str, str]:
    return {m["path"]: m["code"] for m in BLOCK.finditer(PAGE.read_text())}


def test_the_page_holds_a_project_a_conftest_and_its_tests():
    assert sorted(example_files()) == ["shop/tasks.py", "tests/conftest.py", "tests/test_shop.py"]


def test_the_example_passes_as_a_users_suite(tmp_path):
    for path, code in example_files().items():
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(code)
    (tmp_path / "shop" / "__init__.py").write_text("")
    env = clean_env(PYTHONPATH=str(tmp_path), TASKKIT_HOME=str(tmp_path / ".taskkit"))
    done = run_command(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 passed" in done.stdout
