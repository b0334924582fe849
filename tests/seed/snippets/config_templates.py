"""Copied from the seed (usage-examples.md, "Configuration Templates"); only import lines changed."""

# config/error_recovery.py

from taskkit.recovery import CircuitBreaker, RetryStrategy

# External API configuration
EXTERNAL_API_RETRY_CONFIG = {
    "max_attempts": 3,
    "delay": 1.0,
    "backoff": 2.0,
    "jitter": True,
    "strategy": RetryStrategy.EXPONENTIAL
}

EXTERNAL_API_TIMEOUT = 30  # seconds

EXTERNAL_API_CIRCUIT = {
    "failure_threshold": 5,
    "recovery_timeout": 60,
    "expected_exception": (ConnectionError, TimeoutError)
}

# Database configuration
DATABASE_RETRY_CONFIG = {
    "max_attempts": 3,
    "delay": 0.5,
    "backoff": 2.0
}

DATABASE_CONNECTION_TIMEOUT = 10  # seconds

# File I/O configuration
FILE_RETRY_CONFIG = {
    "max_attempts": 2,
    "delay": 0.5,
    "exceptions": (IOError, OSError)
}

# Batch processing configuration
BATCH_SIZE = 1000
BATCH_MAX_RETRIES = 2
BATCH_PARALLEL_WORKERS = 4

# Training configuration
TRAINING_CHECKPOINT_INTERVAL = 10  # epochs
TRAINING_MAX_RETRIES = 3
TRAINING_RETRY_DELAY = 300  # seconds

# Monitoring
LOG_RETRY_ATTEMPTS = True
LOG_CIRCUIT_STATE_CHANGES = True
ALERT_ON_CIRCUIT_OPEN = True
