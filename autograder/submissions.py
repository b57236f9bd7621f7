"""Make any submitted folder safe and gradable before nbgrader sees it, and say what was done.

nbgrader runs on the host as the grading user and follows links when it copies ``submitted/``
into ``autograded/`` and ``feedback/``, and it crashes a student's autograde (or the whole run)
on some mangled notebooks. So :func:`prepare`, for each student, before nbgrader:

* removes every entry nbgrader must not copy: symbolic links (to files or folders), hard links,
  FIFOs, sockets, devices, folders named like a notebook; the assignment folder itself must be a
  real folder; other files over 64 MiB in total are removed, largest first;
* renames a renamed notebook (``ch01_attention (1).ipynb``) back when it is the only one;
* rebuilds every notebook from its cells: a fresh nbformat v4 notebook with the release's
  metadata and, per student cell, only its type and source (nbgrader reads nothing else). A cell
  naming a known ``grade_id`` gets exactly the release's nbgrader metadata (so a student cannot
  change points or turn a test off); unknown or malformed metadata is dropped; duplicates keep
  the last copy, as nbgrader does; answer and test cells whose metadata was stripped are
  recognised (an answer by the names it defines, a locked cell by its source); anything still
  missing is re-inserted from the release after its predecessor;
* grades a notebook that is missing, not JSON, over 32 MiB or that fails in any unexpected way as
  the blank release with a "Grading note" at the top saying why (a readable original is kept as
  ``*.unreadable``), so every student gets a feedback page and nobody stops the class's run.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import uuid
from pathlib import Path

import nbformat

from .notebook import defined_names, meta, source

NOTEBOOK_CAP = 32 * 2**20   # bytes: a larger notebook is not read
EXTRAS_CAP = 64 * 2**20     # bytes: other files beyond this in total are removed, largest first
_NEW_CELL = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell,
             "raw": nbformat.v4.new_raw_cell}
_CELL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SURROGATE = re.compile("[\ud800-\udfff]")


class Unusable(Exception):
    """A notebook that is graded as blank; the message says why, following its file name."""


# -- The folder: nothing nbgrader copies may be a link or special file. -------------------------

def _remove(path: Path) -> None:
    """Delete the entry ``path`` itself: a link, never its target; a real folder with its content
    (``shutil.rmtree`` does not follow links inside it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _walk(root: Path):
    """``(path, lstat)`` of every entry under ``root``, top-down, never following a link, without
    recursion (a deep tree cannot overflow the stack). Entries the caller removed are not entered."""
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            entries = list(it)
        for entry in entries:
            yield Path(entry.path), entry.stat(follow_symlinks=False)
            try:
                if stat.S_ISDIR(os.lstat(entry.path).st_mode):
                    stack.append(Path(entry.path))
            except FileNotFoundError:
                pass


def _unsafe(path: Path, st: os.stat_result) -> str | None:
    """What the entry is if nbgrader must not copy it (it would copy a link's target, read a
    device forever, copy another file's content through a hard link, or try to read a folder
    named like a notebook as one), else None."""
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "a folder" if path.suffix == ".ipynb" else None
    if not stat.S_ISREG(st.st_mode):
        return "a special file (FIFO, socket or device)"
    if st.st_nlink > 1:
        return "a hard link"
    return None


def _real_folder(folder: Path) -> list[str]:
    """Make the student's folder and the assignment folder in it real folders (replacing a link
    or a file), so nothing is read or written through a link; say what was replaced."""
    replaced = []
    for path, what in ((folder.parent, "student"), (folder, "assignment")):
        if os.path.lexists(path):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            kind = "a symbolic link" if os.path.islink(path) else "not a folder"
            replaced.append(f"the {what} folder was {kind}")
            _remove(path)
        os.mkdir(path)
    return replaced


def _remove_unsafe(folder: Path) -> dict[str, str]:
    """Remove every unsafe entry under ``folder``; ``{relative path: what it was}``."""
    removed = {}
    for path, st in _walk(folder):
        what = _unsafe(path, st)
        if what:
            _remove(path)
            removed[path.relative_to(folder).as_posix()] = what
    return removed


def _rename(folder: Path, names: list[str]) -> list[str]:
    """Rename the only unexpected notebook to the only missing one (students rename files)."""
    present = sorted(p.name for p in folder.glob("*.ipynb"))
    missing = [n for n in names if n not in present]
    extra = [n for n in present if n not in names]
    if len(missing) == 1 and len(extra) == 1:
        os.rename(folder / extra[0], folder / missing[0])
        return [f"renamed {extra[0]!r} to {missing[0]!r}"]
    return []


def _clean(folder: Path, names: list[str], notes: list[str]) -> str:
    """Make ``folder`` safe for nbgrader and put a renamed notebook back (notes appended);
    return why a notebook that is now missing is missing."""
    replaced = _real_folder(folder)
    removed = _remove_unsafe(folder)
    notes += replaced + [f"removed {p!r} ({what})" for p, what in removed.items()]
    notes += _rename(folder, names)
    lost = replaced + [f"{p!r} was {what}" for p, what in removed.items() if p.endswith(".ipynb")]
    return f"was not submitted as a plain notebook file ({'; '.join(lost)})" if lost else "was not submitted"


def _cap_extras(folder: Path, names: list[str]) -> list[str]:
    """Remove the largest files other than the graded notebooks until they total at most
    EXTRAS_CAP: nbgrader copies them twice, and one huge file filled the disk."""
    keep = {folder / n for n in names}
    files = sorted(((st.st_size, p) for p, st in _walk(folder) if stat.S_ISREG(st.st_mode) and p not in keep),
                   reverse=True)
    total, notes = sum(size for size, _ in files), []
    for size, path in files:
        if total <= EXTRAS_CAP:
            break
        os.unlink(path)
        total -= size
        notes.append(f"removed {path.relative_to(folder).as_posix()!r} ({size / 2**20:.0f} MiB): "
                     f"extra files are limited to {EXTRAS_CAP // 2**20} MiB in total")
    return notes


# -- One notebook: read safely, rebuild from its cells, or grade the blank release. -------------

def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120]


def _read_json(path: Path) -> dict:
    """The notebook JSON in the plain file ``path``, opened without following a link and read up
    to NOTEBOOK_CAP bytes. Bytes that are not UTF-8 become lone surrogates, replaced later."""
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise Unusable("was not a plain file")
        data = f.read(NOTEBOOK_CAP + 1)
    if len(data) > NOTEBOOK_CAP:
        raise Unusable(f"could not be read: it is larger than {NOTEBOOK_CAP // 2**20} MiB")
    try:
        nb = json.loads(data.decode("utf-8-sig", "surrogateescape"))
    except (ValueError, RecursionError, MemoryError) as exc:
        raise Unusable(f"could not be read: it is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise Unusable("could not be read: it is not a Jupyter notebook (no list of cells)")
    return nb


def _known(release) -> dict[str, dict]:
    return {meta(c)["grade_id"]: c for c in release.cells if meta(c).get("grade_id")}


def _grading_metadata(cell: dict, kind: str, known: dict, notes: list[str]):
    """The release's nbgrader metadata if the student's cell names a known ``grade_id`` with the
    release's cell type (whatever else the student wrote in it), else None."""
    md = cell.get("metadata")
    g = md.get("nbgrader") if isinstance(md, dict) else None
    if g is None:
        return None
    gid = g.get("grade_id") if isinstance(g, dict) else None
    ref = known.get(gid) if isinstance(gid, str) else None
    if ref is None or ref.cell_type != kind:
        notes.append("dropped unknown or malformed nbgrader metadata from a cell")
        return None
    if g != ref.metadata.nbgrader:
        notes.append(f"reset the changed nbgrader metadata of cell {gid!r} to the release's")
    return copy.deepcopy(ref.metadata.nbgrader)


def _rebuild_cell(cell, known: dict, notes: list[str]):
    """A fresh cell with the student's type, source (as text, lone surrogates replaced so it can
    be written) and valid id, and nbgrader metadata only as the release has it; None if the cell
    has no usable type or source."""
    kind = cell.get("cell_type") if isinstance(cell, dict) else None
    if not isinstance(kind, str) or kind not in _NEW_CELL:
        notes.append("dropped a cell that is not code, markdown or raw")
        return None
    text = cell.get("source", "")
    if isinstance(text, list) and all(isinstance(s, str) for s in text):
        text = "".join(text)
    if not isinstance(text, str):
        notes.append("dropped a cell whose source is not text")
        return None
    if _SURROGATE.search(text):
        text = _SURROGATE.sub("\ufffd", text)
        notes.append("replaced invalid characters (lone surrogates or bytes not in UTF-8) with U+FFFD")
    cid = cell.get("id")
    new = _NEW_CELL[kind](text, **({"id": cid} if isinstance(cid, str) and _CELL_ID.fullmatch(cid) else {}))
    grading = _grading_metadata(cell, kind, known, notes)
    if grading is not None:
        new.metadata["nbgrader"] = grading
    attachments = _attachments(cell.get("attachments")) if kind == "markdown" else None
    if attachments:
        new["attachments"] = attachments
    return new


def _attachments(value) -> dict | None:
    """A markdown cell's pasted images, kept when they are what nbformat says they are:
    {name: {mimetype: base64 text}} (the feedback page shows them as images, never as pages)."""
    if not isinstance(value, dict):
        return None
    kept = {name: {m: data for m, data in bundle.items() if isinstance(m, str) and m.startswith("image/")
                   and isinstance(data, str) and not _SURROGATE.search(data)}
            for name, bundle in value.items()
            if isinstance(name, str) and _CELL_ID.fullmatch(name.replace(".", "_")) and isinstance(bundle, dict)}
    return {name: bundle for name, bundle in kept.items() if bundle} or None


def _check_timestamp(folder: Path) -> list[str]:
    """nbgrader parses ``timestamp.txt`` and fails the student's whole autograde on junk."""
    path = folder / "timestamp.txt"
    if not path.is_file() or path.is_symlink():
        return []
    try:
        from nbgrader.utils import parse_utc
        text = path.read_bytes()[:200].decode("utf-8").strip()
        parse_utc(text)
        return []
    except Exception as exc:  # noqa: BLE001 - any unreadable timestamp is dropped
        path.unlink()
        return [f"timestamp.txt could not be read ({type(exc).__name__}); graded without a timestamp"]


def rebuild(data: dict, release) -> tuple[nbformat.NotebookNode, list[str]]:
    """A fresh, valid v4 notebook (the release's metadata) of the student's usable cells, graded
    cells restored. nbgrader reads only types, sources and nbgrader metadata; everything else a
    student can mangle is where crashes and silent misgrading came from, so it is not kept."""
    known, notes = _known(release), []
    nb = nbformat.v4.new_notebook(metadata=copy.deepcopy(release.metadata))
    for cell in data["cells"]:
        new = _rebuild_cell(cell, known, notes)
        if new is not None:
            nb.cells.append(new)
    return nb, notes + repair_structure(nb, release)


def _recognise(nb, ref, names_of: dict, before: str | None = None) -> list:
    """Cells without nbgrader metadata that are ``ref`` stripped of it: an answer defines the
    same names, a locked cell has the same source, a written answer (markdown) is the cell right
    after its question (``before``: the release's preceding cell). ``names_of`` caches parses."""
    plain = [c for c in nb.cells if "nbgrader" not in c.metadata and c.cell_type == ref.cell_type]
    if not meta(ref).get("solution"):
        return [c for c in plain if source(c).strip() == source(ref).strip()]
    if ref.cell_type == "markdown":
        after = [i + 1 for i, c in enumerate(nb.cells[:-1]) if before is not None and source(c).strip() == before]
        return [nb.cells[i] for i in after if nb.cells[i] in plain]
    names = set(defined_names(source(ref)))
    for c in plain:
        if id(c) not in names_of:
            names_of[id(c)] = set(defined_names(source(c)))
    return [c for c in plain if names and names <= names_of[id(c)]]


def repair_structure(nb, release) -> list[str]:
    """Give a rebuilt notebook exactly the release's graded cells (in place); return notes."""
    notes: list[str] = []
    known = _known(release)
    # 1. Duplicated grade ids: keep the last copy.
    seen: set[str] = set()
    for cell in reversed(nb.cells):
        g = meta(cell).get("grade_id")
        if g in seen:
            del cell.metadata["nbgrader"]
            notes.append(f"duplicate of cell {g!r} treated as ordinary code")
        elif g:
            seen.add(g)
    # 2. Recognise cells whose metadata was stripped.
    names_of: dict = {}
    previous = {meta(c).get("grade_id"): source(release.cells[i - 1]).strip()
                for i, c in enumerate(release.cells) if i and meta(c).get("grade_id")}
    for g, ref in known.items():
        match = [] if g in seen else _recognise(nb, ref, names_of, previous.get(g))
        if match:
            match[-1].metadata["nbgrader"] = copy.deepcopy(ref.metadata.nbgrader)
            seen.add(g)
            notes.append(f"restored the metadata of cell {g!r}")
    # 3. Re-insert what is still missing, after the previous graded cell of the release.
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
    # 4. Unique cell ids (copied cells repeat them, which nbformat rejects).
    ids: set[str] = set()
    for cell in nb.cells:
        if cell.get("id") in ids or not cell.get("id"):
            cell["id"] = uuid.uuid4().hex[:12]
        ids.add(cell["id"])
    return notes


def _write(path: Path, nb) -> None:
    """Write ``nb`` as a new file at ``path``: whatever was there is removed first, and the file
    is created exclusively without following links, so nothing is written through a link."""
    _remove(path)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "w",
              encoding="utf-8") as f:
        nbformat.write(nb, f)


def _blank(path: Path, release, reason: str) -> None:
    """Put the blank release at ``path`` with a note at the top saying why (the student sees it
    in the feedback); keep a plain original as ``*.unreadable`` for the instructor."""
    if os.path.lexists(path) and stat.S_ISREG(os.lstat(path).st_mode):
        kept = path.with_name(path.name + ".unreadable")
        _remove(kept)
        os.rename(path, kept)
    nb = copy.deepcopy(release)
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(
        f"**Grading note:** `{path.name}` {reason}, so it was graded as the blank assignment. "
        "Resubmit the notebook as saved by Jupyter."))
    _write(path, nb)


def _prepare_notebook(path: Path, release_path: Path, why_missing: str) -> list[str]:
    """Rebuild one submitted notebook, or grade it as the blank release with a note saying why."""
    release = nbformat.read(release_path, as_version=4)
    try:
        if not os.path.lexists(path):
            raise Unusable(why_missing)
        nb, fixes = rebuild(_read_json(path), release)
        _write(path, nb)
        return [f"{path.name}: {fix}" for fix in dict.fromkeys(fixes)]
    except Unusable as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - one notebook must not stop the class's grading
        reason = f"could not be processed ({type(exc).__name__})"
    _blank(path, release, reason)
    return [f"{path.name} {reason}; graded as blank"]


def _start_over(folder: Path, release_dir: Path, names: list[str], reason: str) -> list[str]:
    """Last resort after an unexpected error: an empty assignment folder, every notebook blank."""
    try:
        _real_folder(folder)
        shutil.rmtree(folder)
        os.mkdir(folder)
        for name in names:
            _blank(folder / name, nbformat.read(release_dir / name, as_version=4), reason)
        return [f"{reason}; the folder was emptied and every notebook graded as blank"]
    except Exception as exc:  # noqa: BLE001 - prepare never raises
        return [f"{reason}, and the folder could not be reset ({type(exc).__name__}): "
                "nbgrader may fail for this student"]


def prepare(student_dir: Path, release_dir: Path) -> list[str]:
    """Make one student's submitted assignment folder safe and gradable (see the module's
    docstring); return notes for the instructor. Never raises."""
    folder, release_dir = Path(student_dir), Path(release_dir)
    names = sorted(p.name for p in release_dir.glob("*.ipynb"))
    notes: list[str] = []
    try:
        why_missing = _clean(folder, names, notes)
        for name in names:
            notes += _prepare_notebook(folder / name, release_dir / name, why_missing)
        notes += _cap_extras(folder, names)
        notes += _check_timestamp(folder)
    except Exception as exc:  # noqa: BLE001 - one student's folder must not stop the class's grading
        notes += _start_over(folder, release_dir, names, f"could not be processed ({type(exc).__name__})")
    return notes
