"""The package layout: the layer contracts hold, and no package reaches into another's privates.

``lint-imports`` (import-linter, run by ``make lint``) checks the layers; this test checks the
rule import-linter cannot express: a ``_private`` module of a package is imported only from
inside that package (what several packages share lives in ``taskkit._utils`` or a public module).
"""

from __future__ import annotations

import grimp
import pytest


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
