"""Make mangled submissions gradable before nbgrader sees them, and say what was done.

nbgrader 0.9.6 crashes a student's whole autograde on some mangled notebooks (its
``DeduplicateIds`` leaves ``{}`` metadata that ``add_missing_task_cells`` then indexes, and
``add_missing_grade_cells`` fails when the cell before a missing one is a locked non-graded
cell). So the structure is restored here first, with the released notebook as the template:

* a renamed notebook (``ch01_attention (1).ipynb``) is renamed back when it is the only one;
* a file that is not a readable notebook is kept as ``*.unreadable`` and replaced by the blank
  release with a note at the top (the student gets 0 *and* an explanation);
* nbgrader metadata that is malformed or names an unknown ``grade_id`` is dropped (the cell
  becomes ordinary student code); duplicates keep the last copy, as nbgrader does;
* answer and test cells whose metadata was stripped are recognised (an answer by the names it
  defines, a locked cell by its source) and get their metadata back;
* anything still missing is re-inserted from the release after its predecessor, so a deleted
  test cell is graded and a deleted answer cell counts as unanswered.
"""
from __future__ import annotations

import copy
import json
import shutil
import uuid
from pathlib import Path

import nbformat

from .notebook import defined_names, meta, source


def _readable(path: Path) -> str | None:
    """None if ``path`` is a notebook that can be graded, else the reason it is not."""
    try:
        nb = nbformat.read(path, as_version=4)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"it is not valid JSON ({str(exc).splitlines()[0][:120]})"
    except Exception as exc:  # noqa: BLE001 - nbformat raises many kinds on junk
        return f"it is not a Jupyter notebook ({type(exc).__name__})"
    if not isinstance(nb.get("cells"), list) or not all(isinstance(c, dict) for c in nb.cells):
        return "it has no cells"
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as exc:
        return f"it is not a valid notebook ({str(exc).splitlines()[0][:120]})"
    return None


def _known(release) -> dict[str, dict]:
    return {meta(c)["grade_id"]: c for c in release.cells if meta(c).get("grade_id")}


def repair_structure(nb, release) -> list[str]:
    """Restore nbgrader metadata and missing graded cells in ``nb`` (in place); return notes."""
    notes: list[str] = []
    known = _known(release)
    # 1. Drop malformed or unknown nbgrader metadata.
    for cell in nb.cells:
        md = cell.get("metadata")
        if not isinstance(md, dict):
            cell["metadata"] = {}
            continue
        if "nbgrader" in md:
            g = md["nbgrader"]
            if not isinstance(g, dict) or g.get("grade_id") not in known:
                del md["nbgrader"]
                notes.append("dropped unknown or malformed nbgrader metadata from a cell")
    # 2. Duplicated grade ids: keep the last copy.
    seen: set[str] = set()
    for cell in reversed(nb.cells):
        g = meta(cell).get("grade_id")
        if g in seen:
            del cell["metadata"]["nbgrader"]
            notes.append(f"duplicate of cell {g!r} treated as ordinary code")
        elif g:
            seen.add(g)
    # 3. Recognise cells whose metadata was stripped.
    for g, ref in known.items():
        if g in seen:
            continue
        plain = [c for c in nb.cells if "nbgrader" not in c.get("metadata", {}) and c.get("cell_type") == ref.cell_type]
        if meta(ref).get("solution"):
            names = set(defined_names(source(ref)))
            match = [c for c in plain if names and names <= set(defined_names(source(c)))]
        else:
            match = [c for c in plain if source(c).strip() == source(ref).strip()]
        if match:
            match[-1]["metadata"]["nbgrader"] = copy.deepcopy(ref.metadata["nbgrader"])
            seen.add(g)
            notes.append(f"restored the metadata of cell {g!r}")
    # 4. Re-insert what is still missing, after the previous graded cell of the release.
    order = [meta(c)["grade_id"] for c in release.cells if meta(c).get("grade_id")]
    for i, g in enumerate(order):
        if g in seen:
            continue
        pos = 0
        for prev in reversed(order[:i]):
            idx = [k for k, c in enumerate(nb.cells) if meta(c).get("grade_id") == prev]
            if idx:
                pos = idx[0] + 1
                break
        cell = copy.deepcopy(known[g])
        cell["id"] = uuid.uuid4().hex[:12]
        nb.cells.insert(pos, cell)
        seen.add(g)
        notes.append(f"cell {g!r} was missing and was put back from the release")
    # 5. Unique cell ids (copied cells repeat them, which nbformat rejects).
    ids: set[str] = set()
    for cell in nb.cells:
        if cell.get("id") in ids or not cell.get("id"):
            cell["id"] = uuid.uuid4().hex[:12]
        ids.add(cell["id"])
    return notes


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
        release = nbformat.read(release_dir / name, as_version=4)
        if not path.exists():
            notes.append(f"{name} was not submitted")
            continue
        reason = _readable(path)
        if reason is not None:
            shutil.move(path, path.with_suffix(".ipynb.unreadable"))
            release.cells.insert(0, nbformat.v4.new_markdown_cell(
                f"**Grading note:** the file you submitted as `{name}` could not be graded because "
                f"{reason}. It was graded as the blank assignment. Resubmit the notebook as saved "
                "by Jupyter."))
            nbformat.write(release, path)
            notes.append(f"{name}: unreadable ({reason}); graded as blank")
            continue
        nb = nbformat.read(path, as_version=4)
        fixes = repair_structure(nb, release)
        if fixes:
            nbformat.write(nb, path)
            notes += [f"{name}: {f}" for f in dict.fromkeys(fixes)]
    return notes
