"""In-memory fakes of the dead-letter store, the checkpoint storage and the progress sink.

They answer the same calls as the real ones (as dramatiq's ``StubBroker`` and httpx's
``MockTransport`` do), so a test of *your* task runs the task's real code paths and then asks
the fake what happened. The pytest fixtures of ``taskkit.testing`` install them; they can also
be used by hand.

Example::

    from taskkit.checkpoint import CheckpointStore
    from taskkit.testing.fakes import MemoryCheckpointStorage

    storage = MemoryCheckpointStorage()
    with CheckpointStore("exp-1", storage=storage, secret_key="a-test-key-16-bytes") as store:
        store.save({"w": 1}, step=0)
    assert storage.steps("exp-1") == [0]
"""

from __future__ import annotations

import builtins
import itertools
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from taskkit.checkpoint import CheckpointInfo, CheckpointStorage, validate_run_id
from taskkit.db.models import DeadLetter
from taskkit.deadletter import DeadLetterEntry, DeadLetterStore
from taskkit.errors import DeadLetterNotFound
from taskkit.tasks import ProgressReport

__all__ = [
    "FakeDeadLetterStore",
    "FakeProgressSink",
    "MemoryCheckpointStorage",
    "ProgressRecord",
]

_STATUSES = ("dead", "replayed", "discarded")


class FakeDeadLetterStore(DeadLetterStore):
    """A ``DeadLetterStore`` in memory: ``record``, ``get``, ``list``, ``depth``, ``discard``
    and ``purge`` behave as the database store's do (a letter recorded again for the same task,
    batch and item updates its letter and adds its attempts); nothing is published.

    Example::

        store = FakeDeadLetterStore()
        store.record([DeadLetterEntry("jobs.fetch", {"args": [1]}, "ValueError", "bad")])
        (letter,) = store.list(task="jobs.fetch")
        assert letter.error_type == "ValueError" and store.depth() == {"jobs.fetch": 1}
    """

    def __init__(self, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        # No database: the real constructor would open an engine.
        self.engine = None  # type: ignore[assignment]
        self.queue = None
        self.app = None
        self.clock = clock
        self._letters: dict[int, DeadLetter] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Condition()

    def record(self, entries: Iterable[DeadLetterEntry], *, connection: Any = None) -> int:
        """Store ``entries`` at once (``connection`` is accepted and ignored); returns how many."""
        rows = [entry.row() for entry in entries]
        with self._lock:
            for row in rows:
                same = self._same_item(row)
                if same is None:
                    letter = DeadLetter(**row)
                    letter.id = next(self._ids)
                    self._letters[letter.id] = letter
                    continue
                same.attempts += row["attempts"]
                for name in ("last_failed_at", "error_type", "error_message", "traceback"):
                    setattr(same, name, row[name])
                same.task_id, same.payload, same.status = row["task_id"], row["payload"], "dead"
            self._lock.notify_all()
        return len(rows)

    def wait_for(
        self, count: int = 1, *, timeout: float = 10.0, **filters: Any
    ) -> builtins.list[DeadLetter]:
        """The letters matching ``filters`` (as ``list`` takes them) once there are ``count``;
        ``TimeoutError`` after ``timeout`` seconds. Celery stores a task's failure in the result
        backend *before* its failure handlers run, so a test that saw ``.get()`` raise waits here
        for the letter rather than reading ``list`` at once.

        Example::

            with pytest.raises(ValueError):
                tasks.price.delay("???").get(timeout=10)
            (letter,) = taskkit_dead_letters.wait_for(task=tasks.price.name)
        """
        found: builtins.list[DeadLetter] = []

        def enough() -> bool:
            nonlocal found
            found = self.list(**filters)
            return len(found) >= count

        with self._lock:
            if not self._lock.wait_for(enough, timeout):
                raise TimeoutError(
                    f"{len(found)} of {count} dead letter(s) matching {filters} after {timeout} s"
                )
        return found

    def _same_item(self, row: dict[str, Any]) -> DeadLetter | None:
        if row["batch_id"] is None and row["item_key"] is None:
            # a whole task: one letter per task id, as the database store merges them
            if row["task_id"] is None:
                return None
            for letter in self._letters.values():
                if (
                    letter.batch_id is None
                    and letter.item_key is None
                    and ((letter.task_name, letter.task_id) == (row["task_name"], row["task_id"]))
                ):
                    return letter
            return None
        for letter in self._letters.values():
            if (letter.task_name, letter.batch_id, letter.item_key) == (
                row["task_name"],
                row["batch_id"],
                row["item_key"],
            ):
                return letter
        return None

    def publish(self, rows: Sequence[dict[str, Any]]) -> None:
        """Nothing to publish to: the fake has no broker queue."""

    def get(self, letter_id: int) -> DeadLetter:
        """The letter with this id; ``DeadLetterNotFound`` if there is none."""
        try:
            return self._letters[int(letter_id)]
        except KeyError:
            raise DeadLetterNotFound(letter_id) from None

    def list(
        self,
        *,
        task: str | None = None,
        batch_id: str | None = None,
        error_type: str | None = None,
        older_than: timedelta | None = None,
        newer_than: timedelta | None = None,
        status: str | None = "dead",
        ids: Sequence[int] | None = None,
        limit: int | None = None,
        newest_first: bool = False,
        before_id: int | None = None,
    ) -> builtins.list[DeadLetter]:
        """Letters matching every filter given, oldest failure first; ``newest_first`` and
        ``before_id``: by id, newest first, below that id (as the real store)."""
        now = self.clock()
        wanted = None if ids is None else {int(i) for i in ids}

        def matches(letter: DeadLetter) -> bool:
            age = now - _aware(letter.last_failed_at)
            return (
                (task is None or letter.task_name == task)
                and (batch_id is None or letter.batch_id == batch_id)
                and (error_type is None or letter.error_type == error_type)
                and (status is None or letter.status == status)
                and (wanted is None or letter.id in wanted)
                and (older_than is None or age > older_than)
                and (newer_than is None or age < newer_than)
                and (before_id is None or letter.id < before_id)
            )

        with self._lock:  # a worker thread may be recording
            letters = builtins.list(self._letters.values())
        found = sorted(
            (letter for letter in letters if matches(letter)),
            key=lambda letter: (_aware(letter.last_failed_at), letter.id),
        )
        if newest_first or before_id is not None:
            found.sort(key=lambda letter: letter.id, reverse=True)
        return found if limit is None else found[:limit]

    def depth(self, status: str = "dead") -> dict[str, int]:
        """Letters per task name with this status, for monitoring."""
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        counts: dict[str, int] = {}
        with self._lock:
            letters = builtins.list(self._letters.values())
        for letter in letters:
            if letter.status == status:
                counts[letter.task_name] = counts.get(letter.task_name, 0) + 1
        return dict(sorted(counts.items()))

    def discard(self, ids: Sequence[int]) -> int:
        """Mark letters ``discarded``; ``DeadLetterNotFound`` (and no change) for an unknown id."""
        with self._lock:
            letters = self._existing(ids)
            for letter in letters:
                letter.status = "discarded"
        return len(letters)

    def purge(
        self,
        *,
        ids: Sequence[int] | None = None,
        older_than: timedelta | None = None,
        task: str | None = None,
        status: str | None = None,
    ) -> int:
        """Delete letters by ``ids``, or those older than ``older_than`` (default: every
        letter, the fake has no retention setting), optionally of one task or status."""
        with self._lock:
            if ids is not None:
                doomed = self._existing(ids)
            else:
                doomed = self.list(task=task, status=status, older_than=older_than)
            for letter in doomed:
                del self._letters[letter.id]
        return len(doomed)

    def _existing(self, ids: Sequence[int]) -> builtins.list[DeadLetter]:
        wanted = [int(i) for i in ids]
        missing = sorted(set(wanted) - set(self._letters))
        if missing:
            raise DeadLetterNotFound(missing)
        return [self._letters[i] for i in wanted]

    def letters_for_replay(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "FakeDeadLetterStore does not replay: test replay_dead_letters with a database "
            "store (DeadLetterStore on a SQLite file)"
        )

    mark_replayed = letters_for_replay


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class MemoryCheckpointStorage(CheckpointStorage):
    """A ``CheckpointStorage`` in memory. ``CheckpointStore`` on it checks sizes, checksums and
    signatures exactly as on a directory: only where the bytes live differs.

    Example::

        storage = MemoryCheckpointStorage()
        store = CheckpointStore("exp-1", storage=storage, secret_key="a-test-key-16-bytes")
        store.save({"w": 1}, step=0)
        assert storage.steps("exp-1") == [0] and storage.writes == 1
    """

    def __init__(self) -> None:
        self._data: dict[tuple[str, int], bytes] = {}
        self._manifests: dict[tuple[str, int], CheckpointInfo] = {}
        self._lock = threading.Lock()
        #: How many checkpoints were written (a replaced step counts again).
        self.writes = 0

    def write(
        self,
        run_id: str,
        step: int,
        data: Sequence[Any],
        manifest: Callable[[], CheckpointInfo],
    ) -> None:
        """Keep the data, then the manifest (so the step is listed only once it is whole)."""
        key = (validate_run_id(run_id), step)
        blob = b"".join(bytes(part) for part in data)
        info = manifest()
        with self._lock:
            self._manifests.pop(key, None)
            self._data[key] = blob
            self._manifests[key] = info
            self.writes += 1

    def infos(self, run_id: str) -> list[CheckpointInfo]:
        """Manifests of the run's checkpoints, oldest step first."""
        with self._lock:
            found = [info for (run, _), info in self._manifests.items() if run == run_id]
        return sorted(found, key=lambda info: info.step)

    def read(self, run_id: str, step: int) -> bytearray:
        """A writable copy of the stored bytes; ``FileNotFoundError`` when there are none."""
        try:
            return bytearray(self._data[run_id, step])
        except KeyError:
            raise FileNotFoundError(f"no checkpoint data for run {run_id!r} step {step}") from None

    def delete(self, run_id: str, step: int) -> None:
        """Forget a step (manifest first); nothing happens when it does not exist."""
        with self._lock:
            self._manifests.pop((run_id, step), None)
            self._data.pop((run_id, step), None)

    def runs(self) -> list[str]:
        """Run ids with a checkpoint, sorted."""
        return sorted({run for run, _ in self._manifests})

    def remove_orphans(self, run_id: str) -> int:
        """Nothing is ever half-written in memory."""
        return 0

    def steps(self, run_id: str | int) -> list[int]:
        """The run's checkpointed steps (epochs), oldest first. ``run_id`` is a run's id (its
        store is keyed ``<id>-<uid>`` by ``TrainingTask``) or a store's full key."""
        return [info.step for info in self.infos(self._key(run_id))]

    def tamper(self, run_id: str | int, step: int) -> None:
        """Flip a byte of a stored checkpoint, to test that loading refuses it."""
        key = (self._key(run_id), step)
        data = bytearray(self._data[key])
        data[-1] ^= 0xFF
        self._data[key] = bytes(data)

    def _key(self, run_id: str | int) -> str:
        """The storage key of run ``run_id``: itself, or the one ``<run_id>-<uid>`` key."""
        wanted = str(run_id)
        keyed = [key for key in self.runs() if key.startswith(f"{wanted}-")]
        if wanted in self.runs() or len(keyed) != 1:
            return wanted
        return keyed[0]


@dataclass(frozen=True)
class ProgressRecord:
    """One progress report a task made: which task, which call, what it said."""

    task_name: str
    task_id: str | None
    report: ProgressReport


class FakeProgressSink:
    """Where the ``taskkit_progress`` fixture collects every ``progress()`` report of every
    ResilientTask (throttled ones included), in order.

    Example::

        def test_reports(taskkit_progress, taskkit_worker):
            count_to.delay(3).get(timeout=10)
            assert [r.current for r in taskkit_progress.reports(count_to.name)] == [1, 2, 3]
    """

    def __init__(self) -> None:
        self.records: list[ProgressRecord] = []
        self._lock = threading.Lock()

    def add(self, task_name: str, task_id: str | None, report: ProgressReport) -> None:
        """Keep one report."""
        with self._lock:
            self.records.append(ProgressRecord(task_name, task_id, report))

    def reports(self, task: str | None = None) -> list[ProgressReport]:
        """The reports of one task name (or of every task), oldest first."""
        with self._lock:
            return [r.report for r in self.records if task is None or r.task_name == task]

    def last(self, task: str | None = None) -> ProgressReport | None:
        """The newest report of one task name (or of any), None if there was none."""
        found = self.reports(task)
        return found[-1] if found else None
