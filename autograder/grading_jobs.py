"""One submission's sandboxed grading as plain data: the job, its key, its result, its cache.

A class is graded in two phases (``autograder.classroom``): first every submission's expensive
part, the sandboxed run of ``grade_notebook``, as a :class:`GradingJob` that any process (a Dask
worker on another machine too) can run with :func:`run_job`; then nbgrader's ordinary, sequential
``autograde``, whose ``SandboxedGrading`` preprocessor finds each result in the
:class:`ResultCache` and replays it (:func:`replay`) instead of grading again. A result is used
only when its key matches: the notebook as the preprocessor sees it (cells' types, sources and
metadata), the source notebook (and the earlier chapters' references it loads), the released data
files, the limits and the grader's own code. Anything else is graded in place, as before.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import resource
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

CACHE_DIR = ".grading_cache"   # under the course root; git-ignored
PACKAGE = Path(__file__).resolve().parent
_REFERENCED = re.compile(r"""reference\(\s*["'](\w+)["']\s*\)""")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def notebook_digest(nb) -> str:
    """Hash of what grading reads from ``nb`` (a notebook dict): each cell's type, source and
    metadata, in order. Outputs (cleared by nbgrader), execution counts and cell ids (which
    nbgrader may re-draw) are left out."""
    cells = [[c.get("cell_type"), c.get("source"), c.get("metadata", {})] for c in nb.get("cells", [])]
    return _sha(json.dumps(cells, sort_keys=True, ensure_ascii=True).encode())


@functools.lru_cache(maxsize=None)
def grader_fingerprint() -> str:
    """Hash of the grader's code (every module of this package): a new grader regrades."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _file_digest(path: str | Path) -> str:
    try:
        return _sha(Path(path).read_bytes())
    except OSError:
        return "missing"


def _sources_digest(source: Path) -> dict[str, str]:
    """The source notebook and every earlier chapter's source that its hidden tests load with
    ``reference("chNN_...")`` (they live beside it)."""
    found = {source.name: _file_digest(source)}
    text = source.read_text(encoding="utf-8", errors="replace") if source.is_file() else ""
    for chapter in sorted(set(_REFERENCED.findall(text))):
        other = source.parent.parent / chapter / f"{chapter}.ipynb"
        found[chapter] = _file_digest(other)
    return found


@dataclass(frozen=True)
class GradingJob:
    """Everything needed to grade one notebook of one student, as plain data.

    ``source`` and ``data_files`` are paths: a worker must see the course at the same path
    (a shared file system, or the same checkout in the same place)."""
    assignment: str
    student: str
    notebook: str
    notebook_json: str              # the notebook exactly as SandboxedGrading receives it
    source: str                     # solutions/<assignment>/<notebook>.ipynb
    data_files: tuple[str, ...]
    limits: dict = field(hash=False)
    budget: float = 600.0
    threads: int = 0                # torch threads in the grading process (0: leave as is)

    @property
    def name(self) -> str:
        return f"{self.student}/{self.notebook}"

    def key(self) -> str:
        """Same key, same result: see the module's docstring."""
        parts = {"notebook": notebook_digest(json.loads(self.notebook_json)),
                 "sources": _sources_digest(Path(self.source)),
                 "data": {Path(p).name: _file_digest(p) for p in self.data_files},
                 "limits": self.limits, "budget": self.budget, "grader": grader_fingerprint()}
        return _sha(json.dumps(parts, sort_keys=True).encode())


def run_job(job: GradingJob) -> dict:
    """Grade ``job`` here (the Dask task): the result as JSON-ready data. ``grade_notebook``
    never raises; a worker without the course's files raises with a clear message."""
    from .startup import skip_iri_format_check
    skip_iri_format_check()   # a fresh worker process: spare it 3 s of start-up CPU
    import nbformat

    from .grade import grade_notebook
    from .notebook import read_chapter
    from .sandbox.process import Limits

    source = Path(job.source)
    if not source.is_file():
        raise FileNotFoundError(f"{socket.gethostname()} has no {source}: every worker needs the course "
                                "at the same path as the machine that started the run")
    if job.threads:
        import torch
        torch.set_num_threads(job.threads)
    nb = nbformat.reads(job.notebook_json, as_version=4)
    with _grader_log() as log:
        report = grade_notebook(nb, read_chapter(source), solutions_dir=source.parent.parent,
                                limits=Limits(**job.limits), data_files=[Path(p) for p in job.data_files],
                                budget_seconds=job.budget)
    outputs = {str(i): json.loads(json.dumps(cell.get("outputs", [])))
               for i, cell in enumerate(nb.cells) if cell.get("cell_type") == "code"}
    usage, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"outputs": outputs, "verdicts": [asdict(v) for v in report.verdicts],
            "events": list(report.events), "seconds": report.seconds,
            "worker": f"{socket.gethostname()}:{os.getpid()}", "log": log.getvalue(),
            "peak_rss_mib": usage.ru_maxrss / 1024, "peak_child_rss_mib": children.ru_maxrss / 1024}


@contextlib.contextmanager
def _grader_log():
    """The grader's warnings and errors (tracebacks of internal errors) while grading one
    notebook, as text: they travel back with the result, from whichever worker."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("autograder")
    logger.addHandler(handler)
    try:
        yield text
    finally:
        logger.removeHandler(handler)


def replay(nb, result: dict):
    """Put ``result``'s outputs on ``nb``'s code cells (in place); return its Report."""
    import nbformat

    from .report import Report, Verdict

    for index, outputs in result["outputs"].items():
        cell = nb.cells[int(index)]
        if cell.get("cell_type") == "code":
            cell.outputs = [nbformat.from_dict(o) for o in outputs]
    return Report(verdicts=[Verdict(**v) for v in result["verdicts"]], events=list(result["events"]),
                  seconds=result["seconds"])


def passed(result: dict) -> tuple[int, int]:
    return sum(v["passed"] for v in result["verdicts"]), len(result["verdicts"])


def broken(result: dict) -> str | None:
    """Why the grader itself failed on this submission (no sandbox, an internal error), or None:
    such a submission got zeros it may not deserve and must be regraded."""
    for event in result["events"]:
        if event.startswith("the sandbox could not start") or "internal error" in event:
            return event
    return None


class ResultCache:
    """``<course>/.grading_cache/<assignment>/<student>/<notebook>.json``: one result per
    submitted notebook with the key it was graded under. Written atomically by the one process
    that started the run (or nbgrader's, in phase 2), so an interrupted run leaves only whole
    entries."""

    def __init__(self, course_root: str | Path):
        self.root = Path(course_root) / CACHE_DIR

    def path(self, job: GradingJob) -> Path:
        return self.root / job.assignment / job.student / f"{job.notebook}.json"

    def get(self, job: GradingJob, key: str | None = None) -> dict | None:
        try:
            entry = json.loads(self.path(job).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != (key or job.key()) or broken(entry["result"]):
            return None
        return entry["result"]

    def put(self, job: GradingJob, result: dict, key: str | None = None) -> None:
        path = self.path(job)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key or job.key(), "student": job.student, "notebook": job.notebook,
                       "result": result}, f)
        os.replace(tmp, path)

    def forget(self, assignment: str, student: str | None = None) -> None:
        import shutil
        folder = self.root / assignment / (student or "")
        if folder.is_dir():
            shutil.rmtree(folder)
