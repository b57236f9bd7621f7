"""Find solution or hidden-test lines where students or readers can see them."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

from .notebook import read_cells, source

BLOCK = re.compile(r"### BEGIN (SOLUTION|HIDDEN TESTS)(.*?)### END (SOLUTION|HIDDEN TESTS)", re.S)


def secret_lines(solutions: Path, min_len: int = 20) -> set[str]:
    """Non-trivial lines inside solution and hidden-test blocks of every source notebook."""
    secret = set()
    for path in solutions.glob("*/*.ipynb"):
        for cell in read_cells(path):   # plain JSON: the leak tests run without Jupyter too
            for _, block, _ in BLOCK.findall(source(cell)):
                for line in block.splitlines():
                    s = line.strip()
                    if len(s) >= min_len and not s.startswith("#"):
                        secret.add(s)
    return secret


def _notebook_text(raw: str) -> str:
    """Sources and text outputs of a notebook, decoded (in the JSON, quotes are escaped)."""
    try:
        cells = json.loads(raw).get("cells", [])
    except (json.JSONDecodeError, AttributeError):
        return raw
    parts = []
    for cell in cells:
        parts.append(source(cell))
        for out in cell.get("outputs", []) or []:
            text = out.get("text") or (out.get("data") or {}).get("text/plain") or ""
            parts.append("".join(text) if isinstance(text, list) else str(text))
    return raw + "\n" + "\n".join(parts)


def find_leaks(solutions: Path, places: list[Path]) -> list[str]:
    secret = secret_lines(solutions)
    hits = []
    for place in places:
        files = [place] if place.is_file() else place.rglob("*")
        for f in files:
            if not f.is_file() or f.suffix not in (".ipynb", ".html", ".py", ".md", ".txt", ".js", ".json"):
                continue
            text = f.read_text(errors="ignore")
            if f.suffix == ".ipynb":
                text = _notebook_text(text)
            elif f.suffix == ".html":
                text = html.unescape(re.sub(r"<[^>]+>", "", text))
            hits += [f"{f}: {s[:80]}" for s in secret if s in text]
    return hits
