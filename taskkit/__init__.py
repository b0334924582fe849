"""taskkit: a Celery-centric task reliability toolkit.

The layers, each importing only from the ones before it:

- ``taskkit.recovery``: retry, timeout, circuit breaker, fallback, safe_execute,
  batch_with_retry, TransactionManager. No Celery, no database.
- ``taskkit.errors``: the exception tree; ``taskkit.testing``: zero waits for test suites.

Importing ``taskkit`` itself imports nothing heavy.

Example::

    from taskkit.recovery import retry

    @retry(max_attempts=3, delay=0.5)
    def fetch() -> bytes: ...
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
