"""Course tooling. ``python -m autograder <command>``:

  release            regenerate notebooks/ from solutions/ (nbgrader generate_assignment)
  check              fail if notebooks/ is stale or anything students see leaks a solution line
  book               check, execute the chapters with the reference, build the book (-W);
                     --offline-math to view it without internet (needs libjs-mathjax)
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


def _grade(assignment: str, course: Path) -> int:
    import csv

    from .submissions import prepare

    from .sandbox.process import Sandbox, SandboxUnavailable

    try:   # refuse to grade at all rather than fail every student if the sandbox cannot start
        with Sandbox() as probe:
            if probe.run_cell("import torch").status != "ok":
                raise SandboxUnavailable("torch does not import inside the sandbox")
    except SandboxUnavailable as exc:
        print(f"Cannot grade: {exc}")
        return 1
    nbgrader = [str(Path(sys.executable).parent / "nbgrader")]
    release_dir = course / "release" / assignment
    if not release_dir.is_dir():
        release_dir = REPO / "notebooks" / assignment
    notes = {}
    for student_dir in sorted((course / "submitted").glob(f"*/{assignment}")):
        notes[student_dir.parent.name] = prepare(student_dir, release_dir)
    for student, msgs in notes.items():
        for m in msgs:
            print(f"[{student}] {m}")
    steps = [["autograde", assignment, "--force"], ["generate_feedback", assignment, "--force"],
             ["export", "--to", str(course / "grades.csv")]]
    status = 0
    for step in steps:
        print("$ nbgrader " + " ".join(step), flush=True)
        status |= subprocess.run(nbgrader + step, cwd=course).returncode
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
    b.add_argument("--offline-math", action="store_true",
                   help="serve MathJax from Debian's libjs-mathjax (for viewing without internet)")
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
        html = build(offline_math=args.offline_math)
        print(f"Book built: open {html / 'index.html'}")
        return 0
    if args.command == "grade":
        return _grade(args.assignment, args.course.resolve())
    return 2


if __name__ == "__main__":
    sys.exit(main())
