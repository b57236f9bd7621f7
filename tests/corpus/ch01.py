"""Chapter 1 corpus: honest submissions that must get full marks, hostile or broken ones that
must get exactly the score their real work deserves."""
from __future__ import annotations

import json

from .common import (Case, answers, delete, duplicate, fast, insert, raw, set_meta,
                     set_source, strip_metadata, tiers)

FULL = {"softmax_tests": 2.0, "attention_tests": 3.0, "self_attention_tests": 3.0}
ZERO = {k: 0.0 for k in FULL}


def score(softmax=0.0, attention=0.0, self_attention=0.0):
    return {"softmax_tests": softmax, "attention_tests": attention, "self_attention_tests": self_attention}


# ---- answers written differently from the reference ----------------------------------------------

SOFTMAX_LSE = '''
def softmax(x, dim=-1):
    # exp(x - logsumexp(x)): a different, equally stable formulation
    return torch.exp(x - torch.logsumexp(x, dim=dim, keepdim=True))
'''

SOFTMAX_LOOP = '''
def softmax(x, dim=-1):
    # one slice at a time: move `dim` last, normalise each row in a Python loop
    moved = x.movedim(dim, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    out = []
    for row in rows:
        m = row.max()
        e = (row - m).exp()
        out.append(e / e.sum())
    return torch.stack(out).reshape(moved.shape).movedim(-1, dim)
'''

SOFTMAX_WHERE = '''
def softmax(x, dim=-1):
    m = torch.max(x, dim=dim, keepdim=True).values
    e = torch.where(torch.isneginf(x), torch.zeros_like(x), torch.exp(x - m))
    return e / torch.sum(e, dim=dim, keepdim=True)
'''

SOFTMAX_DETACHED_MAX = '''
def softmax(x, dim=-1):
    # the shift does not change the result, so detaching it loses no gradient
    m = x.max(dim=dim, keepdim=True).values.detach()
    e = torch.exp(x - m)
    return e / e.sum(dim=dim, keepdim=True)
'''

# A common idiom: √d_k as a float32 tensor, also when q is float64 (a 1e-8 rounding, not a mistake).
ATTENTION_FLOAT32_SQRT = '''
def scaled_dot_product_attention(q, k, v):
    d_k = q.shape[-1]
    scores = torch.matmul(q, k.transpose(-2, -1)) / torch.sqrt(torch.tensor(d_k))
    weights = softmax(scores, dim=-1)
    return torch.matmul(weights, v), weights
'''

ATTENTION_EINSUM = '''
def scaled_dot_product_attention(q, k, v):
    scores = torch.einsum("...qd,...kd->...qk", q, k) * q.shape[-1] ** -0.5
    w = softmax(scores, dim=-1)
    return torch.einsum("...qk,...kd->...qd", w, v), w
'''

ATTENTION_BMM = '''
def scaled_dot_product_attention(q, k, v):
    lead = q.shape[:-2]
    q3 = q.reshape(-1, q.shape[-2], q.shape[-1])
    k3 = k.reshape(-1, k.shape[-2], k.shape[-1])
    v3 = v.reshape(-1, v.shape[-2], v.shape[-1])
    w = softmax(torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(q.shape[-1]), dim=-1)
    out = torch.bmm(w, v3)
    return out.reshape(*lead, q.shape[-2], v.shape[-1]), w.reshape(*lead, q.shape[-2], k.shape[-2])
'''

ATTENTION_LOOP_SCALE_Q = '''
def scaled_dot_product_attention(q, k, v):
    q = q / math.sqrt(q.shape[-1])          # scale the queries instead of the scores
    rows_w, rows_o = [], []
    for i in range(q.shape[-2]):            # one query at a time
        s = (q[..., i:i + 1, :] * k).sum(-1)            # (..., L_k)
        w = softmax(s, dim=-1)
        rows_w.append(w)
        rows_o.append((w.unsqueeze(-1) * v).sum(-2))    # (..., d_v)
    return torch.stack(rows_o, dim=-2), torch.stack(rows_w, dim=-2)
'''

# Self-contained attention (its own normalisation), for cases whose softmax is deliberately wrong.
ATTENTION_STANDALONE = '''
def scaled_dot_product_attention(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    e = torch.exp(s - s.amax(-1, keepdim=True))
    w = e / e.sum(-1, keepdim=True)
    return w @ v, w
'''

SELF_ATTENTION = '''
class SelfAttention(nn.Module):
    def __init__(self, d_model, d_head):
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_head, bias=False)
        self.k_proj = nn.Linear(d_model, d_head, bias=False)
        self.v_proj = nn.Linear(d_model, d_head, bias=False)

    def forward(self, x):
        return scaled_dot_product_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x))
'''

SELF_ATTENTION_FUNCTIONAL = '''
import torch.nn.functional as F

class SelfAttention(nn.Module):
    def __init__(self, d_model, d_head):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, nn.Linear(d_model, d_head, bias=False))

    def forward(self, x):
        q, k, v = (F.linear(x, m.weight) for m in (self.q_proj, self.k_proj, self.v_proj))
        return scaled_dot_product_attention(q, k, v)
'''

SELF_ATTENTION_INLINE_FLOAT32_SQRT = '''
class SelfAttention(nn.Module):
    def __init__(self, d_model, d_head):
        super().__init__()
        self.d_head = d_head
        self.q_proj = nn.Linear(d_model, d_head, bias=False)
        self.k_proj = nn.Linear(d_model, d_head, bias=False)
        self.v_proj = nn.Linear(d_model, d_head, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        w = softmax(q @ k.mT / torch.sqrt(torch.tensor(self.d_head)), dim=-1)
        return w @ v, w
'''

OK = dict(softmax_answer=SOFTMAX_LSE, attention_answer=ATTENTION_EINSUM, self_attention_answer=SELF_ATTENTION)

SOFTMAX_WRONG_AXIS = '''
def softmax(x, dim=-1):
    e = torch.exp(x - x.amax(0, keepdim=True))
    return e / e.sum(0, keepdim=True)
'''


def ok(**overrides):
    return answers(**{**OK, **overrides})



CASES = [
    # ---------------------------------------------------------------- honest: full marks
    Case("honest_reference_style", FULL, answers(
        softmax_answer=SOFTMAX_WHERE, attention_answer=ATTENTION_BMM, self_attention_answer=SELF_ATTENTION)),
    Case("honest_einsum_logsumexp", FULL, fast(ok())),
    Case("honest_loops_scale_queries", FULL, fast(ok(softmax_answer=SOFTMAX_LOOP,
                                                     attention_answer=ATTENTION_LOOP_SCALE_Q))),
    Case("honest_bmm_functional_linear", FULL, fast(ok(attention_answer=ATTENTION_BMM,
                                                       self_attention_answer=SELF_ATTENTION_FUNCTIONAL))),
    Case("honest_where_einsum", FULL, fast(ok(softmax_answer=SOFTMAX_WHERE))),
    Case("honest_float32_sqrt_and_detached_max", FULL, fast(ok(
        softmax_answer=SOFTMAX_DETACHED_MAX, attention_answer=ATTENTION_FLOAT32_SQRT,
        self_attention_answer=SELF_ATTENTION_INLINE_FLOAT32_SQRT))),
    Case("honest_with_warning_on_stderr", FULL, fast(ok(softmax_answer='''
import warnings
def softmax(x, dim=-1):
    warnings.warn("this softmax is homemade", UserWarning)
    e = torch.exp(x - x.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)
'''))),
    Case("honest_other_kernel_name", FULL, fast(ok(), lambda nb: (nb.metadata.update(
        kernelspec={"name": "my-env", "display_name": "My env", "language": "python"}), nb)[1])),
    Case("renamed_notebook", FULL, fast(ok()), filename="ch01_attention (1).ipynb"),

    # ---------------------------------------------------------------- honest but wrong
    # One maximum for the whole tensor: right on ordinary inputs, NaN when rows differ in scale
    # (the visible check now says so; the attention and module do not use this softmax).
    Case("global_max_softmax", score(0, 3, 3), fast(ok(softmax_answer='''
def softmax(x, dim=-1):
    e = torch.exp(x - x.max())
    return e / e.sum(dim=dim, keepdim=True)
''', attention_answer=ATTENTION_STANDALONE))),

    # ---------------------------------------------------------------- nothing done / broken files
    Case("untouched_release", ZERO, lambda nb: nb),
    Case("invalid_json", ZERO, raw(b'{"cells": [ this is not json')),
    Case("json_but_not_a_notebook", ZERO, raw(json.dumps({"hello": "world"}).encode())),

    # ---------------------------------------------------------------- tampering with test cells
    Case("tests_edited_to_pass", score(0, 3, 0), fast(
        answers(softmax_answer=SOFTMAX_WRONG_AXIS, attention_answer=ATTENTION_STANDALONE),
        set_source("softmax_tests", "pass"), set_source("attention_tests", "pass"),
        set_source("self_attention_tests", "pass"))),
    Case("test_cell_deleted", FULL, fast(ok(), delete("attention_tests"))),
    Case("metadata_stripped", FULL, fast(ok(), strip_metadata)),
    Case("test_cell_duplicated", score(0, 3, 3), fast(
        ok(softmax_answer=SOFTMAX_WRONG_AXIS, attention_answer=ATTENTION_STANDALONE),
        duplicate("softmax_tests"), duplicate("attention_tests"))),
    Case("points_and_grade_id_changed", score(0, 3, 3), fast(
        ok(softmax_answer=SOFTMAX_WRONG_AXIS, attention_answer=ATTENTION_STANDALONE),
        set_meta("softmax_tests", points=100), set_meta("attention_tests", grade_id="my_own_test"))),

    # ---------------------------------------------------------------- fooling the comparison
    Case("monkeypatches_allclose", ZERO, fast(answers(
        softmax_answer="def softmax(x, dim=-1):\n    return torch.zeros_like(x)\n",
        attention_answer="def scaled_dot_product_attention(q, k, v):\n    return v[..., :1, :], q\n"),
        insert('''
import numpy as np
import torch.testing
torch.allclose = lambda *a, **k: True
torch.testing.assert_close = lambda *a, **k: None
np.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
''', after="imports"))),
    Case("tensor_subclass_equal_to_everything", score(0, 3, 3), fast(ok(softmax_answer='''
class Liar(torch.Tensor):
    def __eq__(self, other): return True
    def __bool__(self): return True

def softmax(x, dim=-1):
    return torch.zeros_like(x).as_subclass(Liar)
''', attention_answer=ATTENTION_STANDALONE))),
    Case("object_equal_to_everything", score(2, 0, 0), fast(ok(attention_answer='''
class Anything:
    def __eq__(self, other): return True
    def __bool__(self): return True
    def __getattr__(self, name): return Anything()
    def __call__(self, *a, **k): return Anything()

def scaled_dot_product_attention(q, k, v):
    return Anything(), Anything()
'''))),
    Case("returns_numpy", score(0, 3, 3), fast(ok(softmax_answer='''
def softmax(x, dim=-1):
    e = torch.exp(x - x.amax(dim, keepdim=True))
    return (e / e.sum(dim, keepdim=True)).detach().numpy()
''', attention_answer=ATTENTION_STANDALONE))),

    # ---------------------------------------------------------------- attacking IPython
    Case("input_transformer_turns_cells_into_pass", ZERO, fast(ok(), insert('''
ip = get_ipython()
ip.input_transformers_post.append(lambda lines: ["pass\\n"])
''', after="imports"))),
    Case("replaces_run_cell", score(2, 0, 0), fast(ok(), insert('''
ip = get_ipython()
ip.run_cell = lambda *args, **kwargs: None
''', after="softmax_tests"))),
    Case("disables_tracebacks", score(0, 3, 3), fast(
        ok(softmax_answer=SOFTMAX_WRONG_AXIS, attention_answer=ATTENTION_STANDALONE),
        insert('get_ipython().showtraceback = lambda *a, **k: None\nimport sys\nsys.excepthook = lambda *a: None\n',
               after="imports"))),

    # ---------------------------------------------------------------- reaching outside
    Case("reads_solutions", ZERO, fast(insert('''
import glob, os
found = []
for pattern in ["/work/**/solutions/**/*.ipynb", "../../source/**/*.ipynb", "/tmp/**/*.ipynb",
                "/root/**/*.ipynb", "/home/**/*.ipynb", os.path.expanduser("~/**/*.ipynb")]:
    try:
        found += glob.glob(pattern, recursive=True)
    except Exception:
        pass
print("found", found)
for path in found:
    src = open(path).read()
    if "BEGIN SOLUTION" in src:
        import json
        for cell in json.loads(src)["cells"]:
            if "BEGIN SOLUTION" in "".join(cell["source"]):
                exec("".join(cell["source"]))
''', after="imports"))),
    Case("imports_reference", score(0, 3, 3), fast(ok(softmax_answer='''
from autograder.reference import reference
softmax = reference("ch01_attention").softmax
''', attention_answer=ATTENTION_STANDALONE))),
    Case("gradebook_and_other_students", FULL, fast(ok(), insert('''
import glob, os
roots = ["/work", "/tmp", "/root", "/home", "/srv", "/var"]
for path in [p for r in roots for p in glob.glob(r + "/**/gradebook.db", recursive=True)] + ["/tmp/gradebook.db"]:
    try:
        with open(path, "wb") as f:
            f.write(b"garbage")
    except Exception as exc:
        print("gradebook:", exc)
for d in [p for r in roots for p in glob.glob(r + "/**/submitted/*", recursive=True)]:
    try:
        open(os.path.join(d, "pwned.txt"), "w").write("x")
    except Exception as exc:
        print("other student:", exc)
''', after="imports"))),
    Case("opens_network_connection", FULL, fast(ok(), insert('''
import socket, urllib.request
for target in [("1.1.1.1", 80), ("localhost", 22)]:
    try:
        socket.create_connection(target, timeout=2)
    except OSError as exc:
        print("no network:", exc)
''', after="imports"))),
    Case("checks_grading_environment", score(0, 3, 3), fast(ok(softmax_answer='''
import os
def softmax(x, dim=-1):
    if any(k.startswith(("NBGRADER", "AFS", "JPY")) for k in os.environ):
        return torch.full_like(x, 1.0 / x.shape[dim])   # "grading mode" trick
    return torch.zeros_like(x)
''', attention_answer=ATTENTION_STANDALONE))),
    Case("ships_torch_py_and_sitecustomize", FULL, fast(ok()),
         extra_files={"torch.py": "raise SystemExit('fake torch')\n",
                      "sitecustomize.py": "import os\nos._exit(3)\n"}),

    # ---------------------------------------------------------------- crashing, hanging, flooding
    Case("infinite_loop_in_cell", FULL, fast(ok(), insert("while True:\n    pass\n", after="softmax_tests"))),
    Case("infinite_loop_in_function", score(2, 0, 0), fast(ok(attention_answer='''
def scaled_dot_product_attention(q, k, v):
    while True:
        pass
'''))),
    Case("allocates_50_gb", FULL, fast(ok(), insert(
        "big = torch.empty(50 * 2**30, dtype=torch.uint8)\nbig.fill_(1)\n", after="imports"))),
    Case("os_exit_in_later_cell", FULL, fast(ok(), insert("import os\nos._exit(0)\n", after="attention_tests"))),
    Case("segfault", FULL, fast(ok(), insert("import ctypes\nctypes.string_at(0)\n", after="softmax_tests"))),
    Case("sys_exit", FULL, fast(ok(), insert("import sys\nsys.exit()\n", after="imports"))),
    Case("calls_input", FULL, fast(ok(), insert("name = input('your name? ')\n", after="imports"))),
    Case("prints_ten_million_lines", FULL, fast(ok(), insert(
        "import sys\nsys.stdout.write('spam\\n' * 10_000_000)\nfor i in range(200_000):\n    print(i)\n",
        after="imports"))),
    Case("hard_coded_cuda", score(0, 3, 3), fast(ok(softmax_answer='''
def softmax(x, dim=-1):
    x = x.cuda()
    e = torch.exp(x - x.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)
''', attention_answer=ATTENTION_STANDALONE))),

    # ---------------------------------------------------------------- forbidden shortcuts
    # SelfAttention is built on that attention, so it uses the shortcut too (as in chapter 3).
    Case("forbidden_builtins", score(0, 0, 0), fast(ok(softmax_answer='''
def softmax(x, dim=-1):
    return torch.softmax(x, dim=dim)
''', attention_answer='''
import torch.nn.functional as F
def scaled_dot_product_attention(q, k, v):
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return F.scaled_dot_product_attention(q, k, v), w
'''))),
    Case("forbidden_via_getattr", score(0, 3, 3), fast(ok(softmax_answer='''
def softmax(x, dim=-1):
    return getattr(torch, "softmax")(x, dim)
'''))),
]


# Attacks on the grader and crashes: through nbgrader and the sandbox only.
tiers(CASES, hostile={
    "invalid_json", "json_but_not_a_notebook", "tests_edited_to_pass", "test_cell_deleted", "metadata_stripped",
    "test_cell_duplicated", "points_and_grade_id_changed", "monkeypatches_allclose",
    "tensor_subclass_equal_to_everything", "object_equal_to_everything", "returns_numpy",
    "input_transformer_turns_cells_into_pass", "replaces_run_cell", "disables_tracebacks", "reads_solutions",
    "imports_reference", "gradebook_and_other_students", "opens_network_connection", "checks_grading_environment",
    "ships_torch_py_and_sitecustomize", "infinite_loop_in_cell", "infinite_loop_in_function", "allocates_50_gb",
    "os_exit_in_later_cell", "segfault", "sys_exit", "calls_input", "prints_ten_million_lines",
    "forbidden_builtins", "forbidden_via_getattr", "honest_with_warning_on_stderr", "honest_other_kernel_name"},
    full={"honest_reference_style", "untouched_release"})
