"""Trusted stand-ins for the student's functions and modules.

Test cells run in the grader's process with these proxies in place of the student's objects.
A call sends tensors into the sandbox and gets plain tensors back; autograd works across the
boundary (the backward pass asks the sandbox for a vector-Jacobian product), and a module proxy
is a real ``nn.Module`` mirroring the student's parameters, so ``named_parameters``,
``load_state_dict``, ``.to()`` and ``.double()`` behave as on the student's own module.
"""
from __future__ import annotations

import torch
from torch import nn

import time

from ..checks.core import CheckFailure
from . import wire
from .process import Sandbox, SandboxFailure, SandboxTimeout


class StudentError(RuntimeError):
    """The student's code raised (or its process failed); ``student_type`` is the exception's
    type name in the student's process, so messages read as they would in the student's kernel."""

    def __init__(self, text: str, mro: list | None = None):
        names = [wire.clean_text(m, 200) for m in mro[:50] if type(m) is str] if type(mro) is list else []
        self.student_mro = names or None
        kind, sep, rest = text.partition(": ")
        if names:
            self.student_type, message = names[0], rest if sep and kind == names[0] else text
        elif sep and kind.isidentifier():
            self.student_type, message = kind, rest
        else:
            self.student_type, message = "Error", text
        super().__init__(message)


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


def _flatten(tree, tensors: list):
    if isinstance(tree, torch.Tensor):
        tensors.append(tree)
        return {wire.TENSOR: len(tensors) - 1}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_flatten(v, tensors) for v in tree)
    if isinstance(tree, dict):
        return {k: _flatten(v, tensors) for k, v in tree.items()}
    if tree is None or isinstance(tree, (int, float, bool, str)):
        return tree
    raise TypeError(f"cannot send a {type(tree).__name__} to the student's code")


def _rebuild(tree, tensors: list):
    if isinstance(tree, dict) and set(tree) == {wire.TENSOR}:
        i = tree[wire.TENSOR]
        if type(i) is not int or not 0 <= i < len(tensors):
            raise StudentError("outputs: malformed answer")
        return tensors[i]
    if isinstance(tree, dict) and set(tree) == {wire.NOT_A_TENSOR}:
        return NotATensor(wire.clean_text(str(tree[wire.NOT_A_TENSOR]), 300))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_rebuild(v, tensors) for v in tree)
    if isinstance(tree, dict):
        return {k: _rebuild(v, tensors) for k, v in tree.items()}
    return tree


class Session:
    """The grader's connection to one student's sandbox, shared by all proxies of a test cell.
    Every call gets at most the cell limit and at most what is left of ``deadline`` (the test
    cell's and the notebook's time, on the grader's clock)."""

    def __init__(self, sandbox: Sandbox, deadline: float | None = None):
        self.sandbox, self.deadline = sandbox, deadline

    def ask(self, msg: dict) -> dict:
        timeout = self.sandbox.limits.cell_seconds
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise OutOfTime()
            timeout = min(timeout, left)
        try:
            reply = self.sandbox.request(msg, timeout=timeout)
        except SandboxTimeout as exc:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise OutOfTime() from None
            raise StudentError(f"your code's process failed: {exc}") from None
        except SandboxFailure as exc:
            raise StudentError(f"your code's process failed: {exc}") from None
        if not reply["ok"]:
            raise StudentError(self.sandbox.text(reply, "error") or "unknown error", reply.get("mro"))
        return reply


def _get(reply: dict, key: str, default):
    """A reply field, or ``default`` when absent (never ``x or default``: ``x`` may be a tensor)."""
    value = reply.get(key)
    return default if value is None else value


def _list_of(value, kind) -> bool:
    return type(value) is list and all(type(v) is kind for v in value)


def _check_tensor_list(got, what: str, n: int | None = None, allow_none: bool = False) -> list:
    """``got`` must be a list of plain tensors (of length ``n`` when given; ``None`` entries
    allowed where an input did not influence the output)."""
    ok = isinstance(got, list) and (n is None or len(got) == n) and all(
        type(t) is torch.Tensor or (allow_none and t is None) for t in got)
    if not ok:
        raise StudentError(f"{what}: malformed answer")
    return got


class _RemoteOp(torch.autograd.Function):
    """Forward: one call in the sandbox. Backward: one vector-Jacobian product there."""

    @staticmethod
    def forward(ctx, box: dict, *flat):
        ctx.box = box
        ctx.save_for_backward(*flat)
        outs = box["outs"]
        nondiff = [t for t, rg in zip(outs, box["requires_grad"]) if not rg or not t.is_floating_point()]
        ctx.mark_non_differentiable(*nondiff)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        box, flat = ctx.box, ctx.saved_tensors
        wrt = [i for i in range(len(flat)) if ctx.needs_input_grad[i + 1]]
        reply = box["session"].ask(dict(box["request"], op="vjp", wrt=wrt,
                                        tensors=[t.detach() for t in flat],
                                        grad_outputs=[None if g is None else g.detach() for g in grad_outs]))
        got = _check_tensor_list(reply.get("grads"), "gradients", len(wrt), allow_none=True)
        grads: list = [None] * len(flat)
        for i, g in zip(wrt, got):
            if g is None:
                continue
            if g.shape != flat[i].shape:
                raise CheckFailure(f"a gradient has shape {tuple(g.shape)} but its input has shape "
                                   f"{tuple(flat[i].shape)}")
            grads[i] = g.to(dtype=flat[i].dtype, device=flat[i].device)
        return (None, *grads)


def _invoke(session: Session, request: dict, args: tuple, kwargs: dict, extra: list | None = None):
    """Call the student's object in the sandbox with autograd support."""
    tensors: list = []
    tree_args = _flatten(tuple(args), tensors)
    tree_kwargs = _flatten(dict(kwargs), tensors)
    flat = tensors + list(extra or [])
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in flat)
    wrt = [i for i, t in enumerate(flat) if t.requires_grad] if need_grad else []
    request = dict(request, args=tree_args, kwargs=tree_kwargs)
    reply = session.ask(dict(request, op="call", wrt=wrt, tensors=[t.detach() for t in flat]))
    outs = _check_tensor_list(_get(reply, "tensors", []), "outputs")
    requires_grad = _get(reply, "requires_grad", [False] * len(outs))
    if not _list_of(requires_grad, bool) or len(requires_grad) != len(outs):
        raise StudentError("outputs: malformed answer")
    if need_grad and outs:
        box = {"session": session, "request": request, "outs": outs, "requires_grad": requires_grad}
        outs = list(_RemoteOp.apply(box, *flat))
    return _rebuild(reply.get("out"), outs)


class _Remote:
    """Common part of proxies: the trusted copy of the student's source for forbid checks."""

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
        tensors: list = []
        tree_args = _flatten(tuple(args), tensors)
        tree_kwargs = _flatten(dict(kwargs), tensors)
        reply = self._session.ask({"op": "new", "target": self.__name__, "args": tree_args,
                                   "kwargs": tree_kwargs, "tensors": [t.detach() for t in tensors]})
        if reply.get("handle") is None:
            return NotATensor(self._session.sandbox.text(reply, "type") + " (not an nn.Module)")
        names, is_param = reply.get("names"), reply.get("is_param")
        if type(reply["handle"]) is not int or not _list_of(names, str) or not _list_of(is_param, bool) \
                or len(names) != len(is_param) or any(not n or len(n) > 1000 for n in names):
            raise StudentError("your module: malformed answer")
        state = _check_tensor_list(reply.get("state"), "parameters", len(names))
        return RemoteModule(self._session, reply["handle"], names, is_param, state, self.__name__)


class RemoteModule(nn.Module):
    """A real nn.Module holding a mirror of the student's parameters and buffers."""

    def __init__(self, session, handle, names, is_param, state, class_name):
        super().__init__()
        self._session, self._handle, self._class_name = session, handle, class_name
        for name, param, tensor in zip(names, is_param, state):
            owner = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            if param:
                owner.register_parameter(leaf, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))
            else:
                owner.register_buffer(leaf, tensor)

    def forward(self, *args, **kwargs):
        state = dict(self.named_parameters())
        state.update(dict(self.named_buffers()))
        names = list(state)
        return _invoke(self._session, {"handle": self._handle, "names": names, "training": self.training},
                       args, kwargs, extra=[state[n] for n in names])

    def extra_repr(self):
        return f"student's {self._class_name}"


def make_proxy(session: Session, name: str, scope_source: str):
    """A proxy for the student's ``name``, of the right kind, or None if it is not defined."""
    reply = session.ask({"op": "lookup", "name": name})
    kind = reply.get("kind")   # anything but these two strings means "not defined"
    if kind == "class":
        return RemoteClass(session, name, scope_source)
    if kind == "callable":
        return RemoteFunction(session, name, scope_source)
    return None
