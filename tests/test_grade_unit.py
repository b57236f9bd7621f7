"""grade.py and the grade command without nbgrader: what holds whatever breaks."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from autograder import grade
from autograder.notebook import read_chapter
from autograder.sandbox.identity import HOST_UID_BASE, fresh_host_uid
from autograder.sandbox.process import SandboxUnavailable
from conftest import REPO

nbformat = pytest.importorskip("nbformat")
CH = "ch01_attention"


def released():
    return nbformat.read(REPO / "notebooks" / CH / f"{CH}.ipynb", as_version=4)


def chapter():
    return read_chapter(REPO / "solutions" / CH / f"{CH}.ipynb")


def test_the_notebook_output_total_is_held_by_the_grader():
    out = grade._Outputs(limit=1000)
    first = out.stream("x" * 800)
    second = out.stream("y" * 800)
    third = out.stream("z")
    assert len(first[0].text) == 800
    assert second[0].text.startswith("y" * 200) and "not shown" in second[0].text
    assert "output limit" in third[0].text


def test_lone_surrogates_never_reach_a_notebook():
    (cell,) = grade._Outputs(limit=100).stream("caf\udce9")
    assert "\udce9" not in cell.text
    nbformat.validate(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[cell])]))


def test_every_sandbox_gets_its_own_host_uid():
    uids = {fresh_host_uid() for _ in range(100)}
    assert len(uids) == 100 and min(uids) >= HOST_UID_BASE


def test_no_sandbox_means_failing_verdicts_not_a_crash(monkeypatch):
    def broken(*args, **kwargs):
        raise SandboxUnavailable("bwrap: no user namespaces")
    monkeypatch.setattr(grade, "Sandbox", broken)
    nb = released()
    report = grade.grade_notebook(nb, chapter(), solutions_dir=REPO / "solutions")
    assert {v.grade_id for v in report.verdicts} == {ex.test_id for ex in chapter().exercises}
    assert not any(v.passed for v in report.verdicts) and any("sandbox" in e for e in report.events)
    tests = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") in {ex.test_id for ex in chapter().exercises}]
    assert all(c.outputs and c.outputs[0].output_type == "error" for c in tests)


def test_an_internal_error_fails_the_rest_and_keeps_what_was_decided(monkeypatch):
    class Fake:
        limits = grade.Limits()
        alive = True

        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    calls = []

    def boom(self, index, cell):
        calls.append(index)
        if len(calls) > 3:
            raise KeyError("a grader bug")
        cell.outputs = []
    monkeypatch.setattr(grade, "Sandbox", Fake)
    monkeypatch.setattr(grade._Grading, "student_cell", boom)
    report = grade.grade_notebook(released(), chapter(), solutions_dir=REPO / "solutions")
    assert len(report.verdicts) == len(chapter().exercises)
    assert any("internal error" in e for e in report.events)


def test_the_package_nbgrader_loads_is_not_the_working_directorys(tmp_path):
    from autograder.__main__ import _package_seen_by_nbgrader
    shutil.copytree(REPO / "autograder", tmp_path / "autograder", ignore=shutil.ignore_patterns("__pycache__"))
    seen = _package_seen_by_nbgrader(tmp_path)
    assert seen is not None and Path(seen).resolve() == (REPO / "autograder").resolve(), (seen, sys.executable)


def test_a_training_cell_binds_names_by_unpacking_too():
    """``model, history = train()`` in a training cell hands both names to the next test cell."""
    from autograder.notebook import assigned_names
    code = "model, (history, *rest) = train()\nsteps: int = 3\nsteps += 1\n[a, b] = 1, 2\ndef f(): pass\n"
    assert assigned_names(code) == ["f", "model", "history", "rest", "steps", "a", "b"]


def test_a_cell_after_a_killed_process_runs_in_a_fresh_one():
    """A test whose answer is too large kills the student's process. The next cell (the next
    exercise's class, say) runs in a restarted process: sent to the dying one, it would fail and
    be dropped from the replay, and the next exercise would find its name undefined."""
    from autograder.sandbox.process import CellRun, Limits

    class KilledSandbox:
        alive, limits = False, Limits()

        def __init__(self):
            self.calls = []

        def restart(self):
            self.calls.append("restart")
            self.alive = True

        def run_cell(self, src, timeout=None):
            self.calls.append(("run", self.alive))
            return CellRun("ok") if self.alive else CellRun("crashed", error="not running")

    sandbox = KilledSandbox()
    run = grade._Grading(released(), chapter(), sandbox, budget_seconds=60)
    run.cell(1, nbformat.v4.new_code_cell("class Embeddings: pass"))
    assert sandbox.calls == ["restart", ("run", True)]


def test_replaying_a_result_in_nbgrader_does_not_import_torch():
    """nbgrader's autograde only replays what the class run graded: importing torch there costs
    ~3 s of CPU per grading run for nothing."""
    import subprocess

    code = ("import sys, nbformat\n"
            "from autograder.nbgrader_plugin import SandboxedGrading\n"
            "from autograder.grading_jobs import replay\n"
            "nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('x = 1')])\n"
            "report = replay(nb, {'outputs': {'0': [{'output_type': 'stream', 'name': 'stdout', 'text': 'hi'}]},\n"
            "                     'verdicts': [{'grade_id': 't', 'passed': True, 'message': 'ok', 'seconds': 0.1}],\n"
            "                     'events': [], 'seconds': 0.1})\n"
            "assert report.verdicts[0].passed and nb.cells[0].outputs[0].text == 'hi'\n"
            "print('torch' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"
