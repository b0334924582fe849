"""Copied from the seed (usage-examples.md, "Database Operations"); only import lines changed."""

from sqlalchemy.orm import Session
from taskkit.recovery import TransactionManager
from taskkit.db import db_retry, ensure_connection
from taskkit.db.models import ModelRun
from datetime import datetime

@ensure_connection
@db_retry(max_attempts=3, delay=0.5)
def create_model_run(
    db: Session,
    name: str,
    model_type: str,
    config: dict
) -> ModelRun:
    """Create model run with automatic rollback on error."""
    with TransactionManager(db) as tx:
        model_run = ModelRun(
            name=name,
            model_type=model_type,
            config=config,
            status="created",
            created_at=datetime.utcnow()
        )
        db.add(model_run)
        db.flush()  # Get ID without committing

        # Create related records
        from taskkit.db.models import TrainingProgress
        progress = TrainingProgress(
            model_run_id=model_run.id,
            status="initialized",
            progress_percentage=0.0
        )
        db.add(progress)

        # Transaction commits automatically on exit
        return model_run

from sqlalchemy.orm import Session
from taskkit.db import atomic_update
from taskkit.db.models import ModelRun

def increment_model_usage(db: Session, model_id: int) -> bool:
    """Increment usage count with concurrent update protection."""

    # Get current model
    model = db.query(ModelRun).filter_by(id=model_id).first()
    if not model:
        return False

    # Atomic update with retry on conflict
    success = atomic_update(
        db=db,
        model_class=ModelRun,
        record_id=model_id,
        updates={"usage_count": model.usage_count + 1},
        max_retries=5
    )

    return success

from sqlalchemy.orm import Session
from taskkit.db import safe_bulk_insert
from taskkit.db.models import Prediction
from typing import List, Dict

def save_predictions_batch(
    db: Session,
    predictions: List[Dict]
) -> tuple[int, List[tuple]]:
    """Save predictions in batch with error handling."""

    # Convert to model instances
    records = [
        {
            "model_run_id": pred["model_run_id"],
            "input_data": pred["input_data"],
            "prediction": pred["prediction"],
            "confidence": pred.get("confidence", 0.0)
        }
        for pred in predictions
    ]

    # Bulk insert with retry
    successful, failed = safe_bulk_insert(
        db=db,
        model_class=Prediction,
        records=records,
        batch_size=100
    )

    if failed:
        from logging import getLogger as get_logger
        logger = get_logger(__name__)
        logger.error(f"Failed to insert {len(failed)} predictions")
        for record, error in failed:
            logger.error(f"Record: {record}, Error: {error}")

    return len(successful), failed

from sqlalchemy.orm import Session
from taskkit.recovery import TransactionManager
from taskkit.db import with_savepoint
from taskkit.db.models import ModelRun
from taskkit.db.models import Dataset

def create_model_with_dataset(
    db: Session,
    model_data: dict,
    dataset_data: dict
) -> tuple[ModelRun, Dataset]:
    """Create model and dataset with partial rollback capability."""

    with TransactionManager(db) as tx:
        # Create model
        model = ModelRun(**model_data)
        db.add(model)
        db.flush()

        # Try to create dataset (may fail)
        @with_savepoint
        def create_dataset_with_savepoint(db: Session):
            dataset = Dataset(**dataset_data)
            db.add(dataset)
            db.flush()
            return dataset

        try:
            dataset = create_dataset_with_savepoint(db)
        except Exception as e:
            # Dataset creation failed, but model still saved
            from logging import getLogger as get_logger
            logger = get_logger(__name__)
            logger.warning(f"Dataset creation failed: {e}, continuing with model only")
            dataset = None

        # Transaction commits model (and dataset if successful)
        return model, dataset
