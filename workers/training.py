"""The example training job: an incremental scikit-learn classifier that survives worker loss.

``train_model(model_run_id, config)`` trains an ``SGDClassifier`` with ``partial_fit``, one
shuffled pass over the training rows per epoch, on a pandas dataset: the small CSV shipped in
``workers/data/`` (or ``config["dataset"]``, with ``config["backup_dataset"]`` as the fallback),
or a generated one (``config["generate"] = {"n_samples": ..., "n_features": ...}``). It is a
``TrainingTask``: it checkpoints every epoch, resumes after the last checkpoint with the same
random state, and ends bit-identical to an uninterrupted run of the same config.

Config keys (all optional): ``epochs`` (20), ``seed`` (0), ``batch_size`` (256), ``alpha``
(1e-4), ``checkpoint_every`` (the task's, 1), ``dataset``, ``backup_dataset``, ``generate``,
and ``epoch_pause``: seconds each epoch waits after training, which stands in for a heavier
model so that the demo's epochs are long enough to watch and interrupt.

Example::

    from taskkit.tasks import submit_run
    from workers.training import train_model

    run_id, task_id = submit_run(train_model, {"epochs": 30, "seed": 7}, name="demo")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.datasets import make_classification
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import log_loss

from taskkit.recovery import retry, safe_execute
from taskkit.tasks import TrainingTask
from workers.app import app

#: The dataset shipped with the example (regenerate with ``write_example_dataset``).
EXAMPLE_DATASET = Path(__file__).parent / "data" / "classification.csv"
TARGET = "target"


@retry(max_attempts=3, delay=2.0, exceptions=(IOError, OSError, pd.errors.ParserError))
def load_dataset(file_path: str) -> pd.DataFrame:
    """Load dataset with retry."""
    return pd.read_csv(file_path)


def load_dataset_with_fallback(primary_path: str, backup_path: str | None = None) -> pd.DataFrame:
    """Load dataset with fallback to backup (the seed's loader)."""
    df = safe_execute(load_dataset, primary_path, default=None)
    if df is not None:
        return df
    if backup_path:
        df = safe_execute(load_dataset, backup_path, default=None)
        if df is not None:
            return df
    raise FileNotFoundError(f"Could not load dataset from {primary_path} or {backup_path}")


def make_dataset(n_samples: int = 3000, n_features: int = 10, seed: int = 42) -> pd.DataFrame:
    """A binary classification dataset as a DataFrame (``f0..fN`` and ``target``)."""
    X, y = make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=max(2, n_features // 2),
        n_redundant=min(2, n_features // 4),
        flip_y=0.05,
        random_state=seed,
    )
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(n_features)])
    frame[TARGET] = y
    return frame


def write_example_dataset(path: Path = EXAMPLE_DATASET) -> None:
    """Regenerate the shipped CSV (6 decimals keeps it small and exact to read back)."""
    make_dataset().to_csv(path, index=False, float_format="%.6f")


def load_training_data(config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` for a run's config: generated, or read from CSV with the fallback."""
    generate = config.get("generate")
    if generate:
        frame = make_dataset(**generate)
    else:
        frame = load_dataset_with_fallback(
            str(config.get("dataset", EXAMPLE_DATASET)),
            str(config.get("backup_dataset", EXAMPLE_DATASET)),
        )
    if TARGET not in frame.columns:
        raise ValueError(f"dataset has no {TARGET!r} column (columns: {list(frame.columns)})")
    X = frame.drop(columns=[TARGET]).to_numpy(dtype=np.float64)
    y = frame[TARGET].to_numpy()
    return X, y


def run_training(
    task: TrainingTask,
    config: dict[str, Any],
    *,
    on_epoch: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """The body of ``train_model`` (tests wrap it with ``on_epoch`` to count epochs run)."""
    X, y = load_training_data(config)
    split = int(len(X) * 0.8)
    X_train, y_train, X_val, y_val = X[:split], y[:split], X[split:], y[split:]
    classes = np.unique(y)
    seed = int(config.get("seed", 0))
    batch_size = int(config.get("batch_size", 256))
    pause = float(config.get("epoch_pause", 0.0))
    with task.training(
        total_epochs=int(config.get("epochs", 20)),
        checkpoint_every=config.get("checkpoint_every"),
    ) as run:
        order_rng = run.rng("shuffle", seed)
        alpha = float(config.get("alpha", 1e-4))
        model = run.restore()
        if model is None:
            model = SGDClassifier(loss="log_loss", alpha=alpha, random_state=seed)
        else:
            model.set_params(alpha=alpha)  # a fork (taskkit runs fork --set alpha=...) changes it
        for epoch in run.epochs():
            if on_epoch is not None:
                on_epoch(epoch)
            order = order_rng.permutation(split)
            for start in range(0, split, batch_size):
                rows = order[start : start + batch_size]
                model.partial_fit(X_train[rows], y_train[rows], classes=classes)
            if pause:
                time.sleep(pause)
            metrics = {
                "score": float(model.score(X_val, y_val)),
                "loss": float(log_loss(y_val, model.predict_proba(X_val), labels=classes)),
            }
            run.report(epoch, metrics, model)
        return run.complete(model)


@app.task(base=TrainingTask, bind=True, shared=False, name="workers.training.train_model")
def train_model(self: TrainingTask, model_run_id: int, config: dict[str, Any]) -> dict[str, Any]:
    """Train run ``model_run_id`` with ``config``; resumes from its checkpoint after a crash."""
    return run_training(self, config)
