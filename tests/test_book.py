"""The reader's path: the book builds with warnings as errors, every chapter page shows its
figures, and nothing on the site or in a downloadable notebook is a solution or a hidden test."""
from __future__ import annotations

import re

import pytest

from autograder.leaks import find_leaks
from conftest import CHAPTERS, REPO, needs_jupyter

pytestmark = [needs_jupyter, pytest.mark.slow]


@pytest.fixture(scope="module")
def html():
    from autograder.book import build

    return build(strict=True)


def test_book_builds_with_warnings_as_errors(html):
    assert (html / "index.html").exists()
    assert (html / "book" / "instructor.html").exists() and (html / "book" / "grader.html").exists()


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_page_has_figures_math_and_exercise_stubs(html, chapter):
    page = (html / "book" / "_chapters" / f"{chapter}.html").read_text()
    figures = re.findall(r'<img[^>]+src="[^"]+\.png"', page)
    assert len(figures) >= 2, f"{chapter}: expected figures from the solution run, found {len(figures)}"
    assert "YOUR CODE HERE" in page and "NotImplementedError" in page
    assert "math notranslate" in page, "no typeset math on the page"
    assert "Traceback" not in page


def test_no_solution_or_hidden_test_in_the_built_site(html):
    assert find_leaks(REPO / "solutions", [html]) == []
    for path in html.rglob("*"):
        if path.suffix in (".html", ".ipynb", ".txt", ".md"):
            text = path.read_text(errors="ignore")
            assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text, path


def test_solutions_autograder_and_tests_are_not_built(html):
    for folder in ("solutions", "autograder", "tests", "notebooks"):
        assert not (html / folder).exists(), folder


def test_exercise_notebooks_are_downloadable(html):
    downloads = {p.name for p in (html / "_downloads").rglob("*.ipynb")}
    assert {f"{c}.ipynb" for c in CHAPTERS} <= downloads
