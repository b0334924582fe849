"""Exceptions that are a framework's control flow, not failures.

Celery's ``self.retry()`` raises ``celery.exceptions.Retry`` *after* it has already queued the
retry message; ``Ignore`` and ``Reject`` tell the worker what to do with the message; a soft
time limit must reach the task. If ``retry`` re-ran the function on ``Retry``, every attempt
would queue one more message and the task would run several times; if a breaker counted it,
a task's own retries would open the circuit. So every primitive lets these pass untouched:
not retried, not counted, not turned into a fallback value.

They are recognised by the module that defines them, so this module imports no framework.
"""

from __future__ import annotations

__all__ = ["CONTROL_FLOW", "is_control_flow"]

#: (defining module, class name) of the exceptions that are control flow.
CONTROL_FLOW = frozenset(
    {
        ("celery.exceptions", "Retry"),
        ("celery.exceptions", "Ignore"),
        ("celery.exceptions", "Reject"),
        ("billiard.exceptions", "SoftTimeLimitExceeded"),
        ("billiard.exceptions", "TimeLimitExceeded"),
    }
)

_verdicts: dict[type[BaseException], bool] = {}


def is_control_flow(error: BaseException) -> bool:
    """True for a Celery ``Retry``/``Ignore``/``Reject`` or a time limit (or a subclass)."""
    kind = type(error)
    verdict = _verdicts.get(kind)
    if verdict is None:
        verdict = any((c.__module__, c.__qualname__) in CONTROL_FLOW for c in kind.__mro__)
        _verdicts[kind] = verdict
    return verdict
