"""Framing and safe decoding for messages between the grader and the sandboxed student process.

A frame is an 8-byte big-endian length followed by ``torch.save`` bytes of a dict. The student's
side is hostile, so the grader reads a frame with :func:`read_message`, which measures everything
itself before it spends memory or time on it:

1. :func:`decode` checks the zip archive that ``torch.save`` writes (entries stored, not
   compressed, with a bounded total size, a small pickle and a bounded number of entries), checks
   that the pickle names only tensors' own rebuild functions, and only then runs
   ``torch.load(weights_only=True)``;
2. :func:`validate` walks the result within a budget (values visited, nesting, tensor bytes,
   text, integer range), admits only plain tensors and Python primitives, so that nothing of the
   student's classes can cross, and returns a fresh copy.

Any violation raises :class:`WireError`, whose message is the student's failure, never the
grader's crash.
"""
from __future__ import annotations

import io
import math
import os
import pickletools
import re
import struct
import zipfile
from dataclasses import dataclass, replace
from itertools import repeat

import torch

HEADER = struct.Struct(">Q")
TENSOR = "__t__"          # {"__t__": i}: the i-th tensor of the message's flat tensor list
NOT_A_TENSOR = "__nontensor__"  # {"__nontensor__": "description"}: a value that cannot travel
PRIMITIVES = (int, float, bool, str, type(None))


class WireError(RuntimeError):
    """A malformed, oversized or unsafe message from the student's side."""


@dataclass(frozen=True)
class MessageLimits:
    """What one message from the sandbox may cost the grader (all counted by the grader)."""

    max_bytes: int = 256 * 2**20       # the frame; also the archive's uncompressed size and the
    #                                    tensors' total logical size (each returned copy is new)
    max_pickle_bytes: int = 2**20      # the archive's data.pkl: unpickling is pure Python, ~1.5 s/MiB
    max_entries: int = 10_000          # archive entries: one per tensor storage, plus 6
    max_nodes: int = 100_000           # values visited, a shared value once per visit
    max_depth: int = 12                # containers around any value
    max_str_chars: int = 2**18         # one string (the runner keeps 20 000 characters of output)
    max_total_str_chars: int = 2**20   # all strings and dict keys, once per visit


DEFAULT_LIMITS = MessageLimits()


def _limits(limits: MessageLimits | None, max_bytes: int | None) -> MessageLimits:
    limits = limits or DEFAULT_LIMITS
    return limits if max_bytes is None else replace(limits, max_bytes=max_bytes)


# -- writing -------------------------------------------------------------------------------------

def encode(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    return HEADER.pack(len(data)) + data


def write_frame(fd: int, obj) -> None:
    data = encode(obj)
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# -- reading (the grader's side) -----------------------------------------------------------------

def read_message(data: bytes, limits: MessageLimits | None = None):
    """The bytes of one frame (after its header) -> a validated, freshly built message."""
    return validate(decode(data, limits), limits)


def decode(data: bytes, limits: MessageLimits | None = None, *, max_bytes: int | None = None):
    """``torch.load`` a frame, after checking the archive and its pickle (not validated yet)."""
    lim = _limits(limits, max_bytes)
    if len(data) > lim.max_bytes:
        raise WireError(f"the answer was too large ({len(data)} bytes, the limit is {lim.max_bytes})")
    _check_pickle(_check_archive(data, lim))
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location=None, mmap=False)
    except Exception as exc:  # noqa: BLE001 - anything unreadable is the student's failure
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise WireError(f"the answer could not be read safely ({type(exc).__name__}: "
                        f"{clean_text(first, 200)})") from None


# torch.save's storage class for each dtype that may cross: ordinary numbers, nothing exotic.
_STORAGES = {torch.bool: "BoolStorage", torch.uint8: "ByteStorage", torch.int8: "CharStorage",
             torch.int16: "ShortStorage", torch.int32: "IntStorage", torch.int64: "LongStorage",
             torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage",
             torch.float32: "FloatStorage", torch.float64: "DoubleStorage",
             torch.complex64: "ComplexFloatStorage", torch.complex128: "ComplexDoubleStorage"}
# The only globals a message's pickle may name. weights_only alone allows more, and some of it
# costs memory inside torch.load, before any check of ours: bytearray(10**10) is a 30-byte
# pickle, and chained _codecs.encode(..., "hex") doubles a string per call.
# A tensor on the meta device (no data: checks ask for one to see that `device=` is honoured)
# is rebuilt from its dtype, which the pickle names as a global of its own.
_GLOBALS = frozenset({"torch._utils _rebuild_tensor_v2", "collections OrderedDict",
                      "torch._utils _rebuild_meta_tensor_no_storage",
                      *(f"torch {name}" for name in _STORAGES.values()),
                      *(f"torch {str(dtype).removeprefix('torch.')}" for dtype in _STORAGES)})
_OTHER_GLOBAL_OPS = frozenset({"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"})

_EOCD = struct.Struct("<4s4H2LH")       # end of central directory record
_LOCATOR = struct.Struct("<4sLQL")      # zip64 end of central directory locator
_EOCD64 = struct.Struct("<4sQ2H2L4Q")   # zip64 end of central directory record (no extra data)
_NAME = re.compile(r"([A-Za-z0-9_.-]{1,100})/[A-Za-z0-9_./-]{1,100}")


def _bad(why: str) -> WireError:
    return WireError(f"the answer is not a plain torch.save archive ({why})")


def _central_directory(data: bytes) -> tuple[int, int]:
    """(entries, bytes) of the central directory, which must end the archive as torch.save or
    zipfile write it: directory, [zip64 record, zip64 locator,] end record, no comment. Then
    Python's zipfile and torch's own reader (miniz) find the same directory; prepended bytes, a
    locator pointing elsewhere or disagreeing records could make them read different entries."""
    end = len(data) - _EOCD.size
    if end < 0:
        raise _bad("too short")
    sig, disk, cd_disk, n_here, n, cd_size, cd_offset, comment = _EOCD.unpack_from(data, end)
    if sig != b"PK\x05\x06" or disk or cd_disk or n_here != n or comment:
        raise _bad("unexpected end record")
    if end >= _LOCATOR.size and data[end - _LOCATOR.size:end - _LOCATOR.size + 4] == b"PK\x06\x07":
        _, loc_disk, at, disks = _LOCATOR.unpack_from(data, end - _LOCATOR.size)
        end -= _LOCATOR.size + _EOCD64.size
        if end < 0 or at != end or loc_disk or disks != 1:
            raise _bad("unexpected zip64 locator")
        sig, size, _, _, disk, cd_disk, *rest = _EOCD64.unpack_from(data, end)
        if sig != b"PK\x06\x06" or size != _EOCD64.size - 12 or disk or cd_disk \
                or rest != [n, n, cd_size, cd_offset]:
            raise _bad("unexpected zip64 end record")
    if cd_offset + cd_size != end:
        raise _bad("data around the central directory")
    return n, cd_size


def _check_archive(data: bytes, lim: MessageLimits) -> bytes:
    """The pickle of a torch.save archive whose entries are stored (a DEFLATE entry would
    decompress far beyond the frame) and within the limits; raise WireError otherwise."""
    if data[:4] != b"PK\x03\x04":   # torch.load would fall back to its legacy format
        raise _bad("no zip header")
    n, cd_size = _central_directory(data)
    if n > lim.max_entries:
        raise WireError(f"the answer has too many parts ({n}, the limit is {lim.max_entries})")
    if cd_size > n * (46 + 256):    # entries without extra fields or comments, names <= 201 bytes
        raise _bad("oversized central directory")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
        if len(infos) != n:
            raise _bad("entry count")
        names, total, pkl, prefix = set(), 0, None, None
        for info in infos:
            name = info.orig_filename
            match = _NAME.fullmatch(name)
            prefix = prefix or (match and match[1])   # torch reads the first entry's folder
            if not match or match[1] != prefix or name.lower() in names:   # torch: case-blind
                raise _bad("unexpected entry name")
            names.add(name.lower())
            if info.compress_type != zipfile.ZIP_STORED:
                raise WireError("the answer's archive is compressed, which is not allowed")
            if info.compress_size != info.file_size or info.flag_bits & 1 or info.extra or info.comment:
                raise _bad("unexpected entry header")
            total += info.file_size
            if name.lower() == f"{prefix}/data.pkl".lower():
                pkl = info
        if total > lim.max_bytes:
            raise WireError(f"the answer is too large ({total} bytes unpacked, the limit is {lim.max_bytes})")
        if pkl is None:
            raise _bad("no data.pkl")
        if pkl.file_size > lim.max_pickle_bytes:
            raise WireError(f"the answer's structure is too large ({pkl.file_size} bytes of pickle, "
                            f"the limit is {lim.max_pickle_bytes})")
        return archive.read(pkl)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError, struct.error) as exc:
        raise _bad(clean_text(str(exc), 200)) from None


def _check_pickle(pkl: bytes) -> None:
    """Refuse a pickle that names any global but a tensor's rebuild function and storage types."""
    try:
        for op, arg, _ in pickletools.genops(pkl):
            if op.name in _OTHER_GLOBAL_OPS or (op.name == "GLOBAL" and arg not in _GLOBALS):
                name = arg if op.name == "GLOBAL" else op.name
                raise WireError(f"the answer refers to {clean_text(name, 100)!r}, which may not cross")
    except WireError:
        raise
    except Exception as exc:  # noqa: BLE001 - genops is a parser: whatever it raises means malformed
        raise WireError(f"the answer's pickle is malformed ({clean_text(str(exc), 200)})") from None


# -- validation ----------------------------------------------------------------------------------

class _Budget:
    """Counters for one walk of :func:`validate`."""

    def __init__(self, lim: MessageLimits):
        self.lim, self.nodes, self.chars, self.tensor_bytes = lim, 1, 0, 0

    def visit(self, n: int) -> None:
        self.nodes += n
        if self.nodes > self.lim.max_nodes:
            raise WireError(f"the answer has too many values (the limit is {self.lim.max_nodes})")

    def primitive(self, v):
        kind = type(v)
        if kind is str:
            if len(v) > self.lim.max_str_chars:
                raise WireError(f"the answer has a string longer than {self.lim.max_str_chars} characters")
            self.chars += len(v)
            if self.chars > self.lim.max_total_str_chars:
                raise WireError(f"the answer's strings are longer than {self.lim.max_total_str_chars} "
                                f"characters in total")
        elif kind is int and not -2**63 <= v < 2**63:
            raise WireError("the answer has an integer outside the 64-bit range")
        return v

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if (t.layout != torch.strided or t.is_nested or t.is_quantized
                or t.dtype not in _STORAGES):
            raise WireError(f"the answer has an unsupported tensor ({t.layout}, {t.dtype})")
        # Logical size, not storage size: many expanded views of one small storage each count
        # in full, because the copy returned is materialised.
        self.tensor_bytes += math.prod(t.shape) * t.element_size()
        if self.tensor_bytes > self.lim.max_bytes:
            raise WireError(f"the answer's tensors are larger than the size limit "
                            f"({self.lim.max_bytes} bytes in total)")
        return t.detach().clone()


def _type_name(v) -> str:
    return clean_text(type(v).__name__, 100)


def validate(obj, limits: MessageLimits | None = None, *, max_tensor_bytes: int | None = None):
    """Admit only plain dense tensors, primitives, and tuples/lists/dicts of them (dict keys:
    primitives), and return a fresh copy: no shared containers, tensors detached and cloned.

    Walks with an explicit stack (no recursion limit to hit) and counts every visit, so a tree
    whose branches share one list (a few bytes to send, exponential to walk) exhausts the budget
    instead of the grader. ``max_tensor_bytes`` overrides ``limits.max_bytes``."""
    budget = _Budget(_limits(limits, max_tensor_bytes))
    max_depth = budget.lim.max_depth
    root: list = [None]
    todo: list = [(obj, 0, root, 0)]   # (value, depth, container of its copy, index or key)
    while todo:
        value, depth, parent, key = todo.pop()
        kind = type(value)
        if depth < 0:                  # all items of a tuple are copied: freeze it
            parent[key] = tuple(value)
        elif kind in PRIMITIVES:
            parent[key] = budget.primitive(value)
        elif kind in (tuple, list, dict):
            if depth >= max_depth:
                raise WireError(f"the answer is nested too deeply (more than {max_depth} levels)")
            budget.visit(2 * len(value) if kind is dict else len(value))
            if kind is dict:
                for k in value:
                    if type(k) not in PRIMITIVES:
                        raise WireError(f"the answer has a dict key of type {_type_name(k)}")
                    budget.primitive(k)
                copy, keys, values = dict.fromkeys(value), list(value), value.values()
            else:
                copy, keys, values = [None] * len(value), range(len(value)), value
            if kind is tuple:
                todo.append((copy, -1, parent, key))
            else:
                parent[key] = copy
            todo.extend(zip(values, repeat(depth + 1), repeat(copy), keys))
        elif kind is torch.Tensor:
            parent[key] = budget.tensor(value)
        elif isinstance(value, torch.Tensor):
            raise WireError(f"the answer has a {_type_name(value)}, not a plain torch.Tensor")
        else:
            raise WireError(f"the answer contains a value of type {_type_name(value)}")
    return root[0]


# -- display -------------------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(s, limit: int) -> str:
    """Student text made safe to show: at most ``limit`` characters, with a note of how many
    more there were, and lone surrogates (which cannot be written as UTF-8, so would crash
    nbformat.write) replaced by U+FFFD."""
    if not isinstance(s, str):
        s = str(s)
    limit = max(0, limit)
    more = len(s) - limit
    s = _SURROGATE.sub("\ufffd", s[:limit])
    return f"{s}\n[... {more} more characters not shown]" if more > 0 else s
