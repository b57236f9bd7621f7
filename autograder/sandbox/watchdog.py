"""Limits over the whole submission, measured by the grader from outside the sandbox.

Kernel limits (``RLIMIT_AS``, ``RLIMIT_NPROC``, the tmpfs sizes) are per process or per mount;
a submission that forks, or spreads its files over ``/tmp``, the work folder and ``/dev/shm``,
could add them up. The watchdog samples every process of the sandbox (all descendants of
bubblewrap, found in ``/proc``) a few times a second: their number, their memory summed (PSS,
so pages shared after a fork count once) and the bytes in the sandbox's writable mounts, and
kills the sandbox the moment one total is over its limit, remembering why.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

WRITABLE = ("/tmp", "/home/student/work", "/dev/shm")


@dataclass
class Totals:
    processes: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0


def stat_fields(pid: int | str) -> list[bytes] | None:
    """``/proc/PID/stat`` after the process name (state, parent, ...), or None if it is gone.
    The name may hold spaces and parentheses, so the fields start after the last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = stat_fields(entry) if entry.isdigit() else None
        if fields:
            tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _memory(pid: int) -> int:
    """Proportional set size (shared pages split between their users); RSS if PSS is hidden."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _disk(pid: int) -> int:
    used = 0
    for mount in WRITABLE:
        try:
            st = os.statvfs(f"/proc/{pid}/root{mount}")
        except OSError:
            continue
        used += (st.f_blocks - st.f_bfree) * st.f_frsize
    return used


def measure(root_pid: int) -> Totals:
    """Totals of the student's processes: bubblewrap's own init (its first child, which lives in
    the sandbox's mounts) is not the student's and is not counted as one of theirs."""
    pids = descendants(root_pid)
    inside = pids[0] if pids else None
    return Totals(max(0, len(pids) - 1), sum(_memory(p) for p in pids), _disk(inside) if inside else 0)


class Watchdog:
    """Samples ``root_pid``'s sandbox every ``interval`` seconds; calls ``kill`` once, with the
    reason, when a total goes over its limit. ``reason`` stays set afterwards."""

    def __init__(self, root_pid: int, kill, *, processes: int, memory_bytes: int, disk_bytes: int,
                 interval: float = 0.1):
        self.root_pid, self._kill, self.interval = root_pid, kill, interval
        self.limits = Totals(processes, memory_bytes, disk_bytes)
        self.peak = Totals()
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="afs-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def check(self) -> str | None:
        now = measure(self.root_pid)
        self.peak = Totals(*(max(a, b) for a, b in zip(vars(self.peak).values(), vars(now).values())))
        lim = self.limits
        if now.processes >= lim.processes:
            return f"it ran {lim.processes} processes at once (the limit)"
        if now.memory_bytes > lim.memory_bytes:
            return (f"its processes used more than {lim.memory_bytes / 2**30:g} GiB of memory "
                    f"together ({now.memory_bytes / 2**30:.1f} GiB)")
        if now.disk_bytes > lim.disk_bytes:
            return (f"its files in /tmp, /dev/shm and its work folder went over "
                    f"{lim.disk_bytes / 2**20:.0f} MiB together")
        return None

    def enforce(self) -> str | None:
        """Check now (at the end of a cell): kill and return the reason if a total is over."""
        try:
            reason = self.check()
        except Exception:  # noqa: BLE001 - /proc races
            return None
        if reason:
            self.reason = reason
            self._kill()
        return reason

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                reason = self.check()
            except Exception:  # noqa: BLE001 - /proc races (a process that just exited) are normal
                continue
            if reason:
                self.reason = reason
                self._kill()
                return
