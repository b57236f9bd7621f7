"""Helpers shared by the check library's tests: run a check, read the mistake id it reports.

Tests assert mistake ids, not the prose of messages, so that rewording a hint breaks nothing.
"""
from __future__ import annotations

import pytest
from hypothesis import settings

from autograder.checks import catalogue
from autograder.checks.core import CheckFailure

FAST = settings(max_examples=25, deadline=None)


class SandboxError(RuntimeError):
    """What an exception of the student's looks like in the grader: its type travels by name."""

    def __init__(self, student_type, message="from the sandbox"):
        super().__init__(message)
        self.student_type = student_type


def failure(check, *args, **kwargs) -> CheckFailure:
    """The CheckFailure that ``check(*args, **kwargs)`` raises; the test fails if it passes."""
    with pytest.raises(CheckFailure) as info:
        check(*args, **kwargs)
    return info.value


def mistake_of(check, *args, **kwargs) -> str:
    """The id of the mistake ``check(*args, **kwargs)`` reports; for a chapter's check, an id its
    catalogue knows (so every id the mutant tests see is catalogued)."""
    mistake = failure(check, *args, **kwargs).mistake
    chapter = catalogue.chapter_of(getattr(check, "__module__", ""))
    assert chapter is None or catalogue.known(mistake, chapter), f"{mistake!r} is not in {chapter}'s catalogue"
    return mistake
