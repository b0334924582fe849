"""``taskkit dlq list|show|replay|discard|purge|depth``: the dead-letter queue from a shell, on
SQLite and PostgreSQL, replaying into ``tests.cli.dlqapp`` (its messages are read from Redis)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from taskkit.cli import app
from taskkit.cli import dlq as cli_dlq
from taskkit.cli._common import CliError
from taskkit.cli.dlq import parse_age
from taskkit.config import reset_settings
from taskkit.deadletter import DeadLetterStore, SentReplay
from tests._support.letters import letter_entry
from tests.cli import dlqapp

pytestmark = pytest.mark.redis

SCORE, SCORE_V2, PING = dlqapp.SCORE, dlqapp.SCORE_V2, dlqapp.PING
APP = ["--app", "tests.cli.dlqapp"]
#: Wide enough that no table cell is folded.
WIDE = {"COLUMNS": "200"}

AddLetter = Callable[..., int]


@pytest.fixture
def add(database: str) -> AddLetter:
    """Record a letter (an item of a batch unless ``batch=None``); returns its id."""
    store = DeadLetterStore(database, queue="")

    def add(
        task: str = SCORE,
        payload: Any = None,
        *,
        batch: str | None = "b1",
        key: str | None = "a",
        error: BaseException | None = None,
        attempts: int = 1,
        ago: timedelta = timedelta(0),
        status: str = "dead",
    ) -> int:
        entry = letter_entry(
            task, payload, batch=batch, key=key, error=error, attempts=attempts,
            at=datetime.now(UTC) - ago, task_id=f"task-{key or task}",
        )  # fmt: skip
        store.record([entry])
        letter_id = max(letter.id for letter in store.list(task=task, status=None))
        if status == "discarded":
            store.discard([letter_id])
        elif status != "dead":
            raise ValueError(status)
        return letter_id

    return add


@pytest.fixture
def letters(database: str) -> DeadLetterStore:
    """The test database's letters, to check what a command did."""
    return DeadLetterStore(database, queue="")


def statuses(store: DeadLetterStore) -> dict[int, str]:
    return {letter.id: letter.status for letter in store.list(status=None)}


def sent() -> list[tuple[str, str, list[Any], dict[str, Any]]]:
    """(task, task id, args, kwargs) of the messages a replay left in dlqapp's queue."""
    messages = []
    for message in dlqapp.queued():
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        messages.append((message["headers"]["task"], message["headers"]["id"], args, kwargs))
    return messages


def dlq(runner: CliRunner, *args: str, **options: Any) -> Result:
    return runner.invoke(app, ["dlq", *args], **options)


# -- ages --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "age"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("1.5h", timedelta(minutes=90)),
        (" 10 M ", timedelta(minutes=10)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_age_reads_a_number_and_a_unit(text: str, age: timedelta):
    assert parse_age(text) == age


@pytest.mark.parametrize("text", ["", "7", "d", "-1d", "3x", "1h30m", "1e3s", "ten days"])
def test_parse_age_refuses_what_is_not_an_age(text: str):
    with pytest.raises(CliError, match="is not an age") as raised:
        parse_age(text, "--newer-than")

    assert raised.value.code == 2
    assert raised.value.message.startswith(f"--newer-than {text!r} is not an age")


def test_parse_age_refuses_an_age_before_year_one():
    with pytest.raises(CliError, match="too long ago"):
        parse_age("999999999999d")


# -- list --------------------------------------------------------------------------------------


def test_dlq_list_shows_the_waiting_letters_newest_failure_first(runner: CliRunner, add: AddLetter):
    old = add(key="a", ago=timedelta(hours=3), attempts=3, error=KeyError("price"))
    new = add(key="b", error=ValueError("bad row\nsecond line " + "x" * 80))
    add(key="c", status="discarded")

    result = dlq(runner, "list", env=WIDE)
    every = dlq(runner, "list", "--status", "any", env=WIDE)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = ["ID", "TASK", "BATCH", "ITEM", "ERROR", "MESSAGE", "ATTEMPTS", "LAST", "FAILURE"]
    assert lines[0].split() == header
    assert len(lines) == 3
    assert lines[1].split()[:8] == [str(new), SCORE, "b1", "b", "ValueError", "bad", "row", "…"]
    assert lines[1].split()[8] == "1"
    assert lines[2].split()[:7] == [str(old), SCORE, "b1", "a", "KeyError", "'price'", "3"]
    assert every.stdout.splitlines()[0].split() == [*header, "STATUS"]
    assert [line.split()[-1] for line in every.stdout.splitlines()[1:]] == [
        "discarded",
        "dead",
        "dead",
    ]


def test_dlq_list_filters_and_prints_one_json_document(runner: CliRunner, add: AddLetter):
    a = add(SCORE, batch="b1", key="a", ago=timedelta(days=2), error=KeyError("k"))
    b = add(SCORE, batch="b2", key="b", ago=timedelta(minutes=30), error=ValueError("v"))
    c = add(PING, {"args": ["h1"], "kwargs": {}}, batch=None, key=None, error=TimeoutError("t"))
    d = add(SCORE, batch="b2", key="d", status="discarded")

    def ids(*args: str) -> list[int]:
        result = dlq(runner, "list", "--json", *args)
        assert result.exit_code == 0, result.output
        return [record["id"] for record in json.loads(result.stdout)["letters"]]

    assert ids() == [c, b, a]
    assert ids("--task", SCORE) == [b, a]
    assert ids("--batch", "b2") == [b]
    assert ids("--batch", "b2", "--status", "any") == [d, b]
    assert ids("--status", "discarded") == [d]
    assert ids("--error-type", "TimeoutError") == [c]
    assert ids("--older-than", "1d") == [a]
    assert ids("--older-than", "10m", "--newer-than", "1h") == [b]
    assert ids("--newer-than", "1h") == [c, b]
    assert ids("--limit", "2") == [c, b]
    assert json.loads(dlq(runner, "list", "--json", "--limit", "2").stdout)["more"] == 1
    assert json.loads(dlq(runner, "list", "--json").stdout)["more"] == 0
    document = json.loads(dlq(runner, "list", "--json", "--task", PING).stdout)
    [record] = document["letters"]
    assert record == {
        "id": c,
        "task_name": PING,
        "batch_id": None,
        "item_key": None,
        "task_id": f"task-{PING}",
        "error_type": "TimeoutError",
        "error_message": "t",
        "attempts": 1,
        "first_failed_at": record["last_failed_at"],
        "last_failed_at": record["last_failed_at"],
        "status": "dead",
        "replayed_at": None,
        "replayed_into": None,
        "replay_task_id": None,
        "replays": 0,
    }
    failed_at = datetime.fromisoformat(record["last_failed_at"])
    assert failed_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - failed_at) < timedelta(minutes=1)


def test_dlq_list_without_letters_says_so(runner: CliRunner, database: str):
    table = dlq(runner, "list", "--task", "jobs.none")
    lines = dlq(runner, "list", "--json")

    assert table.exit_code == 0, table.output
    assert table.stdout.startswith("no dead letters (status dead, task jobs.none) in ")
    assert lines.exit_code == 0
    assert json.loads(lines.stdout) == {"letters": [], "more": 0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--older-than", "3x"],
            "error: --older-than '3x' is not an age: give a number and a unit",
        ),
        (["--newer-than", "7"], "error: --newer-than '7' is not an age"),
        (
            ["--status", "lost"],
            "error: --status 'lost' is not one of dead, replayed, discarded, any",
        ),
    ],
)
def test_dlq_list_with_a_bad_filter_exits_2(
    runner: CliRunner, add: AddLetter, args: list[str], message: str
):
    add()

    result = dlq(runner, "list", *args)

    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message)
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout == ""


def test_dlq_list_with_an_unreachable_database_exits_1_without_the_password(runner: CliRunner):
    url = "postgresql+psycopg://app:hunter2@127.0.0.1:1/prod"

    result = dlq(runner, "list", "--url", url)

    assert result.exit_code == 1
    assert result.stderr.startswith("error: could not use database postgresql://127.0.0.1:1/prod")
    assert "hunter2" not in result.output


# -- show --------------------------------------------------------------------------------------


def test_dlq_show_prints_every_field_the_payload_and_the_traceback(
    runner: CliRunner, add: AddLetter
):
    letter_id = add(payload={"id": "a", "price": None, "tags": ["x"]}, attempts=3)

    result = dlq(runner, "show", str(letter_id), env=WIDE)

    assert result.exit_code == 0, result.output
    out = result.stdout
    lines = [line.rstrip() for line in out.splitlines()]
    assert lines[:9] == [
        f"letter         {letter_id}",
        "status         dead",
        f"task           {SCORE} [task-a]",
        "batch          b1",
        "item           a",
        "error          KeyError: 'price'",
        "attempts       3",
        lines[7],
        lines[8],
    ]
    assert lines[7].startswith("first failure  20")
    assert lines[8].startswith("last failure   20")
    assert lines[9] == "payload"
    out = "\n".join(lines)
    payload = out.split("payload\n", 1)[1].split("traceback\n", 1)[0]
    assert json.loads(payload) == {"id": "a", "price": None, "tags": ["x"]}
    assert '\n  "price": null,\n' in payload  # indented
    assert out.endswith("traceback\nTraceback (most recent call last):\nKeyError: 'price'")


def test_dlq_show_json_has_the_payload_and_traceback(runner: CliRunner, add: AddLetter):
    letter_id = add(payload={"id": "a", "n": [1, 2]})

    result = dlq(runner, "show", str(letter_id), "--json")

    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["id"], record["task_name"], record["item_key"]) == (letter_id, SCORE, "a")
    assert record["payload"] == {"id": "a", "n": [1, 2]}
    assert record["traceback"].endswith("KeyError: 'price'\n")


def test_dlq_show_of_an_unknown_id_exits_3(runner: CliRunner, database: str):
    result = dlq(runner, "show", "4242")

    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("error: no dead letter with id 4242 in ")
    assert result.stderr.rstrip().endswith("; see: taskkit dlq list --status any")


# -- depth -------------------------------------------------------------------------------------


def test_dlq_depth_counts_the_waiting_letters_per_task(runner: CliRunner, add: AddLetter):
    add(SCORE, key="a")
    add(SCORE, key="b")
    add(SCORE, key="c", status="discarded")
    add(PING, {"args": [], "kwargs": {}}, batch=None, key=None)

    as_json = dlq(runner, "depth", "--json")
    table = dlq(runner, "depth", env=WIDE)

    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == {SCORE: 2, PING: 1}
    assert table.exit_code == 0, table.output
    assert [line.split() for line in table.stdout.splitlines()] == [
        ["TASK", "DEAD"],
        [PING, "1"],  # by task name
        [SCORE, "2"],
    ]


def test_dlq_depth_of_an_empty_queue(runner: CliRunner, database: str):
    as_json = dlq(runner, "depth", "--json")
    table = dlq(runner, "depth")

    assert json.loads(as_json.stdout) == {}
    assert table.stdout.startswith("no dead letters waiting in ")


# -- replay ------------------------------------------------------------------------------------


def test_dlq_replay_of_item_letters_sends_them_as_one_new_batch(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    a = add(key="a")
    b = add(key="b", payload={"id": "b", "price": 3})
    other = add(key="c")

    result = dlq(runner, "replay", str(a), str(b), *APP)

    assert result.exit_code == 0, result.output
    [(task, task_id, args, kwargs)] = sent()
    assert task == SCORE
    assert args == [[{"id": "a"}, {"id": "b", "price": 3}]]
    assert kwargs["keys"] == ["a", "b"]
    assert kwargs["batch_id"].startswith("replay-")
    assert result.stdout.splitlines() == [
        f"sent dead letters {a}, {b} to {SCORE} as task {task_id} (batch {kwargs['batch_id']})",
        "replayed 2 dead letters in 1 message",
    ]
    assert statuses(letters) == {a: "replayed", b: "replayed", other: "dead"}
    shown = dlq(runner, "show", str(a), env=WIDE)
    assert "status         replayed" in shown.stdout
    assert "replays        1" in shown.stdout
    assert f" into {SCORE} [{task_id}]" in shown.stdout


def test_dlq_replay_by_filter_into_another_task(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    a = add(key="a", error=KeyError("x"))
    b = add(key="b", error=ValueError("y"))
    ping = add(
        PING,
        {"args": ["h1"], "kwargs": {"timeout": 2.5}},
        batch=None,
        key=None,
        error=TimeoutError("t"),
    )

    into = dlq(runner, "replay", "--error-type", "KeyError", "--into", SCORE_V2, *APP)
    by_task = dlq(runner, "replay", "--task", PING, *APP)

    assert into.exit_code == 0, into.output
    assert by_task.exit_code == 0, by_task.output
    (first, second) = sent()
    assert (first[0], first[2], first[3]["keys"]) == (SCORE_V2, [[{"id": "a"}]], ["a"])
    assert (second[0], second[2], second[3]) == (PING, ["h1"], {"timeout": 2.5})
    assert by_task.stdout.splitlines() == [
        f"sent dead letter {ping} to {PING} as task {second[1]}",
        "replayed 1 dead letter in 1 message",
    ]
    assert statuses(letters) == {a: "replayed", b: "dead", ping: "replayed"}
    assert letters.get(a).replayed_into == SCORE_V2


def test_dlq_replay_all(runner: CliRunner, add: AddLetter, letters: DeadLetterStore):
    add(key="a")
    add(key="b", status="discarded")
    add(key="c", ago=timedelta(days=3))

    result = dlq(runner, "replay", "--all", "--yes", *APP)

    assert result.exit_code == 0, result.output
    [(_, _, args, _)] = sent()
    assert args == [[{"id": "a"}, {"id": "c"}]]
    assert sorted(statuses(letters).values()) == ["discarded", "replayed", "replayed"]


def test_dlq_replay_all_without_yes_and_no_terminal_exits_2_and_sends_nothing(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    """Issue 14 item 13: `dlq replay --all` sent every letter without asking."""
    a = add(key="a")

    result = dlq(runner, "replay", "--all", *APP)

    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "error: replay --all sends every dead letter again: add --yes (no terminal to ask on)\n"
    )
    assert sent() == []
    assert statuses(letters) == {a: "dead"}


@pytest.mark.parametrize(("answer", "replayed"), [("y\n", True), ("n\n", False), ("\n", False)])
def test_dlq_replay_all_asks_first_on_a_terminal(
    runner: CliRunner,
    add: AddLetter,
    letters: DeadLetterStore,
    monkeypatch: pytest.MonkeyPatch,
    answer: str,
    replayed: bool,
):
    monkeypatch.setattr(cli_dlq, "_interactive", lambda: True)
    a, b = add(key="a"), add(key="b")
    c = add(key="c", status="discarded")

    result = dlq(runner, "replay", "--all", *APP, input=answer)

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("send 2 dead letters (status dead) again, from ")
    if replayed:
        assert "replayed 2 dead letters in 1 message" in result.stdout
        assert statuses(letters) == {a: "replayed", b: "replayed", c: "discarded"}
    else:
        assert result.stdout.endswith("nothing was sent\n")
        assert sent() == []
        assert statuses(letters) == {a: "dead", b: "dead", c: "discarded"}


def test_dlq_replay_all_on_a_terminal_with_nothing_waiting_does_not_ask(
    runner: CliRunner, add: AddLetter, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(cli_dlq, "_interactive", lambda: True)
    add(key="a", status="discarded")

    result = dlq(runner, "replay", "--all", *APP)

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("no dead letters (status dead) in ")


def test_dlq_replay_into_celery_map_exits_2_and_sends_nothing(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    a = add(PING, {"args": [{"task": PING}, [["h1"]]], "kwargs": {}}, batch=None, key=None)

    result = dlq(runner, "replay", str(a), "--into", "celery.map", *APP)

    assert result.exit_code == 2, result.output
    assert "'celery.map' is Celery's own task" in result.stderr
    assert sent() == []
    assert statuses(letters) == {a: "dead"}


def test_dlq_replay_with_nothing_selected_says_so_and_exits_0(runner: CliRunner, add: AddLetter):
    add(key="a", status="discarded")

    result = dlq(runner, "replay", "--task", SCORE, *APP)

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"no dead letters (status dead, task {SCORE}) in ")
    assert result.stdout.rstrip().endswith("; nothing was sent")
    assert sent() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "error: replay what? give letter ids, --task, --batch, --error-type, --older-than"),
        (["1", "--task", SCORE], "error: give letter ids or filters (or --all), not both"),
        (["1", "--all"], "error: give letter ids or filters (or --all), not both"),
        (["--all", "--batch", "b1"], "error: --all replays every dead letter"),
        (["--older-than", "soon"], "error: --older-than 'soon' is not an age"),
        (["--all", "--app", "tests.cli.nothing_here"], "error: cannot import the app module"),
    ],
)
def test_dlq_replay_with_bad_arguments_exits_2_and_sends_nothing(
    runner: CliRunner,
    add: AddLetter,
    letters: DeadLetterStore,
    args: list[str],
    message: str,
):
    add(key="a")

    result = dlq(runner, "replay", *args, *(APP if "--app" not in args else []))

    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message)
    assert sent() == []
    assert set(statuses(letters).values()) == {"dead"}


def test_dlq_replay_of_an_unknown_id_exits_3_and_changes_nothing(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    a = add(key="a")

    result = dlq(runner, "replay", str(a), "4242", *APP)

    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("error: no dead letter with id 4242 in ")
    assert sent() == []
    assert statuses(letters) == {a: "dead"}


def test_dlq_replay_into_a_task_the_app_lacks_exits_2_with_close_names(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    a = add(key="a")

    result = dlq(runner, "replay", str(a), "--into", f"{SCORE}_v3", *APP)

    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(
        f"error: app 'tests.cli.dlqapp' has no task '{SCORE}_v3'; did you mean "
    )
    assert SCORE_V2 in result.stderr
    assert sent() == []
    assert statuses(letters) == {a: "dead"}


def test_dlq_replay_of_a_letter_whose_task_the_app_lacks_exits_2_naming_app_and_fix(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    a = add(key="a")
    gone = add("jobs.retired", key="z")

    result = dlq(runner, "replay", "--all", "--yes", *APP)

    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "error: replay refused, nothing was sent: task 'jobs.retired' is not registered in app "
        f"'tkdlq' (dead letter {gone}); the app was loaded from tests.cli.dlqapp (--app, else "
        "TASKKIT_APP, else workers.app): point --app or TASKKIT_APP at the module that defines "
        "that task\n"
    )
    assert sent() == []
    assert statuses(letters) == {a: "dead", gone: "dead"}


def test_dlq_replay_hint_names_the_app_taken_from_taskkit_app(
    runner: CliRunner, add: AddLetter, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TASKKIT_APP", "tests.cli.dlqapp")
    gone = add("jobs.retired", key="z", batch=None)

    result = dlq(runner, "replay", str(gone))

    assert result.exit_code == 2, result.output
    assert "not registered in app 'tkdlq'" in result.stderr
    assert "the app was loaded from tests.cli.dlqapp" in result.stderr
    assert "point --app or TASKKIT_APP at the module that defines that task" in result.stderr


def test_dlq_replay_refused_for_another_reason_has_no_app_hint(runner: CliRunner, add: AddLetter):
    bad = add(payload={"bad": 1}, key="b")

    result = dlq(runner, "replay", str(bad), *APP)

    assert result.exit_code == 2, result.output
    assert "no longer validates" in result.stderr
    assert "--app" not in result.stderr


def test_dlq_replay_of_a_payload_that_no_longer_validates_exits_2_and_sends_none(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    good = add(key="a")
    bad = add(key="b", payload={"id": "b", "bad": True})

    result = dlq(runner, "replay", "--task", SCORE, *APP)

    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(
        "error: replay refused, nothing was sent: the payload no longer"
    )
    assert "ValueError: not a valid item" in result.stderr
    assert result.stderr.rstrip().endswith(f"(dead letter {bad})")
    assert sent() == []
    assert statuses(letters) == {good: "dead", bad: "dead"}


def test_dlq_replay_of_a_letter_already_replayed_exits_2(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    a = add(key="a")
    assert dlq(runner, "replay", str(a), *APP).exit_code == 0

    again = dlq(runner, "replay", str(a), *APP)

    assert again.exit_code == 2, again.output
    assert "only letters with status 'dead' are replayed" in again.stderr
    assert len(sent()) == 1


def test_dlq_replay_with_the_broker_down_exits_1_and_changes_nothing(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    a = add("down.train", {"args": [1, {}], "kwargs": {}}, batch=None, key=None)

    result = dlq(runner, "replay", "--all", "--app", "tests.cli.cliapp:broker_down")

    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: could not reach the broker redis://127.0.0.1:1/0")
    assert statuses(letters) == {a: "dead"}


# -- discard -----------------------------------------------------------------------------------


def test_dlq_discard_marks_letters_discarded(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    a, b, c = add(key="a"), add(key="b"), add(key="c")

    result = dlq(runner, "discard", str(a), str(c), str(a))

    assert result.exit_code == 0, result.output
    assert result.stdout == f"discarded 2 dead letters: {a}, {c}\n"
    assert statuses(letters) == {a: "discarded", b: "dead", c: "discarded"}


def test_dlq_discard_of_an_unknown_id_exits_3_and_changes_nothing(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    a = add(key="a")

    result = dlq(runner, "discard", str(a), "4242", "4243")

    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("error: no dead letters with ids 4242, 4243 in ")
    assert statuses(letters) == {a: "dead"}


def test_dlq_discard_needs_an_id_or_a_filter(runner: CliRunner, database: str):
    result = dlq(runner, "discard")

    assert result.exit_code == 2
    assert result.stderr.startswith("error: discard what? give letter ids, --task, --batch")


# -- purge -------------------------------------------------------------------------------------


def test_dlq_purge_by_ids_with_yes(runner: CliRunner, add: AddLetter, letters: DeadLetterStore):
    a, b, c = add(key="a"), add(key="b"), add(key="c")

    result = dlq(runner, "purge", str(a), str(c), "--yes")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("deleted 2 dead letters from ")
    assert statuses(letters) == {b: "dead"}


def test_dlq_purge_of_an_unknown_id_exits_3_and_deletes_nothing(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    a = add(key="a")

    result = dlq(runner, "purge", str(a), "4242", "--yes")

    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("error: no dead letter with id 4242 in ")
    assert statuses(letters) == {a: "dead"}


def test_dlq_purge_older_than_an_age_of_a_task_and_status(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    old = add(SCORE, key="old", ago=timedelta(days=10))
    old_discarded = add(SCORE, key="old-x", ago=timedelta(days=10), status="discarded")
    old_other = add(SCORE_V2, key="old", ago=timedelta(days=10))
    new = add(SCORE, key="new", ago=timedelta(hours=1))

    by_status = dlq(
        runner, "purge", "--older-than", "7d", "--task", SCORE, "--status", "discarded", "--yes"
    )
    by_task = dlq(
        runner, "purge", "--older-than", "7d", "--task", SCORE, "--status", "dead", "--yes"
    )

    assert by_status.exit_code == 0, by_status.output
    assert by_status.stdout.startswith("deleted 1 dead letter from ")
    assert by_task.exit_code == 0, by_task.output
    assert statuses(letters) == {old_other: "dead", new: "dead"}
    assert old not in statuses(letters)
    assert old_discarded not in statuses(letters)


def test_dlq_purge_retention_uses_the_setting(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
):
    add(key="40d", ago=timedelta(days=40))
    eight = add(key="8d", ago=timedelta(days=8))
    six = add(key="6d", ago=timedelta(days=6))

    default = dlq(runner, "purge", "--retention", "--status", "dead", "--yes")
    monkeypatch.setenv("TASKKIT_DEAD_LETTER_RETENTION_DAYS", "7")
    reset_settings()
    seven = dlq(runner, "purge", "--retention", "--status", "any", "--yes")

    assert default.exit_code == 0, default.output
    assert default.stdout.startswith("deleted 1 dead letter from ")
    assert seven.exit_code == 0, seven.output
    assert statuses(letters) == {six: "dead"}
    assert eight not in statuses(letters)


def test_dlq_purge_by_age_deletes_only_handled_letters_unless_told(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    """Issue 14 item 13: `dlq purge` deleted never-handled `dead` letters by default."""
    waiting = add(key="a", ago=timedelta(days=10))
    discarded = add(key="b", ago=timedelta(days=10), status="discarded")
    replayed = add(key="c", ago=timedelta(days=10))
    letters.mark_replayed([SentReplay(SCORE, "t-r", None, [replayed])])

    handled = dlq(runner, "purge", "--older-than", "1d", "--yes")

    assert handled.exit_code == 0, handled.output
    assert handled.stdout.startswith("deleted 2 dead letters from ")
    assert statuses(letters) == {waiting: "dead"}
    assert discarded not in statuses(letters)

    dead = dlq(runner, "purge", "--older-than", "1d", "--status", "dead", "--yes")

    assert dead.exit_code == 0, dead.output
    assert statuses(letters) == {}


def test_dlq_purge_without_yes_and_no_terminal_exits_2_and_deletes_nothing(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore
):
    a = add(key="a", ago=timedelta(days=10))

    result = dlq(runner, "purge", "--older-than", "1d")

    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "error: purge deletes letters for good: add --yes (no terminal to ask on)\n"
    )
    assert statuses(letters) == {a: "dead"}


@pytest.mark.parametrize(("answer", "deleted"), [("y\n", True), ("n\n", False), ("\n", False)])
def test_dlq_purge_asks_first_on_a_terminal(
    runner: CliRunner,
    add: AddLetter,
    letters: DeadLetterStore,
    monkeypatch: pytest.MonkeyPatch,
    answer: str,
    deleted: bool,
):
    monkeypatch.setattr(cli_dlq, "_interactive", lambda: True)
    a = add(key="a", ago=timedelta(days=10))
    b = add(key="b", ago=timedelta(days=10), status="discarded")
    c = add(key="c")

    result = dlq(runner, "purge", "--older-than", "1d", "--status", "dead", input=answer)

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("delete 1 dead letter (status dead, older than 1d) from ")
    if deleted:
        assert "deleted 1 dead letter from " in result.stdout
        assert statuses(letters) == {b: "discarded", c: "dead"}
    else:
        assert result.stdout.endswith("nothing was deleted\n")
        assert statuses(letters) == {a: "dead", b: "discarded", c: "dead"}


def test_dlq_purge_interrupted_at_the_question_exits_130_and_deletes_nothing(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(cli_dlq, "_interactive", lambda: True)
    a = add(key="a")

    result = dlq(runner, "purge", str(a), input="")  # end of input: click's Abort, as Ctrl-C

    assert result.exit_code == 130, result.output
    assert result.stderr == "error: interrupted; nothing was deleted\n"
    assert statuses(letters) == {a: "dead"}


def test_dlq_purge_on_a_terminal_with_nothing_to_delete_does_not_ask(
    runner: CliRunner, add: AddLetter, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(cli_dlq, "_interactive", lambda: True)
    add(key="a")

    result = dlq(runner, "purge", "--retention")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(
        "no dead letters (status replayed or discarded, older than the retention of 30d) in "
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "error: purge what? give letter ids, --older-than AGE, --retention, or filters"),
        (["1", "--retention"], "error: purge what?"),
        (["--older-than", "1d", "--retention"], "error: purge what?"),
        (["1", "--task", SCORE], "error: purge what? give letter ids, or filters"),
        (["1", "--status", "dead"], "error: purge what? give letter ids, or filters"),
        (["--older-than", "a week"], "error: --older-than 'a week' is not an age"),
        (["--retention", "--status", "gone"], "error: --status 'gone' is not one of"),
    ],
)
def test_dlq_purge_with_bad_arguments_exits_2_and_deletes_nothing(
    runner: CliRunner,
    add: AddLetter,
    letters: DeadLetterStore,
    args: list[str],
    message: str,
):
    a = add(key="a", ago=timedelta(days=100))

    result = dlq(runner, "purge", *args, "--yes")

    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message)
    assert statuses(letters) == {a: "dead"}


# -- help --------------------------------------------------------------------------------------


def test_dlq_help_lists_its_commands(runner: CliRunner):
    top = runner.invoke(app, ["--help"])
    result = dlq(runner, "--help")

    assert "dlq" in top.stdout
    assert result.exit_code == 0, result.output
    for command in ("list", "show", "replay", "discard", "purge", "depth"):
        assert command in result.stdout


# -- issue 17: fitting the terminal, the same filters everywhere ---------------------------------

#: What `dlq list` must fit without wrapping.
COLUMNS_100 = {"COLUMNS": "100"}


def test_dlq_list_fits_100_columns_one_line_per_letter(runner: CliRunner, add: AddLetter):
    long_task = f"{SCORE}_with_a_rather_long_module_path.and_a_long_function_name"
    ids = [
        add(
            long_task if i % 2 else SCORE,
            batch="batch-" + "f" * 40,
            key=f"item-{i}-" + "k" * 40,
            error=ConnectionRefusedError(f"connection to the scoring service {i} refused " * 5),
            ago=timedelta(minutes=i),
        )
        for i in range(4)
    ]

    for status in ("dead", "any"):
        result = dlq(runner, "list", "--status", status, env=COLUMNS_100)

        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert len(lines) == 1 + len(ids)  # a header and one line per letter: nothing wrapped
        assert max(len(line) for line in lines) <= 100, lines
        assert [int(line.split()[0]) for line in lines[1:]] == ids  # newest failure first
        assert all("…" in line for line in lines[1:])  # cut, and saying so
        assert all("ConnectionRefusedError" in line or "…" in line for line in lines[1:])
    # a task's own name is at the end of its path: that end is kept
    assert lines[2].split()[1].startswith("…")
    assert lines[2].split()[1].endswith("unction_name")


def test_dlq_list_says_how_many_more_the_limit_left_out(runner: CliRunner, add: AddLetter):
    for i in range(5):
        add(key=f"k{i}")

    cut = dlq(runner, "list", "--limit", "2", env=COLUMNS_100)
    whole = dlq(runner, "list", "--limit", "5", env=COLUMNS_100)

    assert cut.exit_code == 0, cut.output
    assert cut.stdout.splitlines()[-1] == "3 more not shown (--limit 2)"
    assert len(cut.stdout.splitlines()) == 4
    assert "more not shown" not in whole.stdout


def test_dlq_list_wide_shows_whole_messages(runner: CliRunner, add: AddLetter):
    message = "the scoring service refused the connection " * 4 + "END"
    add(error=ConnectionRefusedError(message))

    narrow = dlq(runner, "list", env=COLUMNS_100)
    wide = dlq(runner, "list", "--wide", env=COLUMNS_100)

    assert "END" not in narrow.stdout
    assert wide.exit_code == 0, wide.output
    assert "END" in wide.stdout
    assert " ".join(wide.stdout.split()).count("the scoring service refused the connection") == 4


def test_dlq_discard_by_filters_asks_with_the_count_and_touches_only_those(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
):
    a = add(SCORE, batch="b1", key="a", error=KeyError("k"))
    b = add(SCORE, batch="b1", key="b", error=KeyError("k"))
    c = add(SCORE, batch="b1", key="c", error=TimeoutError("t"))
    d = add(SCORE, batch="b2", key="d", error=KeyError("k"))
    e = add(PING, {"args": [], "kwargs": {}}, batch=None, key=None, error=KeyError("k"))

    refused = dlq(runner, "discard", "--batch", "b1", "--error-type", "KeyError")
    assert refused.exit_code == 2, refused.output
    assert "add --yes" in refused.stderr
    assert set(statuses(letters).values()) == {"dead"}

    monkeypatch.setattr(cli_dlq, "_interactive", lambda: True)
    answered_no = dlq(runner, "discard", "--batch", "b1", "--error-type", "KeyError", input="n\n")
    assert answered_no.stdout.startswith(
        "discard 2 dead letters (status dead, batch b1, error type KeyError) in "
    )
    assert answered_no.stdout.endswith("nothing was discarded\n")
    assert set(statuses(letters).values()) == {"dead"}

    done = dlq(runner, "discard", "--batch", "b1", "--error-type", "KeyError", input="y\n")
    by_task = dlq(runner, "discard", "--task", PING, "--yes")

    assert done.exit_code == 0, done.output
    assert (
        "discarded 2 dead letters (status dead, batch b1, error type KeyError) in " in done.stdout
    )
    assert by_task.stdout.startswith("discarded 1 dead letter (status dead, task ")
    assert statuses(letters) == {
        a: "discarded",
        b: "discarded",
        c: "dead",
        d: "dead",
        e: "discarded",
    }


def test_dlq_discard_ids_and_filters_together_exit_2(runner: CliRunner, add: AddLetter):
    a = add()

    result = dlq(runner, "discard", str(a), "--batch", "b1", "--yes")

    assert result.exit_code == 2
    assert result.stderr == "error: give letter ids or filters, not both\n"


def test_dlq_purge_by_batch_and_error_type(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
):
    a = add(SCORE, batch="b1", key="a", error=KeyError("k"))
    b = add(SCORE, batch="b1", key="b", error=TimeoutError("t"))
    c = add(SCORE, batch="b2", key="c", error=KeyError("k"))
    handled = add(SCORE, batch="b1", key="x", error=KeyError("k"), status="discarded")
    monkeypatch.setattr(cli_dlq, "_interactive", lambda: True)

    nothing_handled = dlq(runner, "purge", "--batch", "b2", input="y\n")
    asked = dlq(
        runner, "purge", "--batch", "b1", "--error-type", "KeyError", "--status", "any",
        input="y\n",
    )  # fmt: skip

    assert nothing_handled.stdout.startswith(
        "no dead letters (status replayed or discarded, batch b2) in "
    )
    assert asked.exit_code == 0, asked.output
    assert asked.stdout.startswith("delete 2 dead letters (batch b1, error type KeyError) from ")
    assert "deleted 2 dead letters from " in asked.stdout
    assert statuses(letters) == {b: "dead", c: "dead"}
    assert a not in statuses(letters)
    assert handled not in statuses(letters)

    by_task = dlq(runner, "purge", "--task", SCORE, "--status", "dead", "--yes")

    assert by_task.stdout.startswith("deleted 2 dead letters from ")
    assert statuses(letters) == {}


def test_dlq_purge_deletes_only_what_it_counted(
    runner: CliRunner, add: AddLetter, letters: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
):
    """A letter recorded while the question waits is not deleted unseen."""
    first = add(key="a")
    late: list[int] = []

    def ask(question: str, refused: str) -> bool:
        late.append(add(key="late"))
        return True

    monkeypatch.setattr(cli_dlq, "_interactive", lambda: True)
    monkeypatch.setattr(cli_dlq, "_ask", ask)

    result = dlq(runner, "purge", "--batch", "b1", "--status", "dead")

    assert result.exit_code == 0, result.output
    assert "deleted 1 dead letter from " in result.stdout
    assert statuses(letters) == {late[0]: "dead"}
    assert first not in statuses(letters)


def test_dlq_list_table_keeps_ids_counts_times_and_statuses_whole_at_100_columns():
    """The worst case: long names, ids, keys and messages, STATUS shown: only the text columns
    are cut, never the id, the attempts, the time or the status."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    now = datetime.now(UTC)
    letters = [
        SimpleNamespace(
            id=123456 + i,
            task_name="workers.batch.score_items_with_a_long_name",
            batch_id="f" * 64,
            item_key="item-" + "k" * 60,
            error_type="ConnectionRefusedError",
            error_message="refused " * 30,
            attempts=12,
            last_failed_at=now,
            status="discarded",
        )
        for i in range(3)
    ]
    buffer = io.StringIO()
    Console(file=buffer, width=100).print(
        cli_dlq.letters_table(letters, width=100, status=True)  # type: ignore[arg-type]
    )

    lines = buffer.getvalue().splitlines()
    assert len(lines) == 4
    assert max(len(line) for line in lines) <= 100
    assert lines[0].split()[-4:] == ["ATTEMPTS", "LAST", "FAILURE", "STATUS"]
    for i, line in enumerate(lines[1:]):
        cells = line.split()
        assert cells[0] == str(123456 + i)
        assert cells[-4:] == ["12", *cli_dlq.when(now).split(), "discarded"]
        task = cells[1]
        assert task.startswith("…")  # cut at the start: the task's own name is kept
        assert task.endswith("_long_name")
