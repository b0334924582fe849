"""``BatchTask``: a ResilientTask whose unit of work is an item; ``submit_batch`` splits a batch.

You write the function for one item; calling the task runs a whole list of items through
``batch_with_retry`` (each item retried on its own, with the same waits and retry budget as
everywhere in taskkit) and returns the seed's summary::

    {"total": 1000, "successful": 990, "failed": 10, "failed_ids": [...],
     "batch_id": "...", "skipped": 0}

Items are keyed (``item_key``) and tracked in the item ledger (``taskkit.deadletter``), so a
redelivered chunk skips what is finished and successful + dead-lettered = total; an item runs
twice only if its worker died between running it and the next ledger flush, so make the item
function idempotent per key. ``setup_chunk`` wraps each delivery of a chunk. The decisions
(keys, error classification, chunk failures, leases) are in ``docs/batch.md``.

Example::

    from taskkit.tasks import BatchTask, create_app, submit_batch

    app = create_app("jobs")

    @app.task(base=BatchTask, bind=True, item_max_attempts=3, batch_size=50)
    def score_items(self, item: dict) -> None:
        save_score(item["id"], model.predict(item["features"]))

    summary = score_items.delay(items).get()               # one task, one summary
    submission = submit_batch(score_items, items, chunk_size=1000)
    summary = submission.get(timeout=600)                  # one summary for all chunks
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, cast

import numpy as np
from celery.result import AsyncResult, GroupResult
from sqlalchemy import Engine, Table, select

from taskkit._utils import check_int
from taskkit.db.models import Batch, DeadLetter
from taskkit.db.session import get_engine
from taskkit.deadletter import (
    BatchProgress,
    DeadLetterEntry,
    DeadLetterStore,
    ItemLedger,
    batch_progress,
)
from taskkit.errors import BrokerUnavailable, ConfigurationError, LeaseLost
from taskkit.recovery import batch_with_retry, events
from taskkit.tasks._base import ResilientTask, TaskFailure
from taskkit.tasks._options import (
    Alias,
    Option,
    at_least_one,
    boolean,
    non_negative,
    non_negative_int,
    positive_int,
)
from taskkit.tasks._submit import PUBLISH_RETRY_POLICY, check_reachable, sending

__all__ = ["BatchSubmission", "BatchTask", "submit_batch"]

logger = logging.getLogger("taskkit.tasks")

MAX_KEY_LENGTH = 255


def _item_key_ok(value: Any) -> bool:
    return value is None or isinstance(value, str) or callable(value)


#: The chunk contexts of the chunks running in this thread (innermost last).
_contexts = threading.local()


def _context_stack() -> list[Any]:
    stack: list[Any] | None = getattr(_contexts, "stack", None)
    if stack is None:
        stack = _contexts.stack = []
    return stack


class _Stop(BaseException):
    """Ends a batch from inside (the lease was lost); not an item failure."""


@dataclass
class _Chunk:
    """One delivery of a chunk: its items, their keys, and what became of them so far."""

    items: list[Any]
    keys: list[str]
    public_keys: list[Any]
    batch_id: str
    #: Positions (in ``keys``) of the items done and not yet written to the ledger.
    done: list[int]
    failures: dict[int, int]
    stop: LeaseLost | None = None


class BatchTask(ResilientTask):
    """A task over a list of items, one item function, per-item retry, a ledger and a DLQ.

    See the module docs for the whole behaviour. Example::

        @app.task(base=BatchTask, bind=True, item_key="id")
        def index_document(self, doc: dict) -> None:
            search.upsert(doc["id"], doc["text"])

        index_document.delay(docs)
    """

    max_retries = 5
    #: The task's messages carry a batch, not the item function's arguments.
    typing = False
    lease_key = "batch"

    #: BatchTask's options, added to ResilientTask's (rendered in docs/tasks.md). Words:
    #: ``item_max_attempts`` counts an item's tries, the first included (``batch_with_retry``'s
    #: ``max_retries`` is one less); Celery's ``max_retries`` counts re-queues of the chunk.
    taskkit_options: ClassVar[tuple[Option | Alias, ...]] = (
        Option("item_key", None, _item_key_ok, "None, a key or attribute name, or a callable",
               "How an item's key is found: None uses the item (a `str`/`int`), its `\"id\"`, "
               "or its position."),
        Option("batch_size", 100, positive_int, "an integer >= 1",
               "Items between progress reports and retry rounds."),
        Option("item_max_attempts", 3, positive_int, "an integer >= 1",
               "Tries of one item, the first included (retries = attempts - 1)."),
        Alias("item_max_retries", "item_max_attempts", lambda retries: retries + 1,
              non_negative_int, "an integer >= 0",
              "retries of one item after its first attempt (`item_max_attempts` - 1)"),
        Option("item_delay", 1.0, non_negative, "seconds >= 0",
               "First wait before an item's retry."),
        Option("item_backoff", 2.0, at_least_one, "a number >= 1",
               "Growth factor of an item's waits."),
        Option("item_max_delay", 60.0, non_negative, "seconds >= 0",
               "Longest wait before an item's retry."),
        Option("ledger", True, boolean, "True or False",
               "Keep the item ledger (skip finished items on redelivery)."),
        Option("ledger_flush_every", 500, positive_int, "an integer >= 1",
               "Done items between ledger writes."),
    )  # fmt: skip

    item_key: str | Callable[[Any], Any] | None
    batch_size: int
    item_max_attempts: int
    item_delay: float
    item_backoff: float
    item_max_delay: float
    ledger: bool
    ledger_flush_every: int

    # -- what the user writes -----------------------------------------------------------------

    def process_item(self, item: Any) -> Any:
        """Process one item: the decorated function (or override this in a subclass)."""
        return self.run(item)

    def validate_item(self, item: Any) -> None:
        """Raise if ``item`` cannot be processed any more (a replay checks each payload first).
        The default accepts everything; override it with your schema check."""

    def setup_chunk(self, items: Sequence[Any]) -> contextlib.AbstractContextManager[Any]:
        """A context manager around one delivery of a chunk; what it yields is
        ``self.chunk_context`` while the chunk's items run (and ``flush_items``). Override it
        to load a model once per chunk, open a connection, or compute over all the items at
        once. It gets every item of the chunk, before the ledger skips finished ones, so a setup
        that fails has claimed nothing; it fails the chunk as a whole (the ladder retries or
        fails it, and a chunk that fails for good dead-letters its unfinished items). The default
        yields None.

        Example::

            @contextlib.contextmanager
            def setup_chunk(self, items):
                with open_model(self.model_path) as model:
                    yield model                  # self.chunk_context in the item function
        """
        return contextlib.nullcontext()

    @property
    def chunk_context(self) -> Any:
        """What ``setup_chunk`` yielded for the chunk running in this thread."""
        stack = _context_stack()
        if not stack:
            raise RuntimeError(
                f"{self.name}: chunk_context is only set while a chunk runs (call the task "
                "with a list of items)"
            )
        return stack[-1]

    def flush_items(self) -> None:
        """Write out what ``process_item`` buffered (rows for a bulk insert, say). Called before
        each ledger write that marks items done, and at the end of the chunk, so an item is
        never marked done before its buffered output is stored. The default does nothing."""

    def key_of(self, item: Any, position: int) -> Any:
        """The key of ``item`` at ``position`` in its batch (see ``item_key``).

        With no ``item_key``: a ``str``/``int`` item is its own key, a mapping with an ``"id"``
        its id, and any other item ``#<position>:<hash>``, the first 16 hex digits of the
        sha256 of its canonical JSON (sorted keys, no spaces; tuples as lists, as the task
        message carries them).

        Decision: position alone (``#0``, ``#1``) made a batch that reuses a batch id (a
        "nightly" batch) skip its new items as done. Keying by content runs them, and keeps
        the ledger's promise for a redelivered chunk (same items, same keys), without a
        database round trip to compare the batches. The position stays in the key so that
        equal items in one batch are distinct items (each runs), and each chunk can compute
        its keys alone, without seeing the other chunks. An item that moved to another
        position is a new item and runs again: item functions are idempotent per key anyway.
        """
        key = self.item_key
        if key is None:
            if isinstance(item, str | int) and not isinstance(item, bool):
                return item
            if isinstance(item, Mapping) and "id" in item:
                return item["id"]
            return f"#{position}:{_content_hash(item)}"
        if callable(key):
            return key(item)
        if isinstance(item, Mapping):
            if key not in item:
                raise ConfigurationError(f"{self.name}: item at position {position} has no {key!r}")
            return item[key]
        return getattr(item, key)

    # -- running a chunk ----------------------------------------------------------------------

    def body(self) -> Callable[..., Any]:
        return self.run_batch

    def lease_name(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        _, batch_id, _, offset = _batch_arguments(args, kwargs)
        return f"{self.name}:{batch_id or self.request.id}:{offset}"

    def run_batch(
        self,
        items: Sequence[Any],
        batch_id: str | None = None,
        keys: Sequence[Any] | None = None,
        offset: int = 0,
    ) -> dict[str, Any]:
        """Run ``process_item`` over ``items``; the summary dict (see the module docs)."""
        batch = str(batch_id or self.request.id or uuid.uuid4().hex)
        with self._chunk_ledger(batch, offset) as ledger:
            chunk = self._chunk(items, batch, keys, offset)  # while the ledger's probe travels
            stack = _context_stack()
            with self.setup_chunk(chunk.items) as context:
                stack.append(context)
                try:
                    return self._run_chunk(chunk, ledger, offset)
                finally:
                    stack.pop()

    @contextlib.contextmanager
    def _chunk_ledger(self, batch_id: str, offset: int) -> Iterator[ItemLedger | None]:
        """The chunk's ledger (None with ``ledger=False``): one kept connection for the chunk,
        and the lookup of the chunk's position sent before its keys are computed, so a first
        delivery's claim need not wait for its answer (``ItemLedger.probe``)."""
        if not self.ledger:
            yield None
            return
        with ItemLedger(batch_id, self._engine()) as ledger:
            ledger.probe(offset)
            yield ledger

    def _run_chunk(self, chunk: _Chunk, ledger: ItemLedger | None, offset: int) -> dict[str, Any]:
        # Not durable: a worker that dies keeps the claim, and the chunk's last finish (durable)
        # stores what a crash of PostgreSQL itself could have lost. Fenced under a lease: once
        # another delivery claimed the chunk (it took the lease over), this one's writes are
        # refused where they land (LeaseLost), a write stalled in a cut-off host's connection too.
        finished = (
            ledger.claim(chunk.keys, durable=False, fenced=self.lease is not None, position=offset)
            if ledger is not None
            else {}
        )
        todo = [i for i, key in enumerate(chunk.keys) if key not in finished]
        try:
            outcome = batch_with_retry(
                todo,
                self._item_call(chunk),
                batch_size=self.batch_size,
                max_retries=self.item_max_attempts - 1,
                delay=self.item_delay,
                backoff=self.item_backoff,
                max_delay=self.item_max_delay,
                give_up_on=self._permanent,
                on_progress=self._progress_hook(chunk, ledger, len(finished)),
                sleep=self.sleep or time.sleep,
            )
        except _Stop:
            assert chunk.stop is not None
            raise chunk.stop from None
        dead = [
            DeadLetterEntry.from_exception(
                self.name,
                chunk.items[index],
                error,
                attempts=chunk.failures.get(index, 1),
                batch_id=chunk.batch_id,
                item_key=chunk.keys[index],
                task_id=self.request.id,
            )
            for index, error in outcome.failed
        ]
        self._finish(chunk, ledger, dead)  # the chunk's end: on its way, not yet answered
        failed = sorted(
            {index for index, _ in outcome.failed}
            | {i for i, key in enumerate(chunk.keys) if finished.get(key) == "dead"}
        )
        total = len(chunk.items)
        summary = {
            "total": total,
            "successful": total - len(failed),
            "failed": len(failed),
            "failed_ids": [chunk.public_keys[i] for i in failed],
            "batch_id": chunk.batch_id,
            "skipped": len(finished),
        }
        if ledger is not None:  # the summary was built during the end's round trip
            try:
                ledger.settle()
            except LeaseLost as lost:  # refused: another delivery claimed the chunk
                raise self._lease_lost(lost) from None
        if events.active():
            self._chunk_finished(
                chunk, done=len(todo) - len(outcome.failed), dead=len(dead), skipped=len(finished)
            )
        return summary

    def _chunk_finished(
        self, chunk: _Chunk, *, done: int, dead: int, skipped: int, task_id: str | None = None
    ) -> None:
        events.emit(
            events.BatchChunkFinished(
                self.name,
                str(task_id or self.request.id),
                chunk.batch_id,
                done=done,
                dead=dead,
                skipped=skipped,
            )
        )

    def _chunk(
        self, items: Sequence[Any], batch_id: str | None, keys: Sequence[Any] | None, offset: int
    ) -> _Chunk:
        items = list(items)
        batch_id = batch_id or self.request.id or uuid.uuid4().hex
        if keys is None:
            public = [self.key_of(item, offset + i) for i, item in enumerate(items)]
        else:
            public = list(keys)
            if len(public) != len(items):
                raise ConfigurationError(
                    f"{self.name}: {len(public)} keys given for {len(items)} items"
                )
        stored = _unique_keys(self.name, public)
        return _Chunk(items, stored, public, str(batch_id), [], {})

    def _item_call(self, chunk: _Chunk) -> Callable[[int], None]:
        items, done, failures = chunk.items, chunk.done, chunk.failures
        process = self.process_item

        def call(index: int) -> None:
            if chunk.stop is not None:
                raise _Stop()
            try:
                process(items[index])
            except BaseException:
                failures[index] = failures.get(index, 0) + 1
                raise
            done.append(index)

        return call

    def _progress_hook(
        self, chunk: _Chunk, ledger: ItemLedger | None, skipped: int
    ) -> Callable[[int, int], None]:
        total = len(chunk.items)

        def report(finished: int, todo: int) -> None:
            # The last report is followed by the chunk's end, which writes the same flags.
            if len(chunk.done) >= self.ledger_flush_every and finished < todo:
                flushed = list(chunk.done)
                try:
                    self.flush_items()
                    if ledger is not None:
                        # Sent without waiting for its answer (read before the next ledger
                        # statement): the round trip overlaps the next items.
                        ledger.finish(done_at=flushed, durable=False, wait=False)
                except LeaseLost as lost:  # refused: another delivery claimed the chunk
                    chunk.stop = self._lease_lost(lost)
                    return
                except Exception:
                    logger.warning(
                        "taskkit: %s: writing %d done item(s) failed; will try again",
                        self.name,
                        len(flushed),
                        exc_info=True,
                    )
                else:
                    del chunk.done[: len(flushed)]
            try:
                self.progress(skipped + finished, total, "items")
            except LeaseLost as lost:
                chunk.stop = lost

        return report

    def _finish(
        self, chunk: _Chunk, ledger: ItemLedger | None, dead: list[DeadLetterEntry]
    ) -> None:
        store = self.dead_letters()
        try:
            try:
                self.flush_items()
            except BaseException:
                # The failed items' letters do not depend on the buffered output: keep them,
                # with their own errors, and leave the done items unmarked (they run again).
                self._store_dead(ledger, [], dead, store)
                raise
            # Sent without waiting where the ledger can (its caller settles it): see finish.
            self._store_dead(ledger, chunk.done, dead, store, wait=False)
        except LeaseLost as lost:  # refused: another delivery claimed the chunk
            raise self._lease_lost(lost) from None

    def _lease_lost(self, refused: LeaseLost) -> LeaseLost:
        """The ledger refused a write of this delivery (a newer one claimed the chunk): the
        chunk's lease is lost, and ``LeaseLost`` names the lease (the task looks its holder up)."""
        lease = self.lease
        if lease is None:
            return refused
        lease.lose("the ledger refused its write: a newer delivery claimed the chunk")
        return LeaseLost(lease.key, lease.token)

    def _store_dead(
        self,
        ledger: ItemLedger | None,
        done: list[int],
        dead: list[DeadLetterEntry],
        store: DeadLetterStore,
        *,
        wait: bool = True,
    ) -> None:
        if ledger is not None:
            ledger.finish(done_at=done, dead=dead, store=store, record=self.dead_letter, wait=wait)
        elif self.dead_letter and dead:
            store.record(dead)

    def _engine(self) -> Engine:
        return get_engine(self.app.conf.get("taskkit_database_url"))

    # -- a chunk that failed for good ---------------------------------------------------------

    def record_failure(self, failure: TaskFailure) -> None:
        """Dead-letter every unfinished item of a chunk that failed for good as a whole."""
        items, batch_id, keys, offset = _batch_arguments(failure.args, failure.kwargs)
        if items is None:
            return
        try:
            chunk = self._chunk(items, batch_id or failure.task_id, keys, offset)
        except Exception as exc:
            # No usable keys (the very reason it failed, perhaps): keep the chunk whole.
            logger.error(
                "taskkit: chunk of %s failed for good and its items have no keys (%s); "
                "dead-lettered as one task",
                self.name,
                exc,
            )
            super().record_failure(failure)
            return
        ledger = ItemLedger(chunk.batch_id, self._engine()) if self.ledger else None
        # Claimed (its chunk row), so the dead flags land in the chunk's own row.
        statuses = ledger.claim(chunk.keys, position=offset) if ledger is not None else {}
        dead = [
            DeadLetterEntry(
                task_name=self.name,
                payload=chunk.items[i],
                error_type=failure.error_type,
                error_message=failure.error,
                traceback=failure.traceback,
                attempts=failure.attempts,
                batch_id=chunk.batch_id,
                item_key=key,
                task_id=failure.task_id,
            )
            for i, key in enumerate(chunk.keys)
            if statuses.get(key) not in ("done", "dead")
        ]
        logger.error(
            "taskkit: batch %s of %s failed for good; %d unfinished item(s) dead-lettered",
            chunk.batch_id,
            self.name,
            len(dead),
        )
        self._store_dead(ledger, [], dead, self.dead_letters())
        if events.active():
            # The chunk's end: what the ledger had finished is "skipped", the rest is dead.
            self._chunk_finished(
                chunk,
                done=0,
                dead=len(dead),
                skipped=len(chunk.keys) - len(dead),
                task_id=failure.task_id,
            )


def _batch_arguments(
    args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[Any, str | None, Any, int]:
    names = ("items", "batch_id", "keys", "offset")
    values: dict[str, Any] = dict(zip(names, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k in names})
    return (
        values.get("items"),
        values.get("batch_id"),
        values.get("keys"),
        int(values.get("offset") or 0),
    )


def _content_hash(item: Any) -> str:
    """16 hex digits of the sha256 of ``item``'s canonical JSON (``str`` for what JSON cannot
    hold: a task message could not carry it anyway)."""
    options: dict[str, Any] = {"separators": (",", ":"), "ensure_ascii": False, "default": str}
    try:
        text = json.dumps(item, sort_keys=True, **options)
    except TypeError:  # keys of mixed types cannot be sorted: JSON makes them strings
        text = json.dumps(_str_keys(item), sort_keys=True, **options)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _str_keys(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _str_keys(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_str_keys(v) for v in value]
    return value


def _unique_keys(task_name: str, keys: Sequence[Any]) -> list[str]:
    """The keys as stored (strings), or ``ConfigurationError`` naming the repeated ones."""
    stored = [_stored_key(task_name, key) for key in keys]
    if len(set(stored)) != len(stored):
        repeated = sorted(key for key, count in Counter(stored).items() if count > 1)
        raise ConfigurationError(
            f"{task_name}: item keys must be unique in a batch; repeated: {repeated[:5]}"
        )
    return stored


def _stored_key(task_name: str, key: Any) -> str:
    text = str(key)
    if not text or len(text) > MAX_KEY_LENGTH:
        raise ConfigurationError(
            f"{task_name}: item key must be 1 to {MAX_KEY_LENGTH} characters, not {text[:40]!r}"
        )
    return text


# -- splitting a batch across workers ------------------------------------------------------------


class BatchSubmission(NamedTuple):
    """A batch sent by ``submit_batch``: its id, the chunks' group result, sizes.

    ``total`` is the number of items sent (a generator's length is known once it is read).
    The items' keys are not kept: a chunk that failed as a whole has its keys derived again
    when ``get()`` needs them (see ``get``)."""

    batch_id: str
    result: GroupResult
    total: int
    chunk_size: int
    task: Any

    def get(self, timeout: float | None = None, interval: float = 0.5) -> dict[str, Any]:
        """Wait for every chunk and merge their summaries into one.

        A chunk that failed as a whole counts its items from the ledger (done ones as
        successful, the rest as failed: they were dead-lettered). Its keys come from its
        arguments as the result backend stored them (``result_extended``, taskkit's default),
        or, when it has none (another backend, ``sensitive_args``), from the chunk's dead
        letters (its task id): its failed items are the ones dead-lettered.
        """
        outcomes = self.result.join(timeout=timeout, interval=interval, propagate=False)
        summary: dict[str, Any] = {
            "total": 0,
            "successful": 0,
            "failed": 0,
            "failed_ids": [],
            "batch_id": self.batch_id,
            "skipped": 0,
        }
        for index, returned in enumerate(outcomes):
            outcome = returned if isinstance(returned, dict) else self._from_ledger(index)
            for name in ("total", "successful", "failed", "skipped"):
                summary[name] += int(outcome.get(name, 0))
            summary["failed_ids"].extend(outcome.get("failed_ids", []))
        return summary

    def progress(self) -> BatchProgress:
        """Counts from the ledger: done, dead, claimed, out of ``total``."""
        return batch_progress(self.batch_id, self.task.app.conf.get("taskkit_database_url"))

    def _from_ledger(self, index: int) -> dict[str, Any]:
        size = max(0, min(self.chunk_size, self.total - index * self.chunk_size))
        child = (self.result.results or [])[index]
        keys = self._sent_keys(child, index * self.chunk_size, size)
        if keys is None:
            failed = self._dead_keys(str(child.id))
            return {
                "total": size,
                "successful": size - len(failed),
                "failed": len(failed),
                "failed_ids": failed,
            }
        stored = [_stored_key(self.task.name, key) for key in keys]
        engine = get_engine(self.task.app.conf.get("taskkit_database_url"))
        statuses = ItemLedger(self.batch_id, engine).statuses(stored)
        failed = [key for key, s in zip(keys, stored, strict=True) if statuses.get(s) != "done"]
        return {
            "total": len(keys),
            "successful": len(keys) - len(failed),
            "failed": len(failed),
            "failed_ids": failed,
        }

    def _sent_keys(self, child: Any, offset: int, size: int) -> list[Any] | None:
        """The keys of the chunk at ``offset``, from its arguments in the result backend; None
        when the backend has none (or only redacted ones) for it."""
        if getattr(self.task, "sensitive_args", None):
            return None
        try:
            args, kwargs = child.args, child.kwargs
        except Exception:  # a backend that stores no arguments, or one that does not answer
            return None
        if args is None:
            return None
        items, _, keys, start = _batch_arguments(args, kwargs or {})
        if not isinstance(items, list) or len(items) != size or start != offset:
            return None
        if keys is not None:
            return list(keys)
        return [self.task.key_of(item, offset + i) for i, item in enumerate(items)]

    def _dead_keys(self, task_id: str) -> list[Any]:
        """The keys of the dead letters of one chunk (its task id), as the items give them."""
        engine = get_engine(self.task.app.conf.get("taskkit_database_url"))
        with engine.connect() as connection:
            rows = connection.execute(
                select(DeadLetter.item_key, DeadLetter.payload)
                .where(DeadLetter.batch_id == self.batch_id, DeadLetter.task_id == task_id)
                .order_by(DeadLetter.id)
            ).all()
        keys: list[Any] = []
        for stored, payload in rows:
            try:  # an int key is stored as text: give it back as the item gives it
                key = self.task.key_of(payload, 0)
            except Exception:
                key = stored
            keys.append(key if str(key) == stored else stored)
        return keys


class _SeenKeys:
    """The keys of a batch, chunk by chunk: unique within a chunk (exactly, by the keys) and
    across the batch (by their 64-bit ``hash``; the keys themselves are not kept).

    The hashes are held in sorted numpy arrays of doubling sizes (a new chunk's hashes are one
    array; two arrays of equal size are merged), so a key costs 8 bytes (16 while the largest
    arrays merge), a chunk is checked with one binary search per array, and there are about
    log2(chunks) arrays."""

    def __init__(self, task: BatchTask) -> None:
        self.task = task
        self.levels: list[np.ndarray[Any, np.dtype[np.int64]]] = []

    def add(self, items: Sequence[Any], offset: int) -> None:
        """``ConfigurationError`` for a key that is invalid or seen before in the batch."""
        name = self.task.name
        stored = _unique_keys(
            name, [self.task.key_of(item, offset + i) for i, item in enumerate(items)]
        )
        hashes = np.fromiter((hash(key) for key in stored), dtype=np.int64, count=len(stored))
        hashes.sort()
        clash = np.zeros(len(hashes), dtype=bool)
        for level in self.levels:
            at = np.minimum(np.searchsorted(level, hashes), len(level) - 1)
            clash |= level[at] == hashes
        if clash.any():
            found = set(hashes[clash].tolist())
            repeated = sorted(key for key in stored if hash(key) in found)
            raise ConfigurationError(
                f"{name}: item keys must be unique in a batch; repeated: {repeated[:5]}"
            )
        self.levels.append(hashes)
        while len(self.levels) > 1 and len(self.levels[-2]) <= len(self.levels[-1]):
            last = self.levels.pop()
            merged = np.concatenate((self.levels.pop(), last))
            merged.sort(kind="stable")  # two sorted runs: merged in linear time
            self.levels.append(merged)


def _chunks(items: Iterable[Any], chunk_size: int) -> Iterator[tuple[int, list[Any]]]:
    """``(offset, items)`` of each chunk, read from ``items`` only when it is asked for."""
    iterator = iter(items)
    offset = 0
    while True:
        chunk = list(itertools.islice(iterator, chunk_size))
        if not chunk:
            return
        yield offset, chunk
        offset += len(chunk)
        del chunk  # before the next one is read: one chunk in memory, not two


def submit_batch(
    task: BatchTask,
    items: Iterable[Any],
    chunk_size: int = 1000,
    *,
    batch_id: str | None = None,
    **options: Any,
) -> BatchSubmission:
    """Send ``items`` (a list, or any iterable: a generator of a million rows) to ``task``
    in chunks of ``chunk_size``, one message per chunk, so they run on as many workers as
    there are; record the batch; return a ``BatchSubmission`` whose ``get()`` merges the
    chunks' summaries into one and whose ``progress()`` reads the ledger.

    Streamed: one chunk is read, its keys checked, sent, and dropped before the next is read,
    so the submitting process never holds more than one chunk of items, and no message holds
    more than one chunk. ``options`` go to each chunk's ``apply_async`` (``queue``,
    ``priority``...).

    Keys: unique across the whole batch (``ConfigurationError`` otherwise). A list (any
    sized collection, which can be read twice) has every key checked before anything is sent,
    as before; an iterator is read once, so a chunk's keys are checked before that chunk is
    sent, and the chunks before a bad key have been sent (the error says how many; the
    ``batches`` row records them). Decision: the check across chunks keeps each key's 64-bit
    ``hash``, not the key, in sorted arrays (8 bytes per item: 8 MB for a million, against
    the ~160 MB every item and key took before); two different keys share a hash with a
    probability of about 3e-8 in a million-key batch, and would be refused as repeated. The
    database cannot catch a repeat instead: the ledger keys a row per chunk, and a key in two
    chunks would simply run twice.

    The ``batches`` row (task, total, chunks, group id): for a sized collection it is written
    before anything is sent, with the total it will have; for an iterator, whose length is
    not known until it is read, it is written once the last chunk is sent (the database is
    asked to answer first), so while it is being sent ``batch_progress`` and
    ``taskkit batches show`` report the ledger with no total. Whatever stops the sending
    partway (a broker outage, a bad key, the iterator's own error), the row is left saying
    what was sent: those chunks, with their items as its total; with nothing sent, there is
    no row.

    ``BrokerUnavailable`` within about two seconds when the broker or the result backend is
    down: both are asked to answer before anything is written, and each chunk is published
    with ``PUBLISH_RETRY_POLICY`` (unless ``retry_policy=`` is given). A chunk whose send
    fails in an outage may still have reached the broker; its items then run under the batch
    id too, beyond the recorded total; the error says so.

    Decision: chunks sent one by one and gathered as a Celery ``GroupResult`` (a group id of
    their own, as a group's would be), not a chord. The summary is merged where you wait for
    it, so there is no callback task to register and no chord counter to lose; progress is in
    the ledger.

    Example::

        submission = submit_batch(score_items, rows, chunk_size=500, queue="batch")
        print(submission.progress())
        summary = submission.get(timeout=3600)

        def rows_of(path):  # a file larger than memory, one chunk in memory at a time
            with open(path) as lines:
                yield from (json.loads(line) for line in lines)

        submission = submit_batch(score_items, rows_of("rows.jsonl"), chunk_size=1000)
    """
    if not isinstance(task, BatchTask):
        raise ConfigurationError(f"submit_batch needs a BatchTask, not {task!r}")
    check_int("chunk_size", chunk_size, 1)
    batch_id = batch_id or uuid.uuid4().hex
    seen = _SeenKeys(task)
    sized = isinstance(items, Sized) and not isinstance(items, Iterator)
    if sized:  # read twice: every key checked before anything is sent
        for offset, chunk in _chunks(items, chunk_size):
            seen.add(chunk, offset)
    engine = get_engine(task.app.conf.get("taskkit_database_url"))
    batches = cast(Table, Batch.__table__)
    group_id = uuid.uuid4().hex
    check_reachable(task.app)
    planned: dict[str, Any] | None = None
    with engine.begin() as connection:  # first: a database that is down sends nothing
        if sized:
            total = len(cast(Sized, items))
            planned = {"total": total, "chunks": -(-total // chunk_size), "group_id": group_id}
            connection.execute(
                batches.insert(), {"id": batch_id, "task_name": task.name, **planned}
            )
        else:
            connection.execute(select(1))
    publish: dict[str, Any] = (
        {} if "retry_policy" in options else {"retry_policy": PUBLISH_RETRY_POLICY}
    )
    if "group_id" not in options:
        publish["group_id"] = group_id
    sent: list[AsyncResult[Any]] = []
    count = 0
    try:
        for offset, chunk in _chunks(items, chunk_size):
            if not sized:
                seen.add(chunk, offset)
            with sending(task.app, detail=_partly(batch_id, len(sent), count)):
                sent.append(
                    task.apply_async(
                        (chunk,), {"batch_id": batch_id, "offset": offset}, **publish, **options
                    )
                )
            count += len(chunk)
            del chunk
    except BaseException as error:
        if sent and not isinstance(error, BrokerUnavailable):
            error.add_note(
                f"submit_batch: {len(sent)} chunk(s), {count} item(s), were sent before this "
                f"error and run under batch {batch_id!r}; its batches row says so"
            )
        row = {"total": count, "chunks": len(sent), "group_id": group_id} if sent else None
        if sized or sent:
            with contextlib.suppress(Exception):  # the error that stopped the sending comes first
                _record(engine, task, batch_id, row, exists=sized)
        raise
    row = {"total": count, "chunks": len(sent), "group_id": group_id}
    if row != planned:
        _record(engine, task, batch_id, row, exists=sized)
    return BatchSubmission(
        batch_id, GroupResult(group_id, sent, app=task.app), count, chunk_size, task
    )


def _partly(batch_id: str, chunks: int, items: int) -> str:
    """What a send that fails now leaves behind (``BrokerUnavailable``'s detail)."""
    maybe = f"the chunk being sent, if the broker took it before failing, runs under {batch_id!r}"
    if not chunks:
        return f"the batch was not recorded; {maybe}"
    return (
        f"the {chunks} chunk(s) sent before the failure ({items} items) run under batch "
        f"{batch_id!r}, recorded with that total; {maybe} too"
    )


def _record(
    engine: Engine, task: BatchTask, batch_id: str, row: dict[str, Any] | None, *, exists: bool
) -> None:
    """Write the ``batches`` row (``row``: total, chunks, group id), or delete it (None)."""
    batches = cast(Table, Batch.__table__)
    with engine.begin() as connection:
        if row is None:
            connection.execute(batches.delete().where(batches.c.id == batch_id))
        elif exists:
            connection.execute(batches.update().where(batches.c.id == batch_id).values(**row))
        else:
            connection.execute(batches.insert(), {"id": batch_id, "task_name": task.name, **row})
