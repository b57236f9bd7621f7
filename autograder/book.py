"""Build the book's chapter pages: the student notebook, with the outputs a correct solution gives.

For each chapter the *source* notebook is executed (reference in place, so every figure and
number is real), then its outputs are copied onto the *released* notebook's cells. Answer and
test cells keep the released source and get no outputs, so no solution code, hidden test or
traceback that could quote one reaches the page. stderr outputs are dropped for the same reason.
The result goes to ``book/_chapters/`` (generated, git-ignored); Jupyter Book does not execute
anything itself.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from .course import CHAPTERS, REPO, ensure_tools_on_path, released_notebook, source_notebook
from .notebook import is_solution, is_test

OUT = REPO / "book" / "_chapters"


def execute_source(chapter: str, timeout: int = 600):
    path = source_notebook(chapter)
    nb = nbformat.read(path, as_version=4)
    # Figures must come out inline whatever the caller's MPLBACKEND says (Agg would draw nothing).
    old = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        NotebookClient(nb, kernel_name="python3", timeout=timeout,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if old is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = old
    return nb


def reader_notebook(chapter: str, executed=None):
    """The released notebook with the executed source's outputs on its narrative cells."""
    executed = executed if executed is not None else execute_source(chapter)
    released = nbformat.read(released_notebook(chapter), as_version=4)
    if [c.cell_type for c in executed.cells] != [c.cell_type for c in released.cells]:
        raise RuntimeError(f"{chapter}: notebooks/ does not match solutions/; run `python -m autograder release`")
    page = copy.deepcopy(released)
    for src, dst in zip(executed.cells, page.cells):
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


def write_pages(chapters=CHAPTERS) -> list[Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    written = []
    for chapter in chapters:
        path = OUT / f"{chapter}.ipynb"
        nbformat.write(reader_notebook(chapter), path)
        written.append(path)
    return written


LOCAL_MATHJAX = Path("/usr/share/javascript/mathjax/MathJax.js")   # Debian's libjs-mathjax


def _offline_config() -> Path:
    """_config.yml with MathJax served from disk, for looking at the book on a machine without
    internet (screenshots, reviews). The published site keeps the CDN."""
    import yaml

    config = yaml.safe_load((REPO / "_config.yml").read_text())
    sphinx = config.setdefault("sphinx", {}).setdefault("config", {})
    sphinx["mathjax_path"] = f"file://{LOCAL_MATHJAX}?config=TeX-AMS-MML_HTMLorMML"
    sphinx["myst_update_mathjax"] = False
    path = REPO / "_build" / "offline_config.yml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def build(strict: bool = True, offline_math: bool = False) -> Path:
    """Write the chapter pages and run ``jupyter-book build``; return the HTML folder."""
    ensure_tools_on_path()
    write_pages()
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(REPO)] + (["-W", "--keep-going"] if strict else [])
    if offline_math:
        if not LOCAL_MATHJAX.exists():
            raise RuntimeError("offline math needs Debian's libjs-mathjax (apt-get install libjs-mathjax)")
        cmd += ["--config", str(_offline_config())]
    subprocess.run(cmd, check=True, cwd=REPO)
    return REPO / "_build" / "html"
