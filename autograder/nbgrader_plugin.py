"""nbgrader integration: the preprocessors that replace nbgrader's ``Execute`` and ``OverwriteCells``.

nbgrader still does everything around execution: it restores test cells from the gradebook
(``OverwriteCells``, here :class:`RestoreTestCells`), re-adds deleted ones, de-duplicates ids,
records scores (``SaveAutoGrades``), and builds feedback and exports. Only the running of code
changes: see ``autograder.grade``. A result the class run already computed for exactly this
notebook (``autograder.grading_jobs``) is replayed instead of graded again.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbgrader.coursedir import CourseDirectory
from nbgrader.preprocessors import ClearHiddenTests, NbGraderPreprocessor, OverwriteCells
from traitlets import Bool, Float, Integer

from .grading_jobs import GradingJob, ResultCache, passed, replay, run_job
from .notebook import read_chapter
from .sandbox.limits import Limits


class SandboxedGrading(NbGraderPreprocessor):
    """Run the student's code in a sandbox and decide test cells in the grader's process."""

    cell_timeout = Float(30.0, help="Seconds one cell or one tested call may run").tag(config=True)
    test_timeout = Float(120.0, help="Seconds one test cell may take, all its calls together").tag(config=True)
    notebook_timeout = Float(600.0, help="Seconds one notebook may take in all").tag(config=True)
    memory_gib = Float(6.0, help="Memory of the student's processes together (GiB)").tag(config=True)
    disk_mib = Integer(512, help="Files the student may write, /tmp included (MiB)").tag(config=True)
    max_processes = Integer(64, help="Processes and threads the student may run at once").tag(config=True)
    cpu_seconds = Integer(600, help="CPU-time limit of one student process").tag(config=True)
    use_cache = Bool(True, help="Replay a result graded earlier for exactly this notebook "
                                "(.grading_cache/ in the course)").tag(config=True)

    def job(self, nb, resources) -> GradingJob:
        """``nb`` (as this preprocessor receives it) as a job any grading process can run."""
        info = resources["nbgrader"]
        course = CourseDirectory(config=self.config)
        source_dir = Path(course.format_path(course.source_directory, ".", info["assignment"]))
        release_dir = Path(course.format_path(course.release_directory, ".", info["assignment"]))
        source = source_dir / f"{info['notebook']}.ipynb"
        chapter = read_chapter(source)
        data = sorted(str(p) for p in release_dir.glob("*") if p.is_file() and p.suffix != ".ipynb") \
            if release_dir.is_dir() else []
        # Training cells get their own limit on top of the notebook's (and the CPU time to match).
        budget = self.notebook_timeout + chapter.training_budget
        limits = Limits(memory_bytes=int(self.memory_gib * 2**30), cpu_seconds=max(self.cpu_seconds, int(budget)),
                        cell_seconds=self.cell_timeout, test_seconds=self.test_timeout,
                        disk_bytes=self.disk_mib * 2**20, processes=self.max_processes)
        return GradingJob(info["assignment"], info["student"], info["notebook"], nbformat.writes(nb),
                          str(source), tuple(data), vars(limits).copy(), budget)

    def preprocess(self, nb, resources):
        info = resources["nbgrader"]
        job = self.job(nb, resources)
        cache = ResultCache(CourseDirectory(config=self.config).root)
        key = job.key()
        result = cache.get(job, key) if self.use_cache else None
        how = "replayed from the class run"
        if result is None:
            result, how = run_job(job), "graded here"
            cache.put(job, result, key)
        report = replay(nb, result)
        for event in report.events:
            self.log.warning("%s/%s: %s", info["student"], info["notebook"], event)
        ok, total = passed(result)
        self.log.info("%s/%s: %d of %d test cells passed in %.1f s (%s)", info["student"],
                      info["notebook"], ok, total, report.seconds, how)
        resources.setdefault("afs_reports", {})[info["notebook"]] = report
        return nb, resources


class RestoreTestCells(OverwriteCells):
    """``OverwriteCells`` that tells an untouched locked cell from an edited one.

    nbgrader compares each locked cell's checksum with the source's. A test cell's source
    includes its hidden tests and the released cell does not, so every such cell "has changed!"
    in every submission, an untouched one too: three warnings per student that read like
    tampering. Here a locked cell that is exactly the released one (the source minus its hidden
    tests) is restored silently; an edited one is restored with one line that says so."""

    def preprocess_cell(self, cell, resources, cell_index):
        submitted = cell.source
        self._changed = False
        cell, resources = super().preprocess_cell(cell, resources, cell_index)
        if self._changed and submitted.strip() != _released(cell, self.config).strip():
            self.log.warning("%s: the student edited the locked cell %s; it is graded as the "
                             "instructor wrote it", resources["nbgrader"]["student"],
                             cell.metadata.nbgrader.get("grade_id"))
        return cell, resources

    def report_change(self, name, attr, old, new):
        if attr == "checksum":
            self._changed = True
        else:
            super().report_change(name, attr, old, new)


def _released(cell, config) -> str:
    """The source of ``cell`` as students got it: hidden tests removed (nbgrader's own code)."""
    copy = nbformat.v4.new_code_cell(cell.source)
    ClearHiddenTests(config=config)._remove_hidden_test_region(copy)
    return copy.source
