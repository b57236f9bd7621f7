"""The course's chapters and where their notebooks live: the one home of both.

A chapter id (``ch02_masking``) names a folder and the notebook in it, under ``solutions/`` (the
instructor's source) and ``notebooks/`` (what students get); its checks are
``autograder/checks/ch02.py``. Plain pathlib only: the GPU graders import this without Jupyter.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOLUTIONS = REPO / "solutions"
NOTEBOOKS = REPO / "notebooks"

#: The chapters, in order. Add a new chapter's id here (see docs/adding-a-chapter.md).
CHAPTERS = ["ch01_attention", "ch02_masking", "ch03_multihead", "ch04_positions", "ch05_encoder",
            "ch06_decoder", "ch07_translation", "ch08_efficient"]


def notebook_in(folder: str | Path, chapter: str) -> Path:
    """``folder/<chapter>/<chapter>.ipynb``: the layout nbgrader uses for every copy."""
    return Path(folder) / chapter / f"{chapter}.ipynb"


def source_notebook(chapter: str, solutions: str | Path = SOLUTIONS) -> Path:
    return notebook_in(solutions, chapter)


def released_notebook(chapter: str, notebooks: str | Path = NOTEBOOKS) -> Path:
    return notebook_in(notebooks, chapter)


def check_module(chapter: str) -> str:
    """The module holding the chapter's visible checks: ``ch02_masking`` -> ``autograder.checks.ch02``."""
    return f"autograder.checks.{chapter.split('_')[0]}"


def ensure_tools_on_path() -> None:
    """nbgrader and jupyter-book shell out (``alembic``): make this environment's scripts findable."""
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
