"""The mistakes each chapter's checks can name, read from the check modules themselves.

A chapter's catalogue is every :class:`~autograder.checks.core.Mistake` constant in its check
module's namespace, shared ones it imports (``from .masks import MASK_NOT_BOOL``) included; the
ids a failure can carry besides those are :data:`~autograder.checks.core.GENERIC`. Nothing here
is needed to grade: it is for tests, statistics over submissions, and authors.
"""
from __future__ import annotations

import importlib

from ..course import CHAPTERS, check_module
from .core import GENERIC, Mistake

__all__ = ["mistakes", "generic", "counts", "known", "chapter_of"]


def mistakes(chapter: str) -> dict[str, str]:
    """id -> message (a template with ``{fields}``) of the named mistakes of ``chapter``'s checks."""
    module = importlib.import_module(check_module(chapter))
    found: dict[str, str] = {}
    for value in vars(module).values():
        if isinstance(value, Mistake):
            if found.get(value.id, value.message) != value.message:
                raise ValueError(f"{module.__name__}: two mistakes share the id {value.id!r}")
            found[value.id] = value.message
    return dict(sorted(found.items()))


def generic() -> dict[str, str]:
    """id -> meaning of the failures that name no specific mistake."""
    return dict(GENERIC)


def counts(chapters=CHAPTERS) -> dict[str, int]:
    """How many named mistakes each chapter's checks recognise."""
    return {chapter: len(mistakes(chapter)) for chapter in chapters}


def known(mistake: str, chapter: str | None = None) -> bool:
    """Can a failure of ``chapter``'s checks (or of the shared helpers) carry this id?"""
    return mistake in GENERIC or mistake.startswith("forbidden:") or (
        chapter is not None and mistake in mistakes(chapter))


def chapter_of(module: str) -> str | None:
    """The chapter whose checks live in ``module`` (e.g. ``autograder.checks.ch02``), if any."""
    return next((chapter for chapter in CHAPTERS if check_module(chapter) == module), None)
