"""``taskkit doctor``: checks of a deployment, each with a verdict, the reason and the fix.

``diagnose()`` loads the settings and the Celery app a worker would run (``TASKKIT_APP``, as
``make worker`` does), then runs every check at once, each bounded to a few seconds, so it
answers quickly with a service down. A ``Check`` has a ``name``, a ``verdict`` (``ok``,
``warning`` or ``error``), the ``reason`` (what it saw), the ``fix`` and ``details``; a
``Report`` holds them all, its overall ``verdict`` and the ``exit_code`` of ``taskkit doctor``
(0 ok, 1 warnings, 2 errors). No secret (a key, a token, a URL's password) is ever in one.

The checks, what each looks at and the fix it proposes: ``docs/doctor.md``. The same report is
``taskkit doctor --json`` and ``GET /doctor`` of ``taskkit serve``.

Example::

    from taskkit.doctor import diagnose

    report = diagnose()
    for check in report.checks:
        if check.verdict != "ok":
            print(f"{check.name}: {check.reason} -> {check.fix}")
"""

from __future__ import annotations

from taskkit.doctor._model import EXIT_CODES, Check, Report, Verdict
from taskkit.doctor._run import CHECK_TIMEOUT, CHECKS, diagnose

__all__ = ["CHECK_NAMES", "CHECK_TIMEOUT", "EXIT_CODES", "Check", "Report", "Verdict", "diagnose"]

#: The name of every check, in the order a report lists them.
CHECK_NAMES: tuple[str, ...] = tuple(name for name, _ in CHECKS)
