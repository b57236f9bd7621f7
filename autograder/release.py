"""Generate ``notebooks/`` (what students get) from ``solutions/`` with nbgrader.

``generate(...)`` runs ``nbgrader generate_assignment`` for each chapter against a throw-away
gradebook, so releasing never touches a course's real ``gradebook.db``; the output is
deterministic, so ``stale()`` can compare a fresh generation with what is committed.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from traitlets.config import Config

# REPO and ensure_tools_on_path are imported from here by autograder/__main__.py.
from .course import CHAPTERS, NOTEBOOKS, REPO, SOLUTIONS, ensure_tools_on_path, notebook_in

__all__ = ["REPO", "ensure_tools_on_path", "generate", "stale", "release"]


def generate(out_dir: Path, chapters=CHAPTERS, solutions: Path = SOLUTIONS) -> None:
    """Write the student version of each chapter to ``out_dir/<chapter>/``."""
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory

    from .nbgrader_settings import configure

    ensure_tools_on_path()
    with tempfile.TemporaryDirectory() as tmp:
        c = Config()
        configure(c, root=solutions.parent, source=str(solutions.resolve()), release=str(Path(out_dir).resolve()))
        c.CourseDirectory.db_url = f"sqlite:///{tmp}/release.db"
        api = NbGraderAPI(CourseDirectory(config=c), config=c)
        for chapter in chapters:
            strays = _not_files(solutions / chapter)
            if strays:
                raise RuntimeError(f"cannot release {chapter}: nbgrader copies every file beside the notebook and "
                                   f"cannot copy these, which are not regular files (a kernel's sockets, a FIFO?): "
                                   f"{', '.join(str(p) for p in strays)}. Remove them.")
            result = api.generate_assignment(chapter, force=True, create=True)
            if not result["success"]:
                raise RuntimeError(f"nbgrader could not release {chapter}:\n{result['log']}\n{result.get('error', '')}")


def _not_files(folder: Path) -> list[Path]:
    """Entries under ``folder`` that are neither files nor folders (sockets, FIFOs, devices,
    broken links): nbgrader would fail on them with an unrelated-looking OSError."""
    return sorted(p for p in folder.rglob("*") if not (p.is_file() or p.is_dir())) if folder.is_dir() else []


def _files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder.parent) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def _same(a: Path, b: Path) -> bool:
    """Notebooks are equal when their JSON is (indentation and key order aside); other files byte
    for byte."""
    if a.suffix == ".ipynb":
        return json.loads(a.read_text()) == json.loads(b.read_text())
    return a.read_bytes() == b.read_bytes()


def stale(chapters=CHAPTERS) -> list[str]:
    """Chapters whose committed ``notebooks/`` differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), chapters)
        bad = []
        for chapter in chapters:
            fresh = _files(Path(tmp, chapter))
            if fresh != _files(NOTEBOOKS / chapter) or not all(_same(Path(tmp, f), NOTEBOOKS / f) for f in fresh):
                bad.append(chapter)
        return bad


def release(chapters=CHAPTERS) -> None:
    """Regenerate ``notebooks/`` in place."""
    for chapter in chapters:
        shutil.rmtree(notebook_in(NOTEBOOKS, chapter).parent, ignore_errors=True)
    generate(NOTEBOOKS, chapters)
