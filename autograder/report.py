"""What grading a notebook decided: one verdict per test cell, and what happened on the way.

Kept apart from ``grade`` (which needs torch and the sandbox) so that nbgrader's own processes,
which only replay results graded elsewhere, start without importing torch (~3 s of CPU each)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Verdict:
    grade_id: str
    passed: bool
    message: str
    seconds: float


@dataclass
class Report:
    verdicts: list[Verdict] = field(default_factory=list)
    events: list[str] = field(default_factory=list)   # crashes, timeouts, restarts
    seconds: float = 0.0
