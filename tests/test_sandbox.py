"""The sandboxed student process: isolation, limits, recovery, and the safe wire format."""
from __future__ import annotations

import io
import time

import pytest
import torch

from autograder.checks.core import CheckFailure
from autograder.sandbox import wire
from autograder.sandbox.process import Limits, Sandbox
from autograder.sandbox.proxy import NotATensor, Session, StudentError, make_proxy
from conftest import REPO, needs_bwrap


@pytest.fixture(scope="module")
def sandbox():
    if not __import__("shutil").which("bwrap"):
        pytest.skip("needs bubblewrap")
    with Sandbox(Limits(cell_seconds=3, memory_bytes=4 * 2**30)) as sb:
        yield sb


@needs_bwrap
class TestIsolation:
    def test_runs_code_and_keeps_state(self, sandbox):
        assert sandbox.run_cell("x = 41").status == "ok"
        run = sandbox.run_cell("print(x + 1)")
        assert run.status == "ok" and run.stdout.strip() == "42"

    def test_cannot_see_solutions_or_the_repository(self, sandbox):
        run = sandbox.run_cell(f"open({str(REPO / 'solutions' / 'ch01_attention' / 'ch01_attention.ipynb')!r})")
        assert run.status == "error" and "FileNotFoundError" in run.error
        run = sandbox.run_cell(f"import os; print(sorted(os.listdir({str(REPO)!r})))")
        assert "solutions" not in run.stdout and "tests" not in run.stdout

    def test_has_no_network(self, sandbox):
        run = sandbox.run_cell("import socket; socket.create_connection(('127.0.0.1', 22), timeout=1)")
        assert run.status == "error" and ("unreachable" in run.error or "refused" in run.error)

    def test_system_is_read_only(self, sandbox):
        run = sandbox.run_cell("open('/usr/evil.txt', 'w')")
        assert run.status == "error" and ("Read-only" in run.error or "Permission" in run.error)

    def test_environment_is_minimal(self, sandbox):
        run = sandbox.run_cell("import os; print(sorted(k for k in os.environ if 'NBGRADER' in k or 'AFS' in k))")
        assert run.stdout.strip() == "[]"

    def test_input_fails_instead_of_hanging(self, sandbox):
        assert sandbox.run_cell("input('name?')").status == "error"


@needs_bwrap
class TestLimitsAndRecovery:
    def test_infinite_loop_times_out_and_state_survives(self, sandbox):
        sandbox.run_cell("kept = 'yes'")
        start = time.monotonic()
        run = sandbox.run_cell("while True:\n    pass")
        assert run.status == "timeout" and time.monotonic() - start < 10
        assert sandbox.run_cell("print(kept)").stdout.strip() == "yes"

    def test_memory_limit(self, sandbox):
        run = sandbox.run_cell("import torch; t = torch.empty(50 * 2**30, dtype=torch.uint8)")
        assert run.status == "error" and ("memory" in run.error.lower() or "alloc" in run.error.lower())

    def test_output_is_capped(self, sandbox):
        run = sandbox.run_cell("print('spam\\n' * 1_000_000)")
        assert run.status == "ok" and len(run.stdout) < 30_000 and "not shown" in run.stdout

    def test_segfault_is_reported_and_restart_replays_earlier_cells(self, sandbox):
        sandbox.run_cell("survivor = 7")
        run = sandbox.run_cell("import ctypes; ctypes.string_at(0)")
        assert run.status == "crashed" and "SIGSEGV" in run.error
        sandbox.restart()
        assert sandbox.run_cell("print(survivor)").stdout.strip() == "7"

    def test_os_exit_is_reported(self, sandbox):
        run = sandbox.run_cell("import os; os._exit(3)")
        assert run.status == "crashed" and "exited with status 3" in run.error
        sandbox.restart()
        assert sandbox.alive


@needs_bwrap
class TestProxies:
    def test_function_call_and_gradient_cross_the_boundary(self, sandbox):
        sandbox.run_cell("import torch\ndef cube(x, k=3):\n    return x ** k")
        cube = make_proxy(Session(sandbox), "cube", "")
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        y = cube(x, k=3)
        assert type(y) is torch.Tensor and torch.equal(y.detach(), torch.tensor([1.0, 8.0]))
        (g,) = torch.autograd.grad(y.sum(), [x])
        assert torch.equal(g, torch.tensor([3.0, 12.0]))

    def test_an_unused_input_gets_no_gradient_as_it_would_locally(self, sandbox):
        sandbox.run_cell("def ignores_k(q, k):\n    return q * 2")
        f = make_proxy(Session(sandbox), "ignores_k", "")
        q, k = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
        gq, gk = torch.autograd.grad(f(q, k).sum(), [q, k], allow_unused=True)
        assert torch.equal(gq, torch.full((2,), 2.0)) and gk is None

    def test_module_proxy_mirrors_parameters(self, sandbox):
        sandbox.run_cell("import torch\nclass Lin(torch.nn.Module):\n"
                         "    def __init__(self):\n        super().__init__()\n"
                         "        self.inner = torch.nn.Linear(2, 1, bias=False)\n"
                         "    def forward(self, x):\n        return self.inner(x)")
        Lin = make_proxy(Session(sandbox), "Lin", "")
        m = Lin()
        assert set(dict(m.named_parameters())) == {"inner.weight"}
        m.load_state_dict({"inner.weight": torch.tensor([[2.0, 3.0]])})
        x = torch.tensor([[1.0, 1.0]])
        assert m(x).item() == 5.0
        m.double()
        out = m(x.double())
        assert out.dtype == torch.float64
        (g,) = torch.autograd.grad(out.sum(), [m.inner.weight])
        assert torch.equal(g, torch.tensor([[1.0, 1.0]], dtype=torch.float64))

    def test_non_tensor_results_are_named_not_transported(self, sandbox):
        sandbox.run_cell("import torch\nclass Liar(torch.Tensor):\n    def __eq__(self, o): return True\n"
                         "def sub(x): return x.as_subclass(Liar)\n"
                         "class Any:\n    def __eq__(self, o): return True\n"
                         "def obj(x): return Any()")
        s = Session(sandbox)
        assert isinstance(make_proxy(s, "sub", "")(torch.ones(2)), NotATensor)
        assert isinstance(make_proxy(s, "obj", "")(torch.ones(2)), NotATensor)

    def test_student_exceptions_keep_their_type(self, sandbox):
        sandbox.run_cell("def bad(x):\n    raise ValueError('nope')")
        with pytest.raises(StudentError) as info:
            make_proxy(Session(sandbox), "bad", "")(torch.ones(1))
        assert info.value.student_type == "ValueError" and "nope" in str(info.value)

    def test_monkeypatching_inside_the_sandbox_does_not_reach_the_grader(self, sandbox):
        sandbox.run_cell("import torch\ntorch.allclose = lambda *a, **k: True\n"
                         "def wrong(x):\n    return x * 0")
        wrong = make_proxy(Session(sandbox), "wrong", "")
        assert not torch.allclose(wrong(torch.ones(3)), torch.ones(3))


class TestWire:
    def _frame(self, obj) -> bytes:
        return wire.encode(obj)[wire.HEADER.size:]

    def test_plain_tensors_and_primitives_pass(self):
        obj = {"ok": True, "tensors": [torch.ones(2)], "out": ({"__t__": 0}, 1.5, None, "s")}
        back = wire.validate(wire.decode(self._frame(obj)), max_tensor_bytes=1 << 20)
        assert back["ok"] is True and torch.equal(back["tensors"][0], torch.ones(2))

    def test_arbitrary_pickles_are_refused(self):
        import pickle

        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))
        data = io.BytesIO()
        torch.save({"x": 1}, data)
        with pytest.raises(wire.WireError):
            wire.decode(pickle.dumps(Evil()))

    def test_parameters_and_oversized_tensors_are_refused(self):
        with pytest.raises(wire.WireError):
            wire.validate(torch.nn.Parameter(torch.ones(2)), max_tensor_bytes=1 << 20)
        with pytest.raises(wire.WireError):
            wire.validate(torch.ones(1000), max_tensor_bytes=100)

    def test_check_failure_for_non_tensor_names_the_type(self):
        from autograder.checks.core import expect_tensor
        with pytest.raises(CheckFailure, match="numpy.ndarray"):
            expect_tensor(NotATensor("numpy.ndarray"), "softmax(x)")
