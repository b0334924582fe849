"""What a check finds: ``Check`` (name, verdict, reason, fix, details) and ``Report``.

The JSON schema (``Report.to_dict``) is stable: ``{"verdict", "exit_code", "checks": [{"name",
"verdict", "reason", "fix", "details"}]}``; ``fix`` is null for an ``ok`` check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

__all__ = ["EXIT_CODES", "Check", "Report", "Scrubber", "Verdict", "no_settings", "worst"]

Verdict = Literal["ok", "warning", "error"]

#: The exit status of ``taskkit doctor`` for each overall verdict.
EXIT_CODES: dict[str, int] = {"ok": 0, "warning": 1, "error": 2}

_RANK = {"ok": 0, "warning": 1, "error": 2}


def worst(verdicts: Iterable[str]) -> Verdict:
    """The most severe verdict of ``verdicts`` (``ok`` for none)."""
    found: Verdict = "ok"
    for verdict in verdicts:
        if _RANK[verdict] > _RANK[found]:
            found = verdict  # type: ignore[assignment]
    return found


@dataclass(frozen=True)
class Check:
    """One check's finding: a verdict, the reason (what was seen) and the fix (what to do).

    Example::

        Check("broker", "error", "redis://127.0.0.1:6379/0 does not answer (refused)",
              "start Redis, or set TASKKIT_BROKER_URL")
    """

    #: A stable name (``broker``, ``visibility_timeout``, ...; the list is in docs/doctor.md).
    name: str
    verdict: Verdict
    #: What the check saw, in one or two sentences; never a secret.
    reason: str
    #: What to do about it; None when the verdict is ok.
    fix: str | None = None
    #: What the check looked at (JSON values), for ``--json`` readers.
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The check as JSON-ready data."""
        return {
            "name": self.name,
            "verdict": self.verdict,
            "reason": self.reason,
            "fix": self.fix,
            "details": _plain(self.details),
        }


@dataclass(frozen=True)
class Report:
    """Every check, in a fixed order, and the overall verdict.

    Example::

        report = diagnose()
        print(report.verdict, report.exit_code)   # 'warning' 1
        for check in report.checks:
            print(check.name, check.verdict, check.reason)
    """

    checks: tuple[Check, ...]

    @property
    def verdict(self) -> Verdict:
        """The worst verdict of the checks."""
        return worst(check.verdict for check in self.checks)

    @property
    def exit_code(self) -> int:
        """0 when every check is ok, 1 with warnings, 2 with errors."""
        return EXIT_CODES[self.verdict]

    def check(self, name: str) -> Check:
        """The check called ``name`` (``KeyError`` if there is none)."""
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (the schema of ``--json`` and ``GET /doctor``)."""
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "checks": [check.to_dict() for check in self.checks],
        }

    def to_json(self) -> str:
        """``to_dict`` as JSON text."""
        return json.dumps(self.to_dict(), indent=2)


def _plain(value: Any) -> Any:
    """``value`` as JSON values: tuples as lists, anything unknown as its ``str``."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [_plain(item) for item in items]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class Scrubber:
    """Replaces every known secret (a key, a token, a URL's password) by ``***`` in text: the
    last line of defence, applied to every check before it is shown.

    Example::

        scrub = Scrubber(["hunter2-password"])
        scrub.text("redis://:hunter2-password@cache")   # 'redis://:***@cache'
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        found = {s for s in secrets if s and len(s) >= 4}
        self._pattern = (
            re.compile("|".join(re.escape(s) for s in sorted(found, key=len, reverse=True)))
            if found
            else None
        )

    def text(self, value: str) -> str:
        """``value`` with every secret replaced by ``***``."""
        return value if self._pattern is None else self._pattern.sub("***", value)

    def value(self, value: Any) -> Any:
        """A JSON-ready value with every string scrubbed."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value

    def check(self, check: Check) -> Check:
        """``check`` with its reason, fix and details scrubbed."""
        return replace(
            check,
            reason=self.text(check.reason),
            fix=None if check.fix is None else self.text(check.fix),
            details=self.value(_plain(check.details)),
        )


def no_settings(name: str) -> Check:
    """The check ``name`` skipped because the settings could not be read."""
    return Check(
        name,
        "error",
        "not checked: the settings could not be read (see the settings check)",
        "fix the settings first",
    )
