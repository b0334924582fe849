"""Running taskkit's console script and other commands the way a user's shell would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: The ``taskkit`` console script of the environment running the tests.
TASKKIT = Path(sys.executable).with_name("taskkit")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ``TASKKIT_*`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKKIT_")}
    return {**env, **extra}


def run_command(
    args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` (text output captured, never raising on its exit status); ``env`` defaults
    to ``clean_env()``."""
    return subprocess.run(
        args,
        check=False,
        cwd=cwd,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def taskkit(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``taskkit ARGS...`` in ``cwd``."""
    return run_command([str(TASKKIT), *args], cwd=cwd, env=env)
