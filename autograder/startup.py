"""Process start-up costs worth avoiding, in one place.

jsonschema (imported by nbformat, so by nbgrader, nbconvert and Jupyter Book) imports
``rfc3987_syntax`` when it is installed, only to check the "iri" string format. That module builds
an Earley parser at import time: about 3 s of CPU in every process that opens a notebook. No
notebook schema uses that format, and jsonschema skips the check when the import fails. The course
starts nbgrader several times per grading run and per test module, so this is most of nbgrader's
start-up cost.

``tool_command("nbgrader", ...)`` is the command line of nbgrader (or Jupyter Book) run so.
"""
from __future__ import annotations

import importlib
import sys

TOOLS = {"nbgrader": "nbgrader.apps.nbgraderapp", "jupyter-book": "jupyter_book.cli.main"}


def skip_iri_format_check() -> None:
    """Make ``import rfc3987_syntax`` fail in this process (call before importing nbformat)."""
    sys.modules.setdefault("rfc3987_syntax", None)


def tool_command(tool: str, *args: str) -> list[str]:
    """The argv that runs ``tool ARGS`` with this environment's Python, minus that import
    (``-P``: the working directory, e.g. a course folder, is not put on ``sys.path``)."""
    if tool not in TOOLS:
        raise ValueError(f"unknown tool {tool!r}; known: {', '.join(TOOLS)}")
    return [sys.executable, "-P", "-m", "autograder.startup", tool, *args]


if __name__ == "__main__":
    skip_iri_format_check()
    tool = sys.argv[1]
    sys.argv = [tool, *sys.argv[2:]]
    sys.exit(importlib.import_module(TOOLS[tool]).main())
