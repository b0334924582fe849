"""The README quickstart, run as a new user would: their own project, a worker subprocess on it,
a result, a dead letter, the fix, and ``taskkit dlq replay ID`` with the app from TASKKIT_APP.

The task module and the submitting script are the README's own code blocks (so the README cannot
drift from what works); the commands run here are checked to be the README's commands.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from tests._support.commands import clean_env, run_command

REPO = pathlib.Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BIN = pathlib.Path(sys.executable).parent
TIMEOUT = 60


def readme_file(name: str) -> str:
    """The README's python block whose first line is ``# <name>``."""
    for block in re.findall(r"```python\n(.*?)```", README, flags=re.S):
        if block.startswith(f"# {name}"):
            return block
    raise AssertionError(f"README.md has no python block starting with '# {name}'")


def in_readme(command: str) -> str:
    assert command in README, f"README.md no longer says {command!r}; update the quickstart test"
    return command


def wait_for(condition: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def project(tmp_path: pathlib.Path) -> pathlib.Path:
    """A project folder of the user's own, outside the taskkit checkout."""
    package = tmp_path / "myproject"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(readme_file("myproject/tasks.py"))
    (package / "rates.json").write_text(json.dumps({"EUR": 0.92}))
    (tmp_path / "submit.py").write_text(readme_file("submit.py"))
    return tmp_path


@pytest.fixture
def env(project: pathlib.Path) -> dict[str, str]:
    return {
        **clean_env(),
        # Explicit, as the README exports it: the test must not depend on how an unset home
        # is resolved.
        "TASKKIT_HOME": str(project / ".taskkit"),
        "TASKKIT_APP": "myproject.tasks",
        "PYTHONPATH": str(project),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def run(args: list[str], env: dict[str, str], cwd: pathlib.Path) -> str:
    done = run_command(args, cwd=cwd, env=env, timeout=TIMEOUT)
    assert done.returncode == 0, (
        f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


@pytest.fixture
def worker(project: pathlib.Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    run(in_readme("taskkit db upgrade").split(), env, project)
    command = in_readme("celery -A myproject.tasks worker --pool=solo --loglevel=info").split()
    log_path = project / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(BIN / command[0]), *command[1:], "--without-gossip", "--without-mingle"],
            cwd=project,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:

            def ready() -> bool:
                assert process.poll() is None, f"worker exited:\n{log_path.read_text()[-3000:]}"
                return " ready." in log_path.read_text(errors="replace")

            wait_for(ready, "the worker to be ready")
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=TIMEOUT)


def letters(env: dict[str, str], cwd: pathlib.Path) -> list[dict[str, object]]:
    out = run(["taskkit", "dlq", "list", "--status", "any", "--json"], env, cwd)
    letters: list[dict[str, object]] = json.loads(out)["letters"]
    return letters


def test_readme_quickstart(project, env, worker):
    in_readme("worker APP=myproject.tasks")
    out = run([sys.executable, "submit.py"], env, project)
    assert out.splitlines() == ["92.0", "FAILURE"]

    (letter,) = letters(env, project)
    assert letter["status"] == "dead"
    assert letter["task_name"] == "myproject.tasks.convert"
    assert letter["error_type"] == "ValueError"
    shown = json.loads(run(["taskkit", "dlq", "show", str(letter["id"]), "--json"], env, project))
    assert shown["payload"] == {"args": [100, "GBP"], "kwargs": {}}

    in_readme(f"taskkit dlq replay {letter['id']}")
    (project / "myproject" / "rates.json").write_text(json.dumps({"EUR": 0.92, "GBP": 0.79}))
    run(["taskkit", "dlq", "replay", str(letter["id"])], env, project)  # no --app: TASKKIT_APP

    (replayed,) = letters(env, project)
    assert replayed["status"] == "replayed"
    task_id = replayed["replay_task_id"]
    assert task_id
    check = (
        "import sys\nfrom myproject.tasks import app\n"
        f"print(app.AsyncResult({task_id!r}).get(timeout={TIMEOUT}))"
    )
    assert run([sys.executable, "-c", check], env, project).strip() == "79.0"
    assert worker.poll() is None
