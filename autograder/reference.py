"""The reference solution, read at run time from ``solutions/`` (its only home).

Hidden tests call ``reference("ch01_attention").softmax``. The loader runs the chapter's imports
cell and its answer cells (solution blocks included) from the source notebook in a fresh
namespace. It only works where ``solutions/`` exists: the instructor's machine and the grader's
trusted process. The student's sandbox has no ``solutions/`` to read.

A later chapter that needs an earlier reference (say, attention inside multi-head attention)
takes it from here too, e.g. ``reference("ch02_masking").scaled_dot_product_attention``,
rather than keep a second copy.
"""
from __future__ import annotations

import contextlib
import contextvars
import types
from functools import lru_cache
from pathlib import Path

from .course import SOLUTIONS, source_notebook
from .notebook import is_imports, is_solution, read_cells, source, strip_magics

#: Where the source notebooks live while a notebook is graded (the course's source directory);
#: the repository's solutions/ otherwise. A context variable, set by the grader around its test
#: cells: no environment variable a subprocess could inherit, no global left behind.
_SOLUTIONS: contextvars.ContextVar[Path | None] = contextvars.ContextVar("afs_solutions", default=None)


def solutions_dir() -> Path:
    return _SOLUTIONS.get() or SOLUTIONS


@contextlib.contextmanager
def solutions_at(path: str | Path):
    """Hidden tests run inside this take the reference from ``path``."""
    token = _SOLUTIONS.set(Path(path))
    try:
        yield
    finally:
        _SOLUTIONS.reset(token)


class ReferenceUnavailable(RuntimeError):
    """Raised where the reference solutions are not present (a student's machine, the sandbox)."""


@lru_cache(maxsize=None)
def _load(path: str, mtime: float) -> types.SimpleNamespace:
    ns: dict = {"__name__": f"reference:{Path(path).stem}"}
    for cell in read_cells(path):
        if cell.get("cell_type") == "code" and (is_imports(cell) or is_solution(cell)):
            code = compile(strip_magics(source(cell)), f"<reference {Path(path).name}>", "exec")
            exec(code, ns)  # noqa: S102 - the instructor's own solution code
    # The functions keep `ns` as their globals: leave __builtins__ in it, only hide it here.
    return types.SimpleNamespace(**{k: v for k, v in ns.items() if k != "__builtins__"})


def reference(chapter: str) -> types.SimpleNamespace:
    """The reference definitions of ``chapter`` (e.g. ``"ch01_attention"``) as attributes."""
    path = source_notebook(chapter, solutions_dir())
    if not path.is_file():
        raise ReferenceUnavailable(
            f"The reference solutions are only available to the grader (no {path}).")
    return _load(str(path), path.stat().st_mtime)
