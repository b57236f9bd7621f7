"""Who the student's process is on the host: a user id that owns nothing.

bubblewrap started by an unprivileged user maps the sandbox's uid to that user. Started by root
the same way, it maps the student to *root*, so every root-only file bound into the sandbox
(``/etc/shadow``) is readable. So when the grader runs as root it prepares the user namespace
itself: uid 0 maps to root only so that bubblewrap can set up the mounts, uid 1000 maps to a
fresh host uid that no file or process uses, and the runner is started through ``setpriv`` as
uid 1000 with no capabilities, no supplementary groups and ``no_new_privs`` before any student
code exists. A grader that is not root cannot map another uid; the student then has the
grader's uid, sees only the read-only system directories, and ``book/grader.md`` says to grade
as root or as a dedicated account.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass

SANDBOX_UID = 1000             # the student's uid inside the sandbox
HOST_UID_BASE = 2_100_000_000  # far above any real account; one uid per sandbox
_HOST_UID_SPAN = 50_000_000
_counter = itertools.count()


class IdentityUnavailable(RuntimeError):
    """The tools needed to give the student a uid of its own are missing."""


@dataclass
class Identity:
    """How bubblewrap is told who the student is (``bwrap_args``), the fds it must inherit, the
    prefix that drops to the student before the runner starts, and the host uid (None when the
    student has the grader's own uid)."""
    bwrap_args: list[str]
    pass_fds: tuple[int, ...]
    exec_prefix: list[str]
    host_uid: int | None

    def close(self) -> None:
        for fd in self.pass_fds:
            try:
                os.close(fd)
            except OSError:
                pass


def fresh_host_uid() -> int:
    """A uid no account uses, distinct for each sandbox a grading process starts (so that
    concurrent graders on one machine do not share process limits)."""
    return HOST_UID_BASE + (os.getpid() * 4096 + next(_counter)) % _HOST_UID_SPAN


def _root_identity() -> Identity:
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            raise IdentityUnavailable(f"`{tool}` (util-linux) is needed to grade as root")
    uid = fresh_host_uid()
    holder = subprocess.Popen(["unshare", "--user", "sleep", "60"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):   # `unshare` has exec'd sleep once its namespace differs from ours
            if os.readlink(f"/proc/{holder.pid}/ns/user") != os.readlink("/proc/self/ns/user"):
                break
            if holder.poll() is not None:
                raise IdentityUnavailable("could not create a user namespace (unshare --user failed)")
            os.sched_yield()
        mapping = f"0 0 1\n{SANDBOX_UID} {uid} 1\n"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{holder.pid}/{name}", "w") as f:
                f.write(mapping)
        fd = os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        holder.kill()
        holder.wait()
    drop = ["setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    args = ["--userns", str(fd), "--uid", "0", "--gid", "0", "--cap-drop", "ALL",
            "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    return Identity(args, (fd,), drop, uid)


def student_identity() -> Identity:
    if os.geteuid() == 0:
        # Writing the new namespace's uid_map fails now and then (EPERM) when several graders
        # start sandboxes at once (seen once in ~100 under a loaded test suite): try a fresh one.
        for attempt in range(3):
            try:
                return _root_identity()
            except OSError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")
    return Identity(["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
                     "--cap-drop", "ALL"], (), [], None)
