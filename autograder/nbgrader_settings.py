"""The course's nbgrader configuration, in one function so tests can apply it to a temp course.

``nbgrader_config.py`` at the repository root calls :func:`configure` with the repository as the
course root: ``solutions/`` is nbgrader's *source* directory and ``notebooks/`` its *release*
directory. Submissions, autograded copies, feedback and ``gradebook.db`` also go under the root
(they are git-ignored). The gradebook may instead be a PostgreSQL database (``db_url``).
"""
from __future__ import annotations

from pathlib import Path


def configure(c, root: str | Path, source: str = "solutions", release: str = "notebooks",
              exchange: str | Path | None = None, db_url: str | None = None) -> None:
    """``db_url``: the gradebook (nbgrader's ``db_url``, e.g. ``postgresql://user@host/db``);
    default ``sqlite:///<root>/gradebook.db``."""
    from nbconvert.preprocessors import ClearMetadataPreprocessor, CSSHTMLHeaderPreprocessor
    from nbgrader.preprocessors import (AssignLatePenalties, CheckCellMetadata, ClearHiddenTests,
                                        ClearOutput, DeduplicateIds, GetGrades, IgnorePattern,
                                        LimitOutput, OverwriteKernelspec, SaveAutoGrades)

    from .feedback import feedback_exporter
    from .nbgrader_plugin import RestoreTestCells, SandboxedGrading

    root = Path(root).resolve()
    c.CourseDirectory.root = str(root)
    c.CourseDirectory.source_directory = source
    c.CourseDirectory.release_directory = release
    c.CourseDirectory.course_id = "attention-from-scratch"
    c.CourseDirectory.db_url = db_url or f"sqlite:///{root / 'gradebook.db'}"
    # Student notebooks saved under another kernel name must still grade.
    c.Execute.kernel_name = "python3"
    c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
    # A submission that deleted a test or answer cell gets it back instead of "needs manual grading".
    c.OverwriteCells.add_missing_cells = True
    # nbgrader's sanitising steps, with OverwriteCells told apart from tampering (an untouched
    # test cell no longer "has changed!" because the release removed its hidden tests).
    c.Autograde.sanitize_preprocessors = [ClearOutput, DeduplicateIds, OverwriteKernelspec,
                                          RestoreTestCells, CheckCellMetadata]
    # Student code runs in a sandbox; verdicts are decided outside it (autograder.grade).
    c.Autograde.autograde_preprocessors = [SandboxedGrading, IgnorePattern, ClearMetadataPreprocessor,
                                           LimitOutput, SaveAutoGrades, AssignLatePenalties,
                                           CheckCellMetadata]
    # Warnings on stderr never zero a cell (our test cells never emit stderr anyway).
    c.IgnorePattern.pattern = r"^.*Warning:.*$"
    # Feedback never shows hidden tests.
    c.GenerateFeedback.preprocessors = [GetGrades, CSSHTMLHeaderPreprocessor, ClearHiddenTests]
    # Instructors open feedback pages in a browser logged into the course server, so nothing a
    # student wrote may become live markup there. sanitize_html cleans outputs and raw cells and
    # drops JavaScript/widget outputs; nbgrader's feedback template renders markdown cells without
    # consulting it, so the exporter sanitises rendered markdown too (autograder.feedback, which
    # also adds a CSP and checks every page after generate_feedback).
    c.HTMLExporter.sanitize_html = True
    c.GenerateFeedback.exporter_class = feedback_exporter()
    if exchange is not None:
        c.Exchange.root = str(exchange)
