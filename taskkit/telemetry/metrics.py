"""Prometheus metrics: what taskkit adds to a Celery fleet, as ``taskkit_*`` series.

Everything here is a subscriber of ``taskkit.recovery.events`` plus a few collectors read at
scrape time. Nothing is measured until ``install()`` subscribes (zero cost before), and the
recovery primitives emit only on the unhappy path, so a call that succeeds pays nothing.

Families (names, labels and units as issue 17 lists them; every label is bounded by code or
configuration: task names, layers, outcomes, exception class names, breaker and budget names,
statuses; never a task, run or letter id):

- ``taskkit_task_attempts_total{task,layer,outcome}``: one per ``TaskAttemptEnded``; ``layer``
  is ``inner`` or ``outer``, ``outcome`` ``success``, ``retry``, ``escalated``, ``failure`` or
  ``ignored``.
- ``taskkit_task_terminal_failures_total{task,error}``: tasks that failed for good.
- ``taskkit_dead_lettered_total{task,error}``: dead letters written (tasks and batch items).
- ``taskkit_dead_letters{status}``: the dead-letter table by status, read from the database at
  scrape (one grouped ``COUNT``, cached ``DB_CACHE_SECONDS``).
- ``taskkit_runs{status,stale}``: training runs by status, read likewise; ``stale="true"`` for
  ``running`` runs whose lease heartbeat is older than ``TASKKIT_LEASE_TTL``.
- ``taskkit_circuit_state{breaker}``: 0 closed, 1 half-open, 2 open; and
  ``taskkit_circuit_transitions_total{breaker,to}``.
- ``taskkit_retry_budget_tokens{budget}``: tokens left in the budgets given to ``track_budget``.
- ``taskkit_retries_total{function}`` and ``taskkit_retry_give_ups_total{function,reason}``:
  the plain recovery primitives (``retry``, ``Retrying``) outside tasks.
- ``taskkit_checkpoint_save_seconds`` and ``taskkit_checkpoint_bytes`` histograms.
- ``taskkit_lease_takeovers_total{task}``, ``taskkit_batch_items_total{task,outcome}``
  (``done``, ``dead``, ``skipped``), ``taskkit_run_epoch_seconds`` histogram.

Decision: the breaker state is one series per breaker whose value orders by severity (0, 1,
2) rather than a one-hot ``{state=...}`` set. The one-hot form is Prometheus' idiom for an
enum of unordered states; a breaker's states are ordered, and the numeric form aggregates the
way an operator asks: ``max by (breaker)`` across pool processes and workers is the worst state
anywhere (with one-hot, ``max`` gives 1 for every state some process is in, and a panel needs
three series per breaker), ``== 2`` is the alert, and a graph of it reads as a step line. In a
prefork worker each pool process has its own local breaker; the gauge keeps, per breaker, the
highest value of the live processes.

Prefork workers: prometheus_client's multiprocess mode. ``prepare_multiprocess_dir`` (called by
the worker's main process before it forks the pool) empties the directory and points
``PROMETHEUS_MULTIPROC_DIR`` at it, so every value the pool processes create is an mmap file
there; the serving process aggregates them (``MultiProcessCollector``) with the
database-backed collectors, which run in the serving process only. Task attempts (one or more
per task) are counted in memory and added to their mmap file every ``FLUSH_SECONDS`` by a thread
of each pool process, at its shutdown and at every ``render`` of this process: a multiprocess
increment (a lock, a pid check, an mmap write) costs about as much as a trivial task.

Example::

    from taskkit.telemetry import metrics

    metrics.install()               # subscribe to the event bus (idempotent)
    metrics.track_budget("geocoder", budget)
    print(metrics.render().decode())
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

try:
    import prometheus_client
    from prometheus_client import values as _prometheus_values
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        "taskkit.telemetry.metrics needs prometheus_client: pip install 'taskkit[metrics]'"
    ) from exc

from taskkit.recovery import events

__all__ = [
    "BUCKETS_BYTES",
    "BUCKETS_SECONDS",
    "CIRCUIT_STATE_VALUES",
    "CONTENT_TYPE",
    "DB_CACHE_SECONDS",
    "FLUSH_SECONDS",
    "BreakerCollector",
    "BudgetCollector",
    "DatabaseCollector",
    "Metrics",
    "ensure_multiprocess",
    "install",
    "installed",
    "mark_dead",
    "multiprocess_dir",
    "prepare_multiprocess_dir",
    "render",
    "serve",
    "track_breaker",
    "track_budget",
    "uninstall",
]

logger = logging.getLogger("taskkit.telemetry")

#: The exposition's content type (Prometheus text format 0.0.4).
CONTENT_TYPE: str = prometheus_client.CONTENT_TYPE_LATEST
#: Seconds a database-backed reading is reused (one grouped COUNT per table per window).
DB_CACHE_SECONDS = 5.0
#: Seconds between two flushes of the task attempts a pool process counted in memory (the
#: most a worker's ``/metrics`` lags behind).
FLUSH_SECONDS = 0.5
#: ``taskkit_circuit_state`` values, ordered by severity.
CIRCUIT_STATE_VALUES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
#: Checkpoint save durations and epoch durations (seconds): 5 ms to 10 minutes.
BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: Checkpoint sizes (bytes): 1 KiB to 16 GiB, by powers of 4.
BUCKETS_BYTES = tuple(float(1024 * 4**i) for i in range(13))

_GIVE_UP_REASONS = (
    ("never retried", "permanent"),
    ("retry_if", "rejected"),
    ("no attempts", "attempts"),
    ("deadline", "deadline"),
    ("budget", "budget"),
)


class _Breaker(Protocol):
    name: str

    @property
    def state(self) -> Any: ...


class _Budget(Protocol):
    @property
    def available(self) -> float: ...


class Metrics:
    """The metric families, created in one registry (multiprocess values when
    ``PROMETHEUS_MULTIPROC_DIR`` was set before they were made), and the event handler.

    Example::

        m = Metrics(CollectorRegistry())
        m.handle(events.TaskFailed("tasks.add", "id-1", "KeyError", attempts=3))
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry
        c, g, h = prometheus_client.Counter, prometheus_client.Gauge, prometheus_client.Histogram
        self.task_attempts = c(
            "taskkit_task_attempts",
            "Attempts of taskkit tasks that ended, by layer (inner: one call of the body in the "
            "worker's in-process retry; outer: one delivery) and outcome.",
            ["task", "layer", "outcome"],
            registry=r,
        )
        self.terminal_failures = c(
            "taskkit_task_terminal_failures",
            "taskkit tasks that failed for good, by exception class.",
            ["task", "error"],
            registry=r,
        )
        self.dead_lettered = c(
            "taskkit_dead_lettered",
            "Dead letters written (failed tasks and batch items), by exception class.",
            ["task", "error"],
            registry=r,
        )
        self.circuit_state = g(
            "taskkit_circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open (the worst of the live "
            "processes of a worker).",
            ["breaker"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.circuit_transitions = c(
            "taskkit_circuit_transitions",
            "Circuit breaker state changes, by the state entered.",
            ["breaker", "to"],
            registry=r,
        )
        self.retries = c(
            "taskkit_retries",
            "Retries scheduled by the recovery primitives (retry, Retrying) outside tasks.",
            ["function"],
            registry=r,
        )
        self.give_ups = c(
            "taskkit_retry_give_ups",
            "Retries given up by the recovery primitives, by reason (attempts, deadline, "
            "budget, permanent, rejected, other).",
            ["function", "reason"],
            registry=r,
        )
        self.checkpoint_seconds = h(
            "taskkit_checkpoint_save_seconds",
            "Seconds to make a checkpoint durable.",
            registry=r,
            buckets=BUCKETS_SECONDS,
        )
        self.checkpoint_bytes = h(
            "taskkit_checkpoint_bytes",
            "Size of the checkpoints saved, in bytes.",
            registry=r,
            buckets=BUCKETS_BYTES,
        )
        self.lease_takeovers = c(
            "taskkit_lease_takeovers",
            "Leases taken over from a holder that let them lapse.",
            ["task"],
            registry=r,
        )
        self.batch_items = c(
            "taskkit_batch_items",
            "Batch items by outcome: done, dead (dead-lettered), skipped (done before).",
            ["task", "outcome"],
            registry=r,
        )
        self.epoch_seconds = h(
            "taskkit_run_epoch_seconds",
            "Seconds per training epoch.",
            registry=r,
            buckets=BUCKETS_SECONDS,
        )
        #: Refreshed on every retry event in a process of a prefork worker (the budgets of
        #: a pool process are not readable by the serving process); the lowest of the live ones.
        self.budget_tokens = g(
            "taskkit_retry_budget_tokens",
            "Tokens (whole retries) left in a retry budget.",
            ["budget"],
            registry=r,
            multiprocess_mode="livemin",
        )
        #: Last state seen per breaker name in this process (what ``BreakerCollector`` adds
        #: to the breakers it reads).
        self.seen_states: dict[str, str] = {}
        self.budgets: dict[str, _Budget] = {}
        self.publish_budgets = False
        #: Task attempts counted in memory, not yet added to ``task_attempts`` (``flush``).
        self._pending: dict[tuple[str, str, str], int] = {}
        self._pending_lock = threading.Lock()
        self._flusher: tuple[int, threading.Event] | None = None

    def handle(self, event: events.Event) -> None:
        """Count one event (the event-bus subscriber).

        Task attempts, one or more per task, are counted in memory and added to their counter
        by ``flush`` (at every render in this process, and every ``FLUSH_SECONDS`` from a
        thread of a prefork pool process): a multiprocess counter increment writes an mmap
        file under a lock, which costs more than a trivial task. Everything else is rare and
        counted at once.
        """
        if type(event) is events.TaskAttemptEnded:
            key = (event.task, event.layer, event.outcome)
            with self._pending_lock:
                self._pending[key] = self._pending.get(key, 0) + 1
            if event.outcome == "retry" and self.publish_budgets:
                self._publish_budgets()
        elif isinstance(event, events.TaskFailed):
            self.terminal_failures.labels(event.task, event.error_type).inc()
        elif isinstance(event, events.DeadLettered):
            self.dead_lettered.labels(event.task, event.error_type).inc()
        elif isinstance(event, events.CircuitStateChanged):
            self.seen_states[event.name] = event.new
            self.circuit_state.labels(event.name).set(CIRCUIT_STATE_VALUES.get(event.new, 0.0))
            self.circuit_transitions.labels(event.name, event.new).inc()
        elif isinstance(event, events.RetryScheduled):
            self.retries.labels(event.function).inc()
            if self.publish_budgets:
                self._publish_budgets()
        elif isinstance(event, events.GaveUp):
            self.give_ups.labels(event.function, _reason(event.reason)).inc()
            if self.publish_budgets:
                self._publish_budgets()
        elif isinstance(event, events.CheckpointSaved):
            self.checkpoint_seconds.observe(event.seconds)
            self.checkpoint_bytes.observe(event.size)
        elif isinstance(event, events.LeaseTakenOver):
            self.lease_takeovers.labels(event.task).inc()
        elif isinstance(event, events.BatchChunkFinished):
            for outcome, count in (
                ("done", event.done),
                ("dead", event.dead),
                ("skipped", event.skipped),
            ):
                if count:
                    self.batch_items.labels(event.task, outcome).inc(count)
        elif isinstance(event, events.EpochFinished):
            self.epoch_seconds.observe(event.seconds)

    def flush(self) -> None:
        """Add the task attempts counted in memory to ``task_attempts``.

        Example::

            metrics.installed().flush()
        """
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for labels, count in pending.items():
            self.task_attempts.labels(*labels).inc(count)

    def start_flusher(self, interval: float) -> None:
        """Flush every ``interval`` seconds from a daemon thread of this process (once per
        process: a forked child starts its own).

        Example::

            metrics.install().start_flusher(FLUSH_SECONDS)
        """
        pid = os.getpid()
        if self._flusher is not None and self._flusher[0] == pid:
            return
        stop = threading.Event()
        self._flusher = (pid, stop)

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.flush()
                except Exception:  # an unwritable multiprocess directory: keep counting
                    logger.warning("taskkit metrics: could not flush", exc_info=True)

        threading.Thread(target=loop, name="taskkit-metrics-flush", daemon=True).start()

    def stop_flusher(self) -> None:
        """Stop this process's flusher thread (after a last ``flush``).

        Example::

            metrics.installed().stop_flusher()
        """
        if self._flusher is not None:
            self._flusher[1].set()
            self._flusher = None
        self.flush()

    def _after_fork_in_child(self) -> None:
        self._pending_lock = threading.Lock()
        self._pending = {}  # the parent's, which the parent flushes itself
        self._flusher = None

    def _publish_budgets(self) -> None:
        for name, budget in list(self.budgets.items()):
            try:
                self.budget_tokens.labels(name).set(float(budget.available))
            except Exception:  # a shared budget whose Redis does not answer
                logger.debug("taskkit metrics: could not read retry budget %r", name)


def _reason(text: str) -> str:
    for needle, reason in _GIVE_UP_REASONS:
        if needle in text:
            return reason
    return "other"


# -- the process's installation ----------------------------------------------------------------

_lock = threading.Lock()
_state: dict[str, Any] = {}


def install(registry: CollectorRegistry | None = None) -> Metrics:
    """Create the metric families and subscribe them to the event bus; idempotent (the second
    call returns the first one's ``Metrics``). ``registry`` defaults to a registry of taskkit's
    own (not prometheus_client's global ``REGISTRY``: ``render()`` reads it).

    In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set, see ``prepare_multiprocess_dir``)
    the values are written to that directory, for the serving process to aggregate.

    Example::

        from taskkit.telemetry import metrics

        m = metrics.install()
        m.task_attempts.labels("tasks.add", "outer", "success").get()  # doctest: +SKIP
    """
    with _lock:
        current: Metrics | None = _state.get("metrics")
        if current is None:
            registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
            current = Metrics(registry)
            current.budgets.update(_state.get("budgets", {}))
            os.register_at_fork(after_in_child=current._after_fork_in_child)
            _state.update(
                metrics=current,
                registry=registry,
                unsubscribe=events.subscribe(current.handle),
            )
        if multiprocess_dir() is not None:
            current.publish_budgets = True
            current.start_flusher(FLUSH_SECONDS)
        return current


def installed() -> Metrics | None:
    """The installed ``Metrics``, or None before ``install()``.

    Example::

        if metrics.installed() is None:
            metrics.install()
    """
    metrics: Metrics | None = _state.get("metrics")
    return metrics


def uninstall() -> None:
    """Unsubscribe and forget the families (tests, benchmarks); ``install()`` starts afresh.

    Example::

        metrics.install()
        ...
        metrics.uninstall()
    """
    with _lock:
        unsubscribe = _state.pop("unsubscribe", None)
        if unsubscribe is not None:
            unsubscribe()
        current: Metrics | None = _state.pop("metrics", None)
        if current is not None:
            current.stop_flusher()
            # its at-fork hook stays registered (there is no unregistering): a no-op then
        _state.pop("registry", None)


def track_breaker(breaker: _Breaker) -> None:
    """Report ``breaker``'s state in ``taskkit_circuit_state`` from every scrape of this process,
    even before it changes state (breakers that changed state are reported anyway).

    Example::

        pricing = CircuitBreaker(name="pricing")
        metrics.track_breaker(pricing)
    """
    with _lock:
        _state.setdefault("breakers", {})[breaker.name] = breaker


def track_budget(name: str, budget: _Budget) -> None:
    """Report ``budget.available`` as ``taskkit_retry_budget_tokens{budget=name}``: read at
    scrape in the serving process; in a prefork worker's pool processes, published on each
    retry (the serving process cannot read a pool process's bucket).

    Example::

        geocoder = RetryBudget(ratio=0.1)
        metrics.track_budget("geocoder", geocoder)
    """
    with _lock:
        _state.setdefault("budgets", {})[name] = budget
        current: Metrics | None = _state.get("metrics")
        if current is not None:
            current.budgets[name] = budget


# -- collectors read at scrape ----------------------------------------------------------------


class BreakerCollector(Collector):
    """``taskkit_circuit_state`` read at scrape: the breakers ``breakers()`` returns (default:
    those given to ``track_breaker``), and every other breaker this process saw change state.

    Example::

        registry.register(BreakerCollector(lambda: known_breakers(app)))
    """

    def __init__(self, breakers: Callable[[], dict[str, _Breaker]] | None = None) -> None:
        self._breakers = breakers

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "taskkit_circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            labels=["breaker"],
        )
        states: dict[str, str] = {}
        current = installed()
        if current is not None:
            states.update(current.seen_states)
        found = dict(_state.get("breakers", {}))
        if self._breakers is not None:
            try:
                found.update(self._breakers())
            except Exception:
                logger.warning("taskkit metrics: could not list the breakers", exc_info=True)
        for name, breaker in found.items():
            try:
                state = breaker.state
            except Exception:  # a shared breaker whose Redis does not answer
                continue
            states[name] = str(getattr(state, "value", state))
        for name in sorted(states):
            family.add_metric([name], CIRCUIT_STATE_VALUES.get(states[name], 0.0))
        yield family


class BudgetCollector(Collector):
    """``taskkit_retry_budget_tokens`` read at scrape from the budgets given to
    ``track_budget`` (in this process).

    Example::

        registry.register(BudgetCollector())
    """

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "taskkit_retry_budget_tokens",
            "Tokens (whole retries) left in a retry budget.",
            labels=["budget"],
        )
        for name, budget in sorted(dict(_state.get("budgets", {})).items()):
            try:
                family.add_metric([name], float(budget.available))
            except Exception:  # a shared budget whose Redis does not answer
                continue
        yield family


@dataclass(frozen=True)
class _Reading:
    dead_letters: dict[str, int]
    runs: dict[tuple[str, str], int]


class DatabaseCollector(Collector):
    """``taskkit_dead_letters{status}`` and ``taskkit_runs{status,stale}`` from the database,
    at most one reading per ``ttl`` seconds (two grouped ``COUNT`` queries). When the database
    does not answer, the last reading is served (none before the first success) and a warning
    is logged once per outage.

    Example::

        registry.register(DatabaseCollector("postgresql+psycopg://app@db/app"))
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        ttl: float = DB_CACHE_SECONDS,
        lease_ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.ttl = ttl
        self.lease_ttl = lease_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._reading: _Reading | None = None
        self._read_at = float("-inf")
        self._failing = False
        #: Database readings made (tests check the cache with it).
        self.queries = 0

    def collect(self) -> Iterator[Metric]:
        reading = self._current()
        dead = GaugeMetricFamily(
            "taskkit_dead_letters",
            "Dead letters in the database, by status (dead, replayed, discarded).",
            labels=["status"],
        )
        runs = GaugeMetricFamily(
            "taskkit_runs",
            "Training runs in the database, by status; stale: running with its lease "
            "heartbeat older than TASKKIT_LEASE_TTL.",
            labels=["status", "stale"],
        )
        if reading is not None:
            for status in sorted(set(reading.dead_letters) | {"dead"}):
                dead.add_metric([status], reading.dead_letters.get(status, 0))
            keys = set(reading.runs) | {("running", "true"), ("running", "false")}
            for status, stale in sorted(keys):
                runs.add_metric([status, stale], reading.runs.get((status, stale), 0))
        yield dead
        yield runs

    def _current(self) -> _Reading | None:
        with self._lock:
            now = self._clock()
            if now - self._read_at < self.ttl:
                return self._reading
            self._read_at = now
            try:
                self._reading = self._read()
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    logger.warning(
                        "taskkit metrics: could not read the database (%s); serving the last "
                        "reading",
                        type(exc).__name__,
                    )
                self._failing = True
            return self._reading

    def _read(self) -> _Reading:
        from sqlalchemy import func, select  # noqa: PLC0415

        from taskkit.config import get_settings  # noqa: PLC0415
        from taskkit.db.models import DeadLetter, ModelRun  # noqa: PLC0415
        from taskkit.db.session import session_scope  # noqa: PLC0415

        self.queries += 1
        lease_ttl = self.lease_ttl if self.lease_ttl is not None else get_settings().lease_ttl
        cutoff = datetime.now(UTC) - timedelta(seconds=lease_ttl)
        seen = func.coalesce(ModelRun.heartbeat_at, ModelRun.updated_at, ModelRun.started_at)
        with session_scope(self.url, readonly=True) as db:
            letters = db.execute(
                select(DeadLetter.status, func.count()).group_by(DeadLetter.status)
            ).all()
            by_status = db.execute(
                select(ModelRun.status, func.count()).group_by(ModelRun.status)
            ).all()
            stale = db.scalar(
                select(func.count())
                .select_from(ModelRun)
                .where(ModelRun.status == "running", seen < cutoff)
            )
        runs: dict[tuple[str, str], int] = {}
        for status, count in by_status:
            runs[(status, "false")] = int(count)
        stale_count = int(stale or 0)
        if stale_count:
            runs[("running", "true")] = stale_count
            runs[("running", "false")] = runs.get(("running", "false"), 0) - stale_count
        return _Reading({status: int(count) for status, count in letters}, runs)


# -- multiprocess mode -------------------------------------------------------------------------


def multiprocess_dir() -> Path | None:
    """The multiprocess directory in use (``PROMETHEUS_MULTIPROC_DIR``), or None.

    Example::

        metrics.multiprocess_dir()  # PosixPath('/srv/app/.taskkit/metrics') in a worker
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(path) if path else None


def ensure_multiprocess(path: Path) -> None:
    """Point prometheus_client at ``path`` for every metric created from now on in this
    process and its children (``PROMETHEUS_MULTIPROC_DIR``; prometheus_client chooses its value
    class when it is first imported, so one chosen before is replaced).

    Example::

        metrics.ensure_multiprocess(Path("/tmp/taskkit-metrics"))
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    if not getattr(_prometheus_values.ValueClass, "_multiprocess", False):
        _prometheus_values.ValueClass = _prometheus_values.MultiProcessValue()  # type: ignore[no-untyped-call]


def prepare_multiprocess_dir(path: Path) -> Path:
    """Create ``path``, delete what an earlier worker left there (its ``*.db`` files) and turn
    multiprocess mode on (``ensure_multiprocess``). A worker calls it before forking its pool.

    Example::

        metrics.prepare_multiprocess_dir(settings.home / "metrics")
    """
    path.mkdir(parents=True, exist_ok=True)
    for leftover in path.glob("*.db"):
        leftover.unlink(missing_ok=True)
    ensure_multiprocess(path)
    return path


def mark_dead(pid: int) -> None:
    """Forget the live gauges of the pool process ``pid`` (its counters stay counted).

    Example::

        metrics.mark_dead(os.getpid())   # in worker_process_shutdown
    """
    path = multiprocess_dir()
    if path is not None:
        mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


# -- exposition ---------------------------------------------------------------------------------


class _Merged(Collector):
    """Families of several collectors as one exposition: families of one name are merged and
    a sample already given by an earlier collector (same name and labels) is dropped."""

    def __init__(self, collectors: Iterable[Any]) -> None:
        self._collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        for collector in self._collectors:
            for family in collector.collect():
                target = merged.get(family.name)
                if target is None:
                    target = Metric(family.name, family.documentation, family.type, family.unit)
                    merged[family.name] = target
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if key not in seen:
                        seen.add(key)
                        target.samples.append(sample)
        yield from merged.values()


def render(
    *,
    multiprocess: Path | None = None,
    extra: Iterable[Any] = (),
) -> bytes:
    """The text exposition: this process's installed families, the multiprocess directory's
    files (``multiprocess``, default ``PROMETHEUS_MULTIPROC_DIR``) and the ``extra`` collectors
    (``DatabaseCollector``, ``BreakerCollector``...), merged by family name.

    Example::

        body = metrics.render(extra=[metrics.DatabaseCollector()])
        # b'# HELP taskkit_dead_letters ...\\ntaskkit_dead_letters{status="dead"} 3.0\\n...'
    """
    current = installed()
    if current is not None:
        current.flush()
    collectors: list[Any] = []
    path = multiprocess if multiprocess is not None else multiprocess_dir()
    if path is not None and path.is_dir():
        scratch = CollectorRegistry()
        collectors.append(MultiProcessCollector(scratch, path=str(path)))  # type: ignore[no-untyped-call]
    registry = _state.get("registry")
    if registry is not None and not (path is not None and _multiprocess_values()):
        collectors.append(registry)  # in multiprocess mode its values are the files above
    collectors.extend(extra)
    out = CollectorRegistry(auto_describe=False)
    out.register(_Merged(collectors))
    return prometheus_client.generate_latest(out)


def _multiprocess_values() -> bool:
    return bool(getattr(_prometheus_values.ValueClass, "_multiprocess", False))


def serve(
    port: int,
    *,
    addr: str = "0.0.0.0",
    extra: Iterable[Any] = (),
) -> tuple[Any, int]:
    """Answer ``GET /metrics`` (any path) on ``addr:port`` from a daemon thread with
    ``render(extra=extra)``; returns the server and the port bound (``port=0``: a free one).

    Example::

        server, port = metrics.serve(9108, extra=[metrics.DatabaseCollector()])
        ...
        server.shutdown()
    """
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: PLC0415

    collectors = list(extra)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                body, code, kind = render(extra=collectors), 200, CONTENT_TYPE
            except Exception:
                logger.exception("taskkit metrics: rendering /metrics failed")
                body, code, kind = b"metrics failed, see the worker log\n", 500, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # one line per scrape is noise

    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="taskkit-metrics", daemon=True)
    thread.start()
    return server, int(server.server_address[1])
