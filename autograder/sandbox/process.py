"""Start and talk to a student's sandboxed process (bubblewrap + resource limits).

The sandbox sees: the system's read-only directories, the Python installation and virtualenv
(read-only), the ``autograder`` package (read-only, it holds no solutions), an empty writable
work directory with the assignment's released data files, and a private ``/tmp``. It does not
see ``solutions/``, the gradebook, other submissions or the grader's files, and has no network.
Memory, CPU time, file size and wall-clock time are limited; a crash or hang is reported as
such and the process is restarted with the cells that ran before replayed.
"""
from __future__ import annotations

import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import wire

PACKAGE_DIR = Path(__file__).resolve().parent.parent   # .../autograder


@dataclass
class Limits:
    memory_bytes: int = 6 * 2**30       # address space of the student's process
    cpu_seconds: int = 600              # CPU time of one student process
    file_bytes: int = 64 * 2**20        # largest file the student may write
    cell_seconds: float = 30.0          # one cell or one call
    startup_seconds: float = 90.0       # start-up (python + torch import)
    message_bytes: int = 256 * 2**20    # largest answer accepted back
    threads: int = 1                    # OMP/MKL threads inside the sandbox


class SandboxFailure(Exception):
    """The student's process hung, crashed or broke the protocol; the message says which."""


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create a sandbox on this machine."""


@dataclass
class CellRun:
    status: str                  # "ok", "error" (the cell raised), "timeout", "crashed"
    stdout: str = ""
    stderr: str = ""
    error: str | None = None     # "TypeError: ..." or what happened to the process


def _signal_name(sig: int) -> str:
    try:
        name = signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
    meaning = {"SIGSEGV": "segmentation fault", "SIGKILL": "killed", "SIGXCPU": "CPU time limit",
               "SIGABRT": "aborted", "SIGBUS": "bus error", "SIGXFSZ": "file size limit"}.get(name)
    return f"{name} ({meaning})" if meaning else name


def bwrap_available() -> bool:
    return shutil.which("bwrap") is not None


class Sandbox:
    """One student's process. Use as a context manager; ``run_cell`` and ``request`` never hang."""

    def __init__(self, limits: Limits | None = None, data_files: list[Path] | None = None):
        if not bwrap_available():
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
        self.limits = limits or Limits()
        self.data_files = list(data_files or [])
        self.history: list[str] = []    # cells that ran to completion, replayed after a restart
        self.restarts = 0
        self.proc: subprocess.Popen | None = None
        self._cuda = torch.cuda.is_available()
        self._scratch = Path(tempfile.mkdtemp(prefix="afs-sandbox-"))

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def _command(self, fd_in: int, fd_out: int) -> list[str]:
        cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
               "--uid", "1000", "--gid", "1000",
               # Mounts apply in order: the private /tmp first, so that a virtualenv or checkout
               # that lives under /tmp is bound back on top of it below.
               "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        for p in ("/usr", "/etc", "/lib", "/lib64", "/lib32", "/bin", "/sbin"):
            if os.path.islink(p):
                cmd += ["--symlink", os.readlink(p), p]
            elif os.path.exists(p):
                cmd += ["--ro-bind", p, p]
        for p in {sys.base_prefix, sys.prefix, str(PACKAGE_DIR)}:
            cmd += ["--ro-bind", p, p]
        cmd += ["--dir", "/home/student", "--bind", str(self._work), "/home/student/work",
                "--chdir", "/home/student/work"]
        if self._cuda:   # the GPU, its driver's view of /sys, nothing else
            for dev in sorted(Path("/dev").glob("nvidia*")):
                cmd += ["--dev-bind", str(dev), str(dev)]
            cmd += ["--ro-bind", "/sys", "/sys"]
        cmd += [sys.executable, "-I", "-m", "autograder.sandbox.runner", str(fd_in), str(fd_out)]
        return cmd

    def _env(self) -> dict:
        n = str(self.limits.threads)
        return {"PATH": "/usr/bin:/bin", "HOME": "/home/student", "LANG": "C.UTF-8",
                "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp/mpl", "PYTHONDONTWRITEBYTECODE": "1",
                "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "PYTHONHASHSEED": "0"}

    def _preexec(self):
        lim = self.limits
        if not self._cuda:
            # CUDA reserves far more virtual address space than any sane limit, so on a GPU grader
            # there is no address-space limit (see book/grader.md, "Limits").
            resource.setrlimit(resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_seconds, lim.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim.file_bytes, lim.file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # over-long writes fail instead of killing

    def start(self) -> None:
        self._work = self._scratch / f"work{self.restarts}"
        self._work.mkdir()
        for f in self.data_files:
            shutil.copy(f, self._work / Path(f).name)
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        self._log = open(self._scratch / f"stderr{self.restarts}.log", "wb")
        self.proc = subprocess.Popen(
            self._command(to_child_r, from_child_w), pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
            env=self._env(), preexec_fn=self._preexec, start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        try:
            self.request({"op": "lookup", "name": "__name__"}, timeout=self.limits.startup_seconds)
        except SandboxFailure as exc:
            log = (self._scratch / f"stderr{self.restarts}.log").read_text(errors="replace")[-2000:]
            self.kill()
            raise SandboxUnavailable(f"the sandbox did not start: {exc}\n{log}") from None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        for fd in ("_to_child", "_from_child"):
            try:
                os.close(getattr(self, fd))
            except (OSError, AttributeError):
                pass
            setattr(self, fd, -1)
        if getattr(self, "_log", None):
            self._log.close()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def restart(self) -> None:
        """A fresh process with the completed cells replayed (a cell that fails now is dropped)."""
        self.kill()
        self.restarts += 1
        self.start()
        kept = []
        for src in self.history:
            run = self.run_cell(src, record=False)
            if run.status in ("timeout", "crashed"):
                break
            kept.append(src)
        self.history = kept

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- protocol --------------------------------------------------------------------------------
    def _death(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            return "stopped answering"
        if code < 0:
            return f"was killed by {_signal_name(-code)}"
        if code > 128:
            return f"was killed by {_signal_name(code - 128)}"
        return f"exited with status {code} (os._exit, sys.exit outside a cell, or a crash)"

    def _read(self, n: int, deadline: float) -> bytes:
        chunks, left = [], n
        while left:
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self._from_child], [], [], wait)
            if not ready:
                raise TimeoutError
            b = os.read(self._from_child, min(left, 1 << 20))
            if not b:
                raise EOFError
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)

    def request(self, msg: dict, timeout: float | None = None) -> dict:
        """Send one request and return the validated reply; raise SandboxFailure on a hang/crash."""
        if not self.alive:
            raise SandboxFailure("the student's process is not running")
        timeout = self.limits.cell_seconds if timeout is None else timeout
        msg = dict(msg, timeout=timeout)
        deadline = time.monotonic() + timeout + 5.0   # grace: the runner's own alarm fires first
        try:
            wire.write_frame(self._to_child, msg)
            (n,) = wire.HEADER.unpack(self._read(wire.HEADER.size, deadline))
            if n > self.limits.message_bytes:
                self.kill()
                raise SandboxFailure(f"the answer was too large ({n / 2**20:.0f} MiB)")
            reply = wire.validate(wire.decode(self._read(n, deadline)),
                                  max_tensor_bytes=self.limits.message_bytes)
        except TimeoutError:
            self.kill()
            raise SandboxFailure(f"timed out after {timeout:g} s (and could not be interrupted)") from None
        except (EOFError, BrokenPipeError, OSError):
            raise SandboxFailure(f"the student's process {self._death()}") from None
        except wire.WireError as exc:
            raise SandboxFailure(str(exc)) from None
        if not isinstance(reply, dict) or "ok" not in reply:
            raise SandboxFailure("the student's process sent a malformed answer")
        return reply

    def run_cell(self, source: str, record: bool = True) -> CellRun:
        try:
            reply = self.request({"op": "run_cell", "source": source})
        except SandboxFailure as exc:
            status = "timeout" if "timed out" in str(exc) else "crashed"
            return CellRun(status, error=str(exc))
        if not reply.get("ok"):
            text = str(reply.get("error", ""))
            status = "timeout" if text.startswith("TimeoutError") else "error"
            if status == "timeout":
                text = f"timed out after {self.limits.cell_seconds:g} s"
            return CellRun(status, str(reply.get("stdout", "")), str(reply.get("stderr", "")), text)
        if reply.get("timed_out"):
            return CellRun("timeout", str(reply.get("stdout", "")), str(reply.get("stderr", "")),
                           f"timed out after {self.limits.cell_seconds:g} s")
        if record:
            self.history.append(source)
        err = reply.get("error")
        return CellRun("error" if err else "ok", str(reply.get("stdout", "")),
                       str(reply.get("stderr", "")), None if err is None else str(err))
