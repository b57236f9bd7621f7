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
    state = _State(shell)
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
        _reap_children()
        timeout = float(req.get("timeout", 0) or 0)
        out, err = CappedWriter(), CappedWriter()
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, timeout)
            reply = OPS[req["op"]](req, state)
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


def _reap_children() -> None:
    """Collect children the grader killed after the last cell, so they do not linger as
    zombies (which still count as processes)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


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
# The grader's requests. Objects the grader holds (modules) are kept here by handle; a module
# is described once (its submodules, parameters, buffers and their values) and afterwards only
# the tensors the grader changed travel in (``sync``). A call with gradients keeps its graph for
# the backward request, which is also given the same seed, so dropout masks match.

_CACHED_CALLS = 4


class _State:
    def __init__(self, shell):
        self.shell = shell
        self.objects: dict[int, object] = {}
        self.calls: dict[int, tuple] = {}     # call id -> (inputs, params, outputs), newest last

    def add(self, obj) -> int:
        for handle, known in self.objects.items():
            if known is obj:
                return handle
        self.objects[len(self.objects) + 1] = obj
        return len(self.objects)

    def resolve(self, ref):
        """``[root handle, path]`` -> the object; a path step is an attribute or an index."""
        root, path = ref
        obj = self.objects[root]
        for step in path:
            obj = obj[step] if type(step) is int else getattr(obj, step)
        return obj

    def remember(self, call_id, entry) -> None:
        self.calls[call_id] = entry
        while len(self.calls) > _CACHED_CALLS:
            del self.calls[next(iter(self.calls))]


def describe(state: _State, module, tensors: list) -> dict:
    """A module as the grader mirrors it: submodules, parameters (tied ones share a key) and
    buffers with their persistence, the values appended to ``tensors`` once per key."""
    from autograder.sandbox.codec import type_name
    keys: dict[int, int] = {}

    def key(t):
        if id(t) not in keys:
            keys[id(t)] = len(tensors)
            tensors.append(t.detach().contiguous().clone())
        return keys[id(t)]

    modules = [[name, type_name(m)] for name, m in module.named_modules()]
    params = [[name, key(p), bool(p.requires_grad)]
              for name, p in module.named_parameters(remove_duplicate=False)]
    buffers = []
    for name, b in module.named_buffers(remove_duplicate=False):
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path)
        buffers.append([name, key(b), leaf not in owner._non_persistent_buffers_set])
    return {"handle": state.add(module), "type": type_name(module), "modules": modules,
            "params": params, "buffers": buffers}


def _pack(state: _State, result) -> dict:
    """A result -> reply fields: modules are described (and kept), other objects named."""
    import torch
    from autograder.sandbox.codec import MODULE, flatten, not_a_tensor

    outputs: list = []
    module_state: list = []

    def other(obj):
        if isinstance(obj, torch.nn.Module):
            return {MODULE: describe(state, obj, module_state)}
        return not_a_tensor(obj)

    tree = flatten(result, outputs, other)
    return {"ok": True, "out": tree, "requires_grad": [bool(t.requires_grad) for t in outputs],
            "tensors": [t.detach().contiguous().clone() for t in outputs], "state": module_state}


def _arguments(req, state: _State):
    """The request's tensors, and a function that rebuilds its argument trees from them."""
    from autograder.sandbox.codec import HANDLE, PLAIN_MARKERS, rebuild
    tensors = list(req.get("tensors", []))
    markers = {**PLAIN_MARKERS, HANDLE: state.resolve}
    return tensors, (lambda tree: rebuild(tree, tensors, markers))


def _tensors_of(result) -> list:
    from autograder.sandbox.codec import flatten
    found: list = []
    flatten(result, found, lambda obj: None)
    return found


def _sync(req, state: _State, tensors: list) -> None:
    """Put the grader's changed parameters and buffers into the student's modules, in place
    (``.data``, as ``Module.to`` does), so tied parameters stay tied."""
    import torch
    with torch.no_grad():
        for (root, name), index in zip(req.get("sync", []), req.get("sync_at", [])):
            module = state.objects[root]
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path)
            value = tensors[index]
            if leaf in owner._parameters and owner._parameters[leaf] is not None:
                owner._parameters[leaf].data = value
            else:
                owner._buffers[leaf] = value
        for root, path, flag in req.get("training", []):
            state.objects[root].get_submodule(path).training = bool(flag)


def _target(req, state: _State):
    if "target" in req:
        return state.shell.user_ns[req["target"]]
    obj = state.resolve(req["ref"])
    return obj if req.get("method") is None else getattr(obj, req["method"])


def _forward(req, state: _State):
    """Run the requested call with the request's seed; return (inputs, params, outputs, result)."""
    import torch
    tensors, unpack = _arguments(req, state)
    _sync(req, state, tensors)
    if req.get("seed") is not None:
        torch.manual_seed(int(req["seed"]))
    with torch.enable_grad():
        for i in req.get("wrt", []):
            tensors[i] = tensors[i].detach().requires_grad_()
        args, kwargs = unpack(req.get("args", ())), unpack(req.get("kwargs", {}))
        root = req["ref"][0] if "ref" in req else None
        params = [state.objects[root].get_parameter(n) for n in req.get("wrt_params", [])]
        result = _target(req, state)(*args, **kwargs)
    return [tensors[i] for i in req.get("wrt", [])], params, result


def op_call(req, state: _State) -> dict:
    inputs, params, result = _forward(req, state)
    reply = _pack(state, result)
    if inputs or params:     # keep the graph for the backward request
        state.remember(req.get("call_id"), (inputs, params, _tensors_of(result)))
    return reply


def op_vjp(req, state: _State) -> dict:
    """Gradients of sum(out_i * grad_out_i) with respect to the call's inputs and parameters,
    from the graph the call kept (or from the same call again, with the same seed)."""
    import torch
    entry = state.calls.get(req.get("call_id"))
    if entry is None:
        inputs, params, result = _forward(req, state)
        entry = (inputs, params, _tensors_of(result))
    inputs, params, outputs = entry
    pairs = [(o, g) for o, g in zip(outputs, req["grad_outputs"]) if g is not None and o.requires_grad]
    if not pairs:
        raise RuntimeError("no output of this call requires grad")
    got = torch.autograd.grad([o for o, _ in pairs], [*inputs, *params], [g for _, g in pairs],
                              allow_unused=True, retain_graph=True)
    return {"ok": True, "grads": [None if g is None else g.detach().contiguous().clone() for g in got]}


def op_new(req, state: _State) -> dict:
    import torch
    from autograder.sandbox.codec import type_name
    _, unpack = _arguments(req, state)
    if req.get("seed") is not None:
        torch.manual_seed(int(req["seed"]))
    obj = state.shell.user_ns[req["target"]](*unpack(req.get("args", ())), **unpack(req.get("kwargs", {})))
    if not isinstance(obj, torch.nn.Module):
        return {"ok": True, "module": None, "type": type_name(obj)}
    module_state: list = []
    return {"ok": True, "module": describe(state, obj, module_state), "state": module_state}


def op_get(req, state: _State) -> dict:
    """An attribute of a kept object: a value, a module (described), or "a method"."""
    import torch
    value = getattr(state.resolve(req["ref"]), req["name"])
    if callable(value) and not isinstance(value, torch.nn.Module):
        return {"ok": True, "kind": "method"}
    return dict(_pack(state, value), kind="value")


def op_run_cell(req, state: _State) -> dict:
    result = state.shell.run_cell(req["source"], store_history=True)
    error = result.error_before_exec or result.error_in_exec
    return {"ok": True, "error": None if error is None else f"{type(error).__name__}: {error}"}


def op_lookup(req, state: _State) -> dict:
    import torch
    from autograder.sandbox.codec import type_name
    obj = state.shell.user_ns.get(req["name"], _MISSING)
    if obj is _MISSING:
        return {"ok": True, "kind": "missing"}
    if isinstance(obj, type):
        return {"ok": True, "kind": "class"}
    if isinstance(obj, torch.nn.Module):
        module_state: list = []
        return {"ok": True, "kind": "module", "module": describe(state, obj, module_state), "state": module_state}
    if callable(obj):
        return {"ok": True, "kind": "callable"}
    return dict(_pack(state, obj), kind="value", type=type_name(obj))


def op_release_memory(req, state: _State) -> dict:
    """Before the grader measures a call's memory from outside: make the resident set follow
    live memory (checks.memory.release_free_memory)."""
    from autograder.checks.memory import release_free_memory
    release_free_memory()
    return {"ok": True}


OPS = {"release_memory": op_release_memory, "run_cell": op_run_cell, "lookup": op_lookup, "new": op_new, "call": op_call,
       "vjp": op_vjp, "get": op_get}
_MISSING = object()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
