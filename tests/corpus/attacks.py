"""Attacks on the grading run itself (issue 7), on chapter 1's notebook: files that are not
files, notebooks nbgrader cannot digest, replies that try to stall or bloat the grader, and
submissions that try to outgrow their limits together. Every one must be graded in the same
run as everybody else, get a recorded score and a feedback page, and lose only what its own
answers deserve."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import nbformat

from .ch01 import ATTENTION_STANDALONE, FULL, OK, ZERO, fast, score
from .common import Case, answers, insert, set_meta, tiers

REPO = Path(__file__).resolve().parents[2]
SOLUTION = REPO / "solutions" / "ch01_attention" / "ch01_attention.ipynb"

honest = fast(answers(**OK))


def _as_bytes(nb) -> bytes:
    """JSON with ASCII escapes, so that strings nbformat cannot write (lone surrogates) survive."""
    return json.dumps(nb, ensure_ascii=True).encode()


def with_raw(edit):
    """Apply ``edit`` to a plain-dict copy of the notebook and submit the JSON bytes as they are."""
    def build(nb):
        data = json.loads(json.dumps(honest(nb)))
        edit(data)
        return _as_bytes(data)
    return build


def cell_of(data: dict, grade_id: str) -> dict:
    return next(c for c in data["cells"] if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id)


# ---- planting files ---------------------------------------------------------------------------

def replace_notebook_with_link(name: str):
    def setup(folder: Path, course: Path):
        (folder / "ch01_attention.ipynb").unlink()
        os.symlink(SOLUTION, folder / name)
    return setup


def plant_links(folder: Path, course: Path):
    os.symlink(course / "gradebook.db", folder / "data.npz")
    os.symlink("/etc/shadow", folder / "x")
    os.symlink("/dev/zero", folder / "z")
    os.symlink("/etc", folder / "etc_dir")


def plant_hard_link(folder: Path, course: Path):
    secret = course / "instructor_secret.txt"
    secret.write_text("instructor only\n")
    os.link(secret, folder / "notes.txt")


def plant_fifo(folder: Path, course: Path):
    os.mkfifo(folder / "pipe")


def plant_device(folder: Path, course: Path):
    try:
        os.mknod(folder / "zero", 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 5))
    except PermissionError:   # not root: a FIFO stands in for the special file
        os.mkfifo(folder / "zero")


def notebook_is_a_directory(folder: Path, course: Path):
    (folder / "ch01_attention.ipynb").unlink()
    (folder / "ch01_attention.ipynb").mkdir()
    (folder / "ch01_attention.ipynb" / "inside.txt").write_text("hello")


def folder_is_a_link(folder: Path, course: Path):
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    os.symlink(SOLUTION.parent, folder)


# ---- replies crafted by the student's process -------------------------------------------------

def patch_replies(body: str) -> str:
    """A cell that rewrites, from inside the sandbox, what the runner sends back for calls."""
    return f'''
import sys, io, zipfile, torch
_wire = sys.modules["autograder.sandbox.wire"]
_real_write = _wire.write_frame
def _evil(fd, obj):
    if isinstance(obj, dict) and "tensors" in obj:
{body}
    return _real_write(fd, obj)
_wire.write_frame = _evil
'''


SHARED_REFERENCE_BOMB = patch_replies('''        a = [0.0]
        for _ in range(19):
            a = [a, a, a]
        obj = dict(obj, out=a)''')

COMPRESSED_TENSORS = '''
import sys, io, os, zipfile, torch
_wire = sys.modules["autograder.sandbox.wire"]
def _evil(fd, obj):
    if isinstance(obj, dict) and "tensors" in obj:
        buf = io.BytesIO()
        torch.save(dict(obj, tensors=[torch.zeros(2**28, dtype=torch.uint8)] * 8), buf)
        src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for info in src.infolist():
                z.writestr(info.filename, src.read(info.filename))
        data = out.getvalue()
        os.write(fd, _wire.HEADER.pack(len(data)) + data)
        return
    return _wire.__dict__["_real"](fd, obj)
_wire._real = _wire.write_frame
_wire.write_frame = _evil
'''

OK_IS_A_TENSOR = patch_replies('''        obj = dict(obj, ok=torch.tensor([1, 1]))''')

OUTPUT_COUNTERS = '''
import sys
sys.stdout.kept = -10**12
sys.stdout.write("spam " * 20_000_000)
'''

FORK_BOMB = '''
import os, time
started = 0
try:
    for i in range(2000):
        if os.fork() == 0:
            time.sleep(120)
            os._exit(0)
        started += 1
except OSError as exc:
    print("fork refused after", started, "children:", type(exc).__name__)
'''

FORKED_MEMORY = '''
import os, time
for i in range(3):
    if os.fork() == 0:
        block = bytearray(b"x") * (2600 * 2**20)   # touched: 2.6 GB each, 7.8 GB together
        time.sleep(60)
        os._exit(0)
time.sleep(8)
'''

FILLS_DISK = '''
import os
written = 0
for where in (".", "/tmp", "/dev/shm"):
    try:
        for i in range(100):
            with open(os.path.join(where, f"fill{i}"), "wb") as f:
                f.write(b"0" * (64 * 2**20))
            written += 64
    except OSError as exc:
        print(where, "refused after", written, "MiB:", type(exc).__name__)
'''

SLOW_SOFTMAX = '''
import time
def softmax(x, dim=-1):
    time.sleep(8)           # under the 10 s call limit each time, far over the test cell's limit
    e = torch.exp(x - x.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)
'''

READS_HOST_FILES = '''
for path in ["/etc/shadow", "/etc/gshadow", "/root/.bash_history", "/proc/1/environ"]:
    try:
        print(path, open(path).read()[:200])
    except Exception as exc:
        print(path, type(exc).__name__)
'''

SCRIPT_MARKDOWN = ('<script>document.title="pwned"</script><img src=x onerror="alert(1)">'
                   '<a href="javascript:alert(2)">click</a>')


def add_markdown(text: str):
    def edit(nb):
        nb = copy.deepcopy(nb)
        nb.cells.insert(1, nbformat.v4.new_markdown_cell(text))
        return nb
    return edit


def junk_metadata(data: dict):
    """Every wrong type nbgrader metadata can have, on cells that matter and cells that do not."""
    cells = data["cells"]
    softmax, attention, self_attention = (cell_of(data, g) for g in
                                          ("softmax_answer", "attention_answer", "self_attention_answer"))
    cells[0]["metadata"] = ["not", "a", "dict"]
    softmax["metadata"]["nbgrader"]["grade_id"] = ["x"]
    softmax["metadata"]["tags"] = 5
    attention["metadata"]["nbgrader"]["points"] = "lots"
    self_attention["metadata"]["nbgrader"] = "nbgrader"
    cells.insert(2, {"cell_type": "code", "metadata": {"nbgrader": {"grade_id": {"a": 1}, "grade": "yes"}},
                     "source": ["x = 1\n", 7], "outputs": "none", "execution_count": "one"})
    cells.insert(2, {"cell_type": "mystery", "metadata": None, "source": None})
    data["metadata"] = {"kernelspec": "python3", "nbgrader": [1, 2]}
    data.pop("nbformat_minor", None)


CASES = [
    # ---------------------------------------------------------------- files that are not files
    Case("notebook_is_symlink_to_solutions", ZERO, honest, setup=replace_notebook_with_link("ch01_attention.ipynb")),
    Case("renamed_symlink_to_solutions", ZERO, honest, setup=replace_notebook_with_link("mine.ipynb")),
    Case("extra_files_are_symlinks", FULL, honest, setup=plant_links),
    Case("extra_file_is_a_hard_link", FULL, honest, setup=plant_hard_link),
    Case("extra_file_is_a_fifo", FULL, honest, setup=plant_fifo),
    Case("extra_file_is_a_device", FULL, honest, setup=plant_device),
    Case("notebook_is_a_directory", ZERO, honest, setup=notebook_is_a_directory),
    Case("assignment_folder_is_a_symlink", ZERO, honest, setup=folder_is_a_link),
    # ---------------------------------------------------------------- notebooks nbgrader chokes on
    Case("lone_surrogate_in_a_string", FULL, with_raw(
        lambda d: cell_of(d, "softmax_answer").update(source=OK["softmax_answer"] + "\nNOTE = '\ud800'\n"))),
    Case("stripped_answer_and_surrogate", FULL, with_raw(lambda d: (
        cell_of(d, "attention_answer").update(metadata={}),
        d["cells"].append({"cell_type": "markdown", "metadata": {}, "source": "caf\udce9"})))),
    Case("metadata_of_every_wrong_type", FULL, with_raw(junk_metadata)),
    Case("answer_cell_marked_as_graded", FULL, fast(answers(**OK), set_meta("softmax_answer", grade=True, points=100))),
    Case("test_cell_marked_not_graded", FULL, fast(answers(**OK), set_meta("attention_tests", grade=False))),
    Case("deep_attribute_chain", FULL, fast(answers(**OK), insert("x = y" + ".a" * 200_000 + "\n", after="imports"))),
    Case("long_unary_expression", FULL, fast(answers(**OK), insert("x = " + "-" * 200_000 + "1\n", after="imports"))),
    Case("null_byte_in_source", FULL, fast(answers(**OK), insert("x = 1\x00\n", after="imports"))),
    Case("garbage_timestamp", FULL, honest, extra_files={"timestamp.txt": "not a time\n"}),
    Case("script_in_markdown", FULL, fast(answers(**OK), add_markdown(SCRIPT_MARKDOWN))),
    # ---------------------------------------------------------------- replies against the grader
    Case("shared_reference_bomb", ZERO, fast(answers(**OK), insert(SHARED_REFERENCE_BOMB, after="imports"))),
    Case("compressed_reply", ZERO, fast(answers(**OK), insert(COMPRESSED_TENSORS, after="imports"))),
    Case("ok_is_a_tensor", ZERO, fast(answers(**OK), insert(OK_IS_A_TENSOR, after="imports"))),
    Case("rewrites_output_counters", FULL, fast(answers(**OK), insert(OUTPUT_COUNTERS, after="imports"))),
    # ---------------------------------------------------------------- limits over the whole submission
    Case("fork_bomb", FULL, fast(answers(**OK), insert(FORK_BOMB, after="imports"))),
    Case("forked_children_share_memory", FULL, fast(answers(**OK), insert(FORKED_MEMORY, after="imports"))),
    Case("fills_disk_and_tmp", FULL, fast(answers(**OK), insert(FILLS_DISK, after="imports"))),
    Case("slow_softmax_under_call_limit", score(0, 3, 3), fast(answers(
        **dict(OK, softmax_answer=SLOW_SOFTMAX, attention_answer=ATTENTION_STANDALONE)))),
    Case("keyboard_interrupt_in_cell", FULL, fast(answers(**OK), insert("raise KeyboardInterrupt\n", after="imports"))),
    Case("reads_host_files", FULL, fast(answers(**OK), insert(READS_HOST_FILES, after="imports"))),
]

tiers(CASES, hostile={case.name for case in CASES})
