"""parallel_batch_process: chunks in threads, input order, any size, options passed through."""

from __future__ import annotations

import contextvars
import threading
import time

import pytest
from celery.exceptions import Retry

from taskkit.errors import ConfigurationError
from taskkit.recovery import BatchResult, batch_with_retry, parallel_batch_process
from taskkit.recovery import _parallel as parallel_module
from taskkit.recovery._parallel import chunk_bounds


class Items:
    """A process function: item ``i`` fails ``failures[i]`` times (or forever with -1)."""

    def __init__(self, failures: dict[int, int] | None = None, error=ConnectionError):
        self.failures = dict(failures or {})
        self.error = error
        self.attempts: dict[int, int] = {}
        self.threads: dict[int, int] = {}

    def __call__(self, item: int) -> int:
        self.attempts[item] = self.attempts.get(item, 0) + 1
        self.threads[item] = threading.get_ident()
        left = self.failures.get(item, 0)
        if left:
            self.failures[item] = left - 1
            raise self.error(f"item {item}")
        return item * 10


def no_sleep(seconds: float) -> None:
    raise AssertionError(f"slept {seconds} s; these tests use delay=0")


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 7, 10, 13, 101])
def test_results_are_those_of_one_batch_in_input_order_for_any_size(size, workers):
    items = list(range(size))
    result = parallel_batch_process(items, Items(), num_workers=workers, batch_size=3)
    assert isinstance(result, BatchResult)
    assert result == BatchResult([i * 10 for i in items], [])


@pytest.mark.parametrize(("total", "parts"), [(10, 4), (7, 3), (5, 4), (3, 4), (1, 4), (101, 8)])
def test_chunks_are_contiguous_never_empty_and_at_most_one_apart(total, parts):
    bounds = chunk_bounds(total, parts)
    assert len(bounds) == min(total, parts)
    assert [b[0] for b in bounds] == [0] + [b[1] for b in bounds[:-1]]  # contiguous
    assert bounds[-1][1] == total
    sizes = [stop - start for start, stop in bounds]
    assert min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1
    assert max(sizes) == -(-total // parts)  # ceil(total / parts)


def test_uneven_chunks_keep_input_order_and_each_chunk_runs_in_its_own_thread():
    # 10 items, 4 workers: chunks of 3, 3, 2, 2. The first item of each chunk waits until all
    # four chunks have started, which only happens if they really run at the same time.
    barrier = threading.Barrier(4, timeout=10)
    firsts = {0, 3, 6, 8}
    process = Items()

    def process_item(item: int) -> int:
        if item in firsts:
            barrier.wait()
        return process(item)

    successful, failed = parallel_batch_process(range(10), process_item, num_workers=4)
    assert successful == [i * 10 for i in range(10)]
    assert failed == []
    chunks = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    threads = [{process.threads[i] for i in chunk} for chunk in chunks]
    assert all(len(t) == 1 for t in threads)  # a chunk stays on one thread
    assert len(set().union(*threads)) == 4
    assert threading.get_ident() not in set().union(*threads)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_fewer_items_than_workers_starts_one_thread_per_item(size):
    barrier = threading.Barrier(size, timeout=10)
    process = Items()

    def process_item(item: int) -> int:
        barrier.wait()  # every item runs at the same time: one thread each
        return process(item)

    successful, failed = parallel_batch_process(list(range(size)), process_item, num_workers=4)
    assert successful == [i * 10 for i in range(size)]
    assert failed == []
    assert len(set(process.threads.values())) == size


def test_empty_input_returns_an_empty_result_without_starting_threads(monkeypatch):
    def no_pool(*args, **kwargs):
        raise AssertionError("a thread pool was created for empty input")

    monkeypatch.setattr(parallel_module, "ThreadPoolExecutor", no_pool)
    assert parallel_batch_process([], Items()) == BatchResult([], [])
    assert parallel_batch_process(iter(()), Items(), num_workers=16) == BatchResult([], [])


def test_any_iterable_is_accepted():
    successful, failed = parallel_batch_process((i for i in range(7)), Items(), num_workers=3)
    assert successful == [i * 10 for i in range(7)]
    assert failed == []


def test_failing_items_are_retried_and_reported_in_input_order():
    # Failures spread over all chunks (25 items each); 3 attempts per item with max_retries=2.
    process = Items({1: 1, 30: 2, 57: -1, 80: 3, 99: -1, 12: -1})
    successful, failed = parallel_batch_process(
        range(100), process, num_workers=4, batch_size=10, max_retries=2, delay=0, sleep=no_sleep
    )
    assert successful == [i * 10 for i in range(100) if i not in {12, 57, 80, 99}]
    assert [(item, str(error)) for item, error in failed] == [
        (12, "item 12"),
        (57, "item 57"),
        (80, "item 80"),
        (99, "item 99"),
    ]
    assert all(isinstance(error, ConnectionError) for _, error in failed)
    assert process.attempts[1] == 2
    assert process.attempts[30] == 3
    assert process.attempts[80] == 3  # ran out of retries: 3 attempts
    assert process.attempts[57] == 3


def test_the_result_is_what_batch_with_retry_returns_for_the_same_input():
    failures = {i: i % 4 for i in range(0, 60, 7)}
    options = {"batch_size": 4, "max_retries": 2, "delay": 0, "sleep": no_sleep}
    alone = batch_with_retry(range(60), Items(failures), **options)
    threaded = parallel_batch_process(range(60), Items(failures), num_workers=5, **options)
    assert threaded.successful == alone.successful
    assert [(i, str(e)) for i, e in threaded.failed] == [(i, str(e)) for i, e in alone.failed]


@pytest.mark.parametrize("option", ["num_workers", "batch_size"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "4", None])
def test_bad_num_workers_or_batch_size_is_a_configuration_error(option, value):
    with pytest.raises(ConfigurationError, match=f"{option} must be an integer >= 1"):
        parallel_batch_process([1, 2, 3], Items(), **{option: value})


def test_bad_options_fail_in_the_callers_thread_even_for_empty_input():
    with pytest.raises(ConfigurationError, match="max_retries must be an integer >= 0"):
        parallel_batch_process([], Items(), max_retries=-1)
    with pytest.raises(ConfigurationError, match="delay must be a number"):
        parallel_batch_process([1], Items(), delay=-1)
    with pytest.raises(ConfigurationError, match="unknown option 'dealy'; did you mean 'delay'"):
        parallel_batch_process([1], Items(), dealy=0)


def test_options_are_passed_through_give_up_on_fails_an_item_at_once():
    process = Items({5: -1})

    def process_item(item: int) -> int:
        if item == 2:
            process.attempts[item] = process.attempts.get(item, 0) + 1
            raise ValueError("bad input")
        return process(item)

    successful, failed = parallel_batch_process(
        range(8), process_item, num_workers=3, delay=0, give_up_on=ValueError, sleep=no_sleep
    )
    assert successful == [i * 10 for i in range(8) if i not in {2, 5}]
    assert [(item, type(error)) for item, error in failed] == [
        (2, ValueError),
        (5, ConnectionError),
    ]
    assert process.attempts[2] == 1  # given up on at once
    assert process.attempts[5] == 3  # retried


def test_injected_sleep_is_used_by_every_chunk():
    sleeps: list[float] = []
    lock = threading.Lock()

    def record(seconds: float) -> None:
        with lock:
            sleeps.append(seconds)

    clock_now = [0.0]

    def clock() -> float:
        return clock_now[0]

    def sleep(seconds: float) -> None:
        record(seconds)
        clock_now[0] += seconds  # time moves only when a chunk sleeps

    process = Items({0: 1, 5: 1})
    successful, failed = parallel_batch_process(
        range(10), process, num_workers=2, delay=1.5, sleep=sleep, clock=clock
    )
    assert successful == [i * 10 for i in range(10)]
    assert failed == []
    assert sleeps  # the chunks waited through the injected sleep, not time.sleep
    assert process.attempts[0] == process.attempts[5] == 2


def test_on_progress_counts_over_all_chunks():
    reports: list[tuple[int, int]] = []
    successful, _ = parallel_batch_process(
        range(50),
        Items(),
        num_workers=4,
        batch_size=5,
        on_progress=lambda d, t: reports.append((d, t)),
    )
    assert len(successful) == 50
    assert reports[-1] == (50, 50)
    assert {total for _, total in reports} == {50}
    done = [d for d, _ in reports]
    assert done == sorted(done)  # never goes down


def test_each_chunk_sees_the_callers_context_variables():
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    request_id.set("req-42")
    seen = parallel_batch_process(range(6), lambda _: request_id.get(), num_workers=3)
    assert seen.successful == ["req-42"] * 6


def test_control_flow_in_a_chunk_is_raised_as_is():
    def process_item(item: int) -> int:
        if item == 7:
            raise Retry("retrying in 60s")
        return item

    with pytest.raises(Retry, match="retrying in 60s"):
        parallel_batch_process(range(10), process_item, num_workers=3, delay=0)


def test_an_exception_outside_exceptions_ends_the_call_and_wakes_the_other_chunks():
    # Chunk 2 (items 5..9) schedules a retry an hour away; chunk 1 then raises an exception
    # that is not an item failure. The call raises it at once instead of waiting the hour.
    retry_scheduled = threading.Event()
    attempts: dict[int, int] = {}

    def process_item(item: int) -> int:
        attempts[item] = attempts.get(item, 0) + 1
        if item == 5:
            retry_scheduled.set()
            raise ConnectionError("transient")
        if item == 0:
            assert retry_scheduled.wait(10)
            raise KeyError("a bug, not an item failure")
        return item

    started = time.monotonic()
    with pytest.raises(KeyError, match="a bug"):
        parallel_batch_process(
            range(10), process_item, num_workers=2, delay=3600, exceptions=ConnectionError
        )
    assert time.monotonic() - started < 10
    assert attempts[5] == 1
    assert 1 not in attempts  # chunk 1 ended at its first item


def test_the_error_raised_is_the_one_that_stopped_the_call_not_the_first_chunks():
    # Chunk 1 (items 0..2) has a retry pending an hour away when chunk 2 (items 3..5) raises;
    # chunk 1 is stopped because of that error, and the call raises chunk 2's error.
    retry_scheduled = threading.Event()

    def process_item(item: int) -> int:
        if item == 0:
            retry_scheduled.set()
            raise ConnectionError("transient")
        if item == 3:
            assert retry_scheduled.wait(10)
            raise KeyError("chunk 2")
        return item

    with pytest.raises(KeyError, match="chunk 2"):
        parallel_batch_process(
            range(6), process_item, num_workers=2, delay=3600, exceptions=ConnectionError
        )
