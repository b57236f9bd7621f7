"""prepare(): any submitted folder becomes safe for nbgrader and gradable, and it never raises.

Each test builds a submission in tmp_path, runs prepare() on it (no nbgrader, no sandbox) and
checks the result as nbgrader would meet it: only plain files, a notebook that validates, has
exactly the release's graded cells with the release's nbgrader metadata, keeps the student's
work, and a grading note when it had to be graded as blank.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

nbformat = pytest.importorskip("nbformat")

from autograder import submissions  # noqa: E402
from autograder.notebook import defined_names, meta, safe_parse  # noqa: E402
from autograder.submissions import prepare  # noqa: E402
from conftest import REPO  # noqa: E402

CH = "ch01_attention"
NB = f"{CH}.ipynb"
SOFTMAX = ("def softmax(x, dim=-1):\n    e = (x - x.amax(dim, keepdim=True)).exp()\n"
           "    return e / e.sum(dim, keepdim=True)\n")
ATTENTION = "def scaled_dot_product_attention(q, k, v):\n    return q, k\n"


# -- helpers ------------------------------------------------------------------------------------

def release_dir(chapter: str = CH) -> Path:
    return REPO / "notebooks" / chapter


def released(chapter: str = CH):
    return nbformat.read(release_dir(chapter) / f"{chapter}.ipynb", as_version=4)


def folder(tmp_path: Path, chapter: str = CH) -> Path:
    path = tmp_path / "submitted" / "alice" / chapter
    path.mkdir(parents=True)
    return path


def cell_of(nb, grade_id: str):
    (cell,) = [c for c in nb.cells if meta(c).get("grade_id") == grade_id]
    return cell


def with_answers(**sources: str):
    nb = released()
    for grade_id, src in sources.items():
        cell_of(nb, grade_id).source = src
    return nb


def as_json(nb) -> dict:
    """A notebook as plain JSON, to mangle freely."""
    return json.loads(nbformat.writes(nb))


def json_cell(data: dict, grade_id: str) -> dict:
    return next(c for c in data["cells"] if c["metadata"].get("nbgrader", {}).get("grade_id") == grade_id)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data))   # ensure_ascii: lone surrogates are written as escapes


def graded(nb) -> list[tuple]:
    return sorted((meta(c)["grade_id"], c.cell_type, json.dumps(meta(c), sort_keys=True))
                  for c in nb.cells if "nbgrader" in c.get("metadata", {}))


def assert_only_plain_files(root: Path) -> None:
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            st_ = os.lstat(os.path.join(dirpath, name))
            assert stat.S_ISDIR(st_.st_mode) or (stat.S_ISREG(st_.st_mode) and st_.st_nlink == 1), \
                f"{name} is not a plain file"


def gradable(path: Path, chapter: str = CH):
    """The notebook at ``path`` as nbgrader will read it, after checking it is safe and valid."""
    assert_only_plain_files(path.parent)
    assert stat.S_ISREG(os.lstat(path).st_mode)
    nb = nbformat.reads(path.read_bytes().decode("utf-8"), as_version=4)
    json.dumps(nb, ensure_ascii=False).encode("utf-8")   # raises on a lone surrogate, even escaped
    nbformat.validate(nb)
    assert graded(nb) == graded(released(chapter)), "graded cells differ from the release's"
    return nb


def grading_note(nb) -> str | None:
    first = nb.cells[0]
    return first.source if first.cell_type == "markdown" and first.source.startswith("**Grading note:**") else None


def assert_blank(path: Path, *words: str) -> None:
    nb = gradable(path)
    note = grading_note(nb)
    assert note is not None, "no grading note"
    for word in words:
        assert word in note, note
    assert [c.source for c in nb.cells[1:]] == [c.source for c in released().cells]


@pytest.fixture
def decoy(tmp_path: Path) -> Path:
    """A file outside the submission that a link points at; it must never be changed."""
    path = tmp_path / "solutions" / NB
    path.parent.mkdir(parents=True)
    nbformat.write(with_answers(softmax_answer=SOFTMAX), path)
    return path


def assert_untouched(path: Path, content: bytes) -> None:
    st_ = os.lstat(path)
    assert stat.S_ISREG(st_.st_mode) and st_.st_nlink == 1 and path.read_bytes() == content


# -- 1. links and special files -----------------------------------------------------------------

@pytest.mark.parametrize("name", [NB, "renamed.ipynb"])
def test_a_symlinked_notebook_is_removed_not_followed(tmp_path, decoy, name):
    sub = folder(tmp_path)
    before = decoy.read_bytes()
    os.symlink(os.path.relpath(decoy, sub), sub / name)
    notes = prepare(sub, release_dir())
    assert not any(p.is_symlink() for p in sub.iterdir())
    assert_blank(sub / NB, "symbolic link")
    assert_untouched(decoy, before)
    assert any("symbolic link" in n for n in notes)


def test_odd_file_names_give_printable_notes(tmp_path, decoy):
    sub = folder(tmp_path)
    os.symlink(decoy, os.path.join(os.fsencode(sub), b"\xff\n[bob] full marks.ipynb"))   # not UTF-8
    notes = prepare(sub, release_dir())
    assert_blank(sub / NB, "symbolic link")
    for note in notes:
        assert "\n" not in note
        note.encode("utf-8")                                          # printable by the grader


def test_unsafe_extra_files_are_removed_and_their_targets_untouched(tmp_path, decoy, monkeypatch):
    sub = folder(tmp_path)
    nbformat.write(with_answers(softmax_answer=SOFTMAX), sub / NB)
    target = tmp_path / "gradebook.db"
    target.write_bytes(b"secret grades")
    linked = tmp_path / "other_student.npz"
    linked.write_bytes(b"someone else's data")
    secret_dir = tmp_path / "secret_dir"
    secret_dir.mkdir()
    (secret_dir / "key").write_text("k")
    os.symlink(os.path.relpath(target, sub), sub / "data.npz")        # relative link
    os.symlink(target, sub / "x")                                     # absolute link
    os.symlink("/dev/zero", sub / "z")                                # link to a device
    os.symlink(secret_dir, sub / "data")                              # link to a folder
    os.link(linked, sub / "weights.npz")                              # hard link
    os.mkfifo(sub / "fifo")
    monkeypatch.chdir(sub)                                            # AF_UNIX paths are short
    with socket.socket(socket.AF_UNIX) as s:
        s.bind("sock")
    (sub / "sub").mkdir()
    os.symlink(target, sub / "sub" / "y")                             # a link in a real folder
    (sub / "sub" / "ok.txt").write_text("kept")
    (sub / "notes.txt").write_text("kept too")

    notes = prepare(sub, release_dir())

    left = sorted(p.relative_to(sub).as_posix() for p in sub.rglob("*"))
    assert left == [NB, "notes.txt", "sub", "sub/ok.txt"]
    assert_only_plain_files(sub)
    assert_untouched(target, b"secret grades")
    assert_untouched(linked, b"someone else's data")
    assert (secret_dir / "key").read_text() == "k"
    nb = gradable(sub / NB)
    assert cell_of(nb, "softmax_answer").source == SOFTMAX and grading_note(nb) is None
    for what in ("'data.npz' (a symbolic link)", "'weights.npz' (a hard link)", "'fifo' (a special file",
                 "'sock' (a special file", "'sub/y' (a symbolic link)", "'data' (a symbolic link)"):
        assert any(what in n for n in notes), (what, notes)


def test_device_files_are_removed(tmp_path):
    sub = folder(tmp_path)
    try:
        os.mknod(sub / NB, stat.S_IFCHR | 0o666, os.makedev(1, 5))       # /dev/zero
        os.mknod(sub / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot create device files here: {exc}")
    prepare(sub, release_dir())
    assert not (sub / "zero").exists()
    assert_blank(sub / NB, "special file")


def test_a_symlinked_assignment_folder_is_replaced_not_followed(tmp_path, decoy):
    (tmp_path / "submitted" / "alice").mkdir(parents=True)
    sub = tmp_path / "submitted" / "alice" / CH
    os.symlink(decoy.parent, sub)
    before = decoy.read_bytes()
    notes = prepare(sub, release_dir())
    assert not sub.is_symlink() and sub.is_dir()
    assert_blank(sub / NB, "assignment folder was a symbolic link")
    assert_untouched(decoy, before)
    assert sorted(os.listdir(decoy.parent)) == [NB]
    assert any("assignment folder" in n for n in notes)


def test_a_symlinked_student_folder_is_replaced_not_followed(tmp_path, decoy):
    solutions = tmp_path / "solutions"
    (solutions / CH).mkdir()
    nbformat.write(with_answers(softmax_answer=SOFTMAX), solutions / CH / NB)
    before = (solutions / CH / NB).read_bytes()
    (tmp_path / "submitted").mkdir()
    os.symlink(solutions, tmp_path / "submitted" / "alice")          # alice/ch01 is solutions/ch01
    sub = tmp_path / "submitted" / "alice" / CH
    prepare(sub, release_dir())
    assert not sub.parent.is_symlink()
    assert_blank(sub / NB, "student folder was a symbolic link")
    assert_untouched(solutions / CH / NB, before)
    assert sorted(os.listdir(solutions / CH)) == [NB]


def test_a_notebook_that_is_a_folder_is_graded_blank(tmp_path):
    sub = folder(tmp_path)
    (sub / NB).mkdir()
    (sub / NB / "inside").write_text("x")
    notes = prepare(sub, release_dir())
    assert_blank(sub / NB, "a folder")
    assert any("removed" in n and "a folder" in n for n in notes)


def test_a_huge_notebook_is_not_read(tmp_path):
    sub = folder(tmp_path)
    with open(sub / NB, "wb") as f:
        f.truncate(submissions.NOTEBOOK_CAP + 1)                      # sparse: instant
    notes = prepare(sub, release_dir())
    assert_blank(sub / NB, "larger than 32 MiB")
    assert any("graded as blank" in n for n in notes)


def test_extra_files_over_the_cap_are_removed_largest_first(tmp_path):
    sub = folder(tmp_path)
    nbformat.write(released(), sub / NB)
    for name, size in [("big.bin", 50 * 2**20), ("mid.bin", 20 * 2**20), ("small.txt", 10)]:
        with open(sub / name, "wb") as f:
            f.truncate(size)
    notes = prepare(sub, release_dir())
    assert sorted(os.listdir(sub)) == [NB, "mid.bin", "small.txt"]
    assert any("big.bin" in n for n in notes)


# -- missing and unreadable notebooks -----------------------------------------------------------

def test_a_missing_notebook_is_graded_blank_with_a_note(tmp_path):
    sub = folder(tmp_path)
    notes = prepare(sub, release_dir())
    assert_blank(sub / NB, "was not submitted")
    assert notes == [f"{NB} was not submitted; graded as blank"]


@pytest.mark.parametrize("content,why", [(b"not json {", "not valid JSON"), (b"[1, 2]", "no list of cells"),
                                         (b'{"cells": 3}', "no list of cells"), (b"[" * 100_000, "not valid JSON")])
def test_an_unreadable_file_is_kept_aside_and_graded_blank(tmp_path, content, why):
    sub = folder(tmp_path)
    (sub / NB).write_bytes(content)
    notes = prepare(sub, release_dir())
    assert_blank(sub / NB, why)
    assert (sub / f"{NB}.unreadable").read_bytes() == content
    assert any(why in n for n in notes)


# -- 2. parsing student code --------------------------------------------------------------------

DEEP = {"attribute chain": "a" + ".a" * 100_000, "unary chain": "-" * 100_000 + "x",
        "null byte": "def softmax(x):\x00\n    return x\n", "lone surrogate": "s = '\ud800'\n",
        "huge": "x = 1\n" * 100_000, "syntax error": "def (:"}


@pytest.mark.parametrize("code", DEEP.values(), ids=DEEP.keys())
def test_safe_parse_refuses_what_ast_parse_crashes_on(code):
    assert safe_parse(code) is None
    assert defined_names(code) == []


def test_safe_parse_parses_ordinary_code():
    assert [n.name for n in safe_parse(SOFTMAX).body] == ["softmax"]


@pytest.mark.parametrize("code", DEEP.values(), ids=DEEP.keys())
def test_crashing_code_in_stripped_cells_does_not_stop_prepare(tmp_path, code):
    sub = folder(tmp_path)
    data = as_json(with_answers(softmax_answer=SOFTMAX))
    for cell in data["cells"]:
        cell["metadata"] = {}                                        # so prepare parses them
    data["cells"].insert(0, {"cell_type": "code", "source": code, "metadata": {}, "outputs": [],
                             "execution_count": None, "id": "evil"})
    write_json(sub / NB, data)
    prepare(sub, release_dir())
    nb = gradable(sub / NB)
    assert cell_of(nb, "softmax_answer").source == SOFTMAX
    assert nb.cells[0].source == code.replace("\ud800", "\ufffd")


def test_an_unhashable_grade_id_is_dropped(tmp_path):
    sub = folder(tmp_path)
    data = as_json(with_answers(softmax_answer=SOFTMAX))
    data["cells"].insert(0, {"cell_type": "code", "source": "x = 1", "outputs": [], "execution_count": None,
                             "metadata": {"nbgrader": {"grade_id": ["x"], "grade": True, "points": 5}}})
    write_json(sub / NB, data)
    notes = prepare(sub, release_dir())
    nb = gradable(sub / NB)
    assert nb.cells[0].source == "x = 1" and nb.cells[0].metadata == {}
    assert cell_of(nb, "softmax_answer").source == SOFTMAX
    assert any("malformed nbgrader metadata" in n for n in notes)


# -- 3. ungraded students -----------------------------------------------------------------------

def test_lone_surrogates_anywhere_are_replaced(tmp_path):
    sub = folder(tmp_path)
    data = as_json(with_answers(softmax_answer=SOFTMAX + "# caf\ud800\n"))
    data["cells"][0]["metadata"]["weird"] = "\udfff"
    data["metadata"]["title"] = "\ud800"
    code = next(c for c in data["cells"] if c["cell_type"] == "code")
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "\udc80"}]
    write_json(sub / NB, data)
    notes = prepare(sub, release_dir())
    nb = gradable(sub / NB)
    assert cell_of(nb, "softmax_answer").source == SOFTMAX + "# caf\ufffd\n"
    assert any("U+FFFD" in n for n in notes)


def test_bytes_that_are_not_utf8_are_replaced(tmp_path):
    sub = folder(tmp_path)
    nbformat.write(with_answers(softmax_answer=SOFTMAX + "# caf\u00e9\n"), sub / NB)
    (sub / NB).write_bytes((sub / NB).read_bytes().replace("é".encode(), b"\xe9"))
    prepare(sub, release_dir())
    assert cell_of(gradable(sub / NB), "softmax_answer").source == SOFTMAX + "# caf\ufffd\n"


def test_changed_nbgrader_metadata_is_reset_to_the_release(tmp_path):
    sub = folder(tmp_path)
    nb = with_answers(softmax_answer=SOFTMAX)
    cell_of(nb, "softmax_answer").metadata.nbgrader.update(grade=True, points=100)
    cell_of(nb, "softmax_tests").metadata.nbgrader.update(grade=False)
    cell_of(nb, "attention_tests").metadata.nbgrader.update(points="3000", locked=False)
    nbformat.write(nb, sub / NB)
    notes = prepare(sub, release_dir())
    got = gradable(sub / NB)                                          # graded cells == release's
    assert cell_of(got, "softmax_answer").source == SOFTMAX
    assert any("reset the changed nbgrader metadata of cell 'softmax_tests'" in n for n in notes)


def test_a_known_grade_id_on_a_cell_of_another_type_is_dropped(tmp_path):
    sub = folder(tmp_path)
    data = as_json(released())
    tests = json_cell(data, "softmax_tests")
    tests.update(cell_type="markdown", source="all passed")
    del tests["outputs"], tests["execution_count"]
    write_json(sub / NB, data)
    prepare(sub, release_dir())
    nb = gradable(sub / NB)
    (md,) = [c for c in nb.cells if c.source == "all passed"]
    assert md.cell_type == "markdown" and md.metadata == {}
    assert cell_of(nb, "softmax_tests").source == cell_of(released(), "softmax_tests").source


# -- 4. every wrong type: rebuilt, not rejected ---------------------------------------------------

def test_cells_of_every_wrong_type_are_rebuilt_keeping_the_answers(tmp_path):
    sub = folder(tmp_path)
    data = as_json(with_answers(softmax_answer=SOFTMAX, attention_answer=ATTENTION))
    answer = json_cell(data, "attention_answer")
    answer["source"] = ATTENTION.splitlines(keepends=True)           # a list of lines is fine
    answer["outputs"] = "garbage"
    answer["id"] = "not a valid id!"
    junk = [{"cell_type": "code", "source": "a = 1", "metadata": []},
            {"cell_type": "code", "source": "b = 2", "metadata": "meta"},
            {"cell_type": "code", "source": "c = 3", "metadata": None, "outputs": [1, {"x": 2}]},
            {"cell_type": "code", "source": "d = 4", "metadata": {"nbgrader": ["softmax_answer"]}},
            {"cell_type": "code", "source": "e = 5", "metadata": {"nbgrader": {"grade_id": 7}, "tags": "t"}},
            {"cell_type": "code", "source": "f = 6", "metadata": {"nbgrader": {"grade_id": {"a": 1}}}},
            {"cell_type": "markdown", "source": "# g", "attachments": 5, "id": 12},
            {"cell_type": "raw", "source": "h"},
            {"cell_type": "code", "source": [1, 2]},
            {"cell_type": "code", "source": 3},
            {"cell_type": "heading", "source": "old"},
            {"cell_type": ["code"], "source": "x"},
            {"source": "no type"},
            "not a cell", 42, None]
    data["cells"][1:1] = junk
    data["metadata"] = ["weird"]
    del data["nbformat_minor"]
    write_json(sub / NB, data)
    notes = prepare(sub, release_dir())
    nb = gradable(sub / NB)
    assert grading_note(nb) is None
    assert cell_of(nb, "softmax_answer").source == SOFTMAX
    assert cell_of(nb, "attention_answer").source == ATTENTION
    sources = [c.source for c in nb.cells]
    for kept in ["a = 1", "b = 2", "c = 3", "d = 4", "e = 5", "f = 6", "# g", "h"]:
        assert kept in sources
    assert nb.metadata.kernelspec == released().metadata.kernelspec
    assert any("source is not text" in n for n in notes)
    assert any("not code, markdown or raw" in n for n in notes)


# -- existing behaviours --------------------------------------------------------------------------

@pytest.mark.parametrize("chapter", ["ch01_attention", "ch02_masking", "ch03_multihead"])
def test_an_untouched_release_comes_back_unchanged(tmp_path, chapter):
    sub = folder(tmp_path, chapter)
    nbformat.write(released(chapter), sub / f"{chapter}.ipynb")
    assert prepare(sub, release_dir(chapter)) == []
    nb = gradable(sub / f"{chapter}.ipynb", chapter)
    rel = released(chapter)
    assert [(c.cell_type, c.source, c.id) for c in nb.cells] == [(c.cell_type, c.source, c.id) for c in rel.cells]


def test_a_renamed_notebook_is_renamed_back(tmp_path):
    sub = folder(tmp_path)
    nbformat.write(with_answers(softmax_answer=SOFTMAX), sub / f"{CH} (1).ipynb")
    notes = prepare(sub, release_dir())
    assert cell_of(gradable(sub / NB), "softmax_answer").source == SOFTMAX
    assert notes == [f"renamed '{CH} (1).ipynb' to '{NB}'"]


def test_two_unexpected_notebooks_are_not_guessed_between(tmp_path):
    sub = folder(tmp_path)
    for name in ("a.ipynb", "b.ipynb"):
        nbformat.write(with_answers(softmax_answer=SOFTMAX), sub / name)
    prepare(sub, release_dir())
    assert_blank(sub / NB, "was not submitted")


def test_duplicated_graded_cells_keep_the_last_copy(tmp_path):
    sub = folder(tmp_path)
    data = as_json(with_answers(softmax_answer="def softmax(x):\n    return 'first'\n"))
    i = data["cells"].index(json_cell(data, "softmax_answer"))
    data["cells"].insert(i + 1, {**copy.deepcopy(data["cells"][i]), "source": SOFTMAX})   # same id too
    write_json(sub / NB, data)
    notes = prepare(sub, release_dir())
    got = gradable(sub / NB)
    assert cell_of(got, "softmax_answer").source == SOFTMAX
    assert "def softmax(x):\n    return 'first'\n" in [c.source for c in got.cells]
    assert any("duplicate of cell 'softmax_answer'" in n for n in notes)


def test_stripped_metadata_is_recognised_by_names_and_source(tmp_path):
    sub = folder(tmp_path)
    nb = with_answers(softmax_answer=SOFTMAX, attention_answer=ATTENTION)
    for cell in nb.cells:
        cell.metadata = {}
    nbformat.write(nb, sub / NB)
    notes = prepare(sub, release_dir())
    got = gradable(sub / NB)
    assert cell_of(got, "softmax_answer").source == SOFTMAX
    assert cell_of(got, "attention_answer").source == ATTENTION
    assert [c.source for c in got.cells] == [c.source for c in nb.cells]   # nothing re-inserted
    assert any("restored the metadata of cell 'softmax_tests'" in n for n in notes)


def test_a_deleted_test_cell_is_put_back_after_its_predecessor(tmp_path):
    sub = folder(tmp_path)
    nb = with_answers(softmax_answer=SOFTMAX)
    nb.cells.remove(cell_of(nb, "softmax_tests"))
    nbformat.write(nb, sub / NB)
    notes = prepare(sub, release_dir())
    got = gradable(sub / NB)
    i = got.cells.index(cell_of(got, "softmax_answer"))
    assert meta(got.cells[i + 1])["grade_id"] == "softmax_tests"
    assert any("'softmax_tests' was missing" in n for n in notes)


# -- 5. never raises ------------------------------------------------------------------------------

def test_an_unexpected_error_in_one_notebook_grades_it_blank(tmp_path, monkeypatch):
    sub = folder(tmp_path)
    nbformat.write(with_answers(softmax_answer=SOFTMAX), sub / NB)

    def boom(*args):
        raise KeyError("boom")
    monkeypatch.setattr(submissions, "rebuild", boom)
    notes = prepare(sub, release_dir())
    assert_blank(sub / NB, "could not be processed (KeyError)")
    assert notes == [f"{NB} could not be processed (KeyError); graded as blank"]
    assert cell_of(nbformat.read(sub / f"{NB}.unreadable", as_version=4), "softmax_answer").source == SOFTMAX


def test_an_unexpected_error_in_the_folder_starts_it_over(tmp_path, decoy, monkeypatch):
    sub = folder(tmp_path)
    os.symlink(decoy, sub / "data.npz")

    def boom(*args):
        raise PermissionError("no")
    monkeypatch.setattr(submissions, "_remove_unsafe", boom)
    notes = prepare(sub, release_dir())
    assert sorted(os.listdir(sub)) == [NB]
    assert_blank(sub / NB, "could not be processed (PermissionError)")
    assert any("emptied" in n for n in notes)


# -- property: junk never makes prepare raise ---------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                    | st.text(st.characters(codec=None, categories=["L", "Nd", "P", "Cs"]), max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
GRADE_IDS = [meta(c)["grade_id"] for c in released().cells if meta(c).get("grade_id")]
NBGRADER = st.fixed_dictionaries({}, optional={"grade_id": st.sampled_from(GRADE_IDS) | JSON, "grade": JSON,
                                               "solution": JSON, "locked": JSON, "points": JSON})
CELL = st.fixed_dictionaries({}, optional={
    "cell_type": st.sampled_from(["code", "markdown", "raw", "heading"]) | JSON,
    "source": st.text(max_size=20) | st.lists(st.text(max_size=5), max_size=3) | JSON,
    "metadata": st.fixed_dictionaries({}, optional={"nbgrader": NBGRADER | JSON, "tags": JSON}) | JSON,
    "outputs": JSON, "id": JSON, "execution_count": JSON})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.lists(st.integers(0, len(released().cells) - 1), max_size=8),
       junk=st.lists(CELL | JSON, max_size=6), top=st.dictionaries(st.text(max_size=8), JSON, max_size=3))
def test_junk_never_makes_prepare_raise_and_always_yields_a_gradable_notebook(base, junk, top):
    cells = as_json(released())["cells"]
    data = {**top, "cells": [cells[i] for i in base] + junk}
    with tempfile.TemporaryDirectory() as tmp:
        sub = folder(Path(tmp))
        write_json(sub / NB, data)
        notes = prepare(sub, release_dir())
        assert all(isinstance(n, str) for n in notes)
        nb = gradable(sub / NB)
        assert grading_note(nb) is None


def test_pasted_images_are_kept_and_anything_else_attached_is_dropped(tmp_path):
    nb = with_answers(softmax_answer=SOFTMAX)
    md = next(c for c in nb.cells if c.cell_type == "markdown")
    md["attachments"] = {"plot.png": {"image/png": "iVBORw0KGgo=", "text/html": "<script>x</script>"},
                         "page.html": {"text/html": "<b>x</b>"}}
    target = folder(tmp_path)
    nbformat.write(nb, target / NB)
    prepare(target, release_dir())
    got = nbformat.read(target / NB, as_version=4)
    nbformat.validate(got)
    (kept,) = [c for c in got.cells if c.get("attachments")]
    assert kept["attachments"] == {"plot.png": {"image/png": "iVBORw0KGgo="}}


@pytest.mark.parametrize("content", [b"garbage", b"\xff\xfe", b"2026-13-45 99:99:99"])
def test_a_timestamp_nbgrader_cannot_parse_is_dropped(tmp_path, content):
    target = folder(tmp_path)
    nbformat.write(with_answers(softmax_answer=SOFTMAX), target / NB)
    (target / "timestamp.txt").write_bytes(content)
    notes = prepare(target, release_dir())
    assert not (target / "timestamp.txt").exists() and any("timestamp" in n for n in notes)


def test_a_valid_timestamp_is_kept(tmp_path):
    target = folder(tmp_path)
    nbformat.write(with_answers(softmax_answer=SOFTMAX), target / NB)
    (target / "timestamp.txt").write_text("2026-11-28 10:00:00.000000 UTC")
    assert not [n for n in prepare(target, release_dir()) if "timestamp" in n]
    assert (target / "timestamp.txt").exists()
