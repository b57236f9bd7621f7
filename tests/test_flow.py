"""The instructor's whole path through nbgrader, in a temporary course with a real exchange:
release -> fetch -> submit -> collect -> autograde (sandboxed) -> feedback -> export."""
from __future__ import annotations

import copy
import csv

import pytest

from autograder.notebook import meta
from conftest import REPO, grade, make_course, nbgrader, needs_bwrap, needs_jupyter, scores

pytest.importorskip("nbformat", reason="needs nbformat/nbgrader (not on GPU graders)")   # the corpus needs it
from corpus.ch01 import SOFTMAX_LSE  # noqa: E402

pytestmark = [needs_jupyter, needs_bwrap, pytest.mark.slow]
CH = "ch01_attention"


def _with_answers(nb, answers: dict):
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if meta(cell).get("grade_id") in answers:
            cell.source = answers[meta(cell)["grade_id"]]
    return nb


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    import nbformat

    root = make_course(tmp_path_factory.mktemp("course"), chapters=[CH])
    nbgrader(root, "release_assignment", CH, "--force")
    source = nbformat.read(REPO / "solutions" / CH / f"{CH}.ipynb", as_version=4)
    reference_answers = {meta(c)["grade_id"]: c.source for c in source.cells if meta(c).get("solution")}
    students = {
        "ref": lambda nb: _with_answers(nb, reference_answers),
        "blank": lambda nb: nb,
        # (honest alternatives written differently are the corpus's job: tests/corpus/)
        # correct softmax, wrong attention, and every test cell rewritten to `pass`
        "tamper": lambda nb: _with_answers(nb, {
            "softmax_answer": SOFTMAX_LSE,
            "attention_answer": "def scaled_dot_product_attention(q, k, v):\n    return v, q\n",
            "softmax_tests": "pass", "attention_tests": "pass", "self_attention_tests": "pass"}),
    }
    for student, edit in students.items():
        home = root / "homes" / student
        home.mkdir(parents=True)
        (home / "nbgrader_config.py").write_text(
            f"c = get_config()\nc.Exchange.root = {str(root / 'exchange')!r}\n"
            "c.CourseDirectory.course_id = 'attention-from-scratch'\n")
        nbgrader(home, "fetch_assignment", CH)
        path = home / CH / f"{CH}.ipynb"
        nbformat.write(edit(nbformat.read(path, as_version=4)), path)
        nbgrader(home, "submit", CH, "--student", student)
    nbgrader(root, "collect", CH)
    run = grade(root, CH)
    return root, run, scores(root, CH)


def test_every_submission_was_collected_and_graded(course):
    root, run, got = course
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert set(got) == {"ref", "blank", "tamper"}


def test_reference_answers_score_full_marks(course):
    assert course[2]["ref"] == {"softmax_tests": 2.0, "attention_tests": 3.0, "self_attention_tests": 3.0}


def test_untouched_release_scores_zero(course):
    assert sum(course[2]["blank"].values()) == 0


def test_test_cells_rewritten_to_pass_are_restored_and_fail(course):
    assert course[2]["tamper"] == {"softmax_tests": 2.0, "attention_tests": 0.0, "self_attention_tests": 0.0}


def test_feedback_names_the_failure_and_hides_hidden_tests(course):
    root = course[0]
    page = (root / "feedback" / "tamper" / CH / f"{CH}.html").read_text()
    assert "should be a torch.Tensor" in page or "is wrong" in page or "has shape" in page
    for path in (root / "feedback").rglob("*.html"):
        text = path.read_text()
        assert "BEGIN HIDDEN TESTS" not in text and "compare_with_reference" not in text
        assert "reference(" not in text, "a hidden test's reference lookup is shown"


def test_grades_are_exported(course):
    rows = {r["student_id"]: float(r["score"]) for r in csv.DictReader((course[0] / "grades.csv").open())
            if r["assignment"] == CH}
    assert rows == {"ref": 8.0, "blank": 0.0, "tamper": 2.0}
