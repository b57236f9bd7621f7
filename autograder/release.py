"""Generate ``notebooks/`` (what students get) from ``solutions/`` with nbgrader.

``generate(...)`` runs ``nbgrader generate_assignment`` for each chapter against a throw-away
gradebook, so releasing never touches a course's real ``gradebook.db``; the output is
deterministic, so ``stale()`` can compare a fresh generation with what is committed.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from traitlets.config import Config

from .chapters import CHAPTERS

REPO = Path(__file__).resolve().parent.parent


def ensure_tools_on_path() -> None:
    """nbgrader shells out to ``alembic``: make the running environment's scripts findable."""
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def generate(out_dir: Path, chapters=CHAPTERS, solutions: Path = REPO / "solutions") -> None:
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
            result = api.generate_assignment(chapter, force=True, create=True)
            if not result["success"]:
                raise RuntimeError(f"nbgrader could not release {chapter}:\n{result['log']}\n{result.get('error', '')}")


def _normalised(path: Path) -> dict:
    return json.loads(path.read_text())


def stale(chapters=CHAPTERS) -> list[str]:
    """Chapters whose committed ``notebooks/`` differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), chapters)
        bad = []
        for chapter in chapters:
            fresh = sorted(p.relative_to(tmp) for p in Path(tmp, chapter).rglob("*") if p.is_file())
            have = sorted(p.relative_to(REPO / "notebooks") for p in (REPO / "notebooks" / chapter).rglob("*")
                          if p.is_file()) if (REPO / "notebooks" / chapter).is_dir() else []
            if fresh != have or any(_normalised(Path(tmp, f)) != _normalised(REPO / "notebooks" / f)
                                    for f in fresh if f.suffix == ".ipynb"):
                bad.append(chapter)
        return bad


def release(chapters=CHAPTERS) -> None:
    """Regenerate ``notebooks/`` in place."""
    for chapter in chapters:
        shutil.rmtree(REPO / "notebooks" / chapter, ignore_errors=True)
    generate(REPO / "notebooks", chapters)
