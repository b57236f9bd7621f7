"""The contract between checks and the sandbox for whole models: the same checks, run in the
student's kernel and by the grader through the real sandbox, give identical verdicts.

No nbgrader: a tiny chapter notebook is written to tmp_path and graded by ``grade_notebook``,
whose test cell runs ``seam_checks.run_all`` against proxies; the same function runs here on
the objects the student's cells define. Seconds, not minutes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import seam_checks
from conftest import needs_bwrap

from autograder.grade import grade_notebook
from autograder.notebook import read_chapter
from autograder.sandbox.process import Limits

CELL_SECONDS = 5.0


def _cell(source: str, **nbgrader) -> dict:
    meta = {"nbgrader": dict(nbgrader, schema_version=3)} if nbgrader else {}
    tags = meta.get("nbgrader", {}).pop("tags", None)
    if tags:
        meta["tags"] = tags
    return {"cell_type": "code", "metadata": meta, "source": source, "outputs": [], "execution_count": None}


def write_chapter(tmp_path, student: str, training: str):
    """A source notebook: imports, the answer, a training cell (longer than a cell may run),
    and a test cell that stores its verdicts for the test to read."""
    cells = [
        dict(_cell("import math\nimport torch\nfrom torch import nn\n"), metadata={"tags": ["imports"]}),
        _cell(student, grade_id="model_answer", solution=True, grade=False, locked=False),
        _cell(training + f"\nimport time\ntime.sleep({CELL_SECONDS + 1})\n", grade_id="train_model",
              solution=False, grade=False, locked=True, tags=["training"]),
        _cell("import seam_checks\nseam_checks.LAST = seam_checks.run_all(Tiny, make_model, model)\n"
              "print(seam_checks.LAST)\n", grade_id="seam_tests", solution=False, grade=True, locked=True, points=1),
    ]
    nb = {"cells": cells, "metadata": {"afs": {"training_seconds": 60}}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "seam" / "seam.ipynb"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(nb))
    return path, nb


def in_process(student: str, training: str) -> dict:
    ns: dict = {}
    exec(student, ns)  # noqa: S102 - the test's student code, in "the student's kernel"
    exec(training, ns)  # noqa: S102
    return seam_checks.run_all(ns["Tiny"], ns["make_model"], ns["model"])


def through_sandbox(tmp_path, student: str, training: str):
    import nbformat
    path, nb = write_chapter(tmp_path, student, training)
    chapter = read_chapter(path)
    seam_checks.LAST = None
    report = grade_notebook(nbformat.from_dict(nb), chapter, solutions_dir=path.parent.parent,
                            limits=Limits(cell_seconds=CELL_SECONDS))
    return seam_checks.LAST, report


def verdicts(found: dict) -> dict:
    """Verdicts with their numbers blanked: random initial weights differ between the two
    processes, so "differs by up to 4.02" here is "4.15" there; the verdict is the same."""
    return {k: re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", v) for k, v in found.items()}


BUGGY = (seam_checks.STUDENT
         .replace("pe[:, 0::2] = torch.sin(pos / freq)\n        pe[:, 1::2] = torch.cos(pos / freq)",
                  "pe[:, 0::2] = torch.cos(pos / freq)\n        pe[:, 1::2] = torch.sin(pos / freq)")
         .replace("x = self.norm1(x + self.drop(", "x = self.norm1(x + (")
         .replace("self.generator.weight = self.embed.weight", "pass"))


@needs_bwrap
@pytest.mark.parametrize("student", [seam_checks.STUDENT, BUGGY], ids=["honest", "buggy"])
def test_same_verdicts_in_process_and_through_the_sandbox(tmp_path, student):
    pytest.importorskip("nbformat")
    local = in_process(student, seam_checks.TRAINING)
    remote, report = through_sandbox(tmp_path, student, seam_checks.TRAINING)
    assert remote is not None, report
    assert verdicts(remote) == verdicts(local), (remote, local, report.events)
    assert not report.events, report.events      # the training cell ran past the cell limit
    if student is seam_checks.STUDENT:
        assert set(local.values()) == {"ok"}, local
    else:
        assert local["check_buffers_and_attributes"].startswith("pe[:, 0]") and local["check_methods"] != "ok"


def test_training_cells_and_their_names_come_from_the_source_notebook(tmp_path):
    path, _ = write_chapter(tmp_path, seam_checks.STUDENT, seam_checks.TRAINING)
    chapter = read_chapter(path)
    assert chapter.training_ids == {"train_model"} and chapter.training_seconds == 60
    assert {"Tiny", "make_model", "model"} <= set(chapter.api)


def test_parameters_travel_once(tmp_path, monkeypatch):
    """After the module is built, calls carry only the tensors the grader changed."""
    pytest.importorskip("nbformat")
    from autograder.sandbox import process
    sent = []
    real = process.Sandbox.request

    def spy(self, msg, timeout=None, **kw):
        if msg.get("op") == "call":
            sent.append((len(msg.get("sync", [])), len(msg.get("tensors", []))))
        return real(self, msg, timeout, **kw)

    monkeypatch.setattr(process.Sandbox, "request", spy)
    remote, _ = through_sandbox(tmp_path, seam_checks.STUDENT, seam_checks.TRAINING)
    assert set(remote.values()) == {"ok"}
    n_params = sum(1 for _ in seam_checks.Reference().state_dict())
    assert max(n for n, _ in sent) <= n_params                # at most everything, once per change
    assert sum(1 for n, _ in sent if n == 0) > len(sent) / 2   # most calls ship no parameters


# ---- hostile students aimed at the whole-model surface ----------------------------------------

HOSTILE = {
    "mutates_itself_between_calls": '''
class Sly(Tiny):
    def encode(self, src):
        with torch.no_grad():
            self.embed.weight.add_(0.5)            # a different model at every call
        return super().encode(src)
''',
    "getattr_that_lies": '''
class Always:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
class Sly(Tiny):
    def __getattr__(self, name):
        if name in ("d_model",):
            return Always()
        return super().__getattr__(name)
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        del self.d_model
''',
    "method_returns_a_module": '''
class Sly(Tiny):
    def encode(self, src):
        return self                                # "the answer is the module itself"
''',
    "method_returns_a_non_tensor": '''
class Sly(Tiny):
    def encode(self, src):
        return super().encode(src).detach().numpy()
''',
    "huge_buffer": '''
class Sly(Tiny):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("junk", torch.zeros(24 * 2**20))    # 96 MiB, over the reply limit
''',
}


@pytest.fixture(scope="module")
def hostile_sandbox():
    from autograder.sandbox.process import Sandbox
    if not __import__("shutil").which("bwrap"):
        pytest.skip("needs bubblewrap")
    with Sandbox(Limits(cell_seconds=20, message_bytes=32 * 2**20)) as sb:
        assert sb.run_cell(seam_checks.STUDENT).status == "ok"
        yield sb


@needs_bwrap
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_modules_fail_their_checks_and_nothing_else(hostile_sandbox, name):
    from autograder.sandbox.proxy import Session, make_proxy
    assert hostile_sandbox.run_cell(HOSTILE[name]).status == "ok"
    Sly = make_proxy(Session(hostile_sandbox), "Sly", "")
    found = seam_checks.run_all(Sly, lambda **k: Sly(**k), None)
    assert found["check_methods"] != "ok" or found["check_buffers_and_attributes"] != "ok", found
    if not hostile_sandbox.alive:       # an oversized answer costs the process, which restarts
        hostile_sandbox.restart()
    assert hostile_sandbox.run_cell("Tiny").status == "ok"


@needs_bwrap
def test_a_model_that_trains_itself_when_called_is_graded_as_it_was_left(hostile_sandbox):
    from autograder.sandbox.proxy import Session, make_proxy
    cheat = '''
class Cheat(Tiny):
    def forward(self, src, tgt):                      # learn the test inputs while being graded
        opt = torch.optim.Adam(self.parameters(), lr=0.05)
        with torch.enable_grad():
            for _ in range(40):
                out = super().forward(src, tgt)
                loss = nn.functional.cross_entropy(out.reshape(-1, 11), (src % 10 + 1).reshape(-1))
                opt.zero_grad(); loss.backward(); opt.step()
        return super().forward(src, tgt)
torch.manual_seed(0)
lazy = Cheat(dropout=0.0).eval()                      # never trained in the notebook
'''
    assert hostile_sandbox.run_cell(cheat).status == "ok"
    lazy = make_proxy(Session(hostile_sandbox), "lazy", "")
    src = seam_checks._tokens(9, n=8, length=6)
    with torch.no_grad():
        fooled = (lazy(src, src).argmax(-1) == src % 10 + 1).double().mean().item()
    assert fooled > 0.9                               # calling it does look trained...
    with pytest.raises(seam_checks.CheckFailure):
        seam_checks.check_trained(lazy)               # ...but its weights, as left, are not


MEMORY = '''
import torch
def full_scores(q, k):                 # forms the L x L matrix
    return (q @ k.T).softmax(-1).sum(-1)
def blocked_scores(q, k, block=128):   # never holds more than block x L
    return torch.cat([(q[i:i + block] @ k.T).softmax(-1).sum(-1) for i in range(0, len(q), block)])
def lying_scores(q, k):                # forms it, then tries to make the figure say otherwise
    import autograder.checks.memory as m
    m.measure = lambda fn, *a, **k: (fn(*a, **k), 0)
    open("/proc/self/clear_refs", "w").write("5")
    return full_scores(q, k)
'''


def _peaks(fns):
    """Peak growth (MiB) of each function's first call on L = 4096 inputs, measured in a
    ``peak_memory`` block."""
    from autograder.checks.memory import measure_call, peak_memory
    q = torch.randn(4096, 16)
    found = {}
    for name, fn in fns.items():
        with peak_memory() as meter:
            measure_call(fn, q, q)
        found[name] = None if meter.bytes is None else meter.bytes / 2**20
    return found


def test_peak_memory_in_process():
    """In a fresh process, as in a student's kernel that runs the chapter from the top. (A
    long-lived process whose heap holds hundreds of MiB of free fragments can make an honest
    tiled loop measure high: freed chunks are reused from released pages; see checks/memory.py.)"""
    import subprocess
    import sys
    code = ("import json, torch, test_seam as T\nns = {}\nexec(T.MEMORY, ns)\n"
            "print(json.dumps(T._peaks({n: ns[n] for n in ('full_scores', 'blocked_scores')})))")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["full_scores"] >= 64 and got["blocked_scores"] < 16, got   # 4096^2 float32 = 64 MiB


@needs_bwrap
def test_peak_memory_through_the_sandbox_is_measured_from_outside(hostile_sandbox):
    from autograder.sandbox.proxy import Session, make_proxy
    assert hostile_sandbox.run_cell(MEMORY).status == "ok"
    session = Session(hostile_sandbox)
    got = _peaks({n: make_proxy(session, n, "") for n in ("full_scores", "blocked_scores", "lying_scores")})
    assert got["full_scores"] >= 64 and got["lying_scores"] >= 64 and got["blocked_scores"] < 16, got
