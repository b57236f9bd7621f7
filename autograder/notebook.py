"""Reading the course's notebook conventions (nbgrader metadata plus two tags).

A chapter's source notebook (``solutions/<chapter>/<chapter>.ipynb``) is made of:

* an **imports** cell (tag ``imports``, locked): imports only, including the chapter's checks;
  the grader runs it in its trusted process to get the names test cells use;
* **answer** cells (nbgrader ``solution``): the reference between ``### BEGIN/END SOLUTION``;
  their top-level ``def``/``class`` names are the student's API for that chapter;
* **test** cells (nbgrader ``grade``, locked): visible checks, then ``### BEGIN/END HIDDEN TESTS``;
  a test cell grades the answer cells between it and the previous test cell;
* narrative markdown and code (figures, demos) in between;
* **training** cells (tag ``training``, with a ``grade_id`` so the grader can find them in a
  submission): they run under the chapter's longer limit, ``metadata.afs.training_seconds`` of
  the source notebook (default 300 s), and the top-level names they assign (a trained
  ``model``) join the API of the next test cell, which grades the object as it was left.
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path


def meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def is_solution(cell) -> bool:
    return bool(meta(cell).get("solution"))


def is_test(cell) -> bool:
    m = meta(cell)
    return cell.get("cell_type") == "code" and bool(m.get("grade")) and not m.get("solution")


def tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def is_training(cell) -> bool:
    return cell.get("cell_type") == "code" and "training" in tags(cell) and bool(meta(cell).get("grade_id"))


def is_imports(cell) -> bool:
    return cell.get("cell_type") == "code" and "imports" in tags(cell)


def source(cell) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def strip_magics(code: str) -> str:
    """Drop IPython-only lines (``%magic``, ``!shell``) so the code runs as plain Python."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in code.splitlines())


MAX_PARSE_CHARS = 256 * 1024   # far above any real cell; hostile code takes ~2 s per million chars


def safe_parse(code: str) -> ast.Module | None:
    """``ast.parse(code)``, or None if it cannot be parsed for *any* reason. Student code makes
    the parser raise more than SyntaxError: ValueError (null bytes, lone surrogates),
    RecursionError (``a.a.a...``) or MemoryError (``------x``) when thousands deep, and a huge
    source is refused before it costs seconds. Use it for every parse of a student's code."""
    if not isinstance(code, str) or len(code) > MAX_PARSE_CHARS:
        return None
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def defined_names(code: str) -> list[str]:
    """Top-level ``def`` and ``class`` names of a cell (none if it does not parse)."""
    tree = safe_parse(strip_magics(code))
    body = tree.body if tree is not None else []
    return [n.name for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]


def assigned_names(code: str) -> list[str]:
    """Top-level names a cell binds by ``def``, ``class`` or an assignment, unpacking included
    (``model, history = train()``)."""
    tree = safe_parse(strip_magics(code))
    names: list[str] = []

    def bind(target) -> None:
        if isinstance(target, ast.Name):
            names.append(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                bind(element.value if isinstance(element, ast.Starred) else element)

    for stmt in tree.body if tree is not None else []:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else \
            [stmt.target] if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            bind(target)
    return list(dict.fromkeys(defined_names(code) + names))


@dataclass
class Exercise:
    """One graded test cell and the answer cells it grades."""
    test_id: str
    test_source: str
    points: float
    answer_ids: list[str]
    api: list[str]          # names the answer cells define (e.g. ["softmax"])


@dataclass
class Chapter:
    path: Path
    imports_source: str
    exercises: list[Exercise]
    narrative_sources: set[str]   # sources of the instructor's non-answer code cells
    training_ids: set[str] = field(default_factory=set)   # grade_ids of training cells
    training_seconds: float = 300.0

    @property
    def api(self) -> list[str]:
        return [name for ex in self.exercises for name in ex.api]

    @property
    def training_budget(self) -> float:
        """Seconds the training cells may take together, on top of a notebook's grading budget."""
        return self.training_seconds * len(self.training_ids)


def read_cells(path: str | Path) -> list[dict]:
    """A notebook's cells as plain dicts (plain JSON: the GPU graders have no nbformat)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))["cells"]


def read_chapter(path: str | Path) -> Chapter:
    """Parse a *source* notebook into its imports, exercises and narrative code."""
    path = Path(path)
    notebook = json.loads(path.read_text(encoding="utf-8"))
    imports, exercises, pending_ids, pending_api, narrative = [], [], [], [], set()
    training: set[str] = set()
    for cell in notebook["cells"]:
        if cell.get("cell_type") != "code":
            continue
        if is_imports(cell):
            imports.append(source(cell))
        if is_training(cell):
            training.add(meta(cell)["grade_id"])
            pending_api.extend(n for n in assigned_names(source(cell)) if n not in pending_api)
        if is_solution(cell):
            pending_ids.append(meta(cell).get("grade_id", ""))
            pending_api.extend(defined_names(source(cell)))
        elif is_test(cell):
            exercises.append(Exercise(meta(cell)["grade_id"], source(cell), float(meta(cell).get("points", 0)),
                                      pending_ids, pending_api))
            pending_ids, pending_api = [], []
        else:
            narrative.add(source(cell))
    seconds = notebook.get("metadata", {}).get("afs", {}).get("training_seconds", 300.0)
    return Chapter(path, "\n".join(imports), exercises, narrative, training, float(seconds))
