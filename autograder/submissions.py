"""Make mangled submissions gradable before nbgrader sees them, and say what was done.

* a renamed notebook (``ch01_attention (1).ipynb``) is renamed back when it is the only one;
* a file that is not a readable notebook is kept as ``*.unreadable`` and replaced by the blank
  release with a note at the top, so the student gets a zero *and* feedback saying why, instead
  of the run failing or the submission waiting for manual grading forever.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat


def _readable(path: Path) -> str | None:
    """None if ``path`` is a notebook nbgrader can grade, else the reason it is not."""
    try:
        nb = nbformat.read(path, as_version=4)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"it is not valid JSON ({str(exc).splitlines()[0][:120]})"
    except Exception as exc:  # noqa: BLE001 - nbformat raises many kinds on junk
        return f"it is not a Jupyter notebook ({type(exc).__name__})"
    if not isinstance(nb.get("cells"), list):
        return "it has no cells"
    return None


def prepare(student_dir: Path, release_dir: Path) -> list[str]:
    """Fix what can be fixed in one student's submitted assignment folder; return notes."""
    notes = []
    expected = sorted(p.name for p in release_dir.glob("*.ipynb"))
    present = sorted(p.name for p in student_dir.glob("*.ipynb"))
    missing = [n for n in expected if n not in present]
    extra = [n for n in present if n not in expected]
    if len(missing) == 1 and len(extra) == 1:
        (student_dir / extra[0]).rename(student_dir / missing[0])
        notes.append(f"renamed {extra[0]!r} to {missing[0]!r}")
    for name in expected:
        path = student_dir / name
        if not path.exists():
            notes.append(f"{name} was not submitted")
            continue
        reason = _readable(path)
        if reason is None:
            continue
        shutil.move(path, path.with_suffix(".ipynb.unreadable"))
        blank = nbformat.read(release_dir / name, as_version=4)
        blank.cells.insert(0, nbformat.v4.new_markdown_cell(
            f"**Grading note:** the file you submitted as `{name}` could not be graded because "
            f"{reason}. It was graded as the blank assignment. Keep a copy of your work and "
            "resubmit the notebook as saved by Jupyter."))
        nbformat.write(blank, path)
        notes.append(f"{name}: unreadable ({reason}); graded as blank")
    return notes
