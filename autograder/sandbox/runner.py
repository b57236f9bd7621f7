"""The process that runs a student's notebook, inside the sandbox.

Started by ``autograder.sandbox.process`` under bubblewrap as
``python -m autograder.sandbox.runner IN_FD OUT_FD``. It executes cells in an IPython shell and
answers the grader's requests (call a function, build a module, compute a vector-Jacobian
product) on the student's objects. Nothing here is trusted: the student can change any of it
from a cell, which can only spoil their own answers, because the grader validates everything
it receives and decides verdicts in its own process.
"""
from __future__ import annotations

import io
import os
import signal
import sys
import traceback

CAP = 20_000  # characters of output kept per cell


class CappedWriter(io.TextIOBase):
    """Keeps the first CAP characters written, counts the rest."""

    def __init__(self):
        self.parts, self.kept, self.dropped = [], 0, 0

    def writable(self):
        return True

    def write(self, s):
        s = str(s)
        room = CAP - self.kept
        if room > 0:
            self.parts.append(s[:room])
            self.kept += min(room, len(s))
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def text(self):
        out = "".join(self.parts)
        if self.dropped:
            out += f"\n[... {self.dropped} more characters of output not shown]"
        return out


def _on_alarm(signum, frame):
    raise TimeoutError("timed out")


def main(fd_in: int, fd_out: int) -> None:
    import torch  # noqa: F401 - imported before student code runs, as in a normal notebook
    from IPython.core.interactiveshell import InteractiveShell

    from autograder.sandbox import wire

    shell = InteractiveShell.instance(colors="NoColor")
    shell.user_ns["__name__"] = "__main__"
    handles: dict[int, object] = {}
    signal.signal(signal.SIGALRM, _on_alarm)

    def read_frame():
        head = _read_exact(fd_in, wire.HEADER.size)
        if head is None:
            return None
        (n,) = wire.HEADER.unpack(head)
        return torch.load(io.BytesIO(_read_exact(fd_in, n)), weights_only=True)

    while True:
        req = read_frame()
        if req is None:
            return
        timeout = float(req.get("timeout", 0) or 0)
        out, err = CappedWriter(), CappedWriter()
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, timeout)
            reply = _handle(req, shell, handles)
        except BaseException as exc:  # noqa: BLE001 - every student failure becomes a reply
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "mro": [c.__name__ for c in type(exc).__mro__],
                     "traceback": "".join(traceback.format_exception(exc)[-6:])[-4000:]}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            sys.stdout, sys.stderr = old
        reply["stdout"], reply["stderr"] = out.text(), err.text()
        try:
            wire.write_frame(fd_out, reply)
        except Exception as exc:  # noqa: BLE001 - e.g. a result torch.save cannot write
            wire.write_frame(fd_out, {"ok": False, "error": f"could not send the answer back: {exc}",
                                      "stdout": out.text(), "stderr": err.text()})


def _read_exact(fd, n):
    chunks, left = [], n
    while left:
        b = os.read(fd, left)
        if not b:
            return None
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------

def _pack(obj, tensors):
    """Student result -> wire tree; anything that is not a plain tensor or primitive is named."""
    import torch
    from autograder.sandbox.wire import NOT_A_TENSOR, PRIMITIVES, TENSOR
    if type(obj) is torch.Tensor:
        tensors.append(obj)
        return {TENSOR: len(tensors) - 1}
    if isinstance(obj, torch.Tensor):
        return {NOT_A_TENSOR: f"{type(obj).__name__} (a Tensor subclass)"}
    if type(obj) in PRIMITIVES:
        return obj
    if type(obj) in (tuple, list):
        return type(obj)(_pack(v, tensors) for v in obj)
    return {NOT_A_TENSOR: f"{type(obj).__module__}.{type(obj).__qualname__}"}


def _unpack(tree, tensors):
    from autograder.sandbox.wire import TENSOR
    if isinstance(tree, dict) and set(tree) == {TENSOR}:
        return tensors[tree[TENSOR]]
    if isinstance(tree, (tuple, list)):
        return type(tree)(_unpack(v, tensors) for v in tree)
    if isinstance(tree, dict):
        return {k: _unpack(v, tensors) for k, v in tree.items()}
    return tree


def _handle(req, shell, handles):
    import torch
    op = req["op"]
    if op == "run_cell":
        result = shell.run_cell(req["source"], store_history=True)
        error = result.error_before_exec or result.error_in_exec
        return {"ok": True, "error": None if error is None else f"{type(error).__name__}: {error}",
                "timed_out": isinstance(error, (TimeoutError, KeyboardInterrupt))}
    if op == "lookup":
        obj = shell.user_ns.get(req["name"], _MISSING)
        if obj is _MISSING:
            return {"ok": True, "kind": "missing"}
        kind = "class" if isinstance(obj, type) else "callable" if callable(obj) else "other"
        return {"ok": True, "kind": kind, "type": f"{type(obj).__module__}.{type(obj).__qualname__}"}

    tensors = list(req.get("tensors", []))
    wrt = req.get("wrt") or []
    with torch.enable_grad():
        for i in wrt:
            tensors[i] = tensors[i].detach().requires_grad_()
        args = _unpack(req.get("args", ()), tensors)
        kwargs = _unpack(req.get("kwargs", {}), tensors)
        if op == "new":
            cls = shell.user_ns[req["target"]]
            module = cls(*args, **kwargs)
            if not isinstance(module, torch.nn.Module):
                return {"ok": True, "handle": None,
                        "type": f"{type(module).__module__}.{type(module).__qualname__}"}
            handles[len(handles) + 1] = module
            params = dict(module.named_parameters())
            state = module.state_dict()
            names = list(state)
            return {"ok": True, "handle": len(handles), "names": names,
                    "is_param": [n in params for n in names],
                    "state": [state[n].detach().clone() for n in names]}
        if "handle" in req:
            module = handles[req["handle"]]
            module.train(bool(req.get("training", False)))
            n_state = len(req["names"])
            state = dict(zip(req["names"], tensors[len(tensors) - n_state:]))
            result = torch.func.functional_call(module, state, tuple(args), kwargs)
        else:
            result = shell.user_ns[req["target"]](*args, **kwargs)
        out_tensors: list = []
        tree = _pack(result, out_tensors)
        if op == "call":
            return {"ok": True, "out": tree,
                    "requires_grad": [bool(t.requires_grad) for t in out_tensors],
                    "tensors": [t.detach().contiguous().clone() for t in out_tensors]}
        # op == "vjp": gradients of sum(out_i * grad_out_i) with respect to the tensors in wrt.
        pairs = [(o, g) for o, g in zip(out_tensors, req["grad_outputs"]) if g is not None and o.requires_grad]
        if not pairs:
            raise RuntimeError("no output of this call requires grad")
        got = torch.autograd.grad([o for o, _ in pairs], [tensors[i] for i in wrt],
                                  [g for _, g in pairs], allow_unused=True)
        return {"ok": True, "grads": [None if g is None else g.detach().contiguous().clone() for g in got]}


_MISSING = object()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
