"""Cost as work grows: dead letters 10k -> 1M, runs 1k -> 100k, items per batch 10k -> 1M.

``python -m benchmarks.bench_scale`` runs this section alone, rewrites its part of
docs/benchmarks.md and draws docs/img/scale-*.png.

- Dead letters and runs: the rows are written in bulk (COPY on PostgreSQL, executemany on
  SQLite), analyzed, then the same calls the commands make are timed in process: ``dlq list``
  (``LetterQuery.letters`` for the first page of 100 and ``count`` for "N more not shown"),
  ``dlq depth`` (``DeadLetterStore.depth``), a replay of one batch (``letters_for_replay`` of a
  batch and ``mark_replayed`` in its transaction, committed; no broker send, which does not grow
  with the table), ``runs list`` (``list_runs``, 20 runs).
- Items per batch: ``submit_batch`` of N items (chunks of 1,000, an item function that does
  nothing, the ledger on) from a process of its own to one solo ``celery worker``; wall time
  from the submit to the merged summary, the worker's peak RSS (VmHWM), and the submitting
  process's peak RSS.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks._harness import commit, machine, replace_section, say, table
from benchmarks.bench_checkpoint import postgres_schema
from taskkit.db.migrate import upgrade
from taskkit.db.session import create_engine_for, dispose_engines
from taskkit.tasks import BatchTask, create_app, submit_batch

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "img"


def _sizes(variable: str, default: list[int]) -> list[int]:
    """Sizes, or those of ``variable`` (comma-separated) for a quick trial run."""
    given = os.environ.get(variable)
    return [int(n) for n in given.split(",")] if given else default


LETTERS = _sizes("TASKKIT_BENCH_SCALE_LETTERS", [10_000, 100_000, 1_000_000])
RUNS = _sizes("TASKKIT_BENCH_SCALE_RUNS", [1_000, 10_000, 100_000])
ITEMS = _sizes("TASKKIT_BENCH_SCALE_ITEMS", [10_000, 100_000, 1_000_000])
#: Timed repetitions of each query at each size (median reported), after one warm-up.
REPEAT = 7
BATCH_SIZE = 100
TASKS = 12
START = datetime(2026, 1, 1, tzinfo=UTC)
TRACEBACK = (
    "Traceback (most recent call last):\n"
    + "".join(
        f'  File "/srv/app/jobs/step_{n}.py", line {10 * n + 7}, in step_{n}\n'
        f"    result = step_{n + 1}(item, context)\n"
        for n in range(8)
    )
    + "KeyError: 'price'\n"
)
LETTER_COLUMNS = (
    "task_name, batch_id, item_key, task_id, payload, error_type, error_message, attempts, "
    "first_failed_at, last_failed_at, status, replays, traceback"
)
RUN_COLUMNS = "uid, name, model_type, config, status, usage_count, created_at, updated_at, version"
RUN_STATUSES = ("completed", "completed", "completed", "failed", "running", "queued")


# -- rows ----------------------------------------------------------------------------------------


def letter_rows(count: int) -> Iterator[tuple[Any, ...]]:
    """Batches of 100 failed items over 12 tasks, one letter in ten already replayed, each with
    a ~700-byte traceback as a real failure leaves."""
    for n in range(count):
        batch = n // BATCH_SIZE
        moment = START + timedelta(seconds=n)
        yield (
            f"jobs.task_{batch % TASKS}", f"batch-{batch:07d}", f"item-{n:08d}", f"task-{n}",
            json.dumps({"n": n}), "KeyError" if n % 3 else "ValueError", f"missing key {n}", 3,
            moment, moment, "replayed" if n % 10 == 0 else "dead", 1 if n % 10 == 0 else 0,
            TRACEBACK,
        )  # fmt: skip


def run_rows(count: int) -> Iterator[tuple[Any, ...]]:
    for n in range(count):
        moment = START + timedelta(seconds=n)
        status = RUN_STATUSES[n % len(RUN_STATUSES)]
        yield (f"{n:032x}", f"run-{n % 50}", "sgd", "{}", status, 0, moment, moment, 1)


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def fill(url: str, table_name: str, columns: str, rows: Iterator[tuple[Any, ...]]) -> None:
    """Empty ``table_name`` and write ``rows``: COPY (frozen, so its pages are all-visible at
    once) on PostgreSQL, executemany on SQLite; then fresh statistics."""
    engine = create_engine_for(url)
    raw = engine.raw_connection()
    try:
        cursor: Any
        if engine.dialect.name == "postgresql":
            cursor = raw.driver_connection.cursor()  # type: ignore[union-attr]
            cursor.execute(f"TRUNCATE {table_name} CASCADE")
            with cursor.copy(f"COPY {table_name} ({columns}) FROM STDIN WITH (FREEZE)") as copy:
                for row in rows:
                    copy.write_row(row)
            raw.commit()
            raw.driver_connection.autocommit = True  # type: ignore[union-attr]
            cursor.execute(f"VACUUM ANALYZE {table_name}")
            raw.driver_connection.autocommit = False  # type: ignore[union-attr]
        else:
            names = [c.strip() for c in columns.split(",")]
            cursor = raw.cursor()
            cursor.execute(f"DELETE FROM {table_name}")
            cursor.executemany(
                f"INSERT INTO {table_name} ({', '.join(names)}) "
                f"VALUES ({', '.join('?' for _ in names)})",
                (tuple(_sqlite_value(v) for v in row) for row in rows),
            )
            raw.commit()
            cursor.execute("ANALYZE")
            raw.commit()
    finally:
        raw.close()
        engine.dispose()


@contextmanager
def databases() -> Iterator[list[tuple[str, str]]]:
    """``[(label, url)]``: a new SQLite file (the embedded default) and a new PostgreSQL schema,
    both migrated to head."""
    with tempfile.TemporaryDirectory() as home, postgres_schema("taskkit_bench_scale") as pg:
        sqlite = f"sqlite:///{home}/taskkit.db"
        upgrade(sqlite)
        yield [("SQLite", sqlite), ("PostgreSQL", pg)]
        dispose_engines()


def median_ms(fn: Callable[[], object]) -> float:
    fn()
    times = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


# -- dead letters and runs -------------------------------------------------------------------


def letters_measure(url: str, count: int) -> dict[str, float]:
    from taskkit.deadletter import DeadLetterStore, LetterQuery, SentReplay

    fill(url, "dead_letters", LETTER_COLUMNS, letter_rows(count))
    store = DeadLetterStore(url)
    query = LetterQuery(statuses=("dead",))
    batches = iter(range(count // BATCH_SIZE // 2, count // BATCH_SIZE))

    def page() -> None:
        letters = query.letters(store, limit=100)
        assert len(letters) == 100

    def counted() -> None:
        assert query.count(store) > 0

    def replay_one_batch() -> None:
        batch = f"batch-{next(batches):07d}"
        with store.letters_for_replay(batch_id=batch) as (session, letters):
            assert len(letters) == BATCH_SIZE - BATCH_SIZE // 10, (batch, len(letters))
            ids = [letter.id for letter in letters]
            store.mark_replayed([SentReplay("jobs.replayed", "t", batch, ids)], session)

    result = {
        "list page": median_ms(page),
        "list count": median_ms(counted),
        "depth": median_ms(store.depth),
        "replay one batch": median_ms(replay_one_batch),
    }
    result["dlq list"] = result["list page"] + result["list count"]
    store.engine.dispose()
    return result


def runs_measure(url: str, count: int) -> float:
    from taskkit.db.runs import list_runs

    fill(url, "model_runs", RUN_COLUMNS, run_rows(count))
    return median_ms(lambda: list_runs(url, limit=20))


# -- items per batch -------------------------------------------------------------------------

scale_app = create_app("benchscale")


@scale_app.task(base=BatchTask, bind=True, name="benchscale.nothing")
def nothing(self: BatchTask, item: int) -> None:
    return None


def _peak_rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def submit_main(count: int) -> None:
    """``python -m benchmarks.bench_scale submit N``: submit N items from a generator (streamed:
    ``submit_batch`` reads one chunk at a time), wait for the summary, print one JSON line
    (seconds, peak RSS before and after the submit)."""
    before = _peak_rss_mb()
    start = time.perf_counter()
    submission = submit_batch(nothing, (i for i in range(count)), chunk_size=1000)
    sent = time.perf_counter() - start
    after_submit = _peak_rss_mb()
    summary = submission.get(timeout=1800)
    elapsed = time.perf_counter() - start
    assert summary["successful"] == count, {k: v for k, v in summary.items() if k != "results"}
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "submit_seconds": sent,
                "rss_before": before,
                "rss_submit": after_submit,
                "rss_peak": _peak_rss_mb(),
                "chunks": submission_chunks(count),
            }
        )
    )


def submission_chunks(count: int) -> int:
    return -(-count // 1000)


def items_measure(database: str | None, count: int) -> dict[str, float]:
    """One worker and one submitter, both new, on an embedded broker in a new TASKKIT_HOME;
    the database: the embedded default (None) or ``database``."""
    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKKIT_")}
        env.update(
            TASKKIT_HOME=home,
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        if database is not None:
            env["TASKKIT_DATABASE_URL"] = database
        else:
            upgrade(f"sqlite:///{home}/taskkit.db")
        command = [
            sys.executable, "-m", "celery", "-A", "benchmarks.bench_scale:scale_app", "worker",
            "--pool=solo", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"scale-{uuid.uuid4().hex[:6]}@bench", "-l", "info",
        ]  # fmt: skip
        with tempfile.TemporaryFile() as log:
            worker = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 120
                while b" ready." not in (log.seek(0), log.read())[1]:
                    if worker.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError("the worker did not start:\n" + log.read().decode())
                    time.sleep(0.1)
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.bench_scale", "submit", str(count)],
                    cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False,
                )  # fmt: skip
                if done.returncode != 0:
                    log.seek(0)
                    raise RuntimeError(
                        f"submit of {count} failed:\n{done.stderr[-3000:]}\nworker:\n"
                        + log.read().decode(errors="replace")[-3000:]
                    )
                result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
                result["worker_rss"] = _peak_rss_mb(worker.pid)
            finally:
                worker.terminate()
                try:
                    worker.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait(timeout=5)
                with suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGKILL)
    result["us_per_item"] = result["seconds"] / count * 1e6
    return result


LETTER_HEADERS = [
    "database", "letters", "list page, ms", "list count, ms", "dlq list, ms", "dlq depth, ms",
    "replay one batch, ms",
]  # fmt: skip
ITEM_HEADERS = [
    "database", "items", "seconds", "µs per item (vs smallest)",
    "worker peak RSS, MB (vs smallest)", "submitter peak RSS, MB: before -> after submit",
    "submit, s", "messages",
]  # fmt: skip


# -- plots and section -----------------------------------------------------------------------


def _plot(
    name: str,
    title: str,
    xlabel: str,
    panels: list[tuple[str, dict[str, list[tuple[int, float]]]]],
    limit: float | None = None,
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels, strict=True):
        for label, points in curves.items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        if limit is not None and "ms" in ylabel:
            ax.axhline(limit, color="grey", linestyle="--", linewidth=1, label="100 ms target")
            ax.set_ylim(0, max(ax.get_ylim()[1], limit * 1.1))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    IMAGES.mkdir(parents=True, exist_ok=True)
    figure.savefig(IMAGES / name, dpi=100)
    plt.close(figure)
    return f"![{title}](img/{name})"


def _n(value: int) -> str:
    return f"{value:,}"


ITEMS_HEADING = "### Items per batch: 10k to 1M"
ITEMS_IMAGE = "(img/scale-batch-items.png)"


def items_rows(items: dict[str, dict[int, dict[str, float]]]) -> list[list[str]]:
    rows = []
    for label, sizes in items.items():
        first = sizes[min(sizes)]
        for count, m in sizes.items():
            growth = m["rss_submit"] - m["rss_before"]
            rows.append(
                [
                    "embedded default (SQLite, taskkit+sqlite broker)"
                    if label == "SQLite"
                    else "PostgreSQL (taskkit+sqlite broker)",
                    _n(count),
                    f"{m['seconds']:.1f}",
                    f"{m['us_per_item']:.1f} ({m['us_per_item'] / first['us_per_item']:.2f}x)",
                    f"{m['worker_rss']:.0f} ({m['worker_rss'] / first['worker_rss']:.2f}x)",
                    f"{m['rss_before']:.0f} -> {m['rss_submit']:.0f} (+{growth:.0f})",
                    f"{m['submit_seconds']:.1f}",
                    _n(int(m["chunks"])),
                ]
            )
    return rows


def items_section(items: dict[str, dict[int, dict[str, float]]], run: str = "") -> str:
    """The "Items per batch" subsection (and its plot): ``run`` says how it was run when it
    ran alone (``python -m benchmarks.bench_scale items``)."""
    items_png = _plot(
        "scale-batch-items.png",
        "Items per batch: cost per item and memory",
        "items in the batch",
        [
            (
                "µs per item (wall, submit to summary)",
                {
                    label: [(c, m["us_per_item"]) for c, m in s.items()]
                    for label, s in items.items()
                },
            ),
            (
                "worker peak RSS, MB",
                {label: [(c, m["worker_rss"]) for c, m in s.items()] for label, s in items.items()},
            ),
            (
                "submitting process peak RSS, MB",
                {label: [(c, m["rss_submit"]) for c, m in s.items()] for label, s in items.items()},
            ),
        ],
    )
    return f"""{ITEMS_HEADING}

{run}`submit_batch` of N integers from a generator (chunks of 1,000, one message per chunk;
streamed: the submitter reads, checks, sends and drops one chunk at a time) from a process of
its own to one solo `celery worker` (one process: its peak RSS is the worker's), the item
function doing nothing and the ledger on: the ledger's and the broker's cost per item, with
nothing to hide it. Both on an embedded broker (`taskkit+sqlite`) in a new `TASKKIT_HOME`; the
database is the embedded default (SQLite) or PostgreSQL. Time is from the submit to the merged
summary; "submit, s" is the time `submit_batch` took to send every chunk.

{table(ITEM_HEADERS, items_rows(items))}

{textwrap.fill(items_reading(items), 96)}

{items_png}"""


def items_reading(items: dict[str, dict[int, dict[str, float]]]) -> str:
    """What the items curve says, from smallest to largest batch, per database."""
    parts = []
    for label, sizes in items.items():
        small, large = sizes[min(sizes)], sizes[max(sizes)]
        parts.append(
            f"{label} {large['us_per_item'] / small['us_per_item']:.2f}x per item, worker "
            f"{large['worker_rss'] / small['worker_rss']:.2f}x, submitter "
            f"+{small['rss_submit'] - small['rss_before']:.0f} -> "
            f"+{large['rss_submit'] - large['rss_before']:.0f} MB"
        )
    return (
        f"From {_n(min(next(iter(items.values()))))} to {_n(max(next(iter(items.values()))))} "
        f"items: {'; '.join(parts)} (the target: within 1.5x). What the submitting process "
        "gains with N is the whole-batch key check, one 64-bit hash per key (8 bytes per item "
        "in sorted arrays), not the items; before streaming (commit e9390f9) it went from 100 "
        "to 263 MB at 1M integers, every item, key and chunk signature held before the first "
        "send."
    )


def measure_items() -> dict[str, dict[int, dict[str, float]]]:
    items: dict[str, dict[int, dict[str, float]]] = {}
    with databases() as dbs:
        for label, url in dbs:
            database = None if label == "SQLite" else url
            items[label] = {}
            for count in ITEMS:
                say(f"items per batch: {label}, {count:,}")
                items[label][count] = items_measure(database, count)
    return items


def run_items() -> None:
    """``python -m benchmarks.bench_scale items``: the items curve alone, written in place of
    its subsection of docs/benchmarks.md (the rest of the section is left as it is)."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    items = measure_items()
    seconds = time.perf_counter() - started
    run = textwrap.fill(
        f"`python -m benchmarks.bench_scale items` (this subsection alone) ran in {seconds:.0f} s "
        f"on {machine()}, commit {commit()}, load average {load:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end (the machine shared with other work).",
        96,
    )
    run += "\n\n"
    section = items_section(items, run)
    output = ROOT / "docs" / "benchmarks.md"
    text = output.read_text()
    if ITEMS_HEADING not in text:
        raise SystemExit(f"no {ITEMS_HEADING!r} in {output}: run the whole section first")
    before, rest = text.split(ITEMS_HEADING, 1)
    image = rest.index(ITEMS_IMAGE) + len(ITEMS_IMAGE)
    rest = rest[image:]
    # The section's reading, written after its last full run, keeps its other bullets.
    bullet = "\n- Items per batch:"
    if bullet in rest.split("\n## ", 1)[0]:
        head, tail = rest.split(bullet, 1)
        ends = [i for i in (tail.find("\n- "), tail.find("\n\n"), tail.find("\n## ")) if i >= 0]
        text = (
            "- Items per batch: re-measured alone since, by `python -m benchmarks.bench_scale "
            "items`; its reading is in its subsection above."
        )
        rest = (
            head
            + "\n"
            + textwrap.fill(text, 96, subsequent_indent="  ")
            + tail[min(ends) if ends else len(tail) :]
        )
    output.write_text(before + section + rest)
    say(f"wrote the items subsection of {output}")


def run() -> str:
    letters: dict[str, dict[int, dict[str, float]]] = {}
    runs: dict[str, dict[int, float]] = {}
    started = time.perf_counter()
    with databases() as dbs:
        for label, url in dbs:
            letters[label] = {}
            for count in LETTERS:
                say(f"dead letters: {label}, {count:,}")
                letters[label][count] = letters_measure(url, count)
            fill(url, "dead_letters", LETTER_COLUMNS, iter(()))
            runs[label] = {}
            for count in RUNS:
                say(f"runs: {label}, {count:,}")
                runs[label][count] = runs_measure(url, count)
            # a worker starting on a database looks at every run for an orphan to resume
            fill(url, "model_runs", RUN_COLUMNS, iter(()))
    items = measure_items()
    seconds = time.perf_counter() - started

    letter_rows_ = []
    for label, sizes in letters.items():
        for count, m in sizes.items():
            letter_rows_.append(
                [label, _n(count)]
                + [f"{m[k]:.1f}" for k in ("list page", "list count", "dlq list", "depth")]
                + [f"{m['replay one batch']:.1f}"]
            )
    run_rows_ = [
        [label, _n(count), f"{ms:.2f}"]
        for label, sizes in runs.items()
        for count, ms in sizes.items()
    ]
    letters_png = _plot(
        "scale-dead-letters.png",
        "Dead letters: latency as the table grows",
        "letters in the table",
        [
            (
                f"{label}, ms (median)",
                {
                    what: [(c, m[what]) for c, m in sizes.items()]
                    for what in ("dlq list", "depth", "replay one batch")
                },
            )
            for label, sizes in letters.items()
        ],
        limit=100,
    )
    runs_png = _plot(
        "scale-runs.png",
        "runs list, first page (20 runs)",
        "runs in the table",
        [("ms (median)", {label: list(sizes.items()) for label, sizes in runs.items()})],
        limit=100,
    )
    return f"""## Cost as work grows

`python -m benchmarks.bench_scale` (part of `make bench`); this section ran alone in
{seconds:.0f} s on {machine()}, commit {commit()}. The plots are drawn by the same run into
docs/img/.

### Dead letters: 10k to 1M

Letters written in bulk (COPY on PostgreSQL, one executemany on SQLite), analyzed: batches of
{BATCH_SIZE} items over {TASKS} tasks, one letter in ten already replayed, each with a ~700-byte
traceback. Then, in process, the calls the commands make, median of {REPEAT} after a warm-up:
`dlq list` is its first page of 100 (`LetterQuery.letters`) plus the count behind "N more not
shown" (`LetterQuery.count`); `dlq depth` is `DeadLetterStore.depth`; a replay of one batch is
`letters_for_replay(batch_id=...)` and `mark_replayed` of its {BATCH_SIZE - BATCH_SIZE // 10}
waiting letters, committed (the broker send is left out: it does not grow with the table).
The plans (indexes of migration 0009, no sequential scan) are proved by `EXPLAIN` in
tests/scale/test_plans.py, not by these times.

{table(LETTER_HEADERS, letter_rows_)}

{letters_png}

### Runs: `runs list` first page

`list_runs(limit=20)` (what `taskkit runs list` and `GET /runs` call), newest id first.

{table(["database", "runs", "first page, ms"], run_rows_)}

{runs_png}

{items_section(items)}
"""


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "submit":
        submit_main(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "items":
        run_items()
    else:
        replace_section(run())
        say("wrote the 'Cost as work grows' section of docs/benchmarks.md")
