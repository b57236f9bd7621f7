"""Checks for chapter 4: word order. Attention without positions (the student's chapter-3 module
is permutation-equivariant), the sinusoidal encoding, the positional-encoding module, scaled token
embeddings and rotary position embeddings (RoPE).

Expected values are float64 formulas written out here (:func:`sinusoid`, :func:`rope`), or
PyTorch's own ops (``F.embedding``), never the course's solution. The conventions:

* sinusoid: for i = 0 ... d/2 - 1, PE[pos, 2i] = sin(pos / base^(2i/d)),
  PE[pos, 2i+1] = cos(pos / base^(2i/d)), base 10000, positions counted from 0;
* RoPE: interleaved pairs (2i, 2i+1) rotated by the angle pos * base^(-2i/d):
  (a, b) -> (a cos - b sin, a sin + b cos).

float32 results are compared with a tolerance that grows with the largest position: an angle
pos * w computed in float32 is off by a few units in its last place, about 2e-7 * pos.
"""
from __future__ import annotations

import contextlib
import io
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import forbidden
from .core import (CheckFailure, Mistake, call, expect_close, expect_module, expect_outputs, expect_raises,
                   expect_tensor, fail, is_close, on_devices, passed, randn, tolerance)
from .gradients import expect_grads_close, grads
from .masks import padding
from .mha import mha_loop, random_params
from .scan import forbid_names

# --------------------------------------------------------------------------------------------
# Trusted formulas (float64) and the tables the common mistakes produce
# --------------------------------------------------------------------------------------------


def sinusoid(max_len: int, d: int, *, device="cpu", base: float = 10000.0, start: int = 0, exponent: str = "2i",
             layout: str = "interleaved", swapped: bool = False) -> torch.Tensor:
    """The (max_len, d) float64 table of the course's convention; the keyword arguments other than
    ``device`` produce mistakes: ``exponent`` "i" (base^(i/d)), "4i" (base^(2i/(d/2))), "own" (the
    cos column 2i+1 uses base^((2i+1)/d)); ``layout`` "halves" (all sines, then all cosines)."""
    pos = torch.arange(start, start + max_len, dtype=torch.float64, device=device)[:, None]
    i = torch.arange(d // 2, dtype=torch.float64, device=device)
    power = {"2i": 2 * i / d, "i": i / d, "4i": 4 * i / d, "own": 2 * i / d}[exponent]
    first, second = torch.sin(pos * base ** -power), torch.cos(pos * base ** -power)
    if exponent == "own":
        second = torch.cos(pos * base ** (-(2 * i + 1) / d))
    if swapped:
        first, second = torch.cos(pos * base ** -power), torch.sin(pos * base ** -power)
    if layout == "halves":
        return torch.cat([first, second], dim=-1)
    return torch.stack([first, second], dim=-1).reshape(max_len, d)


def table_tolerance(dtype: torch.dtype, max_len: int) -> tuple[float, float]:
    """(rtol, atol) for a table (or a rotation) with positions below ``max_len`` in ``dtype``."""
    rtol, atol = tolerance(dtype)
    return (rtol, atol) if dtype == torch.float64 else (rtol, atol + 4e-7 * max_len)


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0, *, pairs: str = "interleaved",
         direction: int = 1, exponent: str = "2i") -> torch.Tensor:
    """RoPE in float64 (differentiable), cast back to x's dtype. ``pairs`` "halves" rotates
    (i, i + d/2); ``direction`` -1 rotates backwards; ``exponent`` "i" uses base^(-i/d): mistakes."""
    d = x.shape[-1]
    i = torch.arange(d // 2, dtype=torch.float64, device=x.device)
    angle = positions.to(device=x.device, dtype=torch.float64)[:, None] * base ** -({"2i": 2 * i, "i": i}[exponent] / d)
    cos, sin = torch.cos(angle), direction * torch.sin(angle)
    xd = x.to(torch.float64)
    a, b = (xd[..., 0::2], xd[..., 1::2]) if pairs == "interleaved" else (xd[..., :d // 2], xd[..., d // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = torch.stack([ra, rb], dim=-1).flatten(-2) if pairs == "interleaved" else torch.cat([ra, rb], dim=-1)
    return out.to(x.dtype)


def _rope_mixed(x: torch.Tensor, positions: torch.Tensor, base: float, which: str) -> torch.Tensor:
    """The two ways of mixing the conventions: cos/sin tables of one, "rotate half" of the other."""
    d = x.shape[-1]
    i = torch.arange(d // 2, dtype=torch.float64, device=x.device)
    angle = positions.to(device=x.device, dtype=torch.float64)[:, None] * base ** -(2 * i / d)
    xd = x.to(torch.float64)
    if which == "interleaved_tables":          # cos/sin repeated per pair, halves rotated
        cos, sin = angle.cos().repeat_interleave(2, -1), angle.sin().repeat_interleave(2, -1)
        rotated = torch.cat([-xd[..., d // 2:], xd[..., :d // 2]], dim=-1)
    else:                                      # cos/sin concatenated, pairs rotated
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        rotated = torch.stack([-xd[..., 1::2], xd[..., 0::2]], dim=-1).flatten(-2)
    return (xd * cos + rotated * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Section 0: the student's chapter-3 MultiHeadAttention, pasted; permutation equivariance
# --------------------------------------------------------------------------------------------

PASTED_MHA_FAILS = Mistake(
    "pasted_mha_fails", "the MultiHeadAttention you pasted from chapter 3 (section 0, the cell under \"Your "
    "multi-head attention from chapter 3\") fails chapter 3's own checks: {earlier} Fix it there (paste the "
    "helpers it calls too: split_heads, merge_heads, scaled_dot_product_attention and its softmax).")
NOT_EQUIVARIANT = Mistake(
    "not_permutation_equivariant", "self-attention without positions should be permutation-equivariant: "
    "permuting the input tokens should permute the output rows (and the rows and columns of the weights) in "
    "the same way and change nothing else, but {what} changed otherwise. Does your module add something "
    "that depends on the position (an index, a bias per position)? Chapter 3's module must not.")
NOT_INVARIANT = Mistake(
    "keys_order_matters", "in attention, shuffling the keys and values together (the same permutation for "
    "both) should leave every query's output unchanged, but {what} changed. Does your module treat key "
    "positions differently?")

_D, _H = 12, 3


def _mha(MultiHeadAttention, device):
    """The student's module on ``device`` holding reproducible weights."""
    __tracebackhide__ = True
    module = call(MultiHeadAttention, _D, _H, what=f"MultiHeadAttention({_D}, {_H})")
    try:
        module = module.to(device)
        module.load_state_dict(random_params(_D, seed=400, device=device))
    except Exception as exc:  # noqa: BLE001 - the student's module is student code
        fail(f"Could not load weights into your MultiHeadAttention: {exc}. Keep chapter 3's submodules "
             "q_proj, k_proj, v_proj, out_proj.", mistake="weights_not_loaded")
    return module


def _attend(module, q, k, v, mask, what):
    __tracebackhide__ = True
    args = (q, k, v) if mask is None else (q, k, v, mask)
    out, w = expect_outputs(call(module, *args, what=what), what)
    expect_tensor(out, f"the output of {what}", shape=q.shape, device=q.device)
    expect_tensor(w, f"the weights of {what}", shape=(q.shape[0], _H, q.shape[1], k.shape[1]), device=q.device)
    return out.detach(), w.detach()


def _check_permutation_equivariance(MultiHeadAttention, device) -> int:
    """Self-attention: permuting the tokens permutes the outputs and the weights, nothing else
    (with no mask, and with a padding mask permuted along)."""
    __tracebackhide__ = True
    module = _mha(MultiHeadAttention, device)
    x = randn(2, 6, _D, seed=401, device=device)
    g = torch.Generator().manual_seed(402)
    count = 0
    for trial in range(2):
        perm = torch.randperm(6, generator=g).to(device)
        for mask in (None, padding([6, 4], 6, device)):
            label = "no mask" if mask is None else "a padding mask (lengths 6 and 4)"
            out, w = _attend(module, x, x, x, mask, f"MultiHeadAttention on x ({label})")
            moved = x[:, perm]
            what = f"self-attention on the permuted tokens {perm.tolist()} ({label})"
            out_p, w_p = _attend(module, moved, moved, moved, None if mask is None else mask[..., perm], what)
            if not (is_close(out_p, out[:, perm]) and is_close(w_p, w[:, :, perm][..., perm])):
                fail(NOT_EQUIVARIANT, what=what)
            count += 1
    return count


def _check_keys_as_a_set(MultiHeadAttention, device) -> int:
    """Cross-attention: shuffling keys and values together leaves every output row unchanged."""
    __tracebackhide__ = True
    module = _mha(MultiHeadAttention, device)
    q, kv = randn(2, 3, _D, seed=403, device=device), randn(2, 7, _D, seed=404, device=device)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(405)).to(device)
    out, w = _attend(module, q, kv, kv, None, "cross-attention, 3 queries and 7 keys")
    what = f"cross-attention with the keys and values shuffled by {perm.tolist()}"
    out_p, w_p = _attend(module, q, kv[:, perm], kv[:, perm], None, what)
    if not (is_close(out_p, out) and is_close(w_p, w[..., perm])):
        fail(NOT_INVARIANT, what=what)
    return 1


def _check_is_attention(MultiHeadAttention, device) -> int:
    """The paste computes multi-head attention (against a loop over heads, with a padding mask, in
    cross-attention); where it does not, chapter 3's own checks say why."""
    __tracebackhide__ = True
    module = _mha(MultiHeadAttention, device)
    q, kv = randn(2, 4, _D, seed=406, device=device), randn(2, 5, _D, seed=407, device=device)
    mask = padding([5, 3], 5, device)
    out, w = _attend(module, q, kv, kv, mask, "your MultiHeadAttention, cross-attention with a padding mask")
    want_out, want_w = mha_loop(random_params(_D, seed=400, device=device), q, kv, kv, _H, mask)
    if is_close(out, want_out) and is_close(w, want_w):
        return 1
    from .ch03 import check_multi_head_attention
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            check_multi_head_attention(MultiHeadAttention)
    except CheckFailure as exc:
        if exc.mistake == "not_implemented":
            raise
        fail(PASTED_MHA_FAILS, earlier=str(exc))
    fail(PASTED_MHA_FAILS, earlier="its output or weights for a cross-attention with a padding mask differ from "
         "multi-head attention computed head by head.")


def check_permutation_equivariance(MultiHeadAttention) -> None:
    """Visible tests of section 0: the pasted chapter-3 ``MultiHeadAttention(d_model, num_heads)``
    computes multi-head attention, and without positions it treats its input as a set."""
    __tracebackhide__ = True
    if MultiHeadAttention is None:
        fail("MultiHeadAttention is not defined: paste your chapter-3 MultiHeadAttention (and the functions "
             "it calls) into the cell of section 0 and run it.", mistake="not_implemented")
    forbid_names(MultiHeadAttention, forbidden.ATTENTION, "MultiHeadAttention",
                 "Paste your own chapter-3 module, which computes attention itself.")
    passed("MultiHeadAttention treats its input as a set", on_devices(
        [_check_is_attention, _check_permutation_equivariance, _check_keys_as_a_set], MultiHeadAttention))


# --------------------------------------------------------------------------------------------
# Exercise 1: sinusoidal_encoding(max_len, d_model, dtype=torch.float32, device=None)
# --------------------------------------------------------------------------------------------

SIN_COS_SWAPPED = Mistake("sin_cos_swapped", "sin and cos are swapped: the even columns 2i hold sin(pos·ω_i) "
                          "and the odd columns 2i+1 hold cos(pos·ω_i).")
EXPONENT_I = Mistake("exponent_i_instead_of_2i", "the frequencies use 10000^(i/d_model) for the pair i: the "
                     "exponent is 2i/d_model (pair i holds columns 2i and 2i+1), so that the wavelengths run "
                     "from 2π up to nearly 10000·2π.")
COS_OWN_EXPONENT = Mistake("cos_uses_its_own_index", "the cos column 2i+1 uses the exponent (2i+1)/d_model: a "
                           "pair shares one frequency, 10000^(2i/d_model), for its sin (column 2i) and its cos "
                           "(column 2i+1).")
HALF_D_CONFUSED = Mistake("d_model_and_half_confused", "the exponent is 2i/(d_model/2) (or i was taken from "
                          "arange(0, d_model, 2) and doubled again): the frequencies fall twice as fast as they "
                          "should. With i = 0 ... d_model/2 - 1, the exponent is 2i/d_model.")
POSITIONS_FROM_1 = Mistake("positions_from_1", "the positions start at 1: the first row is position 0, "
                           "PE[0] = (0, 1, 0, 1, ...).")
BASE_1000 = Mistake("base_1000", "the base is 1000: the paper (and this course) uses 10000.")
HALVES_LAYOUT = Mistake("sin_cos_concatenated", "the sines fill the first half of the columns and the cosines "
                        "the second half (tensor2tensor's layout): this course interleaves them, sin in column "
                        "2i and cos in column 2i+1.")
FLOAT32_PRECISION = Mistake("computed_in_float32", "{what} has the right dtype but only float32 precision (off "
                            "by {diff:.1e}): compute the table in the requested dtype (arange(..., "
                            "dtype=dtype)), not in float32 followed by a conversion.")
IGNORES_DEVICE = Mistake(
    "encoding_ignores_device", "{what} ignores its device argument: {why}. The table is then always created on "
    "the CPU, which passes here and fails as soon as the model runs on a GPU, so the check asks for "
    "device=\"meta\" (PyTorch's device without data, present on every machine). Create every tensor with "
    "device=device.")

#: mistake -> the sinusoid() settings that make it
_TABLE_MISTAKES = {SIN_COS_SWAPPED: dict(swapped=True), EXPONENT_I: dict(exponent="i"),
                   COS_OWN_EXPONENT: dict(exponent="own"), HALF_D_CONFUSED: dict(exponent="4i"),
                   POSITIONS_FROM_1: dict(start=1), BASE_1000: dict(base=1000.0), HALVES_LAYOUT: dict(layout="halves")}


def _table_mistakes(max_len, d, device, dtype) -> dict:
    """Mistake -> the table it would give."""
    return {m: sinusoid(max_len, d, device=device, **kw).to(dtype) for m, kw in _TABLE_MISTAKES.items()}


def _encoding(fn, max_len, d, device, dtype=None):
    """Call sinusoidal_encoding; check type, shape, dtype and device."""
    __tracebackhide__ = True
    kwargs = {"device": device} if dtype is None else {"dtype": dtype, "device": device}
    what = f"sinusoidal_encoding({max_len}, {d}, " + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    table = call(fn, max_len, d, what=what, **kwargs)
    expect_tensor(table, what, shape=(max_len, d), dtype=dtype or torch.float32, device=device)
    return table, what


def _check_table_values(fn, device) -> int:
    """The float32 table against the float64 formula; the common mistakes named."""
    __tracebackhide__ = True
    sizes = [(12, 8), (50, 16), (1, 2), (7, 6), (64, 128)]   # the first one small: its float32 errors are tiny
    for max_len, d in sizes:
        table, what = _encoding(fn, max_len, d, device)
        expect_close(table, sinusoid(max_len, d, device=device).float(), what,
                     mistakes=_table_mistakes(max_len, d, device, torch.float32), tol=table_tolerance(torch.float32, max_len))
    return len(sizes)


def _check_table_float64(fn, device) -> int:
    """dtype=torch.float64 gives float64 values of float64 precision, also far from position 0."""
    __tracebackhide__ = True
    max_len, d = 300, 32
    table, what = _encoding(fn, max_len, d, device, torch.float64)
    want = sinusoid(max_len, d, device=device)
    if not is_close(table, want) and is_close(table, want, tol=table_tolerance(torch.float32, max_len)):
        fail(FLOAT32_PRECISION, what=what, diff=float((table.detach() - want).abs().max()))
    expect_close(table, want, what, mistakes=_table_mistakes(max_len, d, device, torch.float64))
    return 2


def _check_table_defaults(fn, device) -> int:
    """Without dtype and device: float32 on the CPU."""
    __tracebackhide__ = True
    table = call(fn, 5, 4, what="sinusoidal_encoding(5, 4)")
    expect_tensor(table, "sinusoidal_encoding(5, 4) (no dtype or device given)", shape=(5, 4), dtype=torch.float32,
                  device="cpu")
    expect_close(table, sinusoid(5, 4).float(), "sinusoidal_encoding(5, 4)")
    return 1


def _check_odd_d_model(fn, device) -> int:
    __tracebackhide__ = True
    for d in (7, 1):
        expect_raises(ValueError, fn, 10, d, what=f"sinusoidal_encoding(10, {d})",
                      hint="An odd d_model cannot be cut into (sin, cos) pairs: check it first and raise "
                           "ValueError with a message that says so.")
    return 2


def _check_table_on_meta(fn) -> int:
    """The table is created on the requested device, on any machine (the meta device)."""
    __tracebackhide__ = True
    what = 'sinusoidal_encoding(6, 4, device="meta")'
    try:
        table = call(fn, 6, 4, device="meta", what=what)
    except CheckFailure:
        return 1    # code that cannot run without data tells nothing about the device
    if isinstance(table, torch.Tensor) and table.device.type != "meta":
        fail(IGNORES_DEVICE, what=what, why=f"asked for the meta device, it returned a table on {table.device}")
    return 2


def check_sinusoidal_encoding(sinusoidal_encoding) -> None:
    """Visible tests for exercise 1. ``sinusoidal_encoding(max_len, d_model, dtype=torch.float32,
    device=None)`` -> ``(max_len, d_model)``: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] =
    cos(pos / 10000^(2i/d)); an odd d_model raises ValueError."""
    __tracebackhide__ = True
    n = on_devices([_check_table_values, _check_table_float64, _check_table_defaults, _check_odd_d_model],
                   sinusoidal_encoding)
    passed("sinusoidal_encoding", n + _check_table_on_meta(sinusoidal_encoding))


# --------------------------------------------------------------------------------------------
# Exercise 2: PositionalEncoding(d_model, max_len=5000, dropout=0.1)
# --------------------------------------------------------------------------------------------

ENCODING_NOT_ADDED = Mistake("encoding_not_added", "the input comes back unchanged: add the table's first L rows "
                             "to x.")
ALONG_BATCH = Mistake("added_along_batch_axis", "the encoding is added along the batch axis: item b of the batch "
                      "got PE[b] at every position (a table shaped (max_len, 1, d_model) for sequence-first "
                      "inputs, or slicing with x.size(0)). The positions are the second-to-last axis: x[..., l, :] "
                      "gets PE[l], the same for every batch item.")
SCALED_INSIDE = Mistake("scaled_inside_positional_encoding", "x is multiplied by √d_model before the encoding is "
                        "added: that scaling belongs to the token embeddings (exercise 3). PositionalEncoding "
                        "adds the table and applies dropout, nothing else.")
PE_IS_A_PARAMETER = Mistake("pe_is_a_parameter", "PositionalEncoding has parameters ({names}): the sinusoidal table "
                            "is fixed, not learned. Register it with register_buffer, not as an nn.Parameter (an "
                            "optimizer would change it).")
PE_NOT_A_BUFFER = Mistake("pe_not_a_buffer", "no buffer of PositionalEncoding({d}, max_len={max_len}) holds the "
                          "({max_len}, {d}) table (its buffers: {buffers}). Build the table once in __init__ and "
                          "register it with self.register_buffer(\"pe\", table, persistent=False): then it moves "
                          "with .to(device) and .double(), and forward does not rebuild it at every call.")
PE_ON_CPU = Mistake(
    "pe_created_on_cpu_in_forward", "the table does not follow the module to another device: after "
    ".to(\"meta\") (PyTorch's device without data, present on every machine), forward {why}. This happens when "
    "forward builds the table (or part of it) on the CPU, or when the table is a plain attribute (self.pe = "
    "...) that .to() does not move. On a GPU it fails with a device mismatch. Register the table as a buffer "
    "in __init__ and use it in forward.")
TOO_LONG_NOT_CHECKED = Mistake("too_long_not_checked", "an input of length {length} > max_len = {max_len} should "
                               "raise a ValueError that says so, but {got}. Compare x.size(-2) with the table's "
                               "length in forward.")
STATE_DICT_NOT_LOADED = Mistake("state_dict_does_not_round_trip", "a fresh PositionalEncoding could not load the "
                                "state_dict of another one ({error}). Keep the table a buffer (persistent or not) "
                                "and add nothing else to the state.")
DROPOUT_MISSING = Mistake("dropout_missing", "in train mode with dropout={p}, no entry was dropped: apply "
                          "dropout (nn.Dropout(p) in __init__) to the sum x + PE, and keep the module's training "
                          "flag (nn.Dropout follows .train()/.eval()).")
DROPOUT_BEFORE_SUM = Mistake("dropout_before_sum", "dropout is applied to x before the encoding is added (the "
                             "dropped entries hold PE values instead of 0): the paper applies dropout to the sum, "
                             "dropout(x + PE).")
DROPOUT_ON_ENCODING = Mistake("dropout_on_encoding_only", "dropout is applied to the encoding only: apply it to "
                              "the sum, dropout(x + PE).")
DROPOUT_NOT_RESCALED = Mistake("dropout_not_rescaled", "the entries kept by dropout are not scaled by 1/(1 - p): "
                               "use nn.Dropout (or F.dropout), which rescales so that the expected value does not "
                               "change.")
DROPOUT_RATE = Mistake("dropout_wrong_rate", "with dropout={p}, a share of {share:.2f} of the entries was dropped "
                       "(expected about {p}): p is the probability of dropping an entry, not of keeping it.")
DROPOUT_IN_EVAL = Mistake("dropout_in_eval_mode", "in eval mode the output still has dropped entries: dropout must "
                          "be off after .eval() (nn.Dropout, or F.dropout(..., training=self.training)).")
DROPOUT_SAME_MASKS = Mistake("dropout_not_random", "dropout dropped the same entries for two different seeds: draw "
                             "the masks from PyTorch's global generator (nn.Dropout does), not from a fixed one.")
DROPOUT_NOT_REPRODUCIBLE = Mistake("dropout_ignores_seed", "two calls after the same torch.manual_seed gave "
                                   "different results: draw the dropout masks from PyTorch's global generator.")

_PD, _PL = 16, 50         # d_model and max_len of the modules the checks build


def _pe_module(PositionalEncoding, device, *, d=_PD, max_len=_PL, dropout=0.0):
    __tracebackhide__ = True
    what = f"PositionalEncoding({d}, max_len={max_len}, dropout={dropout})"
    module = call(PositionalEncoding, d, max_len=max_len, dropout=dropout, what=what)
    if not isinstance(module, nn.Module):
        fail(f"{what} should create a torch.nn.Module (subclass nn.Module and call super().__init__() first).",
             mistake="not_a_module")
    return module.to(device).eval(), what


def _pe_forward(module, x, what):
    __tracebackhide__ = True
    label = f"{what} applied to x of shape {tuple(x.shape)}"
    out = call(module, x, what=label)
    expect_tensor(out, label, shape=x.shape, dtype=x.dtype, device=x.device)
    return out, label


def _added(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x + table[:L] in x's dtype (table: float64, (max_len, d))."""
    return (x.to(torch.float64) + table[:x.shape[-2]]).to(x.dtype)


def _check_pe_values(PositionalEncoding, device) -> int:
    """Eval mode: x + PE[:L] for (..., L, d_model) inputs of every rank, L = max_len included."""
    __tracebackhide__ = True
    module, what = _pe_module(PositionalEncoding, device)
    table = sinusoid(_PL, _PD, device=device)
    shapes = [(1, 7, _PD), (3, 9, _PD), (9, _PD), (2, 2, 5, _PD), (2, _PL, _PD)]
    for i, shape in enumerate(shapes):
        x = randn(*shape, seed=500 + i, device=device)
        out, label = _pe_forward(module, x, what)
        length = shape[-2]
        mistakes = {m: _added(x, wrong) for m, wrong in _table_mistakes(_PL, _PD, device, torch.float64).items()}
        mistakes[ENCODING_NOT_ADDED] = x
        mistakes[SCALED_INSIDE] = _added(x * math.sqrt(_PD), table)
        if x.dim() >= 3:
            along_batch = table[:shape[0]].reshape(shape[0], *[1] * (x.dim() - 2), _PD)
            mistakes[ALONG_BATCH] = (x.to(torch.float64) + along_batch).to(x.dtype)
        expect_close(out, _added(x, table), label, mistakes=mistakes, tol=table_tolerance(torch.float32, length))
    return len(shapes)


def _check_pe_on_meta(PositionalEncoding, device) -> int:
    """Moved to the meta device, the module computes on the meta device (once: any machine has it)."""
    __tracebackhide__ = True
    if device != "cpu":
        return 0
    module, what = _pe_module(PositionalEncoding, device)
    module = module.to("meta")
    x = torch.empty(2, 5, _PD, device="meta")
    try:
        out = call(module, x, what=f"{what}.to(\"meta\") applied to x of shape (2, 5, {_PD}) on the meta device")
    except CheckFailure as exc:
        error = str(exc).split(" raised ", 1)[-1]        # the student's error, without our description
        if "device" in error and "meta" in error:
            fail(PE_ON_CPU, why=f"raised {error[:300]}")
        return 1    # it cannot run without data for another reason: that tells nothing about devices
    if isinstance(out, torch.Tensor) and out.device.type != "meta":
        fail(PE_ON_CPU, why=f"returned a tensor on {out.device}")
    return 1


def _table_buffer(module, d, max_len):
    """The buffer holding a (max_len, d) table (any shape of that size: (1, max_len, d) is fine)."""
    for name, buf in module.named_buffers():
        if type(buf) is torch.Tensor and buf.numel() == max_len * d and buf.is_floating_point():
            return name, buf.reshape(max_len, d)
    return None, None


def _check_pe_buffer(PositionalEncoding, device) -> int:
    """No parameters; a buffer holds the table (with the formula's values)."""
    __tracebackhide__ = True
    module, what = _pe_module(PositionalEncoding, device)
    params = [name for name, _ in module.named_parameters()]
    if params:
        fail(PE_IS_A_PARAMETER, names=", ".join(params))
    name, buf = _table_buffer(module, _PD, _PL)
    if buf is None:
        buffers = {n: tuple(b.shape) for n, b in module.named_buffers()} or "none"
        fail(PE_NOT_A_BUFFER, d=_PD, max_len=_PL, buffers=buffers)
    expect_close(buf, sinusoid(_PL, _PD, device=device).to(buf.dtype), f"the buffer {name} of {what}",
                 mistakes=_table_mistakes(_PL, _PD, device, buf.dtype), tol=table_tolerance(buf.dtype, _PL))
    return 2


def _check_pe_too_long(PositionalEncoding, device) -> int:
    """L > max_len: a ValueError (never a silent broadcast or a cryptic size mismatch)."""
    __tracebackhide__ = True
    module, what = _pe_module(PositionalEncoding, device, max_len=20)
    x = randn(2, 21, _PD, seed=510, device=device)
    try:
        expect_raises(ValueError, module, x, what=f"{what} applied to x of shape (2, 21, {_PD})")
    except CheckFailure as exc:
        if exc.mistake not in ("no_exception", "wrong_exception"):
            raise
        got = "it raised nothing" if exc.mistake == "no_exception" else str(exc).split(" should raise ValueError, but ")[-1]
        fail(TOO_LONG_NOT_CHECKED, length=21, max_len=20, got=got)
    return 1


def _check_pe_state_dict(PositionalEncoding, device) -> int:
    """The state_dict holds no parameter and loads into a fresh module (strict), which then computes
    the same; a persistent table in it has the formula's values."""
    __tracebackhide__ = True
    module, what = _pe_module(PositionalEncoding, device)
    state = module.state_dict()
    fresh, _ = _pe_module(PositionalEncoding, device)
    try:
        fresh.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - the student's module is student code
        fail(STATE_DICT_NOT_LOADED, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    table = sinusoid(_PL, _PD, device=device)
    for key, value in state.items():
        if type(value) is torch.Tensor and value.numel() == _PL * _PD:
            expect_close(value.reshape(_PL, _PD), table.to(value.dtype), f"state_dict()[{key!r}] of {what}",
                         tol=table_tolerance(value.dtype, _PL))
    x = randn(2, 6, _PD, seed=511, device=device)
    out, label = _pe_forward(fresh, x, f"{what} after load_state_dict")
    expect_close(out, _added(x, table), label, tol=table_tolerance(torch.float32, 6))
    return 2


def _check_pe_float64(PositionalEncoding, device) -> int:
    """After .to(torch.float64) the module takes and returns float64 (the table follows)."""
    __tracebackhide__ = True
    module, what = _pe_module(PositionalEncoding, device)
    module = module.to(torch.float64)
    x = randn(3, 8, _PD, seed=512, dtype=torch.float64, device=device)
    out, label = _pe_forward(module, x, f"{what}.to(torch.float64)")
    # The table may have been built in float32 and converted: float32 precision is all it can have.
    expect_close(out, _added(x, sinusoid(_PL, _PD, device=device)), label, tol=table_tolerance(torch.float32, 8))
    return 1


def _check_pe_grads(PositionalEncoding, device) -> int:
    """Eval mode: the gradient with respect to x is the upstream gradient (PE is a constant)."""
    __tracebackhide__ = True
    module, what = _pe_module(PositionalEncoding, device)
    module = module.to(torch.float64)
    x = randn(2, 5, _PD, seed=513, dtype=torch.float64, device=device, requires_grad=True)
    out, label = _pe_forward(module, x, f"{what}.to(torch.float64)")
    ref = x.detach().clone().requires_grad_()
    want = ref + sinusoid(5, _PD, device=device)
    return expect_grads_close(out, want, [x], [ref], label, seed=514)


def _dropout_verdict(out, x, table, p, what) -> None:
    """In train mode every entry is 0 (dropped) or (x + PE)/(1 - p); otherwise name the mistake."""
    __tracebackhide__ = True
    x64, pe = x.to(torch.float64), table[:x.shape[-2]].expand(x.shape)
    total, got = x64 + pe, out.detach().to(torch.float64)
    dropped = got == 0
    rtol, atol = table_tolerance(torch.float32, x.shape[-2])

    def kept_equal(values, want):
        return bool(torch.allclose(values, want, rtol=rtol, atol=atol))

    if not dropped.any() and (kept_equal(got, total) or kept_equal(got, total / (1 - p))):
        fail(DROPOUT_MISSING, p=p)
    kept = ~dropped
    if kept_equal(got[kept], total[kept] / (1 - p)):
        share = float(dropped.double().mean())
        if abs(share - p) > 0.08:
            fail(DROPOUT_RATE, p=p, share=share)
        return
    # Dropout before the sum: out - PE is 0 (dropped) or x / (1 - p); on the encoding: out - x likewise.
    for mistake, base, rest in ((DROPOUT_BEFORE_SUM, pe, x64), (DROPOUT_ON_ENCODING, x64, pe)):
        r = got - base
        zero = r.abs() <= atol
        if zero.any() and (~zero).any() and kept_equal(r[~zero], rest[~zero] / (1 - p)):
            fail(mistake)
    if kept_equal(got[kept], total[kept]):
        fail(DROPOUT_NOT_RESCALED)
    if kept_equal(got[kept], total[kept] / p):
        fail(DROPOUT_RATE, p=p, share=float(dropped.double().mean()))
    fail(f"{what} in train mode: every entry should be either 0 (dropped) or (x + PE)/(1 - p) with p = {p}, "
         "but some are neither.", mistake="values_differ")


def _check_pe_dropout(PositionalEncoding, device) -> int:
    """Train mode: dropout on the sum, masks from the global generator (same seed, same masks; another
    seed, other masks), the gradient that of the realised function; eval mode: no dropout."""
    __tracebackhide__ = True
    p = 0.3
    module, what = _pe_module(PositionalEncoding, device, max_len=40, dropout=p)
    module.train()
    x = randn(4, 30, _PD, seed=520, device=device)
    table = sinusoid(40, _PD, device=device)
    torch.manual_seed(5)
    out, label = _pe_forward(module, x, f"{what} in train mode")
    _dropout_verdict(out, x, table, p, what)
    torch.manual_seed(5)
    again, _ = _pe_forward(module, x, f"{what} in train mode")
    if not torch.equal(again, out):
        fail(DROPOUT_NOT_REPRODUCIBLE)
    torch.manual_seed(6)
    other, _ = _pe_forward(module, x, f"{what} in train mode")
    if torch.equal(other, out):
        fail(DROPOUT_SAME_MASKS)
    # The gradient of the function this forward computed: upstream * kept / (1 - p).
    module = module.to(torch.float64)
    x64 = randn(2, 10, _PD, seed=521, dtype=torch.float64, device=device, requires_grad=True)
    torch.manual_seed(7)
    out64, label = _pe_forward(module, x64, f"{what}.to(torch.float64) in train mode")
    upstream = randn(2, 10, _PD, seed=522, dtype=torch.float64, device=device)
    (g,) = grads(out64, [x64], upstream, label)
    expect_close(g, upstream * (out64.detach() != 0) / (1 - p), f"the gradient of {label} with respect to x")
    module.eval()
    x = randn(2, 30, _PD, seed=523, device=device)
    out, label = _pe_forward(module.to(torch.float32), x, f"{what} in eval mode")
    if not is_close(out, _added(x, table), tol=table_tolerance(torch.float32, 30)) and bool((out == 0).any()):
        fail(DROPOUT_IN_EVAL)
    expect_close(out, _added(x, table), label, tol=table_tolerance(torch.float32, 30))
    return 6


def check_positional_encoding(PositionalEncoding) -> None:
    """Visible tests for exercise 2. ``PositionalEncoding(d_model, max_len=5000, dropout=0.1)``;
    ``forward(x)`` with x ``(..., L, d_model)``, L <= max_len, returns dropout(x + PE[:L]); the table
    is a buffer; L > max_len raises ValueError."""
    __tracebackhide__ = True
    passed("PositionalEncoding", on_devices(
        [_check_pe_values, _check_pe_on_meta, _check_pe_buffer, _check_pe_too_long, _check_pe_state_dict,
         _check_pe_float64, _check_pe_grads, _check_pe_dropout], PositionalEncoding))


# --------------------------------------------------------------------------------------------
# Exercise 3: Embeddings(vocab_size, d_model)
# --------------------------------------------------------------------------------------------

NOT_SCALED = Mistake("embeddings_not_scaled", "the embeddings are not scaled: multiply the looked-up vectors by "
                     "√d_model.")
DIVIDED = Mistake("embeddings_divided_by_sqrt_d_model", "the embeddings are divided by √d_model: multiply by it.")
SCALED_BY_D = Mistake("embeddings_scaled_by_d_model", "the embeddings are multiplied by d_model: the factor is "
                      "√d_model (math.sqrt).")
SCALED_BY_VOCAB = Mistake("embeddings_scaled_by_sqrt_vocab_size", "the embeddings are multiplied by √vocab_size: "
                          "the factor is √d_model, the width of the vectors.")

_V, _ED = 23, 16


def _embeddings(Embeddings, device, dtype=torch.float32):
    __tracebackhide__ = True
    what = f"Embeddings({_V}, {_ED})"
    module = call(Embeddings, _V, _ED, what=what)
    expect_module(module, what, {"embedding.weight": (_V, _ED)},
                  layout="one submodule `embedding`, an nn.Embedding(vocab_size, d_model)",
                  shape_hint="one row of d_model numbers per token of the vocabulary")
    return module.to(device=device, dtype=dtype), what


def _check_embeddings_values(Embeddings, device) -> int:
    """embedding(tokens) · √d_model for token tensors of every rank, against F.embedding."""
    __tracebackhide__ = True
    module, what = _embeddings(Embeddings, device)
    weight = dict(module.named_parameters())["embedding.weight"].detach()
    g = torch.Generator().manual_seed(530)
    shapes = [(2, 7), (5,), (2, 3, 4)]
    for shape in shapes:
        tokens = torch.randint(0, _V, shape, generator=g).to(device)
        label = f"{what} applied to tokens of shape {shape}"
        out = call(module, tokens, what=label)
        expect_tensor(out, label, shape=(*shape, _ED), dtype=weight.dtype, device=device)
        looked_up = F.embedding(tokens, weight)
        expect_close(out, looked_up * math.sqrt(_ED), label, mistakes={
            NOT_SCALED: looked_up, DIVIDED: looked_up / math.sqrt(_ED), SCALED_BY_D: looked_up * _ED,
            SCALED_BY_VOCAB: looked_up * math.sqrt(_V)})
    return len(shapes)


def _check_embeddings_grads(Embeddings, device) -> int:
    """float64 after .to(): the output and the gradient with respect to the embedding matrix."""
    __tracebackhide__ = True
    module, what = _embeddings(Embeddings, device, torch.float64)
    tokens = torch.tensor([[1, 4, 4, 0], [22, 3, 1, 1]], device=device)
    label = f"{what}.to(torch.float64) applied to tokens of shape (2, 4)"
    out = call(module, tokens, what=label)
    expect_tensor(out, label, shape=(2, 4, _ED), dtype=torch.float64, device=device)
    weight = dict(module.named_parameters())["embedding.weight"]
    ref = weight.detach().clone().requires_grad_()
    want = F.embedding(tokens, ref) * math.sqrt(_ED)
    expect_close(out, want, label)
    return 1 + expect_grads_close(out, want, {"embedding.weight": weight}, {"embedding.weight": ref}, label, seed=531,
                                  mistakes={NOT_SCALED: F.embedding(tokens, ref)})


def check_embeddings(Embeddings) -> None:
    """Visible tests for exercise 3. ``Embeddings(vocab_size, d_model)`` with one submodule
    ``embedding = nn.Embedding(vocab_size, d_model)``; ``forward(tokens)``: integer tokens ``(...)``
    -> ``(..., d_model)``, the looked-up rows times √d_model."""
    __tracebackhide__ = True
    passed("Embeddings", on_devices([_check_embeddings_values, _check_embeddings_grads], Embeddings))


# --------------------------------------------------------------------------------------------
# Exercise 4: apply_rope(x, positions, base=10000.0)
# --------------------------------------------------------------------------------------------

ROPE_HALVES = Mistake("rope_halves_convention", "the pairs are (i, i + d/2), the \"rotate half\" convention of "
                      "GPT-NeoX and of many LLaMA ports: this course pairs neighbours, (2i, 2i+1). Both are valid "
                      "but not interchangeable (the weights of a trained model assume one of them).")
ROPE_MIXED = Mistake("rope_conventions_mixed", "the two pairing conventions are mixed: the cos/sin tables belong "
                     "to one (repeated per pair, or concatenated halves) and the rotation to the other (\"rotate "
                     "half\", or neighbours). Rotate each pair (2i, 2i+1) by its own angle pos·θ_i.")
ROPE_BACKWARDS = Mistake("rope_rotates_backwards", "the rotation goes the wrong way: (a, b) becomes (a cos + b sin, "
                         "-a sin + b cos), a rotation by -pos·θ_i. Rotate by +pos·θ_i: (a cos - b sin, "
                         "a sin + b cos).")
ROPE_EXPONENT_I = Mistake("rope_exponent_i_instead_of_2i", "the angles use θ_i = base^(-i/d) for the pair i: "
                          "the exponent is 2i/d (pair i holds features 2i and 2i+1).")
ROPE_IGNORES_POSITIONS = Mistake("rope_ignores_positions", "the rotation uses positions 0, 1, ..., L-1 instead "
                                 "of the `positions` argument (a decoder generating token by token, or a shifted "
                                 "window, passes other positions).")
ROPE_IGNORES_BASE = Mistake("rope_ignores_base", "the `base` argument is ignored (10000 is used whatever it is).")
ROPE_ADDED = Mistake("rope_added_not_rotated", "a sinusoidal table is added to x: RoPE does not add anything, it "
                     "rotates each pair (x_2i, x_2i+1) by the angle pos·θ_i.")
ROPE_NOT_RELATIVE = Mistake("rope_scores_not_relative", "shifting the positions of both q and k by {shift} changed "
                            "the scores q_m · k_n (by up to {diff:.2g}): with a rotation by pos·θ_i they depend only "
                            "on m - n.")
ROPE_FLOAT32 = Mistake("rope_float32_angles", "{what} has the right dtype but only float32 precision (off by "
                       "{diff:.1e}): compute the angles in x's dtype, not in float32.")


def _rope_call(fn, x, positions, what, **kwargs):
    __tracebackhide__ = True
    out = call(fn, x, positions, what=what, **kwargs)
    expect_tensor(out, what, shape=x.shape, dtype=x.dtype, device=x.device)
    return out


def _rope_mistakes(x, positions, base=10000.0) -> dict:
    """Mistake -> what it gives. (The second way of mixing the conventions is tested apart:
    one dict key per mistake.)"""
    table = sinusoid(int(positions.max()) + 1, x.shape[-1], device=x.device, base=base)
    return {ROPE_HALVES: rope(x, positions, base, pairs="halves"),
            ROPE_BACKWARDS: rope(x, positions, base, direction=-1),
            ROPE_EXPONENT_I: rope(x, positions, base, exponent="i"),
            ROPE_MIXED: _rope_mixed(x, positions, base, "interleaved_tables"),
            ROPE_ADDED: (x.to(torch.float64) + table[positions]).to(x.dtype)}


def _expect_rope(out, x, positions, what, base=10000.0, extra=None) -> None:
    """``out`` against rope(x, positions, base), naming the mistakes it matches."""
    __tracebackhide__ = True
    want = rope(x, positions, base)
    tol = table_tolerance(x.dtype, int(positions.max()) + 1)
    if not is_close(out, want, tol=tol) and is_close(out, _rope_mixed(x, positions, base, "halves_tables")):
        fail(f"{what} is wrong: {ROPE_MIXED.message}", mistake=ROPE_MIXED.id)
    expect_close(out, want, what, mistakes={**_rope_mistakes(x, positions, base), **(extra or {})}, tol=tol)


def _check_rope_values(fn, device) -> int:
    """Positions 0 ... L-1 on (B, H, L, d), (L, d) and (B, L, d) inputs; the other conventions named."""
    __tracebackhide__ = True
    shapes = [(2, 3, 5, 8), (6, 4), (3, 9, 16)]
    for i, shape in enumerate(shapes):
        x = randn(*shape, seed=540 + i, device=device)
        positions = torch.arange(shape[-2], device=device)
        what = f"apply_rope(x, torch.arange({shape[-2]})) for x of shape {shape}"
        _expect_rope(_rope_call(fn, x, positions, what), x, positions, what)
    return len(shapes)


def _check_rope_positions(fn, device) -> int:
    """Arbitrary positions (not 0 ... L-1, not sorted) and another base."""
    __tracebackhide__ = True
    x = randn(2, 5, 8, seed=550, device=device)
    positions = torch.tensor([3, 17, 0, 42, 5], device=device)
    what = f"apply_rope(x, positions={positions.tolist()}) for x of shape (2, 5, 8)"
    _expect_rope(_rope_call(fn, x, positions, what), x, positions, what,
                 extra={ROPE_IGNORES_POSITIONS: rope(x, torch.arange(5, device=device))})
    what = f"apply_rope(x, positions={positions.tolist()}, base=100.0) for x of shape (2, 5, 8)"
    _expect_rope(_rope_call(fn, x, positions, what, base=100.0), x, positions, what, 100.0,
                 extra={ROPE_IGNORES_BASE: rope(x, positions)})
    return 2


def _check_rope_relative(fn, device) -> int:
    """Shifting every position of q and k by the same amount leaves every score q_m · k_n unchanged."""
    __tracebackhide__ = True
    q, k = randn(2, 6, 16, seed=560, device=device), randn(2, 6, 16, seed=561, device=device)
    positions = torch.tensor([0, 1, 2, 4, 7, 11], device=device)

    def scores(shift):
        rq = _rope_call(fn, q, positions + shift, f"apply_rope(q, positions + {shift})")
        rk = _rope_call(fn, k, positions + shift, f"apply_rope(k, positions + {shift})")
        return (rq @ rk.transpose(-2, -1)).detach()

    base = scores(0)
    for shift in (1, 13, 40):
        shifted = scores(shift)
        if not is_close(shifted, base, tol=table_tolerance(torch.float32, 60)):
            fail(ROPE_NOT_RELATIVE, shift=shift, diff=float((shifted - base).abs().max()))
    return 3


def _check_rope_float64(fn, device) -> int:
    """float64 precision at large positions, and the gradient with respect to x."""
    __tracebackhide__ = True
    x = randn(2, 4, 8, seed=570, dtype=torch.float64, device=device, requires_grad=True)
    positions = torch.tensor([0, 999, 5000, 123456], device=device)
    what = f"apply_rope(x, positions={positions.tolist()}) for float64 x of shape (2, 4, 8)"
    out = _rope_call(fn, x, positions, what)
    ref = x.detach().clone().requires_grad_()
    want = rope(ref, positions)
    if not is_close(out, want) and is_close(out, want, tol=(1e-3, 1e-3)):
        fail(ROPE_FLOAT32, what=what, diff=float((out.detach() - want.detach()).abs().max()))
    _expect_rope(out, ref.detach(), positions, what)
    return 1 + expect_grads_close(out, want, [x], [ref], what, seed=571)


def _check_rope_odd(fn, device) -> int:
    __tracebackhide__ = True
    x = randn(2, 3, 5, seed=580, device=device)
    expect_raises(ValueError, fn, x, torch.arange(3, device=device), what="apply_rope(x, positions) for x of shape "
                  "(2, 3, 5)", hint="An odd d_head cannot be cut into pairs: check it and raise ValueError.")
    return 1


def check_apply_rope(apply_rope) -> None:
    """Visible tests for exercise 4. ``apply_rope(x, positions, base=10000.0)``: x ``(..., L, d_head)``,
    positions an integer tensor ``(L,)``; each pair (x_2i, x_2i+1) at position p rotated by the angle
    p · base^(-2i/d_head); same shape, dtype and device; an odd d_head raises ValueError."""
    __tracebackhide__ = True
    passed("apply_rope", on_devices([_check_rope_values, _check_rope_positions, _check_rope_relative,
                                     _check_rope_float64, _check_rope_odd], apply_rope))
