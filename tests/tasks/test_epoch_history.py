"""The run's epoch history (``training_epochs``), as the trainer's progress writes it: every
epoch logged since the last write lands in the transaction of the next one, a resumed run's
epoch overwrites its row, and a write that fails keeps its epochs for the next. On SQLite and
PostgreSQL; the end-to-end paths (a throttled fast run, a stop, a fork) are in
tests/api/test_train_api.py and tests/training/test_stop_fork.py."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from taskkit.db.models import ModelRun, TrainingEpoch, TrainingProgress
from taskkit.db.runs import read_epochs
from taskkit.db.session import session_scope
from taskkit.tasks._progress import EpochLog, ProgressReport, write_training_progress


def new_run(url: str) -> int:
    with session_scope(url) as db:
        run = ModelRun(name="history", model_type="sgd", config={"epochs": 4})
        db.add(run)
        db.flush()
        return run.id


def test_every_logged_epoch_is_written_with_the_progress_and_a_retrained_one_overwritten(
    db_url: str, engine: Engine
) -> None:
    run_id = new_run(db_url)
    log = EpochLog()
    log.add(1, {"loss": 0.9})
    log.add(2, {"loss": 0.8})  # epoch 1's report was throttled: it goes with epoch 2's

    write_training_progress(run_id, ProgressReport(2, 4), database_url=db_url, epochs=log)

    assert read_epochs(run_id, db_url) == [(1, {"loss": 0.9}), (2, {"loss": 0.8})]
    assert len(log) == 0
    with session_scope(db_url, readonly=True) as db:
        progress = db.scalars(select(TrainingProgress).filter_by(model_run_id=run_id)).one()
        assert progress.current_epoch == 2

    # A resumed run trains epoch 2 again (from the checkpoint of epoch 1), then epoch 3.
    log.add(2, {"loss": 0.7})
    log.add(3, {"loss": 0.6})
    write_training_progress(run_id, None, database_url=db_url, epochs=log)

    assert read_epochs(run_id, db_url) == [
        (1, {"loss": 0.9}),
        (2, {"loss": 0.7}),
        (3, {"loss": 0.6}),
    ]
    assert read_epochs(run_id, db_url, after=1, limit=1) == [(2, {"loss": 0.7})]
    assert read_epochs(run_id, db_url, limit=2, latest=True) == [
        (2, {"loss": 0.7}),
        (3, {"loss": 0.6}),
    ]
    with session_scope(db_url, readonly=True) as db:
        rows = db.scalars(select(TrainingEpoch).filter_by(model_run_id=run_id)).all()
        assert len(rows) == 3


def test_a_write_that_fails_keeps_its_epochs_for_the_next(db_url: str, engine: Engine) -> None:
    log = EpochLog()
    log.add(1, {"loss": 0.9})

    with pytest.raises(SQLAlchemyError):  # no such run: the foreign key refuses the row
        write_training_progress(999_999, ProgressReport(1, 4), database_url=db_url, epochs=log)

    assert len(log) == 1
    run_id = new_run(db_url)
    write_training_progress(run_id, ProgressReport(1, 4), database_url=db_url, epochs=log)
    assert read_epochs(run_id, db_url) == [(1, {"loss": 0.9})]
    assert len(log) == 0


def test_deleting_a_run_deletes_its_history(db_url: str, engine: Engine) -> None:
    run_id = new_run(db_url)
    log = EpochLog()
    log.add(1, {"loss": 0.9})
    write_training_progress(run_id, ProgressReport(1, 4), database_url=db_url, epochs=log)

    with session_scope(db_url) as db:
        db.delete(db.get(ModelRun, run_id))

    assert read_epochs(run_id, db_url) == []
