"""nbgrader integration: a preprocessor that replaces nbgrader's ``Execute`` during autograde.

nbgrader still does everything around execution: it restores test cells from the gradebook
(``OverwriteCells``), re-adds deleted ones, de-duplicates ids, records scores
(``SaveAutoGrades``), and builds feedback and exports. Only the running of code changes: see
``autograder.grade``.
"""
from __future__ import annotations

from pathlib import Path

from nbgrader.coursedir import CourseDirectory
from nbgrader.preprocessors import NbGraderPreprocessor
from traitlets import Float, Integer

from .grade import grade_notebook
from .notebook import read_chapter
from .sandbox.process import Limits


class SandboxedGrading(NbGraderPreprocessor):
    """Run the student's code in a sandbox and decide test cells in the grader's process."""

    cell_timeout = Float(30.0, help="Seconds one cell or one tested call may run").tag(config=True)
    test_timeout = Float(120.0, help="Seconds one test cell may take, all its calls together").tag(config=True)
    notebook_timeout = Float(600.0, help="Seconds one notebook may take in all").tag(config=True)
    memory_gib = Float(6.0, help="Memory of the student's processes together (GiB)").tag(config=True)
    disk_mib = Integer(512, help="Files the student may write, /tmp included (MiB)").tag(config=True)
    max_processes = Integer(64, help="Processes and threads the student may run at once").tag(config=True)
    cpu_seconds = Integer(600, help="CPU-time limit of one student process").tag(config=True)

    def preprocess(self, nb, resources):
        info = resources["nbgrader"]
        course = CourseDirectory(config=self.config)
        source_dir = Path(course.format_path(course.source_directory, ".", info["assignment"]))
        release_dir = Path(course.format_path(course.release_directory, ".", info["assignment"]))
        chapter = read_chapter(source_dir / f"{info['notebook']}.ipynb")
        data = [p for p in release_dir.glob("*") if p.is_file() and p.suffix != ".ipynb"] \
            if release_dir.is_dir() else []
        # Training cells get their own limit on top of the notebook's (and the CPU time to match).
        budget = self.notebook_timeout + chapter.training_seconds * len(chapter.training_ids)
        limits = Limits(memory_bytes=int(self.memory_gib * 2**30), cpu_seconds=max(self.cpu_seconds, int(budget)),
                        cell_seconds=self.cell_timeout, test_seconds=self.test_timeout,
                        disk_bytes=self.disk_mib * 2**20, processes=self.max_processes)
        report = grade_notebook(nb, chapter, solutions_dir=source_dir.parent, limits=limits,
                                data_files=data, budget_seconds=budget)
        for event in report.events:
            self.log.warning("%s/%s: %s", info["student"], info["notebook"], event)
        passed = sum(v.passed for v in report.verdicts)
        self.log.info("%s/%s: %d of %d test cells passed in %.1f s", info["student"],
                      info["notebook"], passed, len(report.verdicts), report.seconds)
        resources.setdefault("afs_reports", {})[info["notebook"]] = report
        return nb, resources
