"""Grade a whole class: every submission's sandboxed run in parallel, then nbgrader as usual.

nbgrader's ``autograde`` is sequential and is the one writer of the gradebook; it stays so.
Phase 1 (here) takes each submitted notebook through nbgrader's own sanitising preprocessors,
exactly as ``autograde`` will, and grades it as a :class:`~autograder.grading_jobs.GradingJob`:
in this process (``workers=1``), on a local Dask cluster of worker processes (``workers=N``) or
on a Dask cluster the instructor started (``scheduler=ADDRESS``). Results come back as plain data
to this process, which alone writes them to the course's result cache. Phase 2 is the ordinary
``nbgrader autograde``, whose ``SandboxedGrading`` replays each cached result (and grades in
place whatever is missing). A result already in the cache under the same key is not graded
again, so an interrupted run resumes where it stopped; a worker that dies mid-task only means
Dask runs that task again elsewhere.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .grading_jobs import GradingJob, ResultCache, broken, passed, run_job


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def autograde_app(course: Path, assignment: str, argv: list[str]):
    """nbgrader's ``AutogradeApp`` for ``course``, configured as ``nbgrader autograde`` would be
    there (the course's ``nbgrader_config.py``, the user's, ``argv``), not started."""
    from nbgrader.apps import AutogradeApp

    with _cwd(course):
        app = AutogradeApp()
        app.initialize([assignment, *argv, "--log-level=ERROR"])
    return app


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def not_ready(db_url: str, assignment: str) -> str | None:
    """Why ``assignment`` cannot be graded yet with the gradebook at ``db_url``, or None.
    Reads only: it never creates the database, its tables or a file."""
    import sqlalchemy

    fix = f"run `nbgrader generate_assignment {assignment} --force` first (nothing was changed)"
    if db_url.startswith("sqlite:///") and not Path(db_url[len("sqlite:///"):]).is_file():
        return f"there is no gradebook at {db_url[len('sqlite:///'):]}: {fix}"
    engine = sqlalchemy.create_engine(db_url)
    try:
        with engine.connect() as db:
            if not {"assignment", "notebook"} <= set(sqlalchemy.inspect(db).get_table_names()):
                return f"the gradebook {engine.url!r} has no nbgrader tables: {fix}"
            count = db.execute(sqlalchemy.text(
                "SELECT count(*) FROM notebook JOIN assignment ON notebook.assignment_id = assignment.id "
                "WHERE assignment.name = :a"), {"a": assignment}).scalar()
    except sqlalchemy.exc.SQLAlchemyError as exc:
        return f"cannot read the gradebook {engine.url!r} ({first_line(getattr(exc, 'orig', None) or exc)})"
    finally:
        engine.dispose()
    if not count:
        return f"{assignment} is not in the gradebook {engine.url!r}: {fix}"
    return None


def students_of(course: Path, assignment: str, only: str | None = None) -> list[str]:
    submitted = course / "submitted"
    found = sorted(p.parent.name for p in submitted.glob(f"*/{assignment}")) if submitted.is_dir() else []
    return [s for s in found if only is None or s == only]


def build_jobs(app, assignment: str, students: list[str], threads: int = 0
               ) -> tuple[list[GradingJob], dict[str, str]]:
    """Each submitted notebook as ``SandboxedGrading`` will receive it in phase 2 (nbgrader's
    own sanitising preprocessors, with the same configuration and gradebook), as a job; and
    ``{student/notebook: why}`` for those nbgrader itself cannot process."""
    import nbformat
    from nbgrader.api import Gradebook
    from nbgrader.converters import Autograde

    from .nbgrader_plugin import SandboxedGrading

    converter = Autograde(coursedir=app.coursedir, parent=app)
    converter.exporter = converter.exporter_class(parent=converter, config=converter.config)
    converter._sanitizing = True
    converter._init_preprocessors()
    grading = SandboxedGrading(config=converter.config)
    with Gradebook(app.coursedir.db_url, app.coursedir.course_id) as gb:
        notebooks = sorted(nb.name for nb in gb.find_assignment(assignment).notebooks)
    jobs, failed = [], {}
    for student in students:
        folder = Path(app.coursedir.format_path(app.coursedir.submitted_directory, student, assignment))
        for name in notebooks:
            path = folder / f"{name}.ipynb"
            if not path.is_file():
                continue   # nbgrader records 0 ("No submitted file")
            try:
                resources = converter.init_single_notebook_resources(str(path))
                output, resources = converter.exporter.from_filename(str(path), resources=resources)
                job = grading.job(nbformat.reads(output, as_version=4), resources)
            except Exception as exc:  # noqa: BLE001 - reported; phase 2 then records what happened
                failed[f"{student}/{name}"] = f"nbgrader could not prepare it ({first_line(exc)})"
                continue
            jobs.append(dataclasses.replace(job, threads=threads))
    return jobs, failed


def _serial(jobs: list[GradingJob]):
    for job in jobs:
        try:
            yield job, run_job(job), None
        except Exception as exc:  # noqa: BLE001 - one submission never stops the class
            yield job, None, first_line(exc)


def _dask(jobs: list[GradingJob], workers: int, scheduler: str | None):
    """Results as they complete on a Dask cluster: a local one of ``workers`` processes (one
    thread each), or the one at ``scheduler``. A task whose worker died is run again (Dask's
    ``allowed-failures``); one that kept killing workers comes back as ``KilledWorker``."""
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler, timeout="60s")
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
    try:
        futures = {client.submit(run_job, job, pure=False, retries=1,
                                 key=f"grade-{job.student}-{job.notebook}-{job.key()[:12]}"): job
                   for job in jobs}
        for future in as_completed(futures):
            job = futures.pop(future)
            try:
                yield job, future.result(), None
            except Exception as exc:  # noqa: BLE001 - KilledWorker, a worker without the course...
                yield job, None, first_line(exc)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@dataclass
class Summary:
    total: int = 0
    cached: int = 0
    graded: dict[str, float] = field(default_factory=dict)      # student/notebook -> seconds
    failed: dict[str, str] = field(default_factory=dict)        # student/notebook -> why
    workers: dict[str, float] = field(default_factory=dict)     # worker -> peak RSS (MiB), sandbox incl.
    seconds: float = 0.0

    def lines(self, slowest: int = 5) -> list[str]:
        done = len(self.graded)
        out = [f"Graded {done} of {self.total} submitted notebooks in {self.seconds:.0f} s"
               + (f" ({self.cached} already graded, from the cache)" if self.cached else "")
               + (f"; {len(self.failed)} failed to grade:" if self.failed else ".")]
        out += [f"  {name}: {why}" for name, why in sorted(self.failed.items())]
        if self.graded:
            top = sorted(self.graded.items(), key=lambda kv: -kv[1])[:slowest]
            out.append("Slowest: " + ", ".join(f"{name} {s:.1f} s" for name, s in top))
        return out


def grade_class(course: Path, jobs: list[GradingJob], failed: dict[str, str], *, workers: int = 1,
                scheduler: str | None = None, out=sys.stdout) -> Summary:
    """Phase 1: grade every job not already in the course's cache, store each result as it
    arrives, show progress; the summary says what was graded, what failed and why."""
    from tqdm import tqdm

    cache = ResultCache(course)
    summary = Summary(total=len(jobs) + len(failed), failed=dict(failed))
    keys = {job.name: job.key() for job in jobs}
    pending = [job for job in jobs if cache.get(job, keys[job.name]) is None]
    summary.cached = len(jobs) - len(pending)
    start = time.monotonic()
    runner = _serial(pending) if workers <= 1 and not scheduler else _dask(pending, workers, scheduler)
    log_path = cache.root / (jobs[0].assignment if jobs else "_") / "grading.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(pending), unit="nb", file=sys.stderr, dynamic_ncols=True,
              disable=not pending) as bar, open(log_path, "a", encoding="utf-8") as log:
        bar.set_postfix(failed=len(summary.failed))
        for job, result, error in runner:
            why = error or (broken(result) if result else None)
            if result is not None and result.get("log"):
                log.write(f"== {job.name} (worker {result['worker']})\n{result['log']}")
                log.flush()
            if result is not None:
                cache.put(job, result, keys[job.name])
                summary.graded[job.name] = result["seconds"]
                worker = result.get("worker", "")
                summary.workers[worker] = max(summary.workers.get(worker, 0.0),
                                              result["peak_rss_mib"] + result["peak_child_rss_mib"])
            if why:
                why = why.replace("(see the log)", f"(see {log_path})")
                summary.failed[job.name] = why
                bar.write(f"{job.name}: failed to grade: {why}", file=out)
            else:
                ok, total = passed(result)
                where = f" (worker {result['worker']})" if workers > 1 or scheduler else ""
                bar.write(f"{job.name}: {ok} of {total} test cells passed in {result['seconds']:.1f} s{where}",
                          file=out)
            bar.update(1)
            bar.set_postfix(failed=len(summary.failed))
    summary.seconds = time.monotonic() - start
    return summary
