"""Copied from the seed (usage-examples.md, "ML Pipeline Operations"); only import lines changed. Of "Model Training with Error Handling" only
train_model_with_retry is here: its database half needs taskkit.db (issue 3)."""

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
from sklearn.ensemble import RandomForestClassifier
import pandas as pd

@retry(max_attempts=2, delay=5.0)
def train_model_with_retry(X_train, y_train, params: dict):
    """Train model with retry on failure."""
    model = RandomForestClassifier(**params)
    model.fit(X_train, y_train)
    return model
