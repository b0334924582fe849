"""Moved to ``tests._support.workers``; kept while other branches still import it from here."""

from tests._support.workers import WorkerProcess, wait_for

__all__ = ["WorkerProcess", "wait_for"]
