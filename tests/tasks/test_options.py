"""One options system for ResilientTask, BatchTask and TrainingTask: one table per class,
merged along the hierarchy, resolved class -> app config -> default, typos refused with a
suggestion from the class's own options, deprecated aliases, and docs rendered from the tables.

Every task here is defined on a real Celery app (``create_app``, ``@app.task(base=...)``) and
bound, which is when its options are resolved."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine

from taskkit.errors import ConfigurationError
from taskkit.tasks import (
    BatchTask,
    Option,
    ResilientTask,
    TrainingTask,
    create_app,
    options_markdown,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "tasks.md"


def make_app(**config: Any) -> Celery:
    return create_app("optunit", broker_url="memory://", result_backend="cache+memory://", **config)


def define(app: Celery, base: type, **options: Any) -> Any:
    """A task on ``app`` with ``base`` and ``options``, bound (its options resolved)."""
    name = f"optunit.t{uuid.uuid4().hex[:8]}"

    @app.task(base=base, bind=True, shared=False, name=name, **options)
    def task(self: Any, model_run_id: int = 0) -> None:
        return None

    return app.tasks[name]


# One wording for every class: "task <name>: unknown option '<typo>'; did you mean '<option>'?"
TYPO = r"task optunit\.t[0-9a-f]{{8}}: unknown option '{typo}'; did you mean '{meant}'\?$"


@pytest.mark.parametrize(
    ("base", "typo", "meant"),
    [
        (ResilientTask, "outer_max_dalay", "outer_max_delay"),
        (BatchTask, "item_dealy", "item_delay"),
        (BatchTask, "ledger_flush_evry", "ledger_flush_every"),
        (TrainingTask, "checkpoint_evry", "checkpoint_every"),
        (TrainingTask, "inner_max_attempt", "inner_max_attempts"),  # inherited options too
    ],
)
def test_a_misspelt_option_gets_the_same_suggestion_error_on_every_task_class(
    base: type, typo: str, meant: str
) -> None:
    with pytest.raises(ConfigurationError, match=TYPO.format(typo=typo, meant=meant)):
        define(make_app(), base, **{typo: 1})


def test_options_resolve_from_the_task_then_app_config_then_default_on_every_class() -> None:
    app = make_app(
        taskkit_item_delay=0.25,
        taskkit_item_max_attempts=4,
        taskkit_checkpoint_every=3,
        taskkit_inner_max_attempts=6,
    )
    batch = define(app, BatchTask, item_delay=0.5)
    training = define(app, TrainingTask, score_mode="min")

    assert batch.item_delay == 0.5  # the task's own
    assert batch.item_max_attempts == 4  # app config
    assert batch.item_max_delay == 60.0  # default
    assert batch.inner_max_attempts == 6  # a ResilientTask option, through the same path
    assert batch.lease_key == "batch"  # BatchTask's class attribute wins over the default
    assert (training.checkpoint_every, training.score_mode) == (3, "min")
    assert training.checkpoint_format == "pickle"
    assert training.lease_key == training.progress_run_arg == "model_run_id"


def test_a_subclass_adds_options_to_its_bases_table() -> None:
    class Scoring(BatchTask):
        taskkit_options = (
            Option("model_cache_size", 4, lambda v: isinstance(v, int) and v >= 1,
                   "an integer >= 1", "Models kept loaded per process."),
        )  # fmt: skip
        model_cache_size: int

    app = make_app(taskkit_model_cache_size=8)

    assert define(app, Scoring).model_cache_size == 8
    assert define(app, Scoring, model_cache_size=2, item_delay=0).model_cache_size == 2
    assert define(make_app(), Scoring).model_cache_size == 4
    with pytest.raises(ConfigurationError, match="did you mean 'model_cache_size'"):
        define(app, Scoring, model_cache_sise=2)
    with pytest.raises(ConfigurationError, match="model_cache_size must be an integer >= 1"):
        define(app, Scoring, model_cache_size=0)


@pytest.mark.parametrize(
    ("base", "options", "message"),
    [
        (BatchTask, {"item_max_attempts": 0}, "item_max_attempts must be an integer >= 1, got 0"),
        (BatchTask, {"item_backoff": 0.5}, "item_backoff must be a number >= 1, got 0.5"),
        (BatchTask, {"ledger": "yes"}, "ledger must be True or False, got 'yes'"),
        (TrainingTask, {"score_mode": "best"}, "score_mode must be 'max' or 'min', got 'best'"),
        (TrainingTask, {"checkpoint_format": "npz"}, "checkpoint_format must be 'pickle' or"),
    ],
)
def test_a_bad_value_names_the_task_and_the_option(
    base: type, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=rf"task optunit\.t\w+: {re.escape(message)}"):
        define(make_app(), base, **options)


def test_an_explicit_none_is_kept_where_the_option_accepts_it() -> None:
    training = define(make_app(), TrainingTask, score_metric=None)
    assert training.score_metric is None


def test_app_settings_of_every_class_are_checked_with_suggestions() -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'taskkit_item_delay'"):
        make_app(taskkit_item_dealy=1.0)
    with pytest.raises(ConfigurationError, match="did you mean 'taskkit_checkpoint_every'"):
        make_app(taskkit_checkpoint_evry=2)
    with pytest.raises(ConfigurationError, match="batch_size must be an integer >= 1, got 0"):
        make_app(taskkit_batch_size=0)


def test_item_max_retries_is_a_deprecated_alias_of_item_max_attempts(
    db_url: str, engine: Engine
) -> None:
    app = make_app(taskkit_database_url=db_url)
    tries: list[int] = []

    @app.task(base=BatchTask, bind=True, shared=False, name="optunit.flaky",
              item_max_retries=1, item_delay=0)  # fmt: skip
    def flaky(self: BatchTask, item: int) -> None:
        tries.append(item)
        raise RuntimeError("always")

    with pytest.warns(DeprecationWarning, match="item_max_retries is deprecated; use item_max_a"):
        task = app.tasks["optunit.flaky"]  # the app binds its tasks: options are resolved

    assert task.item_max_attempts == 2  # one retry = two attempts
    assert "item_max_retries" not in vars(type(task))
    summary = task([7], batch_id=uuid.uuid4().hex)
    assert summary["failed_ids"] == [7]
    assert tries == [7, 7]  # as many tries as before the rename


def test_the_deprecation_warning_says_what_the_old_value_means() -> None:
    with pytest.warns(DeprecationWarning, match=r"item_max_retries=0 is item_max_attempts=1\)$"):
        assert define(make_app(), BatchTask, item_max_retries=0).item_max_attempts == 1


def test_giving_an_option_and_its_deprecated_alias_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="give item_max_attempts or item_max_retries"):
        define(make_app(), BatchTask, item_max_attempts=3, item_max_retries=2)
    with pytest.raises(ConfigurationError, match="item_max_retries must be an integer >= 0"):
        define(make_app(), BatchTask, item_max_retries=-1)  # refused before any warning


def test_the_markdown_lists_each_option_of_the_class_once() -> None:
    text = options_markdown(BatchTask)
    assert "| `item_max_attempts` | `3` | an integer >= 1 |" in text
    assert "`inner_delay`" not in text  # ResilientTask's, not BatchTask's own
    assert "`inner_delay`" in options_markdown(BatchTask, inherited=True)
    assert "- `item_max_retries` (deprecated, warns)" in text


@pytest.mark.parametrize("cls", [ResilientTask, BatchTask, TrainingTask])
def test_the_docs_show_each_classes_table_as_rendered(cls: type) -> None:
    """docs/tasks.md holds ``options_markdown(cls)`` between markers; regenerate it with
    ``python -m tests.tasks.test_options`` after changing a table."""
    docs = DOCS.read_text()
    begin, end = f"<!-- options: {cls.__name__} -->\n", f"<!-- /options: {cls.__name__} -->"
    assert begin in docs, f"docs/tasks.md has no table for {cls.__name__}"
    assert end in docs, f"docs/tasks.md does not close the table of {cls.__name__}"
    shown = docs.split(begin, 1)[1].split(end, 1)[0]
    assert shown == options_markdown(cls), f"docs/tasks.md: {cls.__name__}'s table is stale"


def regenerate_docs() -> None:
    """Rewrite the tables between the markers of docs/tasks.md."""
    docs = DOCS.read_text()
    for cls in (ResilientTask, BatchTask, TrainingTask):
        begin, end = f"<!-- options: {cls.__name__} -->\n", f"<!-- /options: {cls.__name__} -->"
        head, rest = docs.split(begin, 1)
        docs = head + begin + options_markdown(cls) + end + rest.split(end, 1)[1]
    DOCS.write_text(docs)


if __name__ == "__main__":
    regenerate_docs()
