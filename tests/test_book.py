"""The reader's path: the book builds with warnings as errors, every chapter page shows its
figures, the site carries its own math and the course package, and nothing in the student
edition (site or downloadable notebook) is a solution or a hidden test; the solutions edition
shows the reference and says so on every page."""
from __future__ import annotations

import os
import re
import shutil

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


# --- The book as a reader finds it (issue 9) ------------------------------------------------

URL = "https://github.com/example-org/attention-from-scratch"


def _text_outside_code(page: str) -> str:
    return re.sub(r"<(pre|code)\b.*?</\1>", "", page, flags=re.S)


def test_no_raw_double_dollar_on_any_page(html):
    """`$$` inside a list item needs myst_dmath_double_inline, or it shows as a stray `$`."""
    for page in html.rglob("*.html"):
        assert "$$" not in _text_outside_code(page.read_text()), page


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_mathjax_is_carried_by_the_site_at_a_relative_path(html, chapter):
    page_path = html / "book" / "_chapters" / f"{chapter}.html"
    srcs = re.findall(r'<script[^>]+src="([^"]*MathJax\.js[^"]*)"', page_path.read_text())
    assert len(srcs) == 1 and "://" not in srcs[0] and not srcs[0].startswith("/"), srcs
    path, _, query = srcs[0].partition("?")
    mathjax = (page_path.parent / path).resolve()
    assert mathjax.is_file() and mathjax.is_relative_to(html.resolve())
    config = query.split("config=")[1].split("&")[0]
    assert (mathjax.parent / "config" / f"{config}.js").is_file()
    assert list((mathjax.parent / "fonts").rglob("MathJax_Main-Regular.woff"))


def test_book_css_is_loaded(html):
    page = (html / "book" / "_chapters" / f"{CHAPTERS[0]}.html").read_text()
    assert "_static/custom.css" in page
    # Sphinx 7.4 leaves an existing static file alone: the build must replace it.
    assert (html / "_static" / "custom.css").read_text() == (REPO / "book" / "_static" / "custom.css").read_text()


def test_figure_alt_text_is_carried_from_the_source_cell():
    """reader_notebook keeps a narrative cell's `mystnb` rendering options (myst-nb reads the
    alt text of its figures from `mystnb.image.alt`)."""
    import nbformat

    from autograder.book import reader_notebook
    from autograder.course import source_notebook
    from autograder.notebook import is_solution, is_test

    chapter = CHAPTERS[0]
    nb = nbformat.read(source_notebook(chapter), as_version=4)
    i = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and not (is_solution(c) or is_test(c)))
    nb.cells[i].metadata["mystnb"] = {"image": {"alt": "a heatmap of the weights"}}
    page = reader_notebook(chapter, executed=nb)
    assert page.cells[i].metadata["mystnb"] == {"image": {"alt": "a heatmap of the weights"}}


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_figures_have_alt_text(html, chapter):
    """Alt text comes from each figure cell's `mystnb.image.alt` (docs/adding-a-chapter.md);
    without it myst-nb writes the image's file path."""
    page = (html / "book" / "_chapters" / f"{chapter}.html").read_text()
    alts = re.findall(r'<img[^>]*\balt="([^"]*)"[^>]*src="[^"]+\.png"', page)
    bad = [a for a in alts if not a.strip() or a.endswith(".png")]
    assert not bad, f"{chapter}: {len(bad)} figure(s) without alt text (set mystnb.image.alt in the source cell)"


def test_course_wheel_is_offered_and_holds_no_solution(html, tmp_path):
    """A downloaded notebook runs its visible tests with the wheel the book offers."""
    import subprocess
    import sys
    import zipfile

    from autograder.publish import WHEEL_NAME

    intro = (html / "book" / "intro.html").read_text()
    assert f"../_static/wheels/{WHEEL_NAME}" in intro
    wheel = html / "_static" / "wheels" / WHEEL_NAME
    files = tmp_path / "files"
    zipfile.ZipFile(wheel).extractall(files)
    assert (files / "autograder" / "checks" / "ch01.py").is_file()
    assert not list(files.rglob("*.ipynb")) and not list(files.rglob("__pycache__"))
    # The wheel exposes nothing the package does not: the same leak-check hits as the
    # repository's own autograder/ (see the report on checks/masks.py), none from anything else.
    def hits(root):
        return sorted(h.replace(str(root), "") for h in find_leaks(REPO / "solutions", [root / "autograder"]))
    assert hits(files) == hits(REPO)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(target), str(wheel)], check=True)
    run = subprocess.run([sys.executable, "-c", "import autograder; from autograder.checks.ch01 import check_softmax; "
                          "print(autograder.__file__)"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith(str(target)), run.stdout


def test_no_launch_buttons_without_a_repository_url(html):
    page = (html / "book" / "_chapters" / f"{CHAPTERS[0]}.html").read_text()
    assert "colab.research.google.com" not in page and "mybinder.org" not in page


@pytest.fixture(scope="module")
def solutions_html(html):
    """The solutions edition, built with a repository URL: one build tests both (the chapters
    were already executed for `html`, which is built without a URL)."""
    from autograder.book import build

    return build(strict=True, edition="solutions", repository_url=URL)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_launch_buttons_open_the_released_notebook(solutions_html, chapter):
    page = (solutions_html / "book" / "_chapters" / f"{chapter}.html").read_text()
    target = f"notebooks/{chapter}/{chapter}.ipynb"
    assert f"https://colab.research.google.com/github/example-org/attention-from-scratch/blob/main/{target}" in page
    assert f"https://mybinder.org/v2/gh/example-org/attention-from-scratch/main?urlpath=lab/tree/{target}" in page
    assert f"_sources/book/_chapters/{chapter}.ipynb" in page      # the page's own download stays


def _visible_text(page: str) -> str:
    import html as htmllib

    return htmllib.unescape(re.sub(r"<[^>]+>", "", page))


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_solutions_edition_shows_the_reference_and_no_hidden_test(solutions_html, html, chapter):
    from autograder.leaks import BLOCK
    from autograder.notebook import read_cells, source
    from autograder.course import source_notebook

    solution, hidden = set(), set()
    for cell in read_cells(source_notebook(chapter)):
        if cell.get("cell_type") != "code":     # written answers are rendered (math, markup)
            continue
        for kind, block, _ in BLOCK.findall(source(cell)):
            lines = {s.strip() for s in block.splitlines() if len(s.strip()) >= 20 and not s.strip().startswith("#")}
            (solution if kind == "SOLUTION" else hidden).update(lines)
    shown = _visible_text((solutions_html / "book" / "_chapters" / f"{chapter}.html").read_text())
    assert solution and all(s in shown for s in solution - hidden), chapter
    assert not [s for s in hidden - solution if s in shown]
    assert "BEGIN SOLUTION" not in shown and "HIDDEN TESTS" not in shown
    student = _visible_text((html / "book" / "_chapters" / f"{chapter}.html").read_text())
    assert not [s for s in solution if s in student]


def test_solutions_edition_has_a_banner_on_every_page(solutions_html, html):
    from autograder.book import SOLUTIONS_BANNER

    banner = SOLUTIONS_BANNER.split(".")[0]
    pages = [p for p in solutions_html.rglob("*.html") if p.name not in ("search.html", "genindex.html")
             and "_static" not in p.parts and p.name != "index.html"]
    assert len(pages) >= len(CHAPTERS) + 3
    for page in pages:
        assert banner in page.read_text(), page
    for page in html.rglob("*.html"):
        assert banner not in page.read_text(), page
    assert not (REPO / "book" / "_chapters").joinpath("solutions").exists()
    assert find_leaks(REPO / "solutions", [REPO / "book"]) == []      # book/ never holds a solution


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install -y chromium)")
def test_math_is_typeset_in_a_browser_with_no_network(html):
    """Headless Chromium, served from localhost in a network namespace when bubblewrap is there:
    MathJax replaces every math span's TeX with CommonHTML output."""
    import subprocess
    import sys

    page = f"book/_chapters/{CHAPTERS[0]}.html"
    browse = (f"{CHROMIUM} --headless --no-sandbox --disable-gpu --disable-background-networking "
              "--disable-component-update --disable-sync --no-first-run --virtual-time-budget=20000 "
              f"--dump-dom http://127.0.0.1:8767/{page}")
    script = (f"{sys.executable} -m http.server 8767 --bind 127.0.0.1 >/dev/null 2>&1 & "
              f"for i in $(seq 50); {{ {sys.executable} -c 'import socket; socket.create_connection((\"127.0.0.1\", 8767))' "
              f"2>/dev/null && break; sleep 0.1; }}; {browse} 2>/dev/null; kill %1")
    cmd = ["bash", "-c", script]
    if shutil.which("bwrap"):
        cmd = ["bwrap", "--bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-net",
               "--die-with-parent"] + cmd
    dom = subprocess.run(cmd, cwd=html, capture_output=True, text=True, timeout=120).stdout
    spans = (html / page).read_text().count('class="math notranslate nohighlight"')
    assert spans > 10
    assert dom.count('class="mjx-chtml') >= spans, "MathJax did not typeset the page"
    assert not re.search(r'nohighlight">\s*\\[(\[]', dom), "raw TeX left on the page"


def test_the_build_talks_to_its_kernels_over_unix_sockets(tmp_path):
    """Not localhost TCP: no port another user on the machine could reach, and no "running over
    TCP without encryption" warning from every kernel in the build's output."""
    import subprocess
    import sys

    import nbformat

    path = tmp_path / "tiny.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")]), path)
    code = (f"from pathlib import Path\nfrom autograder.book import _execute\n"
            f"nb = _execute(Path({str(path)!r}), 120)\nprint(nb.cells[0].outputs[0].text.strip())\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "42"
    assert "over TCP" not in run.stderr, run.stderr[-2000:]
