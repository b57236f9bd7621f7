"""The sandbox's limits, alone in a module without torch: nbgrader imports them through the
grading plugin in every run, feedback and export included, which then start without torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    memory_bytes: int = 6 * 2**30       # per process (address space) and all processes together
    cpu_seconds: int = 600              # CPU time of one student process
    file_bytes: int = 64 * 2**20        # largest file the student may write
    disk_bytes: int = 512 * 2**20       # all files written (/tmp, work folder, /dev/shm) together
    processes: int = 64                 # processes (and threads) at once
    cell_seconds: float = 30.0          # one cell or one call
    test_seconds: float = 120.0         # one test cell, all its calls together
    startup_seconds: float = 90.0       # start-up (python + torch import)
    message_bytes: int = 256 * 2**20    # largest answer accepted back
    output_chars: int = 20_000          # output kept per cell (counted by the grader)
    notebook_output_chars: int = 1_000_000   # output kept per notebook, all cells together
    threads: int = 1                    # OMP/MKL threads inside the sandbox
