"""Course tooling. ``python -m autograder <command>``:

  release            regenerate notebooks/ from solutions/ (nbgrader generate_assignment)
  check              fail if notebooks/ is stale or anything students see leaks a solution line
  book               check, execute the chapters with the reference, build the book (-W) into
                     _build/html; --edition solutions builds the solutions edition into
                     _build/solutions/html; --repository-url URL adds launch buttons
  grade ASSIGNMENT   autograde every submission in submitted/, write feedback and grades.csv;
                     --workers N grades N at once, --scheduler ADDRESS on a Dask cluster,
                     --student S one submission, --db URL a PostgreSQL gradebook
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from .release import REPO, ensure_tools_on_path
from .startup import tool_command


def _check() -> int:
    from .leaks import find_leaks
    from .release import stale

    bad = stale()
    if bad:
        print(f"notebooks/ is stale for {', '.join(bad)}: run `python -m autograder release`.")
        return 1
    leaks = find_leaks(REPO / "solutions", [REPO / "notebooks", REPO / "book"])
    if leaks:
        print("Solution or hidden-test lines found where students can see them:\n  " + "\n  ".join(leaks[:20]))
        return 1
    print("notebooks/ is up to date and contains no solution or hidden-test lines.")
    return 0


def _probe_sandbox() -> str | None:
    """Why no student could be graded here, or None: refuse to start rather than give everybody 0."""
    from .sandbox.process import Sandbox, SandboxUnavailable

    try:
        with Sandbox() as probe:
            run = probe.run_cell("import torch, autograder.sandbox.runner")
            if run.status != "ok":
                return f"the sandbox cannot import torch and the grader: {run.error}"
    except SandboxUnavailable as exc:
        return str(exc)
    return None


def _package_seen_by_nbgrader(course: Path) -> str | None:
    """The ``autograder`` package nbgrader will load for this course (it may differ from ours
    when the venv's editable install points at another checkout)."""
    run = subprocess.run([sys.executable, "-P", "-c", "import autograder; print(autograder.__file__)"],
                         cwd=course, capture_output=True, text=True)
    return str(Path(run.stdout.strip()).parent) if run.returncode == 0 else None


def _prepare_all(course: Path, assignment: str, release_dir: Path, students: list[str]) -> None:
    """Repair every submission before nbgrader sees it; one student's folder can never stop
    the others' (``prepare`` does not raise; this guard is for a bug in it)."""
    from .submissions import prepare

    for student in students:
        try:
            notes = prepare(course / "submitted" / student / assignment, release_dir)
        except Exception as exc:  # noqa: BLE001 - reported, and that student is graded as submitted
            notes = [f"could not be checked before grading ({type(exc).__name__}: {exc})"]
        for note in notes:
            print(f"[{student}] {note}")


# nbgrader's lines worth the instructor's eye on the terminal (all of them go to the log file).
_SHOWN = re.compile(r"^\[\w+ \| (WARNING|ERROR|CRITICAL)\]")
_NOISE = re.compile(r"Removing existing (assignment|notebook)|Config option `.*` not recognized")
_FAILED = re.compile(r"There was an error processing assignment: (.*)$")


def _nbgrader(course: Path, args: list[str], log) -> tuple[int, list[str]]:
    """Run ``nbgrader ARGS`` in ``course``; everything to ``log``, warnings and errors shown."""
    print("$ nbgrader " + " ".join(args), flush=True)
    log.write(f"$ nbgrader {' '.join(args)}\n")
    proc = subprocess.Popen(tool_command("nbgrader", *args), cwd=course,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    lines = []
    for line in proc.stdout:
        log.write(line)
        lines.append(line)
        if _SHOWN.match(line) and not _NOISE.search(line):
            print(line, end="", flush=True)
    return proc.wait(), lines


def _nbgrader_failures(lines: list[str], course: Path) -> dict[str, str]:
    """student -> the error that made nbgrader give up on their submission (its last line)."""
    failures, current = {}, None
    for line in lines:
        m = _FAILED.search(line)
        if m:
            current = Path(m.group(1).strip()).relative_to(course / "submitted").parts[0]
            failures[current] = "unknown error"
        elif current and line.startswith("[") and "Traceback" not in line:
            current = None
        elif current and line.strip() and not line.startswith("[") \
                and len(line) - len(line.lstrip()) <= 4:   # the exception, not a frame or its code
            failures[current] = line.strip()[:200]
    return failures


def _record_failure(course: Path, assignment: str, release_dir: Path, student: str, why: str) -> None:
    """The student's notebooks become the blank release with a note saying nbgrader failed on
    them (originals kept as ``*.unreadable``), so they get a recorded 0 and a feedback page."""
    import nbformat

    from .submissions import _blank

    for release in sorted(release_dir.glob("*.ipynb")):
        _blank(course / "submitted" / student / assignment / release.name, nbformat.read(release, as_version=4),
               f"could not be graded: nbgrader failed on it ({why})")


def _nbgrader_steps(course: Path, assignment: str, release_dir: Path, student: str | None,
                    db_args: list[str], summary) -> int:
    """``nbgrader autograde`` (replaying phase 1's results), feedback and export; a student
    nbgrader gives up on gets the blank release with a note, graded again (``summary.failed``
    says so). The status is 0 when every student has a recorded result."""
    from .feedback import secure_feedback
    from .grading_jobs import CACHE_DIR

    only = ["--student", student] if student else []
    (course / CACHE_DIR / assignment).mkdir(parents=True, exist_ok=True)
    with open(course / CACHE_DIR / assignment / "nbgrader.log", "w", encoding="utf-8") as log:
        status, lines = _nbgrader(course, ["autograde", assignment, "--force", *only, *db_args], log)
        failures, unrecorded = _nbgrader_failures(lines, course), []
        for name, why in failures.items():
            _record_failure(course, assignment, release_dir, name, why)
            again, more = _nbgrader(course, ["autograde", assignment, "--force", "--student", name, *db_args], log)
            if again or _nbgrader_failures(more, course):
                unrecorded.append(name)
            summary.failed = {k: v for k, v in summary.failed.items() if not k.startswith(f"{name}/")}
            summary.failed[f"{name}/{assignment}"] = f"nbgrader failed on it ({why}); " + (
                "no result could be recorded" if name in unrecorded else "recorded as blank with a note saying so")
        if failures and not unrecorded:
            status = 0   # every student nbgrader gave up on has a recorded result and a page
        replayed = sum("(replayed from the class run)" in line for line in lines)
        here = sum("(graded here)" in line for line in lines)
        print(f"nbgrader autograde: {replayed} results replayed from the class run, {here} graded in place")
        status |= _nbgrader(course, ["generate_feedback", assignment, "--force", *only, *db_args], log)[0]
        for note in secure_feedback(course, assignment):
            print(note)
        status |= _nbgrader(course, ["export", "--to", str(course / "grades.csv"), *db_args], log)[0]
    return status


def _grade(assignment: str, course: Path, *, workers: int = 1, scheduler: str | None = None,
           student: str | None = None, db: str | None = None, regrade: bool = False) -> int:
    import csv

    from .startup import skip_iri_format_check
    skip_iri_format_check()   # before nbformat is imported (3 s of CPU per process)
    from .classroom import autograde_app, build_jobs, grade_class, not_ready, students_of
    from .grading_jobs import CACHE_DIR, ResultCache

    db_args = [f"--CourseDirectory.db_url={db}"] if db else []
    app = autograde_app(course, assignment, db_args)
    why = not_ready(app.coursedir.db_url, assignment)
    students = students_of(course, assignment, student)
    if not why and not students:
        why = f"nothing submitted under {course / 'submitted' / (student or '*') / assignment} (nothing was changed)"
    if why:
        print(f"Cannot grade {assignment}: {why}")
        return 1
    why = _probe_sandbox()
    if why:
        print(f"Cannot grade: {why}")
        return 1
    ours, theirs = str(Path(__file__).resolve().parent), _package_seen_by_nbgrader(course)
    if theirs and Path(theirs).resolve() != Path(ours):
        print(f"Note: nbgrader will grade with the autograder package in {theirs}, "
              f"not this command's {ours} (the virtualenv's install points there).")
    release_dir = course / "release" / assignment
    if not release_dir.is_dir():
        release_dir = REPO / "notebooks" / assignment
    _prepare_all(course, assignment, release_dir, students)
    if regrade:
        ResultCache(course).forget(assignment, student)
    # Phase 1: the sandboxed grading, in parallel; results kept in the course's cache.
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 and not scheduler else 0
    jobs, failed = build_jobs(app, assignment, students, threads)
    where = f"on the Dask cluster at {scheduler}" if scheduler else \
        f"on {workers} worker processes" if workers > 1 else "here"
    print(f"Grading {len(jobs)} notebooks of {len(students)} students {where}", flush=True)
    try:
        summary = grade_class(course, jobs, failed, workers=workers, scheduler=scheduler)
    except KeyboardInterrupt:
        print("Interrupted: every notebook graded so far is kept; run the same command again to grade the rest.")
        return 130
    # Phase 2: nbgrader, the one writer of the gradebook, replays those results.
    status = _nbgrader_steps(course, assignment, release_dir, student, db_args, summary)
    for line in summary.lines():
        print(line)
    print(f"nbgrader's full log: {course / CACHE_DIR / assignment / 'nbgrader.log'}")
    grades = course / "grades.csv"
    if grades.exists():
        for row in csv.DictReader(grades.open()):
            if row["assignment"] == assignment and (student is None or row["student_id"] == student):
                print(f"{row['student_id']:>20}  {float(row['score']):5.1f} / {float(row['max_score']):.1f}")
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("release")
    sub.add_parser("check")
    b = sub.add_parser("book")
    b.add_argument("--edition", choices=["student", "solutions"], default="student",
                   help="student (default): no solutions; solutions: the reference in every answer "
                        "cell and a banner on every page (publish after the deadline)")
    b.add_argument("--repository-url", default=None,
                   help="GitHub URL of this repository: adds repository and launch (Binder, Colab) "
                        "buttons (default: $AFS_REPOSITORY_URL, else none)")
    g = sub.add_parser("grade")
    g.add_argument("assignment")
    g.add_argument("--course", type=Path, default=REPO, help="course root with submitted/ (default: the repo)")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="grade N submissions at once, each in its own process and sandbox (a local Dask cluster)")
    g.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="grade on the Dask cluster at ADDRESS (tcp://host:8786) instead")
    g.add_argument("--student", default=None, help="grade only this student's submission (e.g. a late one)")
    g.add_argument("--db", metavar="URL", default=None,
                   help="the gradebook's database URL (nbgrader's db_url), e.g. postgresql://user@host/db; "
                        "default: the course's configuration (sqlite:///<course>/gradebook.db)")
    g.add_argument("--regrade", action="store_true",
                   help="grade again even the submissions already graded (ignore .grading_cache/)")
    args = parser.parse_args(argv)
    ensure_tools_on_path()
    if args.command == "release":
        from .release import release
        release()
        print("notebooks/ regenerated from solutions/.")
        return 0
    if args.command == "check":
        return _check()
    if args.command == "book":
        if _check():
            return 1
        from .book import build
        html = build(edition=args.edition, repository_url=args.repository_url)
        print(f"Book built: open {html / 'index.html'}")
        return 0
    if args.command == "grade":
        return _grade(args.assignment, args.course.resolve(), workers=max(1, args.workers),
                      scheduler=args.scheduler, student=args.student, db=args.db, regrade=args.regrade)
    return 2


if __name__ == "__main__":
    sys.exit(main())
