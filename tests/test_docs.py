"""The docs site: its runnable examples run, its settings table is complete, its links resolve.

A page's ```` ```python ```` blocks are executed in order, each on its own (``py`` marks a
sketch that is shown, not run; ``--8<--`` includes files that tests/seed runs).
"""

from __future__ import annotations

import pathlib
import re

import pytest
import redis
import yaml

from taskkit.config import Settings
from tests.conftest import REDIS_URL

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def _blocks() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for n, code in enumerate(FENCE.findall(page.read_text())):
            if "--8<--" not in code:
                found.append((f"{page.relative_to(DOCS)}#{n}", code))
    return found


BLOCKS = _blocks()


def test_the_docs_have_an_example_per_primitive():
    text = "\n".join(code for _, code in BLOCKS)
    for name in (
        "@retry",
        "delays(",
        "@timeout",
        "CircuitBreaker(",
        "RedisCircuitStorage(",
        "RedisRetryBudget(",
        "@fallback",
        "safe_execute(",
        "batch_with_retry(",
        "TransactionManager(",
        "no_waits(",
        "@db_retry",
        "@ensure_connection",
        "atomic_update(",
        "safe_bulk_insert(",
        "upgrade(",
        "ResilientTask",
        "create_app(",
        "TrainingTask",
        "CheckpointStore(",
        "load_model(",
        "BatchTask",
        "DeadLetterStore(",
        "replay_dead_letters(",
    ):
        assert name in text, f"no runnable example in docs/ uses {name}"


@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_docs_example_runs(where, code, request, unique):
    if "redis://" in code:
        # Point the example at the test database, under a name no one else uses.
        request.getfixturevalue("redis_url")
        code = code.replace("redis://127.0.0.1:6379/0", REDIS_URL).replace("feature-store", unique)
    try:
        exec(compile(code, str(DOCS / where), "exec"), {"__name__": "docs_example"})
    finally:
        if "redis://" in code:
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"*{unique}*"))
            if keys:
                client.delete(*keys)
            client.close()


def test_the_settings_table_lists_every_setting():
    page = (DOCS / "configuration.md").read_text()
    listed = set(re.findall(r"^\| `(TASKKIT_[A-Z_]+)` \|", page, flags=re.M))
    fields = {f"TASKKIT_{name.upper()}" for name in Settings.model_fields}
    assert fields - listed == set(), "docs/configuration.md does not list these settings"
    assert {"TASKKIT_DEAD_LETTER", "TASKKIT_DEAD_LETTER_QUEUE"} <= listed
    extra = listed - fields - {"TASKKIT_APP", "TASKKIT_REQUIRE_SERVICES"}
    assert extra == set(), "docs/configuration.md lists settings that do not exist"


def _nav_pages(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in _nav_pages(item)]
    if isinstance(node, dict):
        return [page for value in node.values() for page in _nav_pages(value)]
    return []


def test_every_page_is_in_the_navigation():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = set(_nav_pages(config["nav"]))
    pages = {str(page.relative_to(DOCS)) for page in PAGES}
    assert pages - nav == set(), "pages missing from mkdocs.yml's nav"


@pytest.mark.parametrize("package", ["recovery", "db", "checkpoint", "deadletter", "tasks"])
def test_each_public_package_has_a_reference_page(package):
    page = DOCS / "reference" / f"{package}.md"
    assert f"::: taskkit.{package}" in page.read_text()


def test_one_copy_of_the_layer_table_and_the_ladder():
    ladder = "| error raised by the body | what happens |"
    layers = "| layer | package | depends on | role |"
    pages = {str(p.relative_to(REPO)): p.read_text() for p in [*PAGES, REPO / "README.md"]}
    assert [name for name, text in pages.items() if ladder in text] == ["docs/design.md"]
    assert [name for name, text in pages.items() if layers in text] == ["docs/design.md"]
