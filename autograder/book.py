"""Build the book's chapter pages: the student notebook, with the outputs a correct solution gives.

For each chapter the *source* notebook is executed (reference in place, so every figure and
number is real), then its outputs are copied onto the *released* notebook's cells. Answer and
test cells keep the released source and get no outputs, so no solution code, hidden test or
traceback that could quote one reaches the page. stderr outputs are dropped for the same reason.
The result goes to ``book/_chapters/`` (generated, git-ignored); Jupyter Book does not execute
anything itself.

Two editions: the **student** edition (the default, what is published during a course: no
solution anywhere, checked for leaks after every build) and the **solutions** edition (the same
pages with the reference solutions in the answer cells and a banner on every page, for
instructors to publish after a deadline or for self-learners), staged and built under
``_build/solutions/`` so that ``book/`` never holds a solution.
"""
from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from traitlets.config import Config

from .course import CHAPTERS, REPO, ensure_tools_on_path, notebook_in, released_notebook, source_notebook
from .notebook import is_solution, is_test, source
from .publish import STATIC, build_wheel, copy_mathjax, point_launch_buttons_at_notebooks
from .startup import tool_command

OUT = REPO / "book" / "_chapters"
EDITIONS = ("student", "solutions")
SOLUTIONS_BANNER = ("Solutions edition — contains the reference solutions. "
                    "Work the exercises in the student edition first.")
#: Added to the configuration when a repository URL is given (the theme needs the URL to make them).
LAUNCH_BUTTONS = {"notebook_interface": "jupyterlab", "binderhub_url": "https://mybinder.org",
                  "colab_url": "https://colab.research.google.com"}
_MARKER = re.compile(r"^[ \t]*### (BEGIN|END) SOLUTION[ \t]*\n?", re.M)
_executed: dict[tuple[str, str], object] = {}


def execute_source(chapter: str, timeout: int = 600):
    """The source notebook run with the reference. Kept per process, keyed by the notebook's
    bytes, so that building both editions (or the tests' several builds) runs each chapter once."""
    path = source_notebook(chapter)
    key = (chapter, hashlib.sha256(path.read_bytes()).hexdigest())
    if key not in _executed:
        _executed[key] = _execute(path, timeout)
    return copy.deepcopy(_executed[key])


def _execute(path: Path, timeout: int):
    """Run the notebook in a kernel that talks to this process over Unix sockets in a private
    folder, not localhost TCP: no port another local user could reach, and no "running over TCP
    without encryption" warning from every kernel in the build's output."""
    nb = nbformat.read(path, as_version=4)
    # Figures must come out inline whatever the caller's MPLBACKEND says (Agg would draw nothing).
    old = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        with tempfile.TemporaryDirectory(prefix="afs-kernel-") as sockets:
            # Absolute: the kernel runs in the notebook's folder, the client here.
            config = Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(sockets, "k")}})
            NotebookClient(nb, kernel_name="python3", timeout=timeout, config=config,
                           resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if old is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = old
    return nb


def solution_source(cell) -> str:
    """An answer cell's reference code as a reader should see it: without nbgrader's markers."""
    return _MARKER.sub("", source(cell))


def reader_notebook(chapter: str, executed=None, edition: str = "student"):
    """The released notebook with the executed source's outputs on its narrative cells; in the
    solutions edition, the answer cells show the reference (test cells keep the released source,
    so hidden tests never appear)."""
    if edition not in EDITIONS:
        raise ValueError(f"edition must be one of {EDITIONS}, not {edition!r}")
    executed = executed if executed is not None else execute_source(chapter)
    released = nbformat.read(released_notebook(chapter), as_version=4)
    if [c.cell_type for c in executed.cells] != [c.cell_type for c in released.cells]:
        raise RuntimeError(f"{chapter}: notebooks/ does not match solutions/; run `python -m autograder release`")
    page = copy.deepcopy(released)
    for src, dst in zip(executed.cells, page.cells):
        if "mystnb" in src.get("metadata", {}) and not is_test(src):
            # Rendering options (figure alt text) are the source's: nbgrader may not keep them.
            dst.metadata["mystnb"] = copy.deepcopy(src.metadata["mystnb"])
        if edition == "solutions" and is_solution(src):
            dst.source = solution_source(src)
        if dst.cell_type != "code":
            continue
        dst.execution_count = None
        if is_solution(src) or is_test(src):
            dst.outputs = []
            continue
        for out in src.get("outputs", []):
            if out.output_type == "error":
                raise RuntimeError(f"{chapter}: a narrative cell failed when run with the reference:\n"
                                   f"{out.ename}: {out.evalue}")
        dst.outputs = [o for o in src.get("outputs", [])
                       if not (o.output_type == "stream" and o.name == "stderr")]
    return page


def write_pages(chapters=CHAPTERS, edition: str = "student", out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for chapter in chapters:
        path = out / f"{chapter}.ipynb"
        nbformat.write(reader_notebook(chapter, edition=edition), path)
        written.append(path)
    return written


def _stage_solutions_edition(src: Path) -> None:
    """A copy of the book's sources under ``_build/solutions/src`` (pages, static files, the
    exercise notebooks it offers as downloads), so the solution pages never land in ``book/``."""
    shutil.rmtree(src, ignore_errors=True)
    (src / "book").mkdir(parents=True)
    shutil.copy(REPO / "_toc.yml", src)
    for page in (REPO / "book").glob("*.md"):
        shutil.copy(page, src / "book")
    for chapter in CHAPTERS:
        notebook_in(src / "notebooks", chapter).parent.mkdir(parents=True)
        shutil.copy(released_notebook(chapter), notebook_in(src / "notebooks", chapter))
    write_pages(edition="solutions", out=src / "book" / "_chapters")


def _config(edition: str, repository_url: str | None, absolute_static: bool) -> dict:
    import yaml

    config = yaml.safe_load((REPO / "_config.yml").read_text())
    sphinx = config.setdefault("sphinx", {}).setdefault("config", {})
    if absolute_static:
        sphinx["html_static_path"] = [str(REPO / p) for p in sphinx.get("html_static_path", [])]
    if edition == "solutions":
        config["title"] += " — solutions edition"
        config.setdefault("html", {})["announcement"] = SOLUTIONS_BANNER
    if repository_url:
        config["repository"] = {**config.get("repository", {}), "url": repository_url}
        config["launch_buttons"] = {**config.get("launch_buttons", {}), **LAUNCH_BUTTONS}
        config.setdefault("html", {})["use_repository_button"] = True
    return config


def _drop_copied_static(html: Path) -> None:
    """Remove our static files from a previous build: Sphinx 7.4 does not overwrite a static
    file that is already there, so an edited custom.css (or a new wheel) would not reach the site."""
    for folder in (REPO / "book" / "_static", STATIC):
        for item in folder.iterdir() if folder.is_dir() else []:
            old = html / "_static" / item.name
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()


def build(strict: bool = True, edition: str = "student", repository_url: str | None = None,
          dest: Path | None = None) -> Path:
    """Write the chapter pages and run ``jupyter-book build``; return the HTML folder.

    ``edition="student"`` builds into ``_build/html``, ``"solutions"`` into
    ``_build/solutions/html`` (or ``dest``). ``repository_url`` (or ``$AFS_REPOSITORY_URL``)
    turns on the repository and launch buttons.
    """
    import yaml

    if edition not in EDITIONS:
        raise ValueError(f"edition must be one of {EDITIONS}, not {edition!r}")
    repository_url = repository_url or os.environ.get("AFS_REPOSITORY_URL") or None
    ensure_tools_on_path()
    copy_mathjax(STATIC)
    build_wheel(STATIC)
    if edition == "student":
        write_pages()
        src = REPO
    else:
        src = REPO / "_build" / "solutions" / "src"
        _stage_solutions_edition(src)
    dest = Path(dest) if dest else (REPO / "_build" / "html" if edition == "student" else REPO / "_build" / "solutions" / "html")
    cmd = tool_command("jupyter-book", "build", str(src)) + (["-W", "--keep-going"] if strict else [])
    if edition == "solutions" or repository_url or dest != REPO / "_build" / "html":
        work = dest.parent / "_jb"
        work.mkdir(parents=True, exist_ok=True)
        config = work / "_config.yml"
        config.write_text(yaml.safe_dump(_config(edition, repository_url, absolute_static=src != REPO),
                                         allow_unicode=True))
        cmd += ["--config", str(config), "--path-output", str(work)]
        subprocess.run(cmd, check=True, cwd=REPO)
        shutil.rmtree(dest, ignore_errors=True)
        (work / "_build" / "html").rename(dest)
    else:
        _drop_copied_static(dest)
        subprocess.run(cmd, check=True, cwd=REPO)
    if repository_url:
        point_launch_buttons_at_notebooks(dest)
    if edition == "student":
        from .leaks import find_leaks

        leaks = find_leaks(REPO / "solutions", [dest])
        if leaks:
            raise RuntimeError("the student edition shows solution or hidden-test lines:\n  " + "\n  ".join(leaks[:20]))
    return dest
