"""Trusted stand-ins for the student's functions, classes, modules and values.

Test cells run in the grader's process with these proxies in place of the student's objects,
so the same checks run here and in the student's kernel:

* a function or method call sends tensors into the sandbox and gets plain tensors back, with a
  seed, so that dropout draws the same masks for a forward and its backward; autograd works
  across the boundary (the backward asks the sandbox for a vector-Jacobian product of the graph
  the forward kept);
* a module lives in the sandbox and the grader holds a **handle** to it: a real ``nn.Module``
  mirror with the same submodules, parameters (tied ones tied) and buffers (persistent or not),
  so ``named_parameters``, ``state_dict``/``load_state_dict``, ``.to()``/``.double()``,
  ``.eval()`` behave as on the student's module. Submodules are mirrors too and can be called
  in place (``m.encoder.layers[0](x)``); any public method is callable (``m.encode(src)``);
  other attributes (``m.d_model``) are read on demand. Parameters travel once; afterwards a call
  carries only the tensors the grader changed;
* a module returned by a function, or built by an earlier cell (a trained model), comes back as
  such a mirror.

Everything that comes back is validated (``wire``) and typed here before a check sees it: a
malformed answer is the student's failure (:class:`StudentError`), never the grader's crash.
"""
from __future__ import annotations

import itertools
import time

import torch
from torch import nn

from ..checks.core import CheckFailure
from ..checks.memory import ACTIVE as ACTIVE_METER
from . import wire
from .codec import HANDLE, MODULE, CodecError, dtype_or_device, flatten, rebuild
from .process import Sandbox, SandboxFailure, SandboxTimeout


class StudentError(RuntimeError):
    """The student's code raised (or its process failed). ``student_type`` is the exception's
    type name in the student's process and ``student_mro`` its class names, so that messages and
    ``expect_raises`` read as they would in the student's kernel."""

    def __init__(self, text: str, mro: list | None = None):
        names = [wire.clean_text(m, 200) for m in mro[:50] if type(m) is str] if type(mro) is list else []
        self.student_mro = names or None
        self.student_type = names[0] if names else "Error"
        prefix = f"{self.student_type}: "
        super().__init__(text[len(prefix):] if names and text.startswith(prefix) else text)


class OutOfTime(BaseException):
    """The test cell used up its time. A BaseException, so that no check's ``except Exception``
    (which turns a student's error into a failed expectation) can swallow it and go on calling."""


class NotATensor:
    """Stands for a student result that could not travel (an object of the student's class,
    a Tensor subclass, a numpy array...). Checks report it by :func:`core.describe`."""

    def __init__(self, description: str):
        self.description = description

    def __check_describe__(self) -> str:
        return f"a value of type {self.description}"

    def __repr__(self):
        return f"<{self.description}>"


def _malformed(what: str) -> StudentError:
    return StudentError(f"{what}: malformed answer")


def _get(reply: dict, key: str, default):
    """A reply field, or ``default`` when absent (never ``x or default``: ``x`` may be a tensor)."""
    value = reply.get(key)
    return default if value is None else value


def _list_of(value, kind) -> bool:
    return type(value) is list and all(type(v) is kind for v in value)


def _tensor_list(got, what: str, n: int | None = None, allow_none: bool = False) -> list:
    """``got`` must be a list of plain tensors (of length ``n`` when given; ``None`` entries
    allowed where an input did not influence the output)."""
    ok = type(got) is list and (n is None or len(got) == n) and all(
        type(t) is torch.Tensor or (allow_none and t is None) for t in got)
    if not ok:
        raise _malformed(what)
    return got


class Session:
    """The grader's connection to one student's sandbox, shared by all proxies of a test cell.
    Every call gets at most the cell limit and at most what is left of ``deadline`` (the test
    cell's and the notebook's time, on the grader's clock)."""

    def __init__(self, sandbox: Sandbox, deadline: float | None = None):
        self.sandbox, self.deadline = sandbox, deadline
        self._call_ids = itertools.count(1)

    def ask(self, msg: dict) -> dict:
        """One request; inside a ``checks.memory.peak_memory()`` block, a call's peak memory
        is measured by the grader from outside the student's process and added to the block's meter."""
        meter = ACTIVE_METER.get() if msg.get("op") == "call" else None
        if meter is not None:
            self._ask({"op": "release_memory"}, False)
        reply = self._ask(msg, meter is not None)
        if meter is not None:
            meter.add(self.sandbox.last_peak_bytes)
        return reply

    def _ask(self, msg: dict, measure_memory: bool) -> dict:
        timeout = self.sandbox.limits.cell_seconds
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise OutOfTime()
            timeout = min(timeout, left)
        try:
            reply = self.sandbox.request(msg, timeout=timeout, measure_memory=measure_memory)
        except SandboxTimeout as exc:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise OutOfTime() from None
            raise StudentError(f"your code's process failed: {exc}") from None
        except SandboxFailure as exc:
            raise StudentError(f"your code's process failed: {exc}") from None
        if not reply["ok"]:
            raise StudentError(self.sandbox.text(reply, "error") or "unknown error", reply.get("mro"))
        return reply

    def next_call(self) -> tuple[int, int]:
        """A call id and a seed. The seed is drawn from the grader's global generator, so that
        ``torch.manual_seed(s)`` before two calls makes them draw the same dropout masks, as it
        would in the student's kernel."""
        seed = int(torch.empty((), dtype=torch.int64).random_(0, 2**62).item())
        return next(self._call_ids), seed

    def result(self, reply: dict):
        """A call's result: tensors, primitives, containers, mirrors of returned modules."""
        outs = _tensor_list(_get(reply, "tensors", []), "outputs")
        state = _tensor_list(_get(reply, "state", []), "modules")
        markers = {wire.NOT_A_TENSOR: lambda d: NotATensor(wire.clean_text(str(d), 300)),
                   MODULE: lambda d: mirror(self, d, state)}
        try:
            return outs, rebuild(reply.get("out"), outs, markers)
        except CodecError:
            raise _malformed("outputs") from None


# --------------------------------------------------------------------------------------------
# Calls with autograd

class _RemoteOp(torch.autograd.Function):
    """Forward: one call in the sandbox (already made). Backward: one vector-Jacobian product
    there, of the graph the call kept, for every input and parameter the call was asked about."""

    @staticmethod
    def forward(ctx, box: dict, *flat):
        ctx.box = box
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in flat]
        outs = box["outs"]
        nondiff = [t for t, rg in zip(outs, box["requires_grad"]) if not rg or not t.is_floating_point()]
        ctx.mark_non_differentiable(*nondiff)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        box = ctx.box
        reply = box["session"].ask(dict(box["request"], op="vjp",
                                        grad_outputs=[None if g is None else g.detach() for g in grad_outs]))
        got = _tensor_list(reply.get("grads"), "gradients", len(box["wrt"]), allow_none=True)
        grads: list = [None] * len(ctx.shapes)
        for i, g in zip(box["wrt"], got):
            if g is None:
                continue
            shape, dtype, device = ctx.shapes[i]
            if g.shape != shape:
                raise CheckFailure(f"a gradient has shape {tuple(g.shape)} but its input has shape {tuple(shape)}")
            grads[i] = g.to(dtype=dtype, device=device)
        return (None, *grads)


def _encode(args: tuple, kwargs: dict):
    """Arguments -> (args tree, kwargs tree, their tensors, the module mirrors among them)."""
    tensors: list = []
    modules: list = []

    def handle(obj):
        if isinstance(obj, RemoteModule):
            modules.append(obj)
            return {HANDLE: [obj._afs_root, obj._afs_path]}
        marker = dtype_or_device(obj)       # sinusoidal_encoding(..., dtype=torch.float64)
        if marker is not None:
            return marker
        raise TypeError(f"cannot send a {type(obj).__name__} to the student's code")

    return flatten(tuple(args), tensors, handle), flatten(dict(kwargs), tensors, handle), tensors, modules


def _invoke(session: Session, request: dict, args: tuple, kwargs: dict, params: dict | None = None):
    """Call the student's object in the sandbox with autograd support. ``params`` are the
    called module's mirrored parameters by name (they do not travel; their gradients do)."""
    params = params or {}
    tree_args, tree_kwargs, tensors, modules = _encode(args, kwargs)
    n_inputs = len(tensors)
    sync, sync_at, training = [], [], []
    tops = list({id(m._afs_top): m._afs_top for m in [*modules, *request.pop("modules", [])]}.values())
    for top in tops:
        for name, tensor in top._afs_changed():
            sync.append([top._afs_root, name])
            sync_at.append(len(tensors))
            tensors.append(tensor.detach())
        training += [[top._afs_root, path, m.training] for path, m in top.named_modules()]
    grad_on = torch.is_grad_enabled()
    wrt = [i for i in range(n_inputs) if grad_on and tensors[i].requires_grad]
    wrt_params = [name for name, p in params.items() if grad_on and p.requires_grad]
    call_id, seed = session.next_call()
    request = dict(request, args=tree_args, kwargs=tree_kwargs, tensors=tensors, sync=sync,
                   sync_at=sync_at, training=training, wrt=wrt, wrt_params=wrt_params,
                   call_id=call_id, seed=seed)
    reply = session.ask(dict(request, op="call"))
    for top in tops:
        top._afs_mark_synced()
    outs, result = session.result(reply)
    requires_grad = _get(reply, "requires_grad", [False] * len(outs))
    if not _list_of(requires_grad, bool) or len(requires_grad) != len(outs):
        raise _malformed("outputs")
    if (wrt or wrt_params) and outs:
        flat = [tensors[i] for i in range(n_inputs)] + [params[n] for n in wrt_params]
        box = {"session": session, "request": request, "outs": outs, "requires_grad": requires_grad,
               "wrt": wrt + list(range(n_inputs, n_inputs + len(wrt_params)))}
        new_outs = list(_RemoteOp.apply(box, *flat))
        swap = {id(o): n for o, n in zip(outs, new_outs)}
        result = _retensor(result, swap)
    return result


def _retensor(tree, swap: dict):
    if isinstance(tree, torch.Tensor):
        return swap.get(id(tree), tree)
    if type(tree) in (tuple, list):
        return type(tree)(_retensor(v, swap) for v in tree)
    if type(tree) is dict:
        return {k: _retensor(v, swap) for k, v in tree.items()}
    return tree


# --------------------------------------------------------------------------------------------
# Functions and classes by name

class _Remote:
    """Common part of proxies: the trusted copy of the student's source for forbid checks."""
    __afs_remote__ = True

    def __init__(self, session: Session, name: str, scope_source: str):
        self._session, self.__name__, self._scope_source = session, name, scope_source

    def __trusted_source__(self) -> str:
        return self._scope_source

    def __repr__(self):
        return f"<student's {self.__name__}>"


class RemoteFunction(_Remote):
    def __call__(self, *args, **kwargs):
        return _invoke(self._session, {"target": self.__name__}, args, kwargs)


class RemoteClass(_Remote):
    def __call__(self, *args, **kwargs):
        tree_args, tree_kwargs, tensors, _ = _encode(args, kwargs)
        _, seed = self._session.next_call()     # initial weights follow the grader's seed too
        reply = self._session.ask({"op": "new", "target": self.__name__, "args": tree_args, "seed": seed,
                                   "kwargs": tree_kwargs, "tensors": [t.detach() for t in tensors]})
        if reply.get("module") is None:
            return NotATensor(self._session.sandbox.text(reply, "type") + " (not an nn.Module)")
        module = mirror(self._session, reply["module"], _tensor_list(_get(reply, "state", []), "modules"))
        module.__dict__["_scope_source"] = self._scope_source
        return module


# --------------------------------------------------------------------------------------------
# Modules by handle

CONTAINERS = {"torch.nn.modules.container.ModuleList", "torch.nn.modules.container.Sequential",
              "torch.nn.modules.container.ModuleDict"}


class RemoteModule(nn.Module):
    """A mirror of one of the student's modules (or submodules) living in the sandbox."""
    __afs_remote__ = True

    def __init__(self, session: Session, root: int, path: str, type_name: str):
        super().__init__()
        d = self.__dict__      # plain attributes, never registered as submodules
        d["_afs_session"], d["_afs_root"], d["_afs_path"], d["_afs_type"] = session, root, path, type_name
        d["_afs_top"], d["_afs_synced"], d["_afs_ready"] = self, {}, False

    # -- reading the student's module ------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)        # parameters, buffers, submodules
        except AttributeError:
            # Private and protocol names stay here, and nothing is asked while the mirror is
            # being built (nn.Module's own hasattr checks would otherwise reach the sandbox).
            if name.startswith("_") or not self.__dict__.get("_afs_ready"):
                raise
        reply = self._afs_session.ask({"op": "get", "ref": [self._afs_root, self._afs_path_list()],
                                       "name": name})
        if reply.get("kind") == "method":
            return RemoteMethod(self, name)
        if reply.get("kind") != "value":
            raise _malformed(f"attribute {name!r}")
        return self._afs_session.result(reply)[1]

    def _afs_path_list(self) -> list[str]:
        return self._afs_path.split(".") if self._afs_path else []

    def forward(self, *args, **kwargs):
        return self._afs_call(None, args, kwargs)

    def _afs_call(self, method: str | None, args: tuple, kwargs: dict):
        prefix = f"{self._afs_path}." if self._afs_path else ""
        params = {prefix + n: p for n, p in self.named_parameters()}
        request = {"ref": [self._afs_root, self._afs_path_list()], "method": method, "modules": [self]}
        return _invoke(self._afs_session, request, args, kwargs, params)

    # -- keeping the sandbox's copy in step with this mirror ---------------------------------
    def _afs_state(self) -> dict:
        state = dict(self.named_parameters())
        state.update(dict(self.named_buffers()))
        return state

    @staticmethod
    def _stamp(t: torch.Tensor) -> tuple:
        return id(t), t._version, t.dtype, t.device, tuple(t.shape)

    def _afs_changed(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) for what changed here since the sandbox last saw it (on the top)."""
        return [(n, t) for n, t in self._afs_state().items() if self._afs_synced.get(n) != self._stamp(t)]

    def _afs_mark_synced(self) -> None:
        self.__dict__["_afs_synced"] = {n: self._stamp(t) for n, t in self._afs_state().items()}

    def __trusted_source__(self) -> str | None:
        return self.__dict__.get("_scope_source")

    def extra_repr(self):
        return f"student's {self._afs_type}"


class RemoteContainer(RemoteModule):
    """Mirror of a ModuleList / Sequential / ModuleDict: indexing, length and iteration."""

    def __getitem__(self, key):
        if isinstance(key, int):
            n = len(self._modules)
            if not -n <= key < n:
                raise IndexError(f"index {key} is out of range")
            key = str(key % n)
        return self._modules[key]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values() if not self._afs_type.endswith("ModuleDict") else self._modules)


class RemoteMethod:
    """A public method of the student's module, called on the sandbox's copy."""
    __afs_remote__ = True

    def __init__(self, module: RemoteModule, name: str):
        self._module, self.__name__ = module, name

    def __call__(self, *args, **kwargs):
        return self._module._afs_call(self.__name__, args, kwargs)

    def __repr__(self):
        return f"<student's method {self.__name__} of {self._module._afs_type}>"


def mirror(session: Session, desc, state: list) -> RemoteModule:
    """Build the mirror of a module the sandbox described (see ``runner.describe``)."""
    try:
        return _mirror(session, desc, state)
    except StudentError:
        raise
    except Exception as exc:  # noqa: BLE001 - any inconsistency is a malformed description
        raise StudentError(f"your module could not be mirrored ({type(exc).__name__}: "
                           f"{wire.clean_text(str(exc), 200)})") from None


def _mirror(session: Session, desc, state: list) -> RemoteModule:
    if type(desc) is not dict or type(desc.get("handle")) is not int or type(desc.get("modules")) is not list:
        raise _malformed("module")
    modules, params, buffers = desc["modules"], desc.get("params"), desc.get("buffers")
    if not (all(_list_of(m, str) and len(m) == 2 for m in modules) and modules and modules[0][0] == ""
            and type(params) is list and type(buffers) is list):
        raise _malformed("module")
    root = desc["handle"]
    nodes: dict[str, RemoteModule] = {}
    for path, type_name in modules:
        cls = RemoteContainer if type_name in CONTAINERS else RemoteModule
        node = cls(session, root, path, type_name)
        if path:
            parent, _, leaf = path.rpartition(".")
            nodes[parent].add_module(leaf, node)
            node.__dict__["_afs_top"] = nodes[""]
        nodes[path] = node
    made: dict[int, nn.Parameter] = {}
    for entry in params:
        name, key, requires_grad = entry
        tensor = state[key]
        owner, _, leaf = name.rpartition(".")
        if key not in made:
            made[key] = nn.Parameter(tensor, requires_grad=bool(requires_grad) and tensor.is_floating_point())
        nodes[owner].register_parameter(leaf, made[key])
    for name, key, persistent in buffers:
        owner, _, leaf = name.rpartition(".")
        nodes[owner].register_buffer(leaf, state[key], persistent=bool(persistent))
    top = nodes[""]
    top._afs_mark_synced()
    for node in nodes.values():
        node.__dict__["_afs_ready"] = True
    return top


def make_proxy(session: Session, name: str, scope_source: str):
    """A proxy for the student's ``name`` of the right kind (a function, a class, a module, a
    plain value), or None if it is not defined."""
    reply = session.ask({"op": "lookup", "name": name})
    kind = reply.get("kind")
    if kind == "class":
        return RemoteClass(session, name, scope_source)
    if kind == "callable":
        return RemoteFunction(session, name, scope_source)
    if kind == "module":
        module = mirror(session, reply.get("module"), _tensor_list(_get(reply, "state", []), "modules"))
        module.__dict__["_scope_source"] = scope_source
        return module
    if kind == "value":
        return session.result(reply)[1]
    return None
