"""Static analysis of student code, in one place: what the forbidden-shortcut checks read.

Two questions: *which code* does a tested object use (:func:`source_of` in the student's kernel,
:func:`used_code` in the grader, which follows names through the notebook's cells), and *which
names* does that code use (:func:`forbid_names`). Every parse goes through ``safe_parse``: student
code can be made unparsable, and then the names are read from the text instead.
"""
from __future__ import annotations

import ast
import inspect
import re
import textwrap
from typing import Any, Iterable

from ..notebook import safe_parse, strip_magics
from .core import fail

__all__ = ["source_of", "forbid_names", "used_code", "ALWAYS_FORBIDDEN"]

#: Importing the course's reference is never allowed (the grader cannot see it either).
ALWAYS_FORBIDDEN = ("autograder.reference",)


def source_of(obj: Any) -> str | None:
    """The source to scan for forbidden shortcuts.

    Grader proxies carry the trusted copy of the relevant student cells (``__trusted_source__``);
    in the student's kernel we read the function's or class's own source.
    """
    trusted = getattr(type(obj), "__trusted_source__", None)
    if trusted is not None:
        return trusted(obj)
    try:
        return textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        pass
    if isinstance(obj, type):   # classes typed into a notebook have no file: read their methods
        parts = []
        for klass in obj.__mro__:
            if klass is object or klass.__module__.split(".")[0] in ("torch", "builtins"):
                continue
            for member in vars(klass).values():
                member = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                try:
                    parts.append(textwrap.dedent(inspect.getsource(member)))
                except (OSError, TypeError):
                    continue
        return "\n".join(parts) or None
    return None


def _used_names(source: str) -> list[tuple[str, int]]:
    """(name, line) for every attribute access, imported name and string constant."""
    tree = safe_parse(source)
    if tree is None:
        return _used_names_in_text(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.append((node.attr, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.lineno))
            found.extend((a.name, node.lineno) for a in node.names)
            found.extend((f"{node.module}.{a.name}", node.lineno) for a in node.names if node.module)
        elif isinstance(node, ast.Import):
            found.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.value, node.lineno))
    return found


_TEXT_USES = re.compile(r"""\.\s*([A-Za-z_]\w*)|\bimport\s+([\w.]+)|\bfrom\s+([\w.]+)|["']([\w.]+)["']""")


def _used_names_in_text(source: str) -> list[tuple[str, int]]:
    """The same, read from the text when the code does not parse (a syntax error, or code made
    too big or too deep to parse): padding a cell must not hide a shortcut from the scan."""
    found = []
    for number, line in enumerate(source.splitlines(), 1):
        for match in _TEXT_USES.finditer(line):
            found.extend((g, number) for g in match.groups() if g)
    return found


def forbid_names(obj: Any, names: Iterable[str], exercise: str, hint: str) -> None:
    """Fail if the source behind ``obj`` uses any of ``names`` as an attribute, import or string.

    ``names`` are bare attribute names (``"softmax"`` catches ``torch.softmax``, ``F.softmax``,
    ``x.softmax``, ``getattr(torch, "softmax")``); calling your own function of the same name is
    fine because that is a plain name, not an attribute. The failure's id is ``forbidden:<name>``.
    """
    __tracebackhide__ = True
    source = source_of(obj)
    if not source:
        return
    banned = set(names)
    lines = source.splitlines()
    for name, line in _used_names(source):
        if name in banned or any(name == b or name.startswith(b + ".") for b in ALWAYS_FORBIDDEN):
            text = lines[line - 1].strip() if 0 < line <= len(lines) else ""
            fail(f"{exercise} must be written without `{name}` (your code uses it here: `{text}`). {hint}",
                 mistake=f"forbidden:{name}")


# --------------------------------------------------------------------------------------------
# In the grader: the code a tested object uses, followed through the notebook's cells
# --------------------------------------------------------------------------------------------

def _defined(stmt: ast.stmt) -> set[str]:
    """Names a top-level statement binds (def, class, assignment, import)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {stmt.name}
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in stmt.names}
    targets = stmt.targets if isinstance(stmt, ast.Assign) else \
        [stmt.target] if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) else []
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def used_code(sources: list[str], roots: list[str]) -> str | None:
    """The code the objects named ``roots`` actually use: their last top-level definitions in
    ``sources`` (cells in execution order), and recursively the definitions of every name those
    refer to. None when a root's definition cannot be found statically."""
    latest: dict[str, tuple[int, ast.stmt, str]] = {}
    for order, src in enumerate(sources):
        code = strip_magics(src)
        tree = safe_parse(code)
        if tree is None:
            continue
        for k, stmt in enumerate(tree.body):
            for name in _defined(stmt):
                latest[name] = ((order, k), stmt, code)
    if any(r not in latest for r in roots):
        return None
    seen, todo, picked = set(), list(roots), {}
    while todo:
        name = todo.pop()
        if name in seen or name not in latest:
            continue
        seen.add(name)
        key, stmt, code = latest[name]
        picked[key] = ast.get_source_segment(code, stmt) or ""
        todo += [n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)]
    return "\n\n".join(picked[k] for k in sorted(picked))
