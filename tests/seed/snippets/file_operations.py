"""Copied from the seed (usage-examples.md, "File Operations"); only import lines changed."""

from taskkit.recovery import retry, fallback
import json

def get_default_config():
    """Return default configuration."""
    return {
        "debug": False,
        "timeout": 30,
        "max_retries": 3
    }

@fallback(get_default_config)
@retry(max_attempts=3, delay=0.5, exceptions=(IOError, OSError))
def load_config(config_path: str) -> dict:
    """Load config with retry and fallback to defaults."""
    with open(config_path, 'r') as f:
        return json.load(f)

# Usage
config = load_config("/path/to/config.json")

from taskkit.recovery import retry
import json
import os
from pathlib import Path

@retry(max_attempts=3, delay=1.0, exceptions=(IOError, OSError))
def save_results(results: dict, output_path: str):
    """Save results with retry."""
    # Create directory if needed
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)

    # Write to temporary file first
    temp_path = f"{output_path}.tmp"
    with open(temp_path, 'w') as f:
        json.dump(results, f, indent=2)

    # Atomic rename
    os.replace(temp_path, output_path)

from taskkit.recovery import timeout, retry
import pickle

@timeout(seconds=60)
@retry(max_attempts=2, delay=5.0)
def load_model_file(model_path: str):
    """Load model with timeout and retry."""
    with open(model_path, 'rb') as f:
        return pickle.load(f)
