"""``parallel_batch_process``: ``batch_with_retry`` over contiguous chunks, one thread each."""

from __future__ import annotations

import contextvars
import functools
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Generic, TypeVar

from taskkit._utils import call_hook, check_batch_options, check_int
from taskkit.recovery._batch import BatchResult, batch_with_retry

__all__ = ["parallel_batch_process"]

T = TypeVar("T")
R = TypeVar("R")


def chunk_bounds(total: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(total)`` into at most ``parts`` contiguous ``(start, stop)`` slices.

    Never more slices than items, none empty, sizes differ by at most one: the largest is
    ``ceil(total / parts)`` items, so no thread gets more than its share.
    """
    parts = min(parts, total)
    if parts == 0:
        return []
    size, extra = divmod(total, parts)
    bounds, start = [], 0
    for part in range(parts):
        stop = start + size + (1 if part < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class _Stopped(BaseException):
    """Ends a chunk early once another chunk (or the caller) has raised; never leaves here.

    A ``BaseException``, so ``batch_with_retry`` (which retries ``Exception`` by default) lets it
    through instead of counting it as the item's failure.
    """


def parallel_batch_process(
    items: Iterable[T],
    process_func: Callable[[T], R],
    num_workers: int = 4,
    batch_size: int = 100,
    max_retries: int = 2,
    **options: Any,
) -> BatchResult[T, R]:
    """Run ``batch_with_retry`` over ``items`` split into contiguous chunks, one thread per chunk.

    Returns ``BatchResult(successful, failed)`` exactly as ``batch_with_retry`` would: the
    results of the items that succeeded and ``(item, exception)`` for those that ran out of
    retries, both in input order across chunks. ``items`` may be any iterable; it is read into
    a list first. Every option of ``batch_with_retry`` (``delay``, ``backoff``, ``jitter``,
    ``exceptions``, ``give_up_on``, ``circuit``, ``budget``, ``sleep``, ``clock``, ...) may be
    passed and applies to every chunk; an unknown one is a ``ConfigurationError``, as are
    ``num_workers`` or ``batch_size`` below 1. ``on_progress(done, total)`` counts across all
    chunks (it is called from the worker threads, one call at a time).

    Decisions:

    - Threads, not processes: right for I/O-bound functions (HTTP calls, database writes,
      model servers), which release the GIL while they wait. CPU-bound pure-Python functions
      gain nothing, since the GIL runs one thread at a time; use processes (or Celery's own
      concurrency) for those. A shared ``circuit`` or ``budget`` sees the calls of all threads.
    - Chunks are contiguous, never more than the items, and differ in size by at most one,
      so ``min(num_workers, len(items))`` threads start; none for empty input.
    - Order is kept: each chunk keeps its own order and chunks are joined in input order.
    - An exception that is not an item's failure (a framework's control flow such as Celery's
      ``Retry``, or an exception outside ``exceptions``) ends the whole call: the other chunks
      stop before their next item or retry wait, then that exception is raised here. Retry
      waits use ``sleep`` when given; without it they wake up at once when the call is stopped.
    - Each chunk runs in a copy of the caller's ``contextvars`` context.

    Example::

        successful, failed = parallel_batch_process(
            urls, fetch_metadata, num_workers=8, batch_size=50, max_retries=3, delay=0.5
        )
        for url, error in failed:
            logger.error("could not fetch %s: %s", url, error)
    """
    check_int("num_workers", num_workers, 1)
    check_int("batch_size", batch_size, 1)
    check_batch_options("parallel_batch_process", options, batch_with_retry)
    # Checks every option's value here, in the caller's thread, before any thread starts.
    nothing: BatchResult[T, R] = batch_with_retry(
        [], process_func, batch_size, max_retries, **options
    )
    data = list(items)
    bounds = chunk_bounds(len(data), num_workers)
    if not bounds:
        return nothing
    return _ParallelRun(data, process_func, batch_size, max_retries, options).execute(bounds)


class _ParallelRun(Generic[T, R]):
    """One call of ``parallel_batch_process``: the chunks' threads and what they share."""

    def __init__(
        self,
        data: list[T],
        process_func: Callable[[T], R],
        batch_size: int,
        max_retries: int,
        options: dict[str, Any],
    ) -> None:
        self.data = data
        self.batch_size = batch_size
        self.max_retries = max_retries
        #: Set when a chunk raises (or the caller is interrupted): the other chunks stop. The
        #: event wakes chunks waiting for a retry; the flag is what every call checks (reading
        #: a list item costs less than ``Event.is_set()``, ~20 ns an item).
        self.stop = threading.Event()
        self.stopped = [False]
        self.errors: list[BaseException] = []  # in the order they happened
        self.errors_lock = threading.Lock()
        self.progress_lock = threading.Lock()
        self.on_progress: Callable[[int, int], object] | None = options.pop("on_progress", None)
        self.done: list[int] = []  # per chunk, for on_progress
        self.call = self._stoppable(process_func)
        options["sleep"] = self._stoppable_sleep(options.get("sleep"))
        self.options = options

    def execute(self, bounds: list[tuple[int, int]]) -> BatchResult[T, R]:
        self.done = [0] * len(bounds)
        with ThreadPoolExecutor(len(bounds), thread_name_prefix="taskkit-batch") as pool:
            futures = [
                pool.submit(contextvars.copy_context().run, self._run_chunk, index, start, stop)
                for index, (start, stop) in enumerate(bounds)
            ]
            try:
                wait(futures)
            except BaseException:
                # Raised in this thread by a signal handler (Celery's soft time limit, Ctrl-C):
                # stop the chunks, so that leaving the pool does not wait for all their items.
                self._halt()
                raise
        if self.errors:  # the first one raised; the other chunks stopped because of it
            raise self.errors[0]
        chunks = [future.result() for future in futures]
        successful: list[R] = []
        failed: list[tuple[T, BaseException]] = []
        for chunk in chunks:  # contiguous chunks, joined in input order
            successful.extend(chunk.successful)
            failed.extend(chunk.failed)
        return BatchResult(successful, failed)

    def _run_chunk(self, index: int, start: int, stop: int) -> BatchResult[T, R]:
        try:
            return batch_with_retry(
                self.data[start:stop],
                self.call,
                self.batch_size,
                self.max_retries,
                on_progress=self._progress(index),
                **self.options,
            )
        except _Stopped:
            return BatchResult([], [])  # another chunk's error is the one raised
        except BaseException as error:
            with self.errors_lock:
                self.errors.append(error)
            self._halt()
            raise

    def _halt(self) -> None:
        self.stopped[0] = True
        self.stop.set()

    def _stoppable(self, process_func: Callable[[T], R]) -> Callable[[T], R]:
        stopped = self.stopped

        @functools.wraps(process_func)
        def call(item: T) -> R:
            if stopped[0]:
                raise _Stopped
            return process_func(item)

        return call

    def _stoppable_sleep(self, sleep: Callable[[float], object] | None) -> Callable[[float], None]:
        stop = self.stop
        if sleep is None or sleep is time.sleep:

            def interruptible(seconds: float) -> None:
                if stop.wait(seconds):  # wakes up as soon as the call is stopped
                    raise _Stopped

            return interruptible

        def injected(seconds: float) -> None:
            if stop.is_set():
                raise _Stopped
            sleep(seconds)
            if stop.is_set():
                raise _Stopped

        return injected

    def _progress(self, index: int) -> Callable[[int, int], None] | None:
        """The chunk's ``on_progress``: report the sum over all chunks to the user's hook."""
        hook = self.on_progress
        if hook is None:
            return None
        done, lock, total = self.done, self.progress_lock, len(self.data)

        def report(chunk_done: int, _chunk_total: int) -> None:
            with lock:  # one call at a time, so the counts the hook sees never go down
                done[index] = chunk_done
                call_hook(hook, sum(done), total)

        return report
