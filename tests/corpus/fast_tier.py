"""The corpus's fast tier: grade honest and mistaken submissions in-process, without nbgrader or
the sandbox, with the same test cells, the same checks and the same forbidden-shortcut scope as
the grader. A submission costs about a second here against about ten through the full flow.

What it leaves out is what the full tier (nbgrader + sandbox, ``test_corpus.py``) tests: the
proxy boundary (``test_seam.py`` is its contract), nbgrader's handling of cells and metadata,
limits, and hostile code. So it grades only cases that are not ``hostile``; cases marked ``full``
are graded both ways and must agree.

Run as ``python -m corpus.fast_tier CHAPTER=DIR ...`` (cwd ``tests/``): grades every
``DIR/*.ipynb`` and prints ``{DIR: {case: {"scores": {grade_id: points}, "seconds": s}}}`` as JSON.
One clean process imports torch and each chapter's imports cell once, then forks a child per
submission (two at a time), so no state leaks from one submission to the next and a child that
hangs is killed.
"""
from __future__ import annotations

import contextlib
import io
import json
import linecache
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# A child that takes longer is killed (no case here should hang: hostile ones are not graded in this
# tier). A chapter's training cells add their declared budget, as in the grader: chapter 7's model
# trains in-process in ~25 s idle, several times that while the nbgrader tier fills both cores.
SECONDS_PER_CASE = 120.0
CHILDREN = 2


def _compile(code: str, name: str):
    """Compile a cell so that ``inspect.getsource`` works on what it defines (as in IPython)."""
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    return compile(code, name, "exec")


def grade(nb: dict, chapter, base_ns: dict) -> dict[str, float]:
    """Scores per test cell of one submission, run in this process."""
    from autograder.checks import scan
    from autograder.grade import _Missing, student_scope
    from autograder.notebook import is_imports, meta, source, strip_magics

    tests = {ex.test_id: ex for ex in chapter.exercises}
    student: dict = {"__name__": "__main__"}
    exec(_compile(strip_magics(chapter.imports_source), "<imports>"), student)  # noqa: S102
    scores = {}
    for index, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code" or is_imports(cell):
            continue
        grade_id = meta(cell).get("grade_id")
        if grade_id in tests:
            exercise = tests[grade_id]
            scope = student_scope(nb, chapter, exercise, index)
            scan.source_of = lambda obj, scope=scope: scope   # what the grader's proxies carry
            ns = dict(base_ns)
            ns.update({name: student.get(name, _Missing(name)) for name in chapter.api})
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(exercise.test_source, f"<test {grade_id}>", "exec"), ns)  # noqa: S102
                scores[grade_id] = exercise.points
            except Exception:  # noqa: BLE001 - any failure costs the cell's points, as in the grader
                scores[grade_id] = 0.0
        elif grade_id is not None or source(cell) not in chapter.narrative_sources:
            try:   # the student's cells; narrative demos are skipped (they grade nothing)
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    exec(_compile(strip_magics(source(cell)), f"<cell {index}>"), student)  # noqa: S102
            except Exception:  # noqa: BLE001 - an error in a cell does not stop the notebook
                pass
    return {ex.test_id: scores.get(ex.test_id, 0.0) for ex in chapter.exercises}


def _child(path: Path, chapter, base_ns: dict, write_fd: int) -> None:
    import nbformat
    import torch

    torch.set_num_threads(1)
    start = time.monotonic()
    try:
        nb = nbformat.from_dict(json.loads(path.read_text(encoding="utf-8")))   # written by the test
        result = {"scores": grade(nb, chapter, base_ns)}
        result["seconds"] = round(time.monotonic() - start, 2)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as this case's failure
        result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}   # small: one pipe write
    os.write(write_fd, json.dumps(result).encode())
    os._exit(0)


def main(*jobs: str) -> int:
    """``jobs``: ``CHAPTER=DIR`` pairs; prints ``{DIR: {case: result}}``."""
    from autograder.startup import skip_iri_format_check
    skip_iri_format_check()
    import nbformat  # noqa: F401 - imported once, before forking
    import torch  # noqa: F401
    # Imported lazily by torch on first use, once per process: here, not once per child.
    import torch._dynamo  # noqa: F401 - by some ops on the meta device (1.7 s)
    import torch.fx.experimental.symbolic_shapes  # noqa: F401 - by autograd's first call (sympy, 0.7 s)
    from autograder.course import source_notebook
    from autograder.notebook import read_chapter, strip_magics

    pending = []
    for job in jobs:
        chapter_id, folder = job.split("=", 1)
        chapter = read_chapter(source_notebook(chapter_id))
        base_ns: dict = {"__name__": "__grader__"}
        exec(compile(strip_magics(chapter.imports_source), "<imports>", "exec"), base_ns)  # noqa: S102
        budget = SECONDS_PER_CASE + chapter.training_budget
        pending += [(folder, path, chapter, base_ns, budget) for path in sorted(Path(folder).glob("*.ipynb"))]
    running: dict[int, tuple[str, str, int, float]] = {}
    results: dict[str, dict] = {folder: {} for folder in (job.split("=", 1)[1] for job in jobs)}
    while pending or running:
        while pending and len(running) < CHILDREN:
            folder, path, chapter, base_ns, budget = pending.pop(0)
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                _child(path, chapter, base_ns, write_fd)
            os.close(write_fd)
            running[pid] = (folder, path.stem, read_fd, time.monotonic() + budget)
        time.sleep(0.02)
        for pid, (folder, name, read_fd, deadline) in list(running.items()):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if not done and time.monotonic() < deadline:
                continue
            if not done:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            with os.fdopen(read_fd, "rb") as pipe:
                data = pipe.read()
            results[folder][name] = json.loads(data) if data else {
                "error": "no result: killed at its time limit" if not done else "no result (crashed)"}
            del running[pid]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
