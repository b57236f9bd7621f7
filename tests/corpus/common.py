"""Building corpus submissions from the released notebook with small, readable edits."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import nbformat


@dataclass
class Case:
    """One submission and the score each test cell must get."""
    name: str
    expected: dict[str, float]
    build: Callable[[nbformat.NotebookNode], nbformat.NotebookNode | bytes]
    extra_files: dict[str, str] = field(default_factory=dict)
    filename: str | None = None     # submit under another file name
    note: str = ""
    # Called after the notebook is written: setup(folder, course) plants files (links, FIFOs...).
    setup: Callable | None = None
    # Graded through nbgrader and the sandbox too (not only by the in-process fast tier).
    full: bool = False
    # Attacks, crashes, limits: graded only through nbgrader and the sandbox, never in-process.
    hostile: bool = False
    # Graded in-process by the fast tier too (a full case whose notebook trains is not: the
    # training would cost as much again there, and tests/test_chapters.py trains the reference).
    in_fast_tier: bool = True

    @property
    def through_nbgrader(self) -> bool:
        return self.full or self.hostile or self.setup is not None or self.filename is not None


def gid(cell) -> str | None:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def index_of(nb, grade_id: str) -> int:
    for i, cell in enumerate(nb.cells):
        if gid(cell) == grade_id:
            return i
    raise KeyError(grade_id)


def answers(**sources: str):
    """Replace answer cells' sources: answers(softmax_answer="def softmax...")."""
    def edit(nb):
        nb = copy.deepcopy(nb)
        for grade_id, src in sources.items():
            nb.cells[index_of(nb, grade_id)].source = src
        return nb
    return edit


def then(*edits):
    """Apply several edits in order."""
    def edit(nb):
        for e in edits:
            nb = e(nb)
        return nb
    return edit


def insert(code: str, after: str | None = None, before: str | None = None):
    """Add a student cell (no nbgrader metadata) after/before the cell with that grade_id,
    or at the top."""
    def edit(nb):
        nb = copy.deepcopy(nb)
        cell = nbformat.v4.new_code_cell(code)
        if after is not None:
            nb.cells.insert(index_of(nb, after) + 1, cell)
        elif before is not None:
            nb.cells.insert(index_of(nb, before), cell)
        else:
            nb.cells.insert(0, cell)
        return nb
    return edit


def set_source(grade_id: str, code: str):
    def edit(nb):
        nb = copy.deepcopy(nb)
        nb.cells[index_of(nb, grade_id)].source = code
        return nb
    return edit


def delete(grade_id: str):
    def edit(nb):
        nb = copy.deepcopy(nb)
        del nb.cells[index_of(nb, grade_id)]
        return nb
    return edit


def set_meta(target: str, **changes):
    def edit(nb):
        nb = copy.deepcopy(nb)
        nb.cells[index_of(nb, target)].metadata["nbgrader"].update(changes)
        return nb
    return edit


def strip_metadata(nb):
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        cell.metadata = {}
    return nb


def duplicate(grade_id: str):
    def edit(nb):
        nb = copy.deepcopy(nb)
        i = index_of(nb, grade_id)
        nb.cells.insert(i + 1, copy.deepcopy(nb.cells[i]))
        nb.cells[i + 1].id = nb.cells[i].id + "-copy"
        return nb
    return edit


def _graded_names() -> dict[str, set[str]]:
    """training cell grade_id -> the names it assigns that some test cell grades (a trained
    ``model``), over every chapter's source notebook."""
    global _GRADED
    if _GRADED is None:
        from autograder.course import CHAPTERS, source_notebook
        from autograder.notebook import assigned_names, is_training, read_cells, read_chapter, source
        _GRADED = {}
        for chapter in CHAPTERS:
            api = set(read_chapter(source_notebook(chapter)).api)
            for cell in read_cells(source_notebook(chapter)):
                if is_training(cell):
                    _GRADED[gid(cell)] = set(assigned_names(source(cell))) & api
    return _GRADED


_GRADED: dict[str, set[str]] | None = None


def drop_narrative_code(nb):
    """Remove the demo/figure code cells, and the training demos no test grades (students may
    delete cells; it keeps the corpus fast). A training cell whose result is graded stays."""
    nb = copy.deepcopy(nb)
    graded = _graded_names()
    nb.cells = [c for c in nb.cells if c.cell_type != "code"
                or (gid(c) is not None and (gid(c) not in graded or graded[gid(c)]))]
    return nb


def raw(data: bytes):
    return lambda nb: data


def tiers(cases: list[Case], *, hostile=(), full=(), full_only=()) -> list[Case]:
    """Mark which cases go through nbgrader and the sandbox: ``hostile`` ones only there (attacks,
    crashes, limits, tampered notebooks), ``full`` ones there *and* in the fast tier (the
    reference with its narrative, the blank release), ``full_only`` ones there and not in the fast
    tier (a reference whose narrative trains for tens of seconds). Every other case is graded by
    the fast tier only. Names must exist: a typo fails loudly."""
    names = {c.name for c in cases}
    unknown = (set(hostile) | set(full) | set(full_only)) - names
    assert not unknown, f"no such cases: {sorted(unknown)}"
    for case in cases:
        case.hostile = case.hostile or case.name in hostile
        case.full = case.full or case.name in full or case.name in full_only
        case.in_fast_tier = case.in_fast_tier and case.name not in full_only
    return cases


def fast(*edits):
    """Drop the demo cells (figures, measurements) first: most cases keep the corpus quick so."""
    return then(drop_narrative_code, *edits)


def reference_answers(chapter: str) -> dict[str, str]:
    """The source notebook's answer cells with their solution blocks as plain code (a paste cell
    excepted: its reference loads an earlier chapter's, which students do not have)."""
    import re

    from autograder.course import source_notebook
    from autograder.notebook import read_cells, source

    found = {}
    for cell in read_cells(source_notebook(chapter)):
        grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", "")
        if grade_id.endswith("_answer"):
            found[grade_id] = re.sub(r"^\s*### (BEGIN|END) SOLUTION\n", "", source(cell), flags=re.M)
    return found
