"""``make demo``: a training run survives the SIGKILL of its worker, on the embedded defaults.

What it does, with nothing but this checkout (SQLite database, SQLite broker, files):

1. migrates a fresh database under ``.taskkit/demo`` and starts a worker (``celery -A
   workers.app worker``);
2. submits a training run (``workers.training.train_model``) and shows its progress live;
3. kills the whole worker with SIGKILL in the middle of the run;
4. starts a new worker, which finds the orphaned run and resumes it from its last checkpoint
   (at the next epoch, with the saved random state) until it completes;
5. trains the same config again, uninterrupted, in this process, and says whether the two final
   models are bit-identical (``np.array_equal`` on the coefficients). Exit code 0 when they are.

Usage: ``python -m workers.demo [--epochs N] [--kill-at EPOCH] [--pause SECONDS]``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from celery.result import AsyncResult
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from taskkit.db.migrate import upgrade
from taskkit.db.models import ModelRun, TrainingProgress
from taskkit.db.session import session_scope
from taskkit.tasks import load_model, submit_run

console = Console(highlight=False)

DEMO_HOME = Path(".taskkit") / "demo"


def _prepare_home(home: Path) -> None:
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    os.environ["TASKKIT_HOME"] = str(home.absolute())
    for name in ("TASKKIT_DATABASE_URL", "TASKKIT_BROKER_URL", "TASKKIT_RESULT_BACKEND"):
        os.environ.pop(name, None)
    os.environ.pop("TASKKIT_CHECKPOINT_DIR", None)
    # Checkpoints are signed (HMAC) with a key of this demo; its workers inherit it.
    os.environ.setdefault("TASKKIT_SECRET_KEY", secrets.token_hex(16))
    os.environ["TASKKIT_PROGRESS_INTERVAL"] = "0.2"  # a live bar, one row write per epoch


class Worker:
    """A ``celery -A workers.app worker`` subprocess in its own process group."""

    def __init__(self, name: str, home: Path) -> None:
        self.name = name
        self.log = open(home / f"worker-{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.app",
                "worker",
                "--concurrency=1",
                "--loglevel=INFO",
                f"--hostname={name}@%h",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes: nothing gets to clean up."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # warm shutdown: the worker stops its pool itself
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def _workers(module: str) -> Any:
    """``workers.*`` builds its app from the settings when imported: only after the demo's
    environment is in place."""
    return importlib.import_module(f"workers.{module}")


def _snapshot(run_id: int) -> tuple[str, int, int, dict[str, Any]]:
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        progress = db.query(TrainingProgress).filter_by(model_run_id=run_id).one_or_none()
        status = run.status if run is not None else "missing"
        if progress is None:
            return status, 0, 0, {}
        return status, progress.current_epoch, progress.total_epochs or 0, dict(progress.metrics)


def _follow(run_id: int, epochs: int, until: Any, label: str) -> tuple[str, int]:
    """Show the run's progress live until ``until(status, epoch)``; returns the last seen."""
    status, epoch = "queued", 0
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.completed:>3.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        row = bar.add_task(label, total=epochs, info="")
        while True:
            try:
                status, epoch, _, metrics = _snapshot(run_id)
            except Exception as exc:  # SQLite busy for a moment: keep watching
                metrics = {"note": str(exc)[:40]}
            score = metrics.get("score")
            info = f"{status:<9}" + (f" score {score:.4f}" if isinstance(score, float) else "")
            bar.update(row, completed=epoch, info=info)
            if until(status, epoch):
                return status, epoch
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--kill-at", type=int, default=8, help="SIGKILL after this many epochs")
    parser.add_argument("--pause", type=float, default=0.4, help="seconds added to each epoch")
    parser.add_argument("--home", type=Path, default=DEMO_HOME)
    args = parser.parse_args(argv)
    if not 0 < args.kill_at < args.epochs:
        parser.error("--kill-at must be between 1 and --epochs - 1")

    _prepare_home(args.home)
    train_model = _workers("training").train_model

    console.rule("[bold]taskkit demo: a training run that survives SIGKILL")
    console.print(f"embedded defaults: SQLite database, SQLite broker, files in {args.home}/")
    upgrade()
    config = {"epochs": args.epochs, "seed": 7, "epoch_pause": args.pause}
    workers: list[Worker] = []
    try:
        first = Worker("first", args.home)
        workers.append(first)
        run_id, task_id = submit_run(train_model, config, name="demo")
        console.print(f"submitted run [bold]{run_id}[/] (task {task_id}); config {config}")
        _, epoch = _follow(
            run_id, args.epochs, lambda s, e: e >= args.kill_at or s == "failed", "first worker"
        )
        first.kill()
        console.print(
            f"[bold red]killed the worker with SIGKILL[/] after epoch {epoch} "
            f"(pid {first.process.pid} and its pool process)"
        )
        console.print("starting a new worker: it finds the orphaned run and resumes it")
        second = Worker("second", args.home)
        workers.append(second)
        status, _ = _follow(
            run_id,
            args.epochs,
            lambda s, e: s in ("completed", "failed"),
            "new worker",
        )
        if status != "completed":
            console.print(f"[bold red]the run ended {status}[/]; see {args.home}/worker-*.log")
            return 1
        resumed = _resumed_from(run_id)
        console.print(
            f"run {run_id} completed: the new worker resumed it from its checkpoint at epoch "
            f"{resumed if not isinstance(resumed, int) else resumed + 1} (epochs before it were "
            "not trained again)"
        )

        console.print("training the same config again, uninterrupted, in this process...")
        reference_id = _train_uninterrupted(config)
        same = _same_model(load_model(run_id), load_model(reference_id))
        verdict = "[bold green]YES[/]" if same else "[bold red]NO[/]"
        console.print(
            f"final model of the killed-and-resumed run is bit-identical to an uninterrupted "
            f"run: {verdict}"
        )
        return 0 if same else 1
    finally:
        for worker in workers:
            worker.stop()


def _resumed_from(run_id: int) -> object:
    app = _workers("app").app
    with session_scope() as db:
        run = db.get(ModelRun, run_id)
        task_id = run.task_id if run is not None else None
    try:
        result = AsyncResult(task_id, app=app).get(timeout=30)
    except Exception as exc:
        return f"? ({exc})"
    return result.get("resumed_from") if isinstance(result, dict) else "?"


def _train_uninterrupted(config: dict[str, Any]) -> int:
    train_model = _workers("training").train_model
    reference = {**config, "epoch_pause": 0.0}  # the pause only sleeps; the model is the same
    with session_scope() as db:
        run = ModelRun(name="demo-reference", model_type="sgd", config=reference)
        db.add(run)
        db.flush()
        run_id = run.id
    train_model(run_id, reference)
    return run_id


def _same_model(a: Any, b: Any) -> bool:
    return bool(np.array_equal(a.coef_, b.coef_) and np.array_equal(a.intercept_, b.intercept_))


if __name__ == "__main__":
    raise SystemExit(main())
