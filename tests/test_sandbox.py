"""The sandboxed student process: isolation, limits, recovery, and the safe wire format."""
from __future__ import annotations

import io
import time

import pytest
import torch

from autograder.checks.core import CheckFailure
from autograder.sandbox import wire
from autograder.sandbox.process import Limits, Sandbox
from autograder.sandbox.identity import HOST_UID_BASE
from autograder.sandbox.proxy import NotATensor, OutOfTime, Session, StudentError, make_proxy
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

    def test_matplotlib_finds_the_lent_font_list_and_cannot_change_it(self, sandbox):
        """The grader builds matplotlib's font list once and lends it read-only: pyplot imports
        without rebuilding it (0.7 s a submission otherwise), and a student cannot poison the
        copy the next student's sandbox reads."""
        run = sandbox.run_cell(
            "import os, glob\n"
            "lent = glob.glob('/tmp/mpl/fontlist-*.json')\n"
            "before = [os.stat(p).st_mtime_ns for p in lent]\n"
            "import matplotlib.pyplot as plt\n"
            "plt.figure(); plt.title('fonts'); plt.savefig('/tmp/fonts.png')\n"
            "print(len(lent), before == [os.stat(p).st_mtime_ns for p in lent], os.access(lent[0], os.W_OK))\n"
            "try:\n"
            "    open(lent[0], 'w')\n"
            "    print('written')\n"
            "except OSError:\n"
            "    print('refused')\n")
        assert run.status == "ok", run.error
        assert run.stdout.split() == ["1", "True", "False", "refused"], run.stdout
        assert "font cache" not in run.stderr.lower(), run.stderr

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
        # The loop never ends: the cell's 3 s limit stopped it (a wide margin for a loaded machine).
        assert run.status == "timeout" and time.monotonic() - start < 30
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

    def test_a_killed_sandbox_is_not_alive_even_before_the_kernel_reaps_it(self, sandbox):
        """The grader asks ``alive`` right after killing (an answer too large): a process that is
        dying but not yet reaped must not be handed the next cell."""
        sandbox.run_cell("kept = 1")
        sandbox.kill()
        assert not sandbox.alive
        assert sandbox.run_cell("x = 1").status == "crashed"
        sandbox.restart()
        assert sandbox.alive and sandbox.run_cell("print(kept)").stdout.strip() == "1"

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

    def test_dtype_and_device_arguments_cross_the_boundary(self, sandbox):
        sandbox.run_cell("import torch\ndef zeros(n, dtype=torch.float32, device=None):\n"
                         "    return torch.zeros(n, dtype=dtype, device=device)")
        zeros = make_proxy(Session(sandbox), "zeros", "")
        got = zeros(3, dtype=torch.float64, device=torch.device("cpu"))
        assert got.dtype == torch.float64 and got.device.type == "cpu"
        assert zeros(2, dtype=torch.int8, device="meta").dtype == torch.int8

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


@needs_bwrap
class TestTheStudentOwnsNothing:
    """Item 2 of the grader-holes issue: grading as root must not make the student root."""

    def test_the_student_is_not_the_grader_on_the_host(self, sandbox):
        run = sandbox.run_cell("print(open('/proc/self/uid_map').read())")
        rows = [line.split() for line in run.stdout.splitlines() if line.strip()]
        outer = {int(inside): int(host) for inside, host, _ in rows}
        import os
        if os.geteuid() == 0:
            assert outer[1000] >= HOST_UID_BASE, rows
        else:
            assert outer[1000] == os.geteuid()

    @pytest.mark.skipif(__import__("os").geteuid() != 0, reason="host secrets are root's: grade as root to see")
    def test_root_only_files_are_unreadable_when_grading_as_root(self, sandbox):
        for path in ("/etc/shadow", "/etc/gshadow"):
            run = sandbox.run_cell(f"print(open({path!r}).read())")
            assert run.status == "error" and "Permission" in run.error, (path, run.stdout[:80])

    def test_the_sandbox_runs_the_graders_own_package(self, sandbox):
        run = sandbox.run_cell("import autograder; print(autograder.__file__)")
        assert run.stdout.startswith("/opt/afs/autograder/"), run.stdout


@pytest.fixture()
def small_sandbox():
    """A sandbox of its own (these tests kill it), with small totals."""
    with Sandbox(Limits(cell_seconds=20, memory_bytes=2 * 2**30, disk_bytes=64 * 2**20, processes=48)) as sb:
        yield sb


@needs_bwrap
class TestLimitsOverTheWholeSubmission:
    def test_processes_are_limited(self, small_sandbox):
        run = small_sandbox.run_cell(
            "import os, time\nn = 0\ntry:\n    for i in range(500):\n"
            "        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n"
            "        n += 1\nexcept OSError as e:\n    print('stopped after', n)")
        assert run.status == "crashed" or "stopped after" in run.stdout, run
        assert small_sandbox.watchdog.peak.processes <= 48 + 5

    def test_memory_is_summed_over_forked_children(self, small_sandbox):
        start = time.monotonic()
        run = small_sandbox.run_cell(
            "import os, time\nfor i in range(3):\n    if os.fork() == 0:\n"
            "        b = bytearray(b'x') * (900 * 2**20)\n        time.sleep(30)\n        os._exit(0)\n"
            "time.sleep(60)")
        # Not the cell's 20 s timeout: the watchdog killed the submission for the children's memory.
        assert run.status == "crashed" and "memory" in run.error, run
        assert time.monotonic() - start < 20

    def test_files_are_summed_over_tmp_and_the_work_folder(self, small_sandbox):
        run = small_sandbox.run_cell(
            "import time\nfor where in ('/tmp', '.', '/dev/shm'):\n    try:\n"
            "        open(where + '/f', 'wb').write(b'0' * (40 * 2**20))\n"
            "    except OSError as e:\n        print(where, e)\ntime.sleep(1)")
        assert run.status == "crashed" and "files" in run.error, run

    def test_a_full_tmpfs_is_an_error_not_a_host_disk(self, small_sandbox):
        run = small_sandbox.run_cell("open('/tmp/big', 'wb').write(b'0' * (100 * 2**20))")
        assert run.status in ("error", "crashed") and ("No space" in (run.error or "") or "files" in run.error)

    def test_nothing_a_cell_starts_outlives_it(self, small_sandbox):
        run = small_sandbox.run_cell("import os, time\nfor i in range(5):\n    if os.fork() == 0:\n"
                                     "        os.setsid()\n        time.sleep(60)\n        os._exit(0)")
        assert run.status == "ok"
        run = small_sandbox.run_cell("import os\nprint(len([p for p in os.listdir('/proc') if p.isdigit()]))")
        assert int(run.stdout) <= 3, run.stdout      # bubblewrap's init, the runner (and ls's own)

    def test_keyboard_interrupt_is_the_students_error_not_a_timeout(self, sandbox):
        run = sandbox.run_cell("raise KeyboardInterrupt")
        assert run.status == "error" and "KeyboardInterrupt" in run.error

    def test_output_is_clipped_by_the_grader(self, sandbox):
        for n in (20_000, 2_000_000):    # under and over what one reply may carry in a string
            run = sandbox.run_cell(f"import sys\nsys.stdout.kept = -10**12\nsys.stdout.write('spam ' * {n})")
            assert len(run.stdout) <= sandbox.limits.output_chars + 200, run.status
            assert run.status == "ok" or "too large" in run.error or "string" in run.error, run.error
            if not sandbox.alive:
                sandbox.restart()

    def test_a_test_cell_deadline_holds_across_calls(self, sandbox):
        sandbox.run_cell("import time\ndef slow(x):\n    time.sleep(1)\n    return x")
        slow = make_proxy(Session(sandbox, deadline=time.monotonic() + 2.5), "slow", "")
        start = time.monotonic()
        with pytest.raises(OutOfTime):
            for _ in range(30):
                try:
                    slow(torch.ones(1))
                except Exception:   # a check's `except Exception` must not swallow the deadline
                    pass
        assert time.monotonic() - start < 15, "the calls ran on past the test cell's deadline (30 s of them)"

    def test_a_malformed_reply_is_the_students_failure(self, sandbox):
        sandbox.run_cell("import sys, torch\nw = sys.modules['autograder.sandbox.wire']\nreal = w.write_frame\n"
                         "def evil(fd, obj):\n    if 'tensors' in obj:\n        obj = dict(obj, ok=torch.ones(2))\n"
                         "    real(fd, obj)\nw.write_frame = evil\ndef f(x):\n    return x")
        with pytest.raises(StudentError, match="malformed"):
            make_proxy(Session(sandbox), "f", "")(torch.ones(1))
        sandbox.run_cell("w.write_frame = real")


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


@needs_bwrap
def test_a_second_checkout_grades_with_its_own_package(tmp_path):
    """Grading from another checkout than the one the venv's editable install points at used to
    give every student 0 (the sandbox could not import the package): it must use its own."""
    import shutil
    import subprocess
    import sys

    other = tmp_path / "checkout2"
    shutil.copytree(REPO / "autograder", other / "autograder", ignore=shutil.ignore_patterns("__pycache__"))
    (other / "autograder" / "MARKER").write_text("second checkout\n")
    code = ("from autograder.sandbox.process import Sandbox\n"
            "with Sandbox() as sb:\n"
            "    run = sb.run_cell(\"import autograder, os; print(autograder.__file__, "
            "os.path.exists('/opt/afs/autograder/MARKER'))\")\n"
            "    print(run.status, run.stdout)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=other, capture_output=True, text=True, timeout=300)
    assert out.stdout.startswith("ok /opt/afs/autograder/__init__.py True"), out.stdout + out.stderr[-2000:]
