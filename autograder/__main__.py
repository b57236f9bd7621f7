"""Course tooling. ``python -m autograder <command>``:

  release            regenerate notebooks/ from solutions/ (nbgrader generate_assignment)
  check              fail if notebooks/ is stale or anything students see leaks a solution line
  book               check, execute the chapters with the reference, build the book (-W) into
                     _build/html; --edition solutions builds the solutions edition into
                     _build/solutions/html; --repository-url URL adds launch buttons
  grade ASSIGNMENT   autograde every submission in submitted/, write feedback and grades.csv
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .release import REPO, ensure_tools_on_path


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


def _prepare_all(course: Path, assignment: str, release_dir: Path) -> None:
    """Repair every submission before nbgrader sees it; one student's folder can never stop
    the others' (``prepare`` does not raise; this guard is for a bug in it)."""
    from .submissions import prepare

    submitted = course / "submitted"
    for student_dir in sorted(submitted.glob(f"*/{assignment}")) if submitted.is_dir() else []:
        student = student_dir.parent.name
        try:
            notes = prepare(student_dir, release_dir)
        except Exception as exc:  # noqa: BLE001 - reported, and that student is graded as submitted
            notes = [f"could not be checked before grading ({type(exc).__name__}: {exc})"]
        for note in notes:
            print(f"[{student}] {note}")


def _grade(assignment: str, course: Path) -> int:
    import csv

    why = _probe_sandbox()
    if why:
        print(f"Cannot grade: {why}")
        return 1
    ours, theirs = str(Path(__file__).resolve().parent), _package_seen_by_nbgrader(course)
    if theirs and Path(theirs).resolve() != Path(ours):
        print(f"Note: nbgrader will grade with the autograder package in {theirs}, "
              f"not this command's {ours} (the virtualenv's install points there).")
    nbgrader = [str(Path(sys.executable).parent / "nbgrader")]
    release_dir = course / "release" / assignment
    if not release_dir.is_dir():
        release_dir = REPO / "notebooks" / assignment
    _prepare_all(course, assignment, release_dir)
    steps = [["autograde", assignment, "--force"], ["generate_feedback", assignment, "--force"],
             ["export", "--to", str(course / "grades.csv")]]
    status = 0
    for step in steps:
        print("$ nbgrader " + " ".join(step), flush=True)
        status |= subprocess.run(nbgrader + step, cwd=course).returncode
        if step[0] == "generate_feedback":
            from .feedback import secure_feedback
            for note in secure_feedback(course, assignment):
                print(note)
    grades = course / "grades.csv"
    if grades.exists():
        for row in csv.DictReader(grades.open()):
            if row["assignment"] == assignment:
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
        return _grade(args.assignment, args.course.resolve())
    return 2


if __name__ == "__main__":
    sys.exit(main())
