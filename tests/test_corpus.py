"""The corpus: every submission, honest or hostile, graded through the real nbgrader flow, gets
exactly its expected score per exercise, in bounded time."""
from __future__ import annotations

import os
import re
import stat
import statistics
import time
from pathlib import Path

import pytest

from conftest import REPO, grade, make_course, needs_bwrap, needs_jupyter, scores
from corpus import attacks, ch01, ch02, ch03

pytestmark = [needs_jupyter, needs_bwrap, pytest.mark.slow]

# Each group is one course graded by one `grade` run; two run at a time (the machine has 2 cores).
CORPORA = {"ch01_attention": ch01.CASES, "ch01_attacks": attacks.CASES, "ch02_masking": ch02.CASES,
           "ch03_multihead": ch03.CASES}
CHAPTER = {"ch01_attacks": "ch01_attention"}
ALL = [(group, case) for group, cases in CORPORA.items() for case in cases]


def write_submission(course: Path, chapter: str, case) -> None:
    import nbformat

    released = nbformat.read(course / "release" / chapter / f"{chapter}.ipynb", as_version=4)
    folder = course / "submitted" / case.name / chapter
    folder.mkdir(parents=True)
    result = case.build(released)
    target = folder / (case.filename or f"{chapter}.ipynb")
    if isinstance(result, bytes):
        target.write_bytes(result)
    else:
        nbformat.write(result, target)
    for name, text in case.extra_files.items():
        (folder / name).write_text(text)
    if case.setup is not None:
        case.setup(folder, course)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    courses = {}
    for group, cases in CORPORA.items():
        chapter = CHAPTER.get(group, group)
        course = make_course(tmp_path_factory.mktemp(group), chapters=[chapter], cell_timeout=10)
        for case in cases:
            write_submission(course, chapter, case)
        courses[group] = (course, chapter)

    def run(group):
        course, chapter = courses[group]
        start = time.monotonic()
        done = grade(course, chapter)
        elapsed = time.monotonic() - start
        times = [float(t) for t in re.findall(r"test cells passed in ([0-9.]+) s", done.stdout + done.stderr)]
        return {"course": course, "scores": scores(course, chapter), "run": done, "elapsed": elapsed, "times": times}

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CORPORA, pool.map(run, CORPORA)))


@pytest.mark.parametrize("chapter,case", ALL, ids=[f"{g}:{k.name}" for g, k in ALL])
def test_submission_gets_expected_score(graded, chapter, case):
    got = graded[chapter]["scores"].get(case.name)
    assert got is not None, f"{case.name} was not graded:\n{graded[chapter]['run'].stdout[-3000:]}"
    assert got == case.expected, f"{case.name}: expected {case.expected}, got {got}"


@pytest.mark.parametrize("chapter", list(CORPORA))
def test_corpus_grades_in_bounded_time_and_touches_nothing_else(graded, chapter):
    g = graded[chapter]
    assert len(g["times"]) == len(CORPORA[chapter]), g["run"].stdout[-2000:]
    print(f"\n{chapter}: {len(g['times'])} submissions in {g['elapsed']:.0f} s; per submission "
          f"median {statistics.median(g['times']):.1f} s, worst {max(g['times']):.1f} s")
    assert max(g["times"]) < 120
    assert not list(g["course"].rglob("pwned.txt")), "a submission wrote into another student's folder"
    feedback = list((g["course"] / "feedback").rglob("*.html"))
    assert len(feedback) == len(CORPORA[chapter])
    for page in feedback:
        text = page.read_text()
        assert "BEGIN HIDDEN TESTS" not in text and "compare_with_reference" not in text, page


@pytest.mark.parametrize("chapter", list(CORPORA))
def test_nothing_unsafe_reaches_autograded_or_feedback(graded, chapter):
    """What nbgrader copies on the host holds only plain files of bounded size: no link, FIFO or
    device, no solution, no host secret, no student script."""
    course = graded[chapter]["course"]
    shadow = [line for line in Path("/etc/shadow").read_text().splitlines() if line.strip()][:1] \
        if os.access("/etc/shadow", os.R_OK) else []
    for top in ("autograded", "feedback"):
        for path in (course / top).rglob("*"):
            mode = path.lstat().st_mode
            assert stat.S_ISREG(mode) or stat.S_ISDIR(mode), f"{path} is not a plain file"
            if stat.S_ISREG(mode):
                assert path.stat().st_nlink == 1, f"{path} is a hard link"
                # bounded by what a notebook may be (32 MiB), whatever its code prints or holds
                assert path.stat().st_size < 32 * 2**20, f"{path} is {path.stat().st_size} bytes"
                text = path.read_bytes().decode("utf-8", "replace")
                assert "instructor only" not in text, path
                assert not any(line in text for line in shadow), f"{path} holds /etc/shadow"
                if path.suffix == ".html":
                    assert "<script>document.title" not in text and 'onerror="alert' not in text, path
    from autograder.leaks import find_leaks
    # The feedback is what students get back (autograded/ holds the hidden tests, by design).
    linked = [course / "feedback" / student for student in
              ("notebook_is_symlink_to_solutions", "renamed_symlink_to_solutions", "assignment_folder_is_a_symlink")]
    assert not find_leaks(REPO / "solutions", [p for p in linked if p.exists()])
