"""Framing and safe decoding for messages between the grader and the sandboxed student process.

A frame is an 8-byte big-endian length followed by ``torch.save`` bytes of a dict. The grader
decodes the student's side with ``torch.load(weights_only=True)`` (no arbitrary pickles) after a
size check, then :func:`validate` walks the result and admits only plain tensors and Python
primitives: nothing of the student's classes can cross.
"""
from __future__ import annotations

import io
import os
import struct

import torch

HEADER = struct.Struct(">Q")
TENSOR = "__t__"          # {"__t__": i}: the i-th tensor of the message's flat tensor list
NOT_A_TENSOR = "__nontensor__"  # {"__nontensor__": "description"}: a value that cannot travel


class WireError(RuntimeError):
    """A malformed, oversized or unsafe message from the student's side."""


def encode(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    return HEADER.pack(len(data)) + data


def decode(data: bytes):
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location=None)
    except Exception as exc:  # noqa: BLE001 - anything unreadable is the student's failure
        raise WireError(f"the answer could not be read safely ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def write_frame(fd: int, obj) -> None:
    data = encode(obj)
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


PRIMITIVES = (int, float, bool, str, type(None))


def validate(obj, *, max_tensor_bytes: int, depth: int = 0):
    """Admit only plain dense tensors, primitives, and tuples/lists/dicts of them."""
    if depth > 20:
        raise WireError("the answer is nested too deeply")
    if type(obj) is torch.Tensor:
        if obj.layout != torch.strided or obj.is_meta or obj.is_quantized:
            raise WireError(f"the answer has an unsupported tensor layout ({obj.layout})")
        if obj.numel() * obj.element_size() > max_tensor_bytes:
            raise WireError("the answer has a tensor larger than the size limit")
        return obj
    if isinstance(obj, torch.Tensor):
        raise WireError(f"the answer has a {type(obj).__name__}, not a plain torch.Tensor")
    if type(obj) in PRIMITIVES:
        return obj
    if type(obj) in (tuple, list):
        return type(obj)(validate(v, max_tensor_bytes=max_tensor_bytes, depth=depth + 1) for v in obj)
    if type(obj) is dict:
        return {validate(k, max_tensor_bytes=max_tensor_bytes, depth=depth + 1):
                validate(v, max_tensor_bytes=max_tensor_bytes, depth=depth + 1) for k, v in obj.items()}
    raise WireError(f"the answer contains a value of type {type(obj).__name__}")
