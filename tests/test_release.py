"""What students receive: generated from solutions/, in sync, and free of solutions and hidden tests."""
from __future__ import annotations

import json

import pytest

from autograder.leaks import find_leaks, secret_lines
from conftest import CHAPTERS, REPO, needs_jupyter

pytestmark = needs_jupyter


def test_notebooks_are_in_sync_with_solutions():
    from autograder.release import stale

    assert stale() == [], "notebooks/ is stale: run `python -m autograder release`"


def test_release_is_deterministic(tmp_path):
    from autograder.release import generate

    generate(tmp_path / "a", CHAPTERS)
    generate(tmp_path / "b", CHAPTERS)
    for chapter in CHAPTERS:
        name = f"{chapter}/{chapter}.ipynb"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_leak_check_finds_a_planted_leak(tmp_path):
    secret = sorted(secret_lines(REPO / "solutions"))
    assert len(secret) > 20, "solution/hidden blocks should have substantial lines to look for"
    quoted = [line for line in secret if '"' in line] or secret   # escaped inside the JSON
    (tmp_path / "leaky.ipynb").write_text(json.dumps({"cells": [{"cell_type": "code", "source": quoted[0]}]}))
    assert find_leaks(REPO / "solutions", [tmp_path])


def test_released_notebooks_contain_no_solution_or_hidden_test_lines():
    assert find_leaks(REPO / "solutions", [REPO / "notebooks"]) == []


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_released_notebook_has_stubs_and_no_markers(chapter):
    text = (REPO / "notebooks" / chapter / f"{chapter}.ipynb").read_text()
    assert "YOUR CODE HERE" in text and "raise NotImplementedError()" in text
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "reference(\\\""):
        assert marker not in text, marker


def test_a_socket_or_fifo_in_solutions_fails_with_a_clear_message(tmp_path):
    """A kernel started in a chapter's folder can leave its IPC sockets there; nbgrader would then
    fail with "No such device or address" deep in a traceback."""
    import os
    import shutil

    from autograder.release import generate

    solutions = tmp_path / "solutions"
    shutil.copytree(REPO / "solutions" / "ch02_masking", solutions / "ch02_masking")
    os.mkfifo(solutions / "ch02_masking" / "kernel-ipc-1")
    with pytest.raises(RuntimeError, match=r"cannot release ch02_masking: .*kernel-ipc-1\. Remove them\."):
        generate(tmp_path / "out", ["ch02_masking"], solutions=solutions)
    assert not (tmp_path / "out" / "ch02_masking").exists()
