"""The package layout: the layer contracts hold, and no package reaches into another's privates.

``lint-imports`` (import-linter, run by ``make lint``) checks the layers; this test checks the
rule import-linter cannot express: a ``_private`` module of a package is imported only from
inside that package (what several packages share lives in ``taskkit._utils`` or a public module).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent


def private_owner(module: str) -> str | None:
    """The package whose private module this is, or None for a public module."""
    parts = module.split(".")
    for depth, part in enumerate(parts[1:], start=1):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:depth])
    return None


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("taskkit", "workers")


def test_no_package_imports_another_packages_private_modules(graph: grimp.ImportGraph):
    crossings = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            home = private_owner(imported)
            if home is None or home == "taskkit":  # taskkit._utils is the shared home
                continue
            if not (importer == home or importer.startswith(home + ".")):
                crossings.append(f"{importer} -> {imported}")
    assert crossings == []


def test_the_rule_sees_a_crossing():
    assert private_owner("taskkit.db._retry") == "taskkit.db"
    assert private_owner("taskkit.db.models") is None
    assert private_owner("taskkit._utils") == "taskkit"


def test_lint_imports_breaks_on_an_upward_import(tmp_path: Path):
    """The contracts are live: the data layer importing the Celery layer fails ``lint-imports``."""
    for part in ("taskkit", "workers"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "taskkit" / "db" / "models.py").open("a") as models:
        models.write("\nimport taskkit.tasks  # the deliberate upward import\n")
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stdout
    assert "Layers: each imports only from the layers below it BROKEN" in done.stdout
    assert "taskkit.db is not allowed to import taskkit.tasks" in done.stdout
