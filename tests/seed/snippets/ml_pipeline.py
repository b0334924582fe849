"""Copied from the seed (usage-examples.md, "ML Pipeline Operations"); only import lines changed."""

from taskkit.recovery import retry, safe_execute
import pandas as pd
from typing import Optional

@retry(max_attempts=3, delay=2.0, exceptions=(IOError, OSError, pd.errors.ParserError))
def load_dataset(file_path: str) -> pd.DataFrame:
    """Load dataset with retry."""
    return pd.read_csv(file_path)

def load_dataset_with_fallback(
    primary_path: str,
    backup_path: Optional[str] = None
) -> pd.DataFrame:
    """Load dataset with fallback to backup."""

    # Try primary
    df = safe_execute(
        load_dataset,
        primary_path,
        default=None
    )

    if df is not None:
        return df

    # Try backup
    if backup_path:
        df = safe_execute(
            load_dataset,
            backup_path,
            default=None
        )

        if df is not None:
            return df

    # Raise if both failed
    raise FileNotFoundError(f"Could not load dataset from {primary_path} or {backup_path}")

from taskkit.recovery import safe_execute, batch_with_retry
import pandas as pd
import numpy as np

def engineer_features(df: pd.DataFrame) -> pd.DataFrame:
    """Engineer features with safe execution of optional steps."""
    df = df.copy()

    # Required transformations (will raise on error)
    df['age_squared'] = df['age'] ** 2

    # Optional transformations (won't break pipeline)
    # Add interaction feature (may fail on missing columns)
    interaction = safe_execute(
        lambda: df['feature1'] * df['feature2'],
        default=pd.Series([0] * len(df))
    )
    df['interaction'] = interaction

    # Add log transform (may fail on negative values)
    log_feature = safe_execute(
        lambda: np.log1p(df['amount']),
        default=pd.Series([0] * len(df))
    )
    df['log_amount'] = log_feature

    return df

from taskkit.recovery import retry, TransactionManager
from taskkit.db import db_retry
from sklearn.ensemble import RandomForestClassifier
import pandas as pd

@retry(max_attempts=2, delay=5.0)
def train_model_with_retry(X_train, y_train, params: dict):
    """Train model with retry on failure."""
    model = RandomForestClassifier(**params)
    model.fit(X_train, y_train)
    return model

def train_and_save_model(
    db,
    model_run_id: int,
    X_train,
    y_train,
    params: dict
):
    """Train and save model with full error recovery."""
    try:
        # Train model
        model = train_model_with_retry(X_train, y_train, params)

        # Calculate metrics
        from sklearn.metrics import accuracy_score
        train_pred = model.predict(X_train)
        accuracy = accuracy_score(y_train, train_pred)

        # Save to database with retry
        save_model_results(db, model_run_id, model, accuracy)

        return model, accuracy

    except Exception as e:
        # Update status to failed with retry
        update_model_status(db, model_run_id, "failed", str(e))
        raise

@db_retry(max_attempts=3)
def save_model_results(db, model_run_id: int, model, accuracy: float):
    """Save model results with retry."""
    import pickle

    with TransactionManager(db):
        from taskkit.db.models import ModelRun
        model_run = db.query(ModelRun).filter_by(id=model_run_id).first()

        if model_run:
            model_run.model_object = pickle.dumps(model)
            model_run.accuracy = accuracy
            model_run.status = "completed"

@db_retry(max_attempts=3)
def update_model_status(db, model_run_id: int, status: str, error_msg: str = None):
    """Update model status with retry."""
    with TransactionManager(db):
        from taskkit.db.models import ModelRun
        model_run = db.query(ModelRun).filter_by(id=model_run_id).first()

        if model_run:
            model_run.status = status
            if error_msg:
                model_run.error_message = error_msg
