"""Start and talk to a student's sandboxed process (bubblewrap + resource limits).

The sandbox sees: the system's read-only directories, the Python installation and virtualenv
(read-only), the ``autograder`` package (read-only at a fixed place, it holds no solutions), a
size-limited in-memory work directory with the assignment's released data files, and a private,
size-limited ``/tmp`` and ``/dev/shm``. It does not see ``solutions/``, the gradebook, other
submissions or the grader's files, has no network, and runs as a uid that owns nothing on the
host (``identity.py``). Per-process kernel limits (address space, CPU time, file size, process
count) stop the obvious cases at once; the grader's own watchdog (``watchdog.py``) holds the
totals over all the submission's processes, and the grader's clock decides every time-out. A
crash or hang is reported as such and the process is restarted with the cells that ran before
replayed.
"""
from __future__ import annotations

import atexit
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks.memory import status_kib
from . import wire
from .identity import IdentityUnavailable, student_identity
from .limits import Limits  # noqa: F401 - re-exported: callers build Limits from here
from .watchdog import Watchdog, descendants, stat_fields

PACKAGE_DIR = Path(__file__).resolve().parent.parent   # .../autograder
# The grader's own package is mounted here and put first on the runner's path, so the sandbox
# runs exactly the code the grader runs, whichever checkout or install the venv points at.
PACKAGE_MOUNT = "/opt/afs"
SYSTEM_DIRS = ("/usr", "/etc", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
RUNNER = ("import sys; sys.path.insert(0, '/opt/afs'); import runpy; "
          "runpy.run_module('autograder.sandbox.runner', run_name='__main__', alter_sys=True)")


SANDBOX_PATH = "/usr/bin:/bin"
MPL_DIR = "/tmp/mpl"   # the sandbox's MPLCONFIGDIR
_fonts_lock = threading.Lock()
_fonts: list[Path] | None = None


def matplotlib_font_cache() -> list[Path]:
    """Matplotlib's font list, built once per grader process on the host and lent read-only to
    every sandbox. Each sandbox's ``/tmp`` starts empty, so without it every submission rebuilt
    the list when it imported pyplot (0.7-0.9 s of its time). It names font files only."""
    global _fonts
    with _fonts_lock:
        if _fonts is None:
            where = Path(tempfile.mkdtemp(prefix="afs-mpl-"))
            atexit.register(shutil.rmtree, where, ignore_errors=True)
            try:
                subprocess.run([sys.executable, "-I", "-c", "import matplotlib.font_manager"],
                               env={"PATH": SANDBOX_PATH, "MPLCONFIGDIR": str(where), "MPLBACKEND": "Agg"},
                               capture_output=True, timeout=120)
            except (OSError, subprocess.SubprocessError):
                pass   # no matplotlib, or it failed: each sandbox builds its own, as before
            _fonts = sorted(where.glob("fontlist-*.json"))
            for f in _fonts:
                f.chmod(0o644)
        return _fonts


class SandboxFailure(Exception):
    """The student's process hung, crashed or broke the protocol; the message says which."""


class SandboxTimeout(SandboxFailure):
    """The grader's clock ran out before the student's code answered."""


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


def _alive(pid: int) -> bool:
    """Running or sleeping: neither gone nor a zombie."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] != b"Z"


def bwrap_available() -> bool:
    return shutil.which("bwrap") is not None


class Sandbox:
    """One student's process. Use as a context manager; ``run_cell`` and ``request`` never hang."""

    def __init__(self, limits: Limits | None = None, data_files: list[Path] | None = None):
        if not bwrap_available():
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
        self.limits = limits or Limits()
        self.data_files = list(data_files or [])
        self.history: list[tuple[str, float | None]] = []   # (cell, time limit) that completed, replayed after a restart
        self.restarts = 0
        self.last_peak_bytes: int | None = None    # of the last request made with measure_memory
        self.proc: subprocess.Popen | None = None
        self._killed = False    # set the moment kill() is called: SIGKILL is not instant
        self._cuda = torch.cuda.is_available()
        self._scratch = Path(tempfile.mkdtemp(prefix="afs-sandbox-"))

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def _command(self, fd_in: int, fd_out: int) -> list[str]:
        lim = self.limits
        cmd = ["bwrap", *self._identity.bwrap_args, "--unshare-ipc", "--unshare-pid", "--unshare-net",
               "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--new-session",
               # Mounts apply in order: the private /tmp first, so that a virtualenv or checkout
               # that lives under /tmp is bound back on top of it below.
               "--proc", "/proc", "--dev", "/dev",
               "--perms", "1777", "--size", str(lim.disk_bytes), "--tmpfs", "/dev/shm",
               "--perms", "1777", "--size", str(lim.disk_bytes), "--tmpfs", "/tmp"]
        bound = []
        for p in SYSTEM_DIRS:
            if os.path.islink(p):
                cmd += ["--symlink", os.readlink(p), p]
            elif os.path.exists(p):
                cmd += ["--ro-bind", p, p]
                bound.append(p)
        made: set[str] = set()

        def parents(path: str) -> list[str]:
            """Directories above ``path`` that bubblewrap must create, world-traversable (it
            would make them private to root, which the student no longer is)."""
            out = []
            for parent in reversed(Path(path).parents):
                q = str(parent)
                if q == "/" or q in made or any(q == b or q.startswith(b + "/") for b in bound):
                    continue
                made.add(q)
                out += ["--perms", "0755", "--dir", q]
            return out

        for p in sorted({sys.base_prefix, sys.prefix}):
            cmd += parents(p) + ["--ro-bind", p, p]
        cmd += parents(PACKAGE_MOUNT + "/autograder") + ["--ro-bind", str(PACKAGE_DIR), PACKAGE_MOUNT + "/autograder"]
        cmd += ["--perms", "0777", "--dir", MPL_DIR]
        for f in matplotlib_font_cache():
            cmd += ["--ro-bind", str(f), f"{MPL_DIR}/{f.name}"]
        cmd += parents("/home/student/work") + [
            "--perms", "0777", "--size", str(lim.disk_bytes), "--tmpfs", "/home/student/work"]
        for f in self._data:
            cmd += ["--ro-bind", str(f), f"/home/student/work/{f.name}"]
        cmd += ["--chdir", "/home/student/work"]
        if self._cuda:   # the GPU, its driver's view of /sys, nothing else
            for dev in sorted(Path("/dev").glob("nvidia*")):
                cmd += ["--dev-bind", str(dev), str(dev)]
            cmd += ["--ro-bind", "/sys", "/sys"]
        cmd += [*self._identity.exec_prefix, sys.executable, "-I", "-c", RUNNER, str(fd_in), str(fd_out)]
        return cmd

    def _env(self) -> dict:
        n = str(self.limits.threads)
        return {"PATH": SANDBOX_PATH, "HOME": "/home/student", "LANG": "C.UTF-8",
                "MPLBACKEND": "Agg", "MPLCONFIGDIR": MPL_DIR, "PYTHONDONTWRITEBYTECODE": "1",
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
        if self._identity.host_uid is not None:
            # Counted per host uid; the student's uid is its own, so this is the sandbox's count.
            resource.setrlimit(resource.RLIMIT_NPROC, (lim.processes, lim.processes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # over-long writes fail instead of killing

    def start(self) -> None:
        self._data = []
        data_dir = self._scratch / "data"
        data_dir.mkdir(exist_ok=True)
        for f in self.data_files:   # the release's files, readable by the student's uid
            dest = data_dir / Path(f).name
            shutil.copyfile(f, dest)
            dest.chmod(0o644)
            self._data.append(dest)
        data_dir.chmod(0o755)
        try:
            self._identity = student_identity()
        except (IdentityUnavailable, OSError) as exc:
            raise SandboxUnavailable(str(exc)) from None
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        self._log = open(self._scratch / f"stderr{self.restarts}.log", "wb")
        root = self._identity.host_uid is not None
        self._killed = False
        self.proc = subprocess.Popen(
            self._command(to_child_r, from_child_w),
            pass_fds=(to_child_r, from_child_w, *self._identity.pass_fds),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
            env=self._env(), preexec_fn=self._preexec, start_new_session=True,
            extra_groups=[] if root else None)
        os.close(to_child_r)
        os.close(from_child_w)
        self._identity.close()
        lim = self.limits
        self.watchdog = Watchdog(self.proc.pid, self.kill, processes=lim.processes,
                                 memory_bytes=lim.memory_bytes, disk_bytes=lim.disk_bytes)
        self.watchdog.start()
        try:
            self.request({"op": "lookup", "name": "__name__"}, timeout=self.limits.startup_seconds)
            self._own = set(descendants(self.proc.pid))   # bubblewrap's init and the runner
        except SandboxFailure as exc:
            log = (self._scratch / f"stderr{self.restarts}.log").read_text(errors="replace")[-2000:]
            self.kill()
            raise SandboxUnavailable(f"the sandbox did not start: {exc}\n{log}") from None

    def kill(self) -> None:
        """Kill the whole sandbox (bubblewrap's pid namespace dies with it). Safe from any thread.
        From this call on the sandbox is not ``alive``, even while the kernel is still reaping it:
        otherwise the next cell could be sent to a process about to vanish, and be dropped."""
        self._killed = True
        if self.proc and self.proc.poll() is None:
            for pid in [*descendants(self.proc.pid), self.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def stop_strays(self) -> int:
        """Kill every process a cell or call left running (forked children, daemons): nothing
        a student starts outlives the cell that started it. Returns how many still had not died."""
        if not self.alive:
            return 0
        strays = [pid for pid in descendants(self.proc.pid) if pid not in getattr(self, "_own", ())]
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 1.0   # until they are dead (zombies the runner will collect)
        while strays and time.monotonic() < deadline:
            strays = [pid for pid in strays if _alive(pid)]
            time.sleep(0.01)
        return len(strays)

    def _reap(self) -> None:
        self.kill()
        watchdog = getattr(self, "watchdog", None)
        if watchdog is not None:
            watchdog.stop()
        if self.proc:
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
        self._reap()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def restart(self) -> None:
        """A fresh process with the completed cells replayed (a cell that fails now is dropped)."""
        self._reap()
        self.restarts += 1
        self.start()
        kept = []
        for src, timeout in self.history:
            run = self.run_cell(src, record=False, timeout=timeout)
            if run.status in ("timeout", "crashed"):
                break
            kept.append((src, timeout))
        self.history = kept

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self._killed and self.proc.poll() is None

    # -- protocol --------------------------------------------------------------------------------
    def _death(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            return "stopped answering"
        reason = getattr(self, "watchdog", None) and self.watchdog.reason
        if reason:
            return f"was stopped because {reason}"
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

    def request(self, msg: dict, timeout: float | None = None, measure_memory: bool = False) -> dict:
        """Send one request and return the validated reply. Raise SandboxTimeout when the
        grader's clock ran out (an answer that is an error and came at or after ``timeout`` is
        the runner's alarm, whatever it says), SandboxFailure on a crash or a malformed reply.
        With ``measure_memory``, ``last_peak_bytes`` is then the request's peak memory growth in
        the student's processes, as their kernel counts it (or None), whatever they report."""
        if not self.alive:
            raise SandboxFailure("the student's process is not running")
        timeout = self.limits.cell_seconds if timeout is None else max(0.01, timeout)
        msg = dict(msg, timeout=timeout, measure_memory=measure_memory)
        self.last_peak_bytes = None
        resident = self._reset_peaks() if measure_memory else None
        start = time.monotonic()
        deadline = start + timeout + 5.0   # grace: the runner's own alarm fires first
        try:
            wire.write_frame(self._to_child, msg)
            (n,) = wire.HEADER.unpack(self._read(wire.HEADER.size, deadline))
            if n > self.limits.message_bytes:
                self.kill()
                raise SandboxFailure(f"the answer was too large ({n / 2**20:.0f} MiB)")
            reply = wire.read_message(self._read(n, deadline),
                                      wire.MessageLimits(max_bytes=self.limits.message_bytes))
        except TimeoutError:
            self.kill()
            raise SandboxTimeout(f"timed out after {timeout:g} s (and could not be interrupted)") from None
        except (EOFError, BrokenPipeError, OSError):
            raise SandboxFailure(f"the student's process {self._death()}") from None
        except wire.WireError as exc:
            raise SandboxFailure(str(exc)) from None
        if resident is not None:
            self.last_peak_bytes = self._peak_growth(resident)
        if type(reply) is not dict or type(reply.get("ok")) is not bool:
            raise SandboxFailure("the student's process sent a malformed answer")
        failed = not reply["ok"] or reply.get("error") is not None
        if failed and time.monotonic() - start >= timeout:
            raise SandboxTimeout(f"timed out after {timeout:g} s")
        return reply

    def _reset_peaks(self) -> dict[int, int] | None:
        """Reset the resident-set high-water mark of the sandbox's own processes (bubblewrap's
        init and the runner); their resident sets now (KiB), or None where that is impossible."""
        resident = {}
        for pid in self._own:
            try:
                with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
                    f.write("5")
            except OSError:
                return None
            rss = status_kib(pid, "VmRSS")
            if rss is None:
                return None
            resident[pid] = rss
        return resident

    def _peak_growth(self, resident: dict[int, int]) -> int | None:
        total = 0
        for pid, rss in resident.items():
            peak = status_kib(pid, "VmHWM")
            if peak is None:
                return None
            total += max(0, peak - rss)
        return total * 1024

    def text(self, reply: dict, key: str) -> str:
        """A string field of a reply, as the grader may show it: clipped, valid UTF-8."""
        value = reply.get(key)
        return "" if value is None else wire.clean_text(str(value), self.limits.output_chars)

    def run_cell(self, source: str, record: bool = True, timeout: float | None = None) -> CellRun:
        try:
            reply = self.request({"op": "run_cell", "source": source}, timeout=timeout)
        except SandboxTimeout as exc:
            return CellRun("timeout", error=str(exc))
        except SandboxFailure as exc:
            return CellRun("crashed", error=str(exc))
        out, err = self.text(reply, "stdout"), self.text(reply, "stderr")
        over = self.watchdog.enforce()   # what a cell leaves behind counts too (and is not replayed)
        self.stop_strays()
        if over:
            return CellRun("crashed", out, err, f"the student's process was stopped because {over}")
        if not reply["ok"] or reply.get("error") is not None:
            return CellRun("error", out, err, self.text(reply, "error") or "Error: (no message)")
        if record:
            self.history.append((source, timeout))
        return CellRun("ok", out, err)
