"""Reading the course's notebook conventions (nbgrader metadata plus two tags).

A chapter's source notebook (``solutions/<chapter>/<chapter>.ipynb``) is made of:

* an **imports** cell (tag ``imports``, locked): imports only, including the chapter's checks;
  the grader runs it in its trusted process to get the names test cells use;
* **answer** cells (nbgrader ``solution``): the reference between ``### BEGIN/END SOLUTION``;
  their top-level ``def``/``class`` names are the student's API for that chapter;
* **test** cells (nbgrader ``grade``, locked): visible checks, then ``### BEGIN/END HIDDEN TESTS``;
  a test cell grades the answer cells between it and the previous test cell;
* narrative markdown and code (figures, demos) in between.
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass
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


def is_imports(cell) -> bool:
    return cell.get("cell_type") == "code" and "imports" in tags(cell)


def source(cell) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def strip_magics(code: str) -> str:
    """Drop IPython-only lines (``%magic``, ``!shell``) so the code runs as plain Python."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in code.splitlines())


def defined_names(code: str) -> list[str]:
    """Top-level ``def`` and ``class`` names of a cell."""
    try:
        tree = ast.parse(strip_magics(code))
    except SyntaxError:
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]


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

    @property
    def api(self) -> list[str]:
        return [name for ex in self.exercises for name in ex.api]


def read_cells(path: str | Path) -> list[dict]:
    """A notebook's cells as plain dicts (plain JSON: the GPU graders have no nbformat)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))["cells"]


def read_chapter(path: str | Path) -> Chapter:
    """Parse a *source* notebook into its imports, exercises and narrative code."""
    path = Path(path)
    imports, exercises, pending_ids, pending_api, narrative = [], [], [], [], set()
    for cell in read_cells(path):
        if cell.get("cell_type") != "code":
            continue
        if is_imports(cell):
            imports.append(source(cell))
        if is_solution(cell):
            pending_ids.append(meta(cell).get("grade_id", ""))
            pending_api.extend(defined_names(source(cell)))
        elif is_test(cell):
            exercises.append(Exercise(meta(cell)["grade_id"], source(cell), float(meta(cell).get("points", 0)),
                                      pending_ids, pending_api))
            pending_ids, pending_api = [], []
        else:
            narrative.add(source(cell))
    return Chapter(path, "\n".join(imports), exercises, narrative)
