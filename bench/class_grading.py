"""Grading a synthetic class three ways: serially, with ``--workers 2``, and on a local Dask
cluster of two worker processes (``--scheduler``), each into its own copy of the course.

The class is a mix of chapter 1's corpus (tests/corpus/ch01.py), repeated to N students: honest
answers written several ways, wrong ones, hostile ones (tests rewritten to pass, an object equal
to everything, a patched ``allclose``), the untouched release with its demo cells, and a slow one
(an infinite loop in a tested function, stopped by the per-call limit). Reported: seconds per
submission of the grading phase each way and the speed-ups, whether all three gradebooks hold the
same scores, the peak memory of each worker (its own and its largest sandbox's), what nbgrader's
own three runs (replaying the results, feedback, export) cost against the grading, and how many
cores the whole machine kept busy on average during each run (run it on an idle machine: the
figure counts every process). The last line holds the figures.

    python bench/class_grading.py [--n 200] [--cell-timeout 10]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import make_course, nbgrader  # noqa: E402
from corpus import ch01  # noqa: E402
from corpus.common import drop_narrative_code  # noqa: E402

CH = "ch01_attention"
MIX = ["honest_einsum_logsumexp", "honest_loops_scale_queries", "honest_bmm_functional_linear",
       "honest_reference_style", "global_max_softmax", "tests_edited_to_pass", "object_equal_to_everything",
       "monkeypatches_allclose", "untouched_release", "infinite_loop_in_function"]


def build_class(course: Path, n: int) -> None:
    import nbformat

    cases = {c.name: c for c in ch01.CASES}
    released = nbformat.read(course / "release" / CH / f"{CH}.ipynb", as_version=4)
    for i in range(n):
        case = cases[MIX[i % len(MIX)]]
        folder = course / "submitted" / f"s{i:03d}_{case.name}" / CH
        folder.mkdir(parents=True)
        nb = case.build(released)   # every third one without its demo cells (students delete them)
        nbformat.write(nb if i % 3 else drop_narrative_code(nb), folder / f"{CH}.ipynb")


def scores(course: Path) -> dict:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        return {s.student.id: round(s.code_score, 6) for s in gb.assignment_submissions(CH)}


def peaks(course: Path) -> dict[str, float]:
    """worker -> peak MiB (the worker's own RSS + its largest sandbox's), from the cached results."""
    import json

    found: dict[str, float] = {}
    for path in (course / ".grading_cache" / CH).glob("*/*.json"):
        r = json.loads(path.read_text())["result"]
        found[r["worker"]] = max(found.get(r["worker"], 0.0), r["peak_rss_mib"] + r["peak_child_rss_mib"])
    return found


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent running (user + system, every process), so far:
    the sandboxes' processes are nobody's children, so rusage cannot count them."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def grade(course: Path, *extra: str) -> tuple[float, float, str, float]:
    """(total seconds, grading-phase seconds, output, cores busy on average) of one
    `python -m autograder grade`."""
    start, cpu = time.monotonic(), busy_seconds()
    run = subprocess.run([sys.executable, "-m", "autograder", "grade", CH, "--course", str(course), *extra],
                         cwd=REPO, capture_output=True, text=True)
    total, cpu = time.monotonic() - start, busy_seconds() - cpu
    if run.returncode != 0:
        raise SystemExit(f"grade {' '.join(extra)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    phase1 = float(re.search(r"submitted notebooks in (\d+) s", run.stdout).group(1))
    return total, phase1, run.stdout, cpu / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--cell-timeout", type=float, default=10.0)
    args = parser.parse_args()
    from distributed import LocalCluster

    base = Path(tempfile.mkdtemp(prefix="afs-class-"))
    template = make_course(base / "template", chapters=[CH], cell_timeout=args.cell_timeout)
    build_class(template, args.n)
    courses = {way: base / way for way in ("serial", "workers2", "dask2")}
    for course in courses.values():
        shutil.copytree(template, course)
        text = (course / "nbgrader_config.py").read_text().replace(str(template), str(course))
        (course / "nbgrader_config.py").write_text(text)

    results = {"serial": grade(courses["serial"]), "workers2": grade(courses["workers2"], "--workers", "2")}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        results["dask2"] = grade(courses["dask2"], "--scheduler", cluster.scheduler_address)
    start = time.monotonic()
    nbgrader(courses["serial"], "export", "--to", str(base / "x.csv"))
    startup = time.monotonic() - start     # nbgrader's start-up plus a trivial export

    got = {way: scores(course) for way, course in courses.items()}
    same = got["serial"] == got["workers2"] == got["dask2"] and len(got["serial"]) == args.n
    n = args.n
    for way, (total, phase1, out, cores) in results.items():
        print(f"{way}: {total:.0f} s in all, grading {phase1:.0f} s ({phase1 / n:.2f} s/submission), "
              f"nbgrader and the rest {total - phase1:.0f} s; {cores:.2f} of {os.cpu_count()} cores busy "
              f"on average; peak MiB per worker "
              + ", ".join(f"{w} {m:.0f}" for w, m in sorted(peaks(courses[way]).items())))
    serial, w2, d2 = (results[w][1] for w in ("serial", "workers2", "dask2"))
    rest = results["serial"][0] - serial
    worker_peak = max(max(peaks(courses[w]).values()) for w in ("workers2", "dask2"))
    shutil.rmtree(base, ignore_errors=True)
    print(f"class_grading: n={n} serial {serial / n:.2f} s/submission, --workers 2 {w2 / n:.2f} "
          f"(x{serial / w2:.2f}), dask 2 workers {d2 / n:.2f} (x{serial / d2:.2f}); same scores all three "
          f"ways: {same}; cores busy serial {results['serial'][3]:.2f}, --workers 2 "
          f"{results['workers2'][3]:.2f}; peak per worker {worker_peak:.0f} MiB; nbgrader start-up {startup:.1f} s per "
          f"command, its 3 commands + intake {rest:.0f} s per run vs {serial:.0f} s of serial grading")


if __name__ == "__main__":
    main()
