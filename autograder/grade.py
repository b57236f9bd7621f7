"""Grade one submitted notebook: student code in the sandbox, verdicts in this (trusted) process.

Walks the cells in order. Code cells written or edited by the student run in the sandbox; a
*test* cell (identified by its ``grade_id`` in the instructor's source notebook) runs here, its
source taken from the source notebook, with proxies in place of the student's objects. Each test
cell gets outputs that nbgrader scores as usual: an ``error`` output (0 points) or a ``stream``
(full points). Whatever the submission does, every test cell gets a verdict.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
import traceback
from pathlib import Path

import nbformat

from .checks.core import CheckFailure
from .checks.scan import used_code
from .notebook import Chapter, meta, source, strip_magics
from .reference import solutions_at
from .report import Report, Verdict
from .sandbox.process import Limits, Sandbox, SandboxUnavailable
from .sandbox.proxy import OutOfTime, Session, StudentError, make_proxy
from .sandbox.wire import clean_text

log = logging.getLogger("autograder")


class _Missing:
    """Stands for a student API name the submission never defined."""

    def __init__(self, name):
        self.__name__ = name

    def __call__(self, *a, **k):
        raise CheckFailure(f"`{self.__name__}` is not defined. Run the cell that defines it (and "
                           "keep the name given in the exercise).")


def _error_output(kind: str, message: str):
    return nbformat.v4.new_output("error", ename=kind, evalue=message, traceback=[f"{kind}: {message}"])


def _stream(text: str, name: str = "stdout"):
    return nbformat.v4.new_output("stream", name=name, text=text)


def student_scope(nb, chapter: Chapter, exercise, upto: int) -> str:
    """What an exercise's forbidden-shortcut check reads: the code its API objects use, as the
    student's cells before the test cell define it (instructor cells included, since a student
    function calling an instructor helper uses what that helper uses). If that cannot be worked
    out statically, every cell the student wrote or edited."""
    cells = [c for c in nb.cells[:upto] if c.cell_type == "code"]
    tests = {ex.test_id for ex in chapter.exercises}
    sources = [source(c) for c in cells if meta(c).get("grade_id") not in tests]
    found = used_code(sources, exercise.api) if exercise.api else None
    if found is not None:
        return found
    known = {aid for ex in chapter.exercises for aid in ex.answer_ids} | {"imports"}
    return "\n\n".join(strip_magics(source(c)) for c in cells
                        if meta(c).get("grade_id") not in tests
                        and (meta(c).get("grade_id") in known or source(c) not in chapter.narrative_sources))


def _trusted_namespace(chapter: Chapter) -> dict:
    ns: dict = {"__name__": "__grader__"}
    exec(compile(strip_magics(chapter.imports_source), "<imports>", "exec"), ns)  # noqa: S102
    return ns


def run_test(sandbox: Sandbox, chapter: Chapter, exercise, nb, base_ns: dict, index: int,
             deadline: float | None = None) -> Verdict:
    """Run one test cell here, against proxies; it fails once ``deadline`` (grader's clock) or
    the sandbox's ``test_seconds`` has passed, however its time was spent."""
    start = time.monotonic()
    limit = sandbox.limits.test_seconds
    end = start + limit if deadline is None else min(deadline, start + limit)
    session = Session(sandbox, end)
    scope = student_scope(nb, chapter, exercise, index)
    ns = dict(base_ns)
    out = io.StringIO()
    try:
        for name in chapter.api:
            proxy = make_proxy(session, name, scope)
            ns[name] = _Missing(name) if proxy is None else proxy
        with contextlib.redirect_stdout(out):
            exec(compile(exercise.test_source, f"<test {exercise.test_id}>", "exec"), ns)  # noqa: S102
        return Verdict(exercise.test_id, True, out.getvalue() or "passed", time.monotonic() - start)
    except OutOfTime:
        what = f"{limit:g} s for one test cell" if end == start + limit else "the notebook's grading time"
        return Verdict(exercise.test_id, False, f"Your code used up {what}: the checks could not finish. "
                       "Look for a function that is very slow or waits.", time.monotonic() - start)
    except CheckFailure as exc:
        return Verdict(exercise.test_id, False, str(exc), time.monotonic() - start)
    except StudentError as exc:
        return Verdict(exercise.test_id, False, f"Your code failed while being tested: "
                       f"{exc.student_type}: {exc}", time.monotonic() - start)
    except Exception as exc:  # noqa: BLE001 - never show a traceback: it would quote hidden tests
        log.warning("test %s raised outside a check:\n%s", exercise.test_id, traceback.format_exc())
        return Verdict(exercise.test_id, False, f"{type(exc).__name__}: {exc}", time.monotonic() - start)


class _Outputs:
    """Cell outputs, clipped and counted by the grader: the notebook's total stays bounded,
    whatever the student's process claims about its own output."""

    def __init__(self, limit: int):
        self.left = limit

    def stream(self, text: str, name: str = "stdout") -> list:
        if not text:
            return []
        if self.left <= 0:
            return [_stream("[output not shown: this notebook's output limit was reached]\n", name)]
        text = clean_text(text, self.left)
        self.left -= len(text)
        return [_stream(text, name)]


class _Grading:
    """One notebook's grading run: the sandbox, the clock, the outputs and the report."""

    def __init__(self, nb, chapter: Chapter, sandbox: Sandbox, budget_seconds: float):
        self.nb, self.chapter, self.sandbox = nb, chapter, sandbox
        self.exercises = {ex.test_id: ex for ex in chapter.exercises}
        self.deadline = time.monotonic() + budget_seconds
        self.budget = budget_seconds
        self.outputs = _Outputs(sandbox.limits.notebook_output_chars)
        self.report = Report()
        self.base_ns = _trusted_namespace(chapter)

    def cell(self, index: int, cell) -> None:
        gid = meta(cell).get("grade_id")
        if time.monotonic() >= self.deadline:
            msg = f"not run: the notebook used up its grading time ({self.budget:g} s)"
            cell.outputs = [_error_output("GradingTimeout", msg)]
            if gid in self.exercises:
                self.report.verdicts.append(Verdict(gid, False, msg, 0.0))
        else:
            if not self.sandbox.alive:   # killed by the cell before (a test's answer too large, say)
                self.sandbox.restart()
            if gid in self.exercises and meta(cell).get("grade"):
                self.test_cell(index, cell, self.exercises[gid])
            else:
                self.student_cell(index, cell)

    def test_cell(self, index: int, cell, exercise) -> None:
        verdict = run_test(self.sandbox, self.chapter, exercise, self.nb, self.base_ns, index, self.deadline)
        self.sandbox.stop_strays()
        verdict.message = clean_text(verdict.message, 10_000)
        self.report.verdicts.append(verdict)
        cell.outputs = self.outputs.stream(verdict.message.rstrip() + "\n") if verdict.passed else \
            [_error_output("CheckFailure", verdict.message)]
        if not self.sandbox.alive:
            self.report.events.append(f"cell {index}: the process died during the tests; restarted")
            self.sandbox.restart()

    def student_cell(self, index: int, cell) -> None:
        """Run a cell the student wrote or may have edited; a training cell (by the source
        notebook's word, not the submission's) gets the chapter's training limit."""
        left = self.deadline - time.monotonic()
        training = meta(cell).get("grade_id") in self.chapter.training_ids
        limit = self.chapter.training_seconds if training else self.sandbox.limits.cell_seconds
        run = self.sandbox.run_cell(source(cell), timeout=min(limit, left))
        outputs = self.outputs.stream(run.stdout) + self.outputs.stream(run.stderr, "stderr")
        if run.status in ("timeout", "crashed"):
            self.report.events.append(f"cell {index}: {run.error}")
            outputs.append(_error_output("GradingError", f"This cell was stopped: {run.error}."))
            self.sandbox.restart()
            self.report.events.append(f"restarted after cell {index}; {len(self.sandbox.history)} cells replayed")
        elif run.status == "error":
            kind, _, msg = (run.error or "Error: ").partition(": ")
            outputs.append(_error_output(kind if kind.isidentifier() else "Error", msg))
        cell.outputs = outputs



def grade_notebook(nb, chapter: Chapter, *, solutions_dir: Path, limits: Limits | None = None,
                   data_files: list[Path] | None = None, budget_seconds: float = 600.0) -> Report:
    """Grade ``nb`` (modified in place: outputs of every code cell) against ``chapter``. Never
    raises: whatever breaks, every test cell of the chapter gets a verdict."""
    t0 = time.monotonic()
    report = Report()
    index = 0
    grading = None
    try:
        with solutions_at(solutions_dir), Sandbox(limits, data_files) as sandbox:
            grading = _Grading(nb, chapter, sandbox, budget_seconds)
            report = grading.report
            for index, cell in enumerate(nb.cells):
                if cell.get("cell_type") == "code":
                    grading.cell(index, cell)
    except SandboxUnavailable as exc:
        report.events.append(f"the sandbox could not start: {exc}")
        why = "not graded: the grader could not start a sandbox (the instructor has been told)"
        log.error("sandbox unavailable: %s", exc)
        _fail_undecided(nb, chapter, report, why)
    except Exception:  # noqa: BLE001 - a grading bug must cost the student nothing but a re-grade
        log.error("grading stopped at cell %d:\n%s", index, traceback.format_exc())
        report.events.append(f"grading stopped at cell {index} by an internal error (see the log)")
        why = "not graded: the grader hit an internal error here (the instructor has been told)"
        _fail_undecided(nb, chapter, report, why, start=index if grading is not None else 0)
    graded = {v.grade_id for v in report.verdicts}
    for ex in chapter.exercises:
        if ex.test_id not in graded:   # a test cell the submission lost: nbgrader re-adds it; say so
            report.verdicts.append(Verdict(ex.test_id, False, "this test cell was missing", 0.0))
    report.seconds = time.monotonic() - t0
    return report


def _fail_undecided(nb, chapter: Chapter, report: Report, why: str, start: int = 0) -> None:
    """Give every test cell from ``start`` on that has no verdict yet a failing one (the
    grading itself broke: no sandbox, or an internal error)."""
    tests = {ex.test_id for ex in chapter.exercises}
    for cell in nb.cells[start:]:
        gid = meta(cell).get("grade_id") if cell.get("cell_type") == "code" else None
        if gid in tests and gid not in {v.grade_id for v in report.verdicts}:
            cell.outputs = [_error_output("GradingError", why)]
            report.verdicts.append(Verdict(gid, False, why, 0.0))
