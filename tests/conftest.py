"""Shared fixtures: the repository, chapters, and a temporary nbgrader course."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# One thread per process, here and in every process the tests start (grading runs, nbgrader, the
# book's kernels inherit it). The suite runs two workers on two cores, each starting graders and
# sandboxes: with torch's default of one thread per core, small ops spin-wait on a thread another
# process holds, and the check tests ran 4x slower whenever anything else was busy (measured:
# tests/test_ch06_checks.py 69 s instead of 16 s beside one busy process).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
if "torch" in sys.modules:
    sys.modules["torch"].set_num_threads(1)

# nbgrader shells out to `alembic`: put this environment's scripts first on PATH.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

from autograder.chapters import CHAPTERS  # noqa: E402
from autograder.startup import skip_iri_format_check, tool_command  # noqa: E402

skip_iri_format_check()   # this process opens notebooks too


def has_jupyter() -> bool:
    try:
        import nbformat  # noqa: F401
        import nbgrader  # noqa: F401
    except ImportError:
        return False
    return True


needs_jupyter = pytest.mark.skipif(not has_jupyter(), reason="needs nbformat/nbgrader (not on GPU graders)")
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (apt-get install bubblewrap)")


def nbgrader(course: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = tool_command("nbgrader", *args)
    result = subprocess.run(cmd, cwd=course, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"nbgrader {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


# Every corpus notebook's grading budget (``SandboxedGrading.notebook_timeout``), before the
# chapter's training cells add theirs.
NOTEBOOK_TIMEOUT = 240


def make_course(root: Path, chapters=CHAPTERS, cell_timeout: float = 10.0) -> Path:
    """A temporary nbgrader course whose source directory is the repository's solutions/."""
    write_course_config(root, cell_timeout)
    (root / "exchange").mkdir(exist_ok=True)
    for chapter in chapters:
        nbgrader(root, "generate_assignment", chapter, "--force")
    return root


def copy_course(template: Path, root: Path, cell_timeout: float = 10.0) -> Path:
    """Another course with ``template``'s assignments (its gradebook and release), at ``root``."""
    shutil.copytree(template, root, dirs_exist_ok=True)
    write_course_config(root, cell_timeout)     # the copy's config must name the copy
    return root


def write_course_config(root: Path, cell_timeout: float) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "nbgrader_config.py").write_text(
        "from autograder.nbgrader_settings import configure\n"
        "c = get_config()\n"
        f"configure(c, root={str(root)!r}, source={str(REPO / 'solutions')!r}, release='release', "
        f"exchange={str(root / 'exchange')!r})\n"
        f"c.SandboxedGrading.cell_timeout = {cell_timeout}\n"
        f"c.SandboxedGrading.test_timeout = {3 * cell_timeout}\n"
        f"c.SandboxedGrading.notebook_timeout = {NOTEBOOK_TIMEOUT}\n")


def grade(course: Path, assignment: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autograder", "grade", assignment, "--course", str(course)],
                          cwd=REPO, capture_output=True, text=True)


def scores(course: Path, assignment: str) -> dict[str, dict[str, float]]:
    """student -> {grade_id: score} of the autograded (code) test cells, from the gradebook;
    written questions are graded by hand and are not in it."""
    from nbgrader.api import Gradebook

    out: dict[str, dict[str, float]] = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for sub in gb.assignment_submissions(assignment):
            for nb in sub.notebooks:
                for g in nb.grades:
                    if g.cell.cell_type == "code":
                        out.setdefault(sub.student.id, {})[g.name] = g.score
    return out


# Shared by the check tests: run a check on a mutant and require the named mistake in its message.
def fails_with(check, fn, *words):
    from autograder.checks.core import CheckFailure
    with pytest.raises(CheckFailure) as info:
        check(fn)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), message
    return message
