"""Every chapter: the reference passes all its tests; the released stubs fail the visible ones;
its checks' mistakes are catalogued; a failing check shows students the message, not the checker.

Runs with torch, numpy and pytest alone (notebooks are read as JSON), so it is also the CUDA
half of the suite: on a machine with CUDA, every check loops over the CPU and the GPU.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autograder.checks import catalogue
from autograder.checks.core import GENERIC, CheckFailure
from autograder.course import CHAPTERS, REPO, check_module, released_notebook, source_notebook
from autograder.notebook import is_solution, read_cells, read_chapter, source, strip_magics
from autograder.reference import reference

HIDDEN = "### BEGIN HIDDEN TESTS"
CHECKS = REPO / "autograder" / "checks"


def _exercises():
    for chapter in CHAPTERS:
        for ex in read_chapter(source_notebook(chapter)).exercises:
            yield pytest.param(chapter, ex, id=f"{chapter}:{ex.test_id}")


def _imports(chapter):
    ns = {"__name__": "__test__"}
    exec(strip_magics(read_chapter(source_notebook(chapter)).imports_source), ns)
    return ns


_trained: dict = {}


def _training_results(chapter, ns) -> dict:
    """The names a chapter's training cells leave (a trained ``model``), from running them once
    with the reference in place, as a student's notebook would."""
    if chapter not in _trained:
        from autograder.notebook import is_training
        run = dict(ns)
        for cell in read_cells(source_notebook(chapter)):
            if is_training(cell):
                exec(compile(strip_magics(source(cell)), f"<training cell of {chapter}>", "exec"), run)
        _trained[chapter] = {k: v for k, v in run.items() if k not in ns}
    return _trained[chapter]


@pytest.mark.parametrize("chapter,exercise", list(_exercises()))
def test_reference_passes_visible_and_hidden_tests(chapter, exercise, capsys):
    ref = reference(chapter)
    ns = _imports(chapter)
    api = read_chapter(source_notebook(chapter)).api
    ns.update({name: getattr(ref, name) for name in api if hasattr(ref, name)})
    if any(name not in ns for name in exercise.api):      # a test cell after a training cell
        ns.update(_training_results(chapter, ns))
    assert HIDDEN in exercise.test_source, f"{exercise.test_id} has no hidden tests"
    exec(compile(exercise.test_source, exercise.test_id, "exec"), ns)
    assert "\u2713" in capsys.readouterr().out, "the visible check did not report success"


@pytest.mark.parametrize("chapter,exercise", list(_exercises()))
def test_released_stubs_fail_visible_tests(chapter, exercise):
    released = read_cells(released_notebook(chapter))
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
    with pytest.raises(CheckFailure, match="NotImplementedError|not defined") as info:
        exec(compile(test, exercise.test_id, "exec"), ns)
    assert info.value.mistake in ("not_implemented", "raised")


def test_every_chapter_has_graded_exercises_with_points():
    for chapter in CHAPTERS:
        ch = read_chapter(source_notebook(chapter))
        assert ch.exercises and all(ex.points > 0 for ex in ch.exercises), chapter
        assert ch.imports_source.strip(), f"{chapter} has no imports cell"
        assert all(ex.api for ex in ch.exercises), f"{chapter}: a graded exercise defines nothing to test"
        assert (CHECKS / f"{check_module(chapter).rsplit('.', 1)[1]}.py").is_file(), chapter


# --------------------------------------------------------------------------------------------
# The mistake catalogue
# --------------------------------------------------------------------------------------------

def test_mistake_catalogue_counts_per_chapter(capsys):
    counts = catalogue.counts()
    with capsys.disabled():
        print("\nnamed mistakes per chapter:", ", ".join(f"{c}: {n}" for c, n in counts.items()),
              f"(and {len(GENERIC)} generic ids)")
    for chapter in CHAPTERS:
        named = catalogue.mistakes(chapter)
        assert len(named) == counts[chapter] >= 3, chapter
        for mistake, message in named.items():
            assert re.fullmatch(r"[a-z][a-z0-9_]*", mistake), mistake
            assert mistake not in GENERIC, f"{chapter}: {mistake} is also a generic id"
            assert len(message) > 20, f"{chapter}: {mistake} has no real message"


def _ids_in(path: Path) -> tuple[set[str], set[str]]:
    """(ids of Mistake(...) definitions, literal ids passed as mistake=...) in a check module."""
    defined, used = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        if getattr(node.func, "id", None) == "Mistake" and node.args and isinstance(node.args[0], ast.Constant):
            defined.add(node.args[0].value)
        for kw in node.keywords:
            if kw.arg == "mistake" and isinstance(kw.value, ast.Constant):
                used.add(kw.value.value)
            elif kw.arg == "mistake" and isinstance(kw.value, ast.JoinedStr):
                used.add("forbidden:<name>" if ast.unparse(kw.value).startswith("f'forbidden:") else "?")
    return defined, used


def test_every_id_in_the_check_modules_is_catalogued():
    """Named mistakes are in a chapter's catalogue (shared ones in at least one); literal ids are
    generic. The mutant tests check the same of every id they see (tests/checking.py)."""
    all_named = {m for chapter in CHAPTERS for m in catalogue.mistakes(chapter)}
    for path in sorted(CHECKS.glob("*.py")):
        defined, used = _ids_in(path)
        chapter = catalogue.chapter_of(f"autograder.checks.{path.stem}")
        expected = set(catalogue.mistakes(chapter)) if chapter else all_named
        assert defined <= expected, f"{path.name}: not catalogued: {sorted(defined - expected)}"
        assert used <= set(GENERIC), f"{path.name}: ids neither named nor generic: {sorted(used - set(GENERIC))}"


# --------------------------------------------------------------------------------------------
# What a student sees when a check fails
# --------------------------------------------------------------------------------------------

STUDENT_CELL = '''
import torch
from autograder.checks.ch01 import check_softmax

def softmax(x, dim=-1):
    return torch.exp(x)

check_softmax(softmax)
'''


def test_a_failing_check_shows_the_message_and_few_frames_in_ipython():
    """IPython hides frames with ``__tracebackhide__``: the student sees their cell, the line
    that raises, and the message (a fresh process: the shell is a process-wide singleton)."""
    pytest.importorskip("IPython")
    script = ("from IPython.core.interactiveshell import InteractiveShell\n"
              "shell = InteractiveShell.instance(colors='nocolor')\n"
              f"shell.run_cell({STUDENT_CELL!r})\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                         timeout=120).stdout
    assert "CheckFailure: softmax(x) for x of shape (3, 5) is wrong: these are unnormalised exponentials" in out
    frames = re.findall(r"^(?:Cell In\[\d+\]|File \S+)", out, flags=re.M)
    assert len(frames) <= 2, out                  # the student's cell and the raise in fail()
    assert "skipping hidden" in out and "check_softmax(softmax)" in out
