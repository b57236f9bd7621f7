"""Peak memory of a call, measured where the student's code runs.

A check that says "your tiled attention formed the L x L matrix" needs the memory the student's
code used, not the time it took. ``with peak_memory() as m: fn(q, k, v)`` gives ``m.bytes``: the
largest growth of memory during the block, over the calls in it.

* The process's resident-set high-water mark, ``VmHWM``, reset before the call by
  writing ``5`` to ``/proc/self/clear_refs`` and read after it, minus the resident set before.
  Large tensors are mapped and unmapped as they come and go, so the peak sees every L x L
  intermediate even if it is freed before the call returns.
* Through the sandbox, a proxied call made inside the block is measured the same way, on the
  student's processes, by the grader reading their ``/proc`` entries from outside (the student's
  code cannot report its own figure; :data:`ACTIVE` tells the proxy to measure), so the same
  check gives the same verdict in the kernel and in the grader.

Memory checks run on CPU tensors: on a GPU the caching allocator, not the kernel, holds the
memory. Where the measurement is impossible (not Linux, ``/proc`` unreadable) ``m.bytes`` is
``None`` and a check must say it could not measure rather than fail the student. Measure a call with
inputs of a size not used before in the process, so nothing can have been set aside for it.

Known limit: the figure is the growth of *resident* memory. In a process whose heap holds large
free fragments (hundreds of MiB freed in the middle of the heap), an honest loop's blocks can be
served from different released fragments one after the other, and the growth then approaches the
total allocated rather than the live peak (measured: a 128-row tiled loop at L = 4096 gave 4 MiB
in a fresh process, 48-68 MiB after a long test session). Kernels and sandboxes that run a
chapter from the top are close to fresh; checks should keep a wide margin (the L x L matrix of
a naive version is 64 MiB at L = 4096, 256 MiB at L = 8192).

Known hole: the high-water mark lives in the student's own process, which may reset it itself
(``/proc/self/clear_refs``) after forming the matrix and before the grader reads it. Chapter 8's
check refuses code that names the meter (``tampers_with_memory_meter``), but a name built at run
time gets through (``tests/corpus/ch08.py``, ``KNOWN_HOLES``). Closing it needs a mark the
student cannot touch: a memory cgroup per sandbox (``memory.peak`` on cgroup v2,
``memory.max_usage_in_bytes`` on v1), which the grading machine must delegate to the grader.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

__all__ = ["MemoryMeter", "peak_memory", "measure", "ACTIVE"]


@dataclass
class MemoryMeter:
    """The largest growth seen by the calls measured so far (bytes), or None if not measurable."""
    bytes: int | None = 0

    def add(self, peak: int | None) -> None:
        if peak is None or self.bytes is None:
            self.bytes = None
        else:
            self.bytes = max(self.bytes, int(peak))


#: The meter of the innermost ``peak_memory()`` block, read by the sandbox proxy.
ACTIVE: contextvars.ContextVar[MemoryMeter | None] = contextvars.ContextVar("afs_memory_meter", default=None)


def status_kib(pid: int | str, field: str) -> int | None:
    """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM), or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


_M_MMAP_THRESHOLD = -3
_fixed = False


def release_free_memory() -> None:
    """Make this process's resident set follow its live memory before a measurement.

    * From now on, blocks of 256 KiB or more are mapped and unmapped with their tensors (glibc's
      own threshold rises after each free, and freed blocks then stay resident: an honest tiled
      loop looked like 64 MiB). Set at the first measurement only: it slows large allocations
      (page faults), so ordinary grading keeps glibc's default.
    * ``malloc_trim(0)`` hands the heap's free pages back to the kernel, so an allocation served
      from them faults them in again and counts (a long-lived process otherwise reuses resident
      free memory, and a 64 MiB matrix measured as 0).

    The sandbox's runner does the same when the grader is about to measure. glibc only."""
    global _fixed
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        if not _fixed:
            libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
            _fixed = True
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn, *args, **kwargs):
    """``(result, peak_growth_bytes or None)`` of ``fn(*args, **kwargs)`` in this process."""
    release_free_memory()
    rss = status_kib("self", "VmRSS")
    if rss is None or not _reset_cpu_peak():
        return fn(*args, **kwargs), None
    result = fn(*args, **kwargs)
    peak = status_kib("self", "VmHWM")
    return result, None if peak is None else max(0, peak - rss) * 1024


@contextlib.contextmanager
def peak_memory():
    """Measure the calls made in the block: in-process ones made through :func:`measure_call`,
    proxied ones (any call) by the grader, from outside the sandbox."""
    meter = MemoryMeter()
    token = ACTIVE.set(meter)
    try:
        yield meter
    finally:
        ACTIVE.reset(token)


def measure_call(fn, *args, **kwargs):
    """Call ``fn``; inside a :func:`peak_memory` block, record its peak on the block's meter.
    A proxy measures itself in the sandbox (and records on the same meter), so it is just called."""
    meter = ACTIVE.get()
    if meter is None or getattr(fn, "__afs_remote__", False):
        return fn(*args, **kwargs)
    result, peak = measure(fn, *args, **kwargs)
    meter.add(peak)
    return result
