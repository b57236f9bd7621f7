"""The corpus's fast tier: every case that is not hostile, graded in-process with the same test
cells and checks as the grader (``corpus/fast_tier.py``); the cases the full tier
(``test_corpus.py``) also grades must get the same scores both ways."""
from __future__ import annotations

import pytest

from conftest import REPO, needs_jupyter
from corpus.groups import CHAPTER, CORPORA, FAST_TIER, FULL_TIER

pytestmark = [needs_jupyter, pytest.mark.slow]

FAST = [(group, case) for group, cases in FAST_TIER.items() for case in cases]


@pytest.fixture(scope="module")
def fast_graded(tmp_path_factory):
    """group -> {case: {"scores": {grade_id: points}} or {"error": why}}, graded in-process."""
    import json
    import subprocess
    import sys

    import nbformat

    from autograder.course import released_notebook

    jobs = {}
    for group, cases in FAST_TIER.items():
        if not cases:
            continue
        chapter = CHAPTER.get(group, group)
        folder = tmp_path_factory.mktemp(f"fast_{group}")
        released = nbformat.read(str(released_notebook(chapter)), as_version=4)
        for case in cases:
            nbformat.write(case.build(released), folder / f"{case.name}.ipynb")
        jobs[group] = f"{chapter}={folder}"
    run = subprocess.run([sys.executable, "-m", "corpus.fast_tier", *jobs.values()],
                         cwd=REPO / "tests", capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout)
    return {group: results[job.split("=", 1)[1]] for group, job in jobs.items()}


@pytest.mark.parametrize("chapter,case", FAST, ids=[f"fast:{g}:{k.name}" for g, k in FAST])
def test_fast_tier_gives_expected_score(fast_graded, chapter, case):
    got = fast_graded[chapter].get(case.name, {"error": "not graded"})
    assert "scores" in got, f"{case.name}: {got['error']}"
    assert got["scores"] == case.expected, f"{case.name}: expected {case.expected}, got {got['scores']}"


def test_tiers_are_set_where_they_matter():
    """Every chapter has cases graded both ways."""
    for group in CORPORA:
        both = [c.name for c in FULL_TIER[group] if not c.hostile]
        assert both or group == "ch01_attacks", f"{group}: no case is graded by both tiers"


