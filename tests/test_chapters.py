"""Every chapter: the reference passes all its tests; the released stubs fail the visible ones.

Runs with torch, numpy and pytest alone (notebooks are read as JSON), so it is also the CUDA
half of the suite: on a machine with CUDA, every check loops over the CPU and the GPU.
"""
from __future__ import annotations

import pytest

from autograder.checks.core import CheckFailure
from autograder.notebook import is_solution, read_cells, read_chapter, source, strip_magics
from autograder.reference import reference
from conftest import CHAPTERS, REPO

HIDDEN = "### BEGIN HIDDEN TESTS"


def _exercises():
    for chapter in CHAPTERS:
        for ex in read_chapter(REPO / "solutions" / chapter / f"{chapter}.ipynb").exercises:
            yield pytest.param(chapter, ex, id=f"{chapter}:{ex.test_id}")


def _imports(chapter):
    ns = {"__name__": "__test__"}
    exec(strip_magics(read_chapter(REPO / "solutions" / chapter / f"{chapter}.ipynb").imports_source), ns)
    return ns


@pytest.mark.parametrize("chapter,exercise", list(_exercises()))
def test_reference_passes_visible_and_hidden_tests(chapter, exercise, capsys):
    ref = reference(chapter)
    ns = _imports(chapter)
    ns.update({name: getattr(ref, name) for name in exercise.api})
    ns.update({name: getattr(ref, name) for name in read_chapter(
        REPO / "solutions" / chapter / f"{chapter}.ipynb").api})
    assert HIDDEN in exercise.test_source, f"{exercise.test_id} has no hidden tests"
    exec(compile(exercise.test_source, exercise.test_id, "exec"), ns)
    assert "\u2713" in capsys.readouterr().out, "the visible check did not report success"


@pytest.mark.parametrize("chapter,exercise", list(_exercises()))
def test_released_stubs_fail_visible_tests(chapter, exercise):
    released = read_cells(REPO / "notebooks" / chapter / f"{chapter}.ipynb")
    ns = _imports(chapter)
    for cell in released:
        if cell.get("cell_type") == "code" and is_solution(cell):
            assert "raise NotImplementedError()" in source(cell)
            try:   # a stub may raise at top level (e.g. "paste your chapter-2 attention here")
                exec(strip_magics(source(cell)), ns)
            except NotImplementedError:
                pass
    test = next(source(c) for c in released
                if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == exercise.test_id)
    assert HIDDEN not in test and "BEGIN SOLUTION" not in test
    with pytest.raises(CheckFailure, match="NotImplementedError|not defined"):
        exec(compile(test, exercise.test_id, "exec"), ns)


def test_every_chapter_has_graded_exercises_with_points():
    for chapter in CHAPTERS:
        ch = read_chapter(REPO / "solutions" / chapter / f"{chapter}.ipynb")
        assert ch.exercises and all(ex.points > 0 for ex in ch.exercises), chapter
        assert ch.imports_source.strip(), f"{chapter} has no imports cell"
        assert all(ex.api for ex in ch.exercises if ex.answer_ids != ["attention_from_ch02"]), chapter
