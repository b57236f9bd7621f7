"""The corpus: every submission, honest or hostile, gets exactly its expected score per exercise.

Two tiers (``tests/corpus/common.py``, ``tiers``): here, hostile cases, each chapter's reference
with its narrative and its blank release (and the few cases whose path differs in the sandbox) are
graded through the real nbgrader flow and the sandbox, in bounded time; every case that is not
hostile is graded by the in-process fast tier (``test_corpus_fast.py``), with the same test cells
and checks, at a tenth of the cost. The cases graded both ways must agree, which keeps the fast
tier honest. A submission costs 5-8 s of CPU here (sandbox and torch start-up, its tests, nbgrader's
autograde and feedback), so a case earns its place only with an attack or a path no other case has."""
from __future__ import annotations

import os
import re
import stat
import statistics
import time
from pathlib import Path

import pytest

from autograder.course import source_notebook
from autograder.notebook import read_chapter
from conftest import NOTEBOOK_TIMEOUT, REPO, copy_course, grade, make_course, needs_bwrap, needs_jupyter, scores
from corpus.groups import CHAPTER, CORPORA, FULL_TIER

pytestmark = [needs_jupyter, needs_bwrap, pytest.mark.slow]

ALL = [(group, case) for group, cases in FULL_TIER.items() for case in cases]


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


# Submissions per grading run, and runs at a time: much of a hostile case's time is spent waiting
# for a limit (a cell's timeout, a test's deadline), so three runs share the two cores well. Each
# run costs ~15 s of CPU before and after its submissions (nbgrader's commands, the sandbox probe),
# so a chapter's cases go in as few runs as keep the longest one short of the rest together.
SHARD, RUNS_AT_ONCE = 36, 3
# Chapter 1's cells and tests take a second or two, so its limits are tighter: the attacks that
# run until a limit (loops, slow calls, fork bombs) then cost half as much. 10 s elsewhere.
CELL_TIMEOUT = {"ch01_attention": 5.0, "ch01_attacks": 5.0}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """group -> {"courses", "scores", "runs", "times" (student -> s), "elapsed"}, each group graded
    in shards of at most SHARD submissions, one nbgrader course each (copies of one template
    that holds every chapter: a new gradebook alone costs nbgrader ~5 s)."""
    from concurrent.futures import ThreadPoolExecutor

    chapters = sorted({CHAPTER.get(group, group) for group, cases in FULL_TIER.items() if cases})
    template = make_course(tmp_path_factory.mktemp("template"), chapters=chapters, cell_timeout=10)
    shards = []
    for group, cases in FULL_TIER.items():
        chapter = CHAPTER.get(group, group)
        runs = -(-len(cases) // SHARD)
        for i in range(runs):
            course = copy_course(template, tmp_path_factory.mktemp(f"{group}_{i}"), CELL_TIMEOUT.get(group, 10.0))
            for case in cases[i::runs]:     # interleaved: the slow cases spread over the runs
                write_submission(course, chapter, case)
            shards.append((group, chapter, course))
    # Longest first: a chapter whose notebook trains (chapter 7's reference, ~40 s), then by number
    # of submissions.
    trains = {chapter: bool(read_chapter(source_notebook(chapter)).training_ids) for chapter in chapters}
    shards.sort(key=lambda shard: (not trains[shard[1]], -len(list((shard[2] / "submitted").iterdir()))))

    def run(shard):
        group, chapter, course = shard
        start = time.monotonic()
        done = grade(course, chapter)
        elapsed = time.monotonic() - start
        times = {student: float(t) for student, t in re.findall(
            r"(\S+)/\S+: \d+ of \d+ test cells passed in ([0-9.]+) s", done.stdout + done.stderr)}
        return group, course, scores(course, chapter), done, elapsed, times

    results = {group: {"courses": [], "scores": {}, "runs": [], "times": {}, "elapsed": 0.0} for group in CORPORA}
    with ThreadPoolExecutor(max_workers=RUNS_AT_ONCE) as pool:
        for group, course, got, done, elapsed, times in pool.map(run, shards):
            g = results[group]
            g["courses"].append(course)
            g["scores"].update(got)
            g["runs"].append(done)
            g["times"].update(times)
            g["elapsed"] += elapsed
    return results


# Seconds a run may take past its budget: the last cell's limit is checked between cells, and
# stopping the sandbox and writing the report follow.
TEARDOWN_SLACK = 60


def _log(g) -> str:
    return "\n".join(run.stdout[-2000:] for run in g["runs"])


@pytest.mark.parametrize("chapter,case", ALL, ids=[f"{g}:{k.name}" for g, k in ALL])
def test_submission_gets_expected_score(graded, chapter, case):
    got = graded[chapter]["scores"].get(case.name)
    assert got is not None, f"{case.name} was not graded:\n{_log(graded[chapter])}"
    assert got == case.expected, f"{case.name}: expected {case.expected}, got {got}"


@pytest.mark.parametrize("chapter", list(CORPORA))
def test_corpus_grades_in_bounded_time_and_touches_nothing_else(graded, chapter):
    g = graded[chapter]
    assert len(g["times"]) == len(FULL_TIER[chapter]), _log(g)
    slowest = sorted(g["times"].items(), key=lambda item: -item[1])[:5]
    print(f"\n{chapter}: {len(g['times'])} submissions in {g['elapsed']:.0f} s of grading runs; per submission "
          f"median {statistics.median(g['times'].values()):.1f} s; slowest "
          + ", ".join(f"{name} {t:.1f} s" for name, t in slowest))
    # No submission outlives the budget the grader gives a notebook (plus its training cells'): that
    # bound is the grader's, so it holds on any machine; how fast grading is lives in bench/.
    budget = NOTEBOOK_TIMEOUT + read_chapter(source_notebook(CHAPTER.get(chapter, chapter))).training_budget
    over = {name: t for name, t in g["times"].items() if t > budget + TEARDOWN_SLACK}
    assert not over, f"graded past the notebook's budget of {budget:g} s: {over}"
    assert not [p for c in g["courses"] for p in c.rglob("pwned.txt")], "a submission wrote into another student's folder"
    feedback = [p for c in g["courses"] for p in (c / "feedback").rglob("*.html")]
    assert len(feedback) == len(FULL_TIER[chapter])
    for page in feedback:
        text = page.read_text()
        assert "BEGIN HIDDEN TESTS" not in text and "compare_with_reference" not in text, page


@pytest.mark.parametrize("chapter", list(CORPORA))
def test_nothing_unsafe_reaches_autograded_or_feedback(graded, chapter):
    """What nbgrader copies on the host holds only plain files of bounded size: no link, FIFO or
    device, no solution, no host secret, no student script."""
    courses = graded[chapter]["courses"]
    shadow = [line for line in Path("/etc/shadow").read_text().splitlines() if line.strip()][:1] \
        if os.access("/etc/shadow", os.R_OK) else []
    for path in (p for course in courses for top in ("autograded", "feedback") for p in (course / top).rglob("*")):
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
    linked = [course / "feedback" / student for course in courses for student in
              ("notebook_is_symlink_to_solutions", "renamed_symlink_to_solutions", "assignment_folder_is_a_symlink")]
    assert not find_leaks(REPO / "solutions", [p for p in linked if p.exists()])
