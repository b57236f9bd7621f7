"""Grading a class: serially into SQLite, and on a real Dask cluster of two worker processes (one
killed mid-run) into a real PostgreSQL server, with the same scores; the instructor's traps
(grading before generate_assignment, checksum warnings, a submission nbgrader fails on); a rerun
grades only what is missing."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, grade, make_course, nbgrader, needs_bwrap, needs_jupyter

pytest.importorskip("nbformat", reason="needs nbformat/nbgrader (not on GPU graders)")
from corpus import ch01  # noqa: E402
from corpus.common import Case, answers, fast, then  # noqa: E402

pytestmark = [needs_jupyter, needs_bwrap, pytest.mark.slow]
CH = "ch01_attention"
_CASES = {c.name: c for c in ch01.CASES}
# A small class: right, one mistake, tests rewritten to pass (the others' test cells untouched).
CLASS = [_CASES["honest_einsum_logsumexp"], _CASES["global_max_softmax"], _CASES["tests_edited_to_pass"]]
# nbgrader itself gives up on this one (the course's configuration below makes it fail).
BREAKS = Case("breaks_nbgrader", ch01.ZERO, fast(then(answers(softmax_answer="# BREAK NBGRADER\n"))))
FAILING_STEP = '''
from nbgrader.preprocessors import NbGraderPreprocessor
class FailsOnMarker(NbGraderPreprocessor):
    """Stands for any nbgrader failure on one submission."""
    def preprocess(self, nb, resources):
        if any("BREAK NBGRADER" in cell.source for cell in nb.cells):
            raise RuntimeError("simulated failure inside nbgrader")
        return nb, resources
c.Autograde.sanitize_preprocessors = list(c.Autograde.sanitize_preprocessors) + [FailsOnMarker]
'''


def _write(course: Path, cases) -> None:
    import nbformat

    released = nbformat.read(course / "release" / CH / f"{CH}.ipynb", as_version=4)
    for case in cases:
        folder = course / "submitted" / case.name / CH
        folder.mkdir(parents=True)
        nbformat.write(case.build(released), folder / f"{CH}.ipynb")


def _scores(db_url: str) -> dict[str, dict[str, float]]:
    """student -> {grade_id: score} of the code test cells, and how many submissions each has."""
    from nbgrader.api import Gradebook

    out = {}
    with Gradebook(db_url) as gb:
        for sub in gb.assignment_submissions(CH):
            assert sub.student.id not in out, f"{sub.student.id} recorded twice"
            out[sub.student.id] = {g.name: g.score for nb in sub.notebooks for g in nb.grades
                                   if g.cell.cell_type == "code"}
    return out


def _sqlite(course: Path) -> str:
    return f"sqlite:///{course / 'gradebook.db'}"


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The class graded the default way (one process, SQLite), plus a student nbgrader fails on."""
    course = make_course(tmp_path_factory.mktemp("serial"), chapters=[], cell_timeout=10)
    with open(course / "nbgrader_config.py", "a") as f:
        f.write(FAILING_STEP)
    nbgrader(course, "generate_assignment", CH, "--force")
    _write(course, CLASS + [BREAKS])
    run = grade(course, CH)
    return course, run, _scores(_sqlite(course))


def test_serial_class_gets_expected_scores(serial):
    course, run, got = serial
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    for case in CLASS:
        assert got[case.name] == case.expected, case.name


def test_every_submission_has_one_log_line_and_the_summary(serial):
    out = serial[1].stdout
    for case in CLASS:
        assert out.count(f"{case.name}/{CH}: ") == 1, out
    assert "Graded 3 of 4 submitted notebooks" in out and "Slowest: " in out, out
    assert "3 results replayed from the class run, 0 graded in place" in out, out


def test_checksum_warnings_only_for_an_edited_test_cell(serial):
    out = serial[1].stdout + serial[1].stderr
    assert "has changed" not in out
    edited = [line for line in out.splitlines() if "edited the locked cell" in line]
    assert sorted(line.split("cell ")[-1].split(";")[0] for line in edited) == \
        ["attention_tests", "self_attention_tests", "softmax_tests"], edited
    assert all("tests_edited_to_pass" in line for line in edited)


def test_a_submission_nbgrader_fails_on_is_recorded_with_a_page(serial):
    course, run, got = serial
    assert got[BREAKS.name] == BREAKS.expected
    assert f"{BREAKS.name}/{CH}: nbgrader failed on it (RuntimeError: simulated failure inside nbgrader); " \
           "recorded as blank with a note saying so" in run.stdout, run.stdout
    page = (course / "feedback" / BREAKS.name / CH / f"{CH}.html").read_text()
    assert "nbgrader failed on it" in page and "simulated failure inside nbgrader" in page
    assert (course / "submitted" / BREAKS.name / CH / f"{CH}.ipynb.unreadable").is_file()


def test_rerun_grades_only_what_is_missing_and_gives_the_same_result(serial):
    """An interrupted run leaves whole cache entries: a rerun grades only the others, the same way."""
    import json

    from autograder.classroom import autograde_app, build_jobs, grade_class
    from autograder.grading_jobs import ResultCache

    course = serial[0]
    students = [c.name for c in CLASS]
    jobs, failed = build_jobs(autograde_app(course, CH, []), CH, students)
    assert not failed and len(jobs) == len(students)
    cache = ResultCache(course)
    lost = next(j for j in jobs if j.student == "global_max_softmax")
    before = json.loads(cache.path(lost).read_text())["result"]
    cache.path(lost).unlink()
    summary = grade_class(course, jobs, failed)
    assert summary.cached == len(students) - 1 and list(summary.graded) == [lost.name]
    after = cache.get(lost)
    assert [(v["grade_id"], v["passed"], v["message"]) for v in after["verdicts"]] == \
        [(v["grade_id"], v["passed"], v["message"]) for v in before["verdicts"]]


def test_grading_before_generate_assignment_fails_fast_and_changes_nothing(tmp_path):
    course = make_course(tmp_path / "course", chapters=[])
    folder = course / "submitted" / "bob" / CH
    folder.mkdir(parents=True)
    shutil.copy(REPO / "notebooks" / CH / f"{CH}.ipynb", folder)
    (course / "grades.csv").write_text("kept\n")
    before = sorted((p, p.read_bytes()) for p in course.rglob("*") if p.is_file())
    run = grade(course, CH)
    assert run.returncode == 1
    assert run.stdout.strip().splitlines() == [
        f"Cannot grade {CH}: there is no gradebook at {course / 'gradebook.db'}: run "
        f"`nbgrader generate_assignment {CH} --force` first (nothing was changed)"], run.stdout + run.stderr
    assert sorted((p, p.read_bytes()) for p in course.rglob("*") if p.is_file()) == before


# -- PostgreSQL and Dask ------------------------------------------------------------------------

def _pg_bin() -> Path | None:
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(folder, "pg_ctl").exists():
            return Path(folder)
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own in a temporary folder, on a free port, for this module.
    PostgreSQL refuses to run as root: as root, it runs as the `postgres` user."""
    binaries = _pg_bin()
    if binaries is None or not (binaries / "initdb").exists():
        pytest.skip("needs PostgreSQL's server binaries (apt-get install postgresql)")
    as_user = []
    folder = Path(tempfile.mkdtemp(prefix="afs-pg-"))
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = str(folder / "data")

    def pg(*args):
        return subprocess.run(as_user + [str(binaries / args[0]), *args[1:]], capture_output=True, text=True,
                              check=True)

    pg("initdb", "-D", data, "-U", "grader", "--auth=trust", "-E", "UTF8", "--no-sync")
    pg("pg_ctl", "-D", data, "-l", str(folder / "log"), "-w", "-o",
       f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off", "start")
    try:
        import psycopg
        with psycopg.connect(host="127.0.0.1", port=port, user="grader", dbname="postgres", autocommit=True) as db:
            db.execute("CREATE DATABASE gradebook")
        yield f"postgresql://grader@127.0.0.1:{port}/gradebook"
    finally:
        pg("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def on_dask(tmp_path_factory, postgres):
    """The same class on a Dask cluster of two worker processes, into PostgreSQL (``--db``);
    one worker is killed (SIGKILL) while it grades."""
    from distributed import Client, LocalCluster

    course = make_course(tmp_path_factory.mktemp("dask"), chapters=[], cell_timeout=10)
    nbgrader(course, "generate_assignment", CH, "--force", "--db", postgres)
    _write(course, CLASS)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)
        run = subprocess.Popen([sys.executable, "-m", "autograder", "grade", CH, "--course", str(course),
                                "--scheduler", cluster.scheduler_address, "--db", postgres],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killed, deadline = None, time.monotonic() + 240
        while killed is None and run.poll() is None and time.monotonic() < deadline:
            busy = [address for address, keys in client.processing().items() if keys]
            if busy:
                time.sleep(1.0)   # well inside a grading (several seconds each)
                cached = len(list((course / ".grading_cache" / CH).glob("*/*.json")))
                killed = (pids[busy[0]], cached)
                os.kill(pids[busy[0]], signal.SIGKILL)
            time.sleep(0.2)
        out, err = run.communicate(timeout=400)
    return course, run.returncode, out, err, killed, _scores(postgres)


def test_dask_cluster_into_postgres_matches_serial_sqlite(serial, on_dask):
    course, status, out, err, killed, got = on_dask
    assert status == 0, out[-4000:] + err[-3000:]
    assert killed is not None and killed[1] < len(CLASS), "no worker was killed while grading"
    assert got == {k: v for k, v in serial[2].items() if k != BREAKS.name}
    assert "3 results replayed from the class run, 0 graded in place" in out, out


def test_a_killed_worker_still_gives_every_grade_exactly_once(on_dask):
    course, status, out, err, killed, got = on_dask
    assert sorted(got) == sorted(c.name for c in CLASS)
    for case in CLASS:
        assert out.count(f"{case.name}/{CH}: ") == 1, out
        assert len(list((course / ".grading_cache" / CH / case.name).glob("*.json"))) == 1
    assert f":{killed[0]})" not in out, "a result came back from the killed worker"
