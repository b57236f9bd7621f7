"""The one tree codec for values crossing the sandbox boundary, used on both sides.

A value travels as a *tree* of primitives, tuples, lists and str-keyed dicts, with every tensor
replaced by ``{"__t__": i}`` (its index in the message's flat tensor list) and every object that
cannot travel replaced by a one-key *marker* dict that the other side turns back into something
(a module handle, a description of a foreign object). Each side says what to do with objects
and markers; the walk itself is written once, here.
"""
from __future__ import annotations

from typing import Callable

import torch

from .wire import NOT_A_TENSOR, PRIMITIVES, TENSOR

HANDLE = "__handle__"   # {"__handle__": [root, path]}: an object living in the sandbox
MODULE = "__module__"   # {"__module__": description}: a module the sandbox just handed out
DTYPE = "__dtype__"     # {"__dtype__": "float64"}: a torch.dtype argument
DEVICE = "__device__"   # {"__device__": "cuda:0"}: a torch.device argument


class CodecError(ValueError):
    """A tree that does not follow the format (only the student's side sends those)."""


def flatten(obj, tensors: list, other: Callable[[object], object]):
    """Value -> tree, appending tensors to ``tensors``; ``other(obj)`` encodes anything else."""
    if type(obj) is torch.Tensor:
        tensors.append(obj)
        return {TENSOR: len(tensors) - 1}
    if type(obj) in PRIMITIVES:
        return obj
    if type(obj) in (tuple, list):
        return type(obj)(flatten(v, tensors, other) for v in obj)
    if type(obj) is dict and all(type(k) is str for k in obj):
        return {k: flatten(v, tensors, other) for k, v in obj.items()}
    return other(obj)


def rebuild(tree, tensors: list, markers: dict[str, Callable[[object], object]]):
    """Tree -> value; ``markers[key](payload)`` rebuilds a ``{key: payload}`` marker."""
    if type(tree) is dict:
        if len(tree) == 1:
            ((key, payload),) = tree.items()
            if key == TENSOR:
                if type(payload) is not int or not 0 <= payload < len(tensors):
                    raise CodecError("a tensor index is out of range")
                return tensors[payload]
            if key in markers:
                return markers[key](payload)
        return {k: rebuild(v, tensors, markers) for k, v in tree.items()}
    if type(tree) in (tuple, list):
        return type(tree)(rebuild(v, tensors, markers) for v in tree)
    return tree


def dtype_or_device(obj) -> dict | None:
    """The marker for a ``torch.dtype`` or ``torch.device`` argument, or None."""
    if isinstance(obj, torch.dtype):
        return {DTYPE: str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {DEVICE: str(obj)}
    return None


def _dtype(name) -> torch.dtype:
    value = getattr(torch, name, None) if type(name) is str else None
    if not isinstance(value, torch.dtype):
        raise CodecError(f"not a dtype: {name!r}")
    return value


def _device(name) -> torch.device:
    if type(name) is not str:
        raise CodecError(f"not a device: {name!r}")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise CodecError(f"not a device: {name!r}") from exc


#: Markers every side rebuilds the same way (add a handle resolver where handles may come).
PLAIN_MARKERS = {DTYPE: _dtype, DEVICE: _device}


def type_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def not_a_tensor(obj) -> dict:
    """The marker for a result that cannot travel, naming its type for the student."""
    if isinstance(obj, torch.Tensor):
        return {NOT_A_TENSOR: f"{type(obj).__name__} (a Tensor subclass)"}
    return {NOT_A_TENSOR: type_name(obj)}
