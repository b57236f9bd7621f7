"""Checks for chapter 2: the causal mask, the padding mask, and attention with a boolean mask.

The course-wide mask convention (chapters 3+ rely on it) is spelled out in :mod:`.masks`: a
boolean tensor, True where a query may attend to a key, broadcastable against the logits
``(..., L_q, L_k)``; a query that may attend to nothing gets zero weights and a zero output.

Expected values come from PyTorch's own operations (``torch.tril``, ``torch.arange`` comparisons,
``F.scaled_dot_product_attention`` with a boolean ``attn_mask``, ``torch.softmax`` after
``masked_fill(-inf)``), never from the course's solution. Each public check runs a list of
``_check_<property>(fn, device)`` functions on the CPU and, when present, on CUDA; whether
``causal_mask`` honours ``device=`` is also checked on the ``meta`` device, so that a CPU-only
machine catches it too.

Later chapters that call the student's chapter-2 attention use :func:`masked_attention_failure`
to tell a chapter-2 bug from a bug in the layer built on it.
"""
from __future__ import annotations

import ast
import math

import torch

from . import forbidden, masks
from .core import (CheckFailure, Mistake, call, expect_close, expect_outputs, expect_tensor, fail, on_devices,
                   passed, randn, randn_qkv, tolerance)
from .gradients import expect_grads_close
from .masks import MASK_NOT_BOOL, causal, expect_mask, expect_mask_tensor, padding  # noqa: F401 - catalogued
from .scan import forbid_names, source_of
from ..notebook import safe_parse

# --------------------------------------------------------------------------------------------
# Exercise 1: causal_mask(n, device=None) -> (n, n) bool
# --------------------------------------------------------------------------------------------

CAUSAL_INVERTED = Mistake("causal_inverted", "it is inverted (True where a key is blocked). In this course True "
                          "means \"this query may attend to this key\", as in F.scaled_dot_product_attention's "
                          "boolean attn_mask.")
CAUSAL_UPPER = Mistake("causal_upper_triangle", "it is the upper triangle. Row i is query i and column j is key "
                       "j; query i may see keys j <= i, which is the lower triangle (torch.tril), not torch.triu.")
CAUSAL_NO_DIAGONAL = Mistake("causal_without_diagonal", "the diagonal is excluded: a position may attend to "
                             "itself (keys j <= i, not j < i).")
CAUSAL_ALL_TRUE = Mistake("causal_blocks_nothing", "every entry is True, which blocks nothing: only keys j <= i "
                          "are allowed for query i.")
CAUSAL_SHIFTED = Mistake("causal_shifted_by_one", "it is shifted by one: query i may also see key i + 1, the very "
                         "token it is trained to predict, so the model can still copy the answer. Query i may "
                         "see keys j <= i (diagonal included), not j <= i + 1.")
CAUSAL_IGNORES_DEVICE = Mistake(
    "causal_ignores_device", "{what} ignores its device argument: {why}. The mask is then always created on the "
    "default device (the CPU). That passes on a machine without a GPU and fails as soon as the attention runs on "
    "one, so the check asks for device=\"meta\" (PyTorch's device without data, present on every machine) to "
    "catch it anywhere. Create the tensor on the requested device (the tensor factories take device=...).")


def _check_causal_values(causal_mask, device) -> int:
    __tracebackhide__ = True
    for n in (5, 2, 1):
        what = f"causal_mask({n}, device={device!r})"
        m = expect_mask_tensor(call(causal_mask, n, device=device, what=what), what, (n, n), device)
        want = causal(n, device)
        ones = torch.ones(n, n, dtype=torch.bool, device=device)
        expect_mask(m, want, what, mistakes={CAUSAL_INVERTED: ~want, CAUSAL_UPPER: torch.triu(ones),
                                             CAUSAL_NO_DIAGONAL: torch.tril(ones, diagonal=-1),
                                             CAUSAL_ALL_TRUE: ones, CAUSAL_SHIFTED: torch.tril(ones, diagonal=1)})
    return 12


def _device_parameter_unused(fn) -> bool:
    """Static: a ``def causal_mask(n, device=None)`` whose body never reads ``device``."""
    tree = safe_parse(source_of(fn) or "")
    if tree is None:
        return False
    defs = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    named = [node for node in defs if node.name == "causal_mask"]
    if not (named or defs):
        return False
    node = (named or defs)[-1]      # the definition in force (in the grader: the last in the notebook)
    params = [a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)]
    if "device" not in params or node.args.vararg or node.args.kwarg:
        return False
    return not any(isinstance(n, ast.Name) and n.id == "device" for body in node.body for n in ast.walk(body))


def _check_honours_device(causal_mask) -> int:
    """The mask is created on the requested device, on any machine: asked for the ``meta`` device
    (no data, available everywhere), a mask that comes back on the CPU ignored the argument."""
    __tracebackhide__ = True
    what = "causal_mask(4, device=\"meta\")"
    if _device_parameter_unused(causal_mask):
        fail(CAUSAL_IGNORES_DEVICE, what="causal_mask(n, device)",
             why="the function never uses its parameter `device`")
    try:
        m = call(causal_mask, 4, device="meta", what=what)
    except CheckFailure:
        # Code that cannot run on a device without data (or a result that cannot leave the
        # grader's sandbox, which does not carry meta tensors) tells nothing about the device.
        return 1
    if isinstance(m, torch.Tensor) and m.device.type != "meta":
        fail(CAUSAL_IGNORES_DEVICE, what=what, why=f"asked for the meta device, it returned a mask on {m.device}")
    return 2


def _check_default_device(causal_mask) -> int:
    """Without a device argument the mask is on the CPU."""
    __tracebackhide__ = True
    m = call(causal_mask, 3, what="causal_mask(3)")
    expect_mask_tensor(m, "causal_mask(3) (no device given)", (3, 3), "cpu")
    expect_mask(m, causal(3), "causal_mask(3)", {})
    return 1


def check_causal_mask(causal_mask) -> None:
    """Visible tests for exercise 1. ``causal_mask(n, device=None)`` -> ``(n, n)`` bool, True on
    and below the diagonal (query i may attend to keys j <= i)."""
    __tracebackhide__ = True
    n = on_devices([_check_causal_values], causal_mask)
    passed("causal_mask", n + _check_default_device(causal_mask) + _check_honours_device(causal_mask))


# --------------------------------------------------------------------------------------------
# Exercise 2: padding_mask(lengths, max_len) -> (B, 1, max_len) bool
# --------------------------------------------------------------------------------------------

PADDING_NO_QUERY_AXIS = Mistake(
    "padding_without_query_axis", "{what} has shape {shape} = (B, max_len); it should be (B, 1, max_len). The "
    "middle axis is the query axis, of size 1, so that the mask broadcasts over every query of the "
    "(B, L_q, L_k) logits: add it with mask[:, None, :] or .unsqueeze(1).")
PADDING_BLOCKS_QUERIES = Mistake(
    "padding_blocks_queries", "{what} has shape (B, max_len, 1): such a mask would block queries (rows), not "
    "keys. Padding hides keys, the last axis: the shape is (B, 1, max_len).")
PADDING_INVERTED = Mistake("padding_inverted", "it is inverted (True at the padding). In this course True means "
                           "\"may attend\": True at the real tokens, False at the padding.")
PADDING_ONE_TOO_MANY = Mistake("padding_one_too_many", "it is off by one: a sequence of length n has real tokens "
                               "at positions 0, ..., n-1 (use position < length, not <=).")
PADDING_ONE_TOO_FEW = Mistake("padding_one_too_few", "it is off by one: a sequence of length n has real tokens "
                              "at positions 0, ..., n-1, so position n-1 is real too.")
PADDING_AT_START = Mistake("padding_at_start", "the padding is at the start of the sequences; in this course the "
                           "real tokens come first and the padding last.")

_PADDING_CASES = [([3, 1, 5], 5, torch.int64), ([2, 4], 6, torch.int64), ([0, 2, 3], 3, torch.int64),
                  ([4, 1], 4, torch.int32), ([2], 2, torch.int64)]


def _check_padding_values(padding_mask, device) -> int:
    __tracebackhide__ = True
    for lens, max_len, int_dtype in _PADDING_CASES:
        lengths = torch.tensor(lens, dtype=int_dtype, device=device)
        what = f"padding_mask(torch.tensor({lens}, dtype={int_dtype}), {max_len}) on {device}"
        m = expect_tensor(call(padding_mask, lengths, max_len, what=what), what)
        b = len(lens)
        if tuple(m.shape) == (b, max_len) and b != 1:
            fail(PADDING_NO_QUERY_AXIS, what=what, shape=tuple(m.shape))
        if tuple(m.shape) == (b, max_len, 1) and max_len != 1:
            fail(PADDING_BLOCKS_QUERIES, what=what)
        expect_mask_tensor(m, what, (b, 1, max_len), device)
        positions, n = torch.arange(max_len, device=device), lengths[:, None]
        want = padding(lengths, max_len)
        expect_mask(m, want, what, mistakes={
            PADDING_INVERTED: ~want, PADDING_ONE_TOO_MANY: (positions <= n)[:, None, :],
            PADDING_ONE_TOO_FEW: (positions < n - 1)[:, None, :],
            PADDING_AT_START: (positions >= max_len - n)[:, None, :]})
    return 3 * len(_PADDING_CASES)


def check_padding_mask(padding_mask) -> None:
    """Visible tests for exercise 2. ``padding_mask(lengths, max_len)`` with ``lengths`` a 1-D
    integer tensor of B lengths -> ``(B, 1, max_len)`` bool on ``lengths.device``, True at the
    real tokens (positions < length), False at the padding."""
    __tracebackhide__ = True
    passed("padding_mask", on_devices([_check_padding_values], padding_mask))


# --------------------------------------------------------------------------------------------
# Exercise 3: scaled_dot_product_attention(q, k, v, mask=None) -> (output, weights)
# --------------------------------------------------------------------------------------------

_NAN_FULLY_MASKED = (
    "Make sure you aren't computing 0 * -inf or softmax of an all -inf row: a query that may "
    "attend to no key has every logit at -inf, and a softmax of that row is -inf - (-inf) = NaN "
    "(zeroing its weights and dividing by their sum is 0 / 0 = NaN too). "
    "Find the rows that have no allowed key, and either keep them from reaching the softmax as all "
    "-inf (any finite logit will do) and give them zero weights afterwards, or replace their NaN "
    "weights by 0 after the softmax.")
_EMPTY_ROWS = "a query that may attend to no key must get all-zero weights and a zero output"

NO_SCALING = Mistake("no_scaling", "no scaling: divide the logits QKᵀ by √d_k before masking and the softmax.")
MASK_INVERTED = Mistake("mask_inverted", "the mask is inverted (it blocks the keys where it is True). In this "
                        "course True means \"this query may attend to this key\", as in "
                        "F.scaled_dot_product_attention's boolean attn_mask: fill the logits where the mask is "
                        "False (~mask) with -inf.")
MASK_IGNORED = Mistake("mask_ignored", "the mask has no effect: fill the logits where the mask is False with "
                       "-inf before the softmax.")
MASK_AFTER_SOFTMAX = Mistake("mask_after_softmax", "the mask is applied AFTER the softmax by zeroing weights, so "
                             "the rows no longer sum to 1 (and the blocked keys still shrank the allowed weights "
                             "through the softmax's denominator). Apply it to the logits BEFORE the softmax: "
                             "masked_fill(~mask, -inf).")
LARGE_NEGATIVE_FILL = Mistake("large_negative_fill", f"{_EMPTY_ROWS}. It looks like the blocked logits were set "
                              "to a large finite negative number (e.g. -1e9) instead of -inf: a row in which "
                              "every logit is -1e9 is an ordinary softmax (uniform weights). Use -inf, and zero "
                              "the rows that have no allowed key.")
LARGE_NEGATIVE_ADDED = Mistake("large_negative_added", f"{_EMPTY_ROWS}. It looks like a large finite negative "
                               "number (e.g. -1e9) was added to the blocked logits instead of filling them with "
                               "-inf: such a row is still an ordinary softmax. Use -inf, and zero the rows that "
                               "have no allowed key.")
UNIFORM_EMPTY_ROWS = Mistake("uniform_empty_rows", f"{_EMPTY_ROWS}, not uniform weights over the blocked keys.")
MASK_FILLED_WITH_ZERO = Mistake(
    "mask_filled_with_zero", "the blocked logits were set to 0 (masked_fill(~mask, 0), or logits * mask) instead "
    "of -inf. A logit of 0 is an ordinary logit: exp(0) = 1, so the blocked keys still get weight. Set the "
    "blocked logits to -inf before the softmax, so that exp gives exactly 0.")
MASK_TRANSPOSED = Mistake("mask_transposed", "the mask is transposed: its rows are the queries and its columns "
                          "the keys, like the logits (..., L_q, L_k); use it as it is.")
NAN_IN_EMPTY_ROWS = Mistake("nan_in_empty_rows", "The result ({label}) is NaN exactly in the rows where the "
                            f"query may attend to no key (a fully masked row). {_NAN_FULLY_MASKED}")
NAN_WHERE_ALL_ALLOWED = Mistake("nan_where_all_allowed", "The result ({label}) is NaN in rows where the mask "
                                "allows every key, i.e. where an INVERTED mask would block everything. True "
                                "means \"may attend\": fill the logits where the mask is False (~mask) with -inf.")
NAN_IN_RESULT = Mistake("nan_in_result", f"The result ({{label}}) contains NaN. {_NAN_FULLY_MASKED} Also look "
                        "for 0 * inf, and for exp() of large numbers (subtract the row maximum first).")
BLOCKED_WEIGHT = Mistake("blocked_weight_not_zero", "weights ({label}): keys the mask blocks (False) must get "
                         "exactly zero weight, but some get up to {largest:.3g}. Fill the blocked logits with -inf "
                         "before the softmax: exp(-inf) is exactly 0, exp of a merely large negative number may "
                         "not be.")
CAUSAL_ROWS_SUM = Mistake("causal_rows_do_not_sum_to_one", "With a causal mask every row of weights should still "
                          "sum to 1, got {sums}.")
PEEKING = Mistake("peeks_at_the_future", "No peeking: with a causal mask, changing q, k and v only at positions > "
                  "{t} changed the {part} at positions <= {t}, so those positions can see the future. The "
                  "blocked keys must have no influence at all: not through their weights, and not through the "
                  "softmax's denominator (which is what happens when the weights are zeroed after the softmax). "
                  "Fill the blocked logits with -inf before the softmax.")
EMPTY_ROW_WEIGHTS = Mistake("empty_row_weights_not_zero", "A query that may attend to no key (a fully masked "
                            "row) must get all-zero weights, got {got} ({label}). If you used a large negative "
                            "number instead of -inf, such a row is an ordinary softmax; use -inf and zero these "
                            "rows.")
EMPTY_ROW_OUTPUT = Mistake("empty_row_output_not_zero", "A query that may attend to no key must get a zero "
                           "output, got {got} ({label}).")
NAN_AFTER_RENORMALISING = Mistake("nan_after_renormalising", "The result ({label}) contains NaN. If you zero "
                                  "the blocked weights after the softmax and then renormalise, the blocked key's "
                                  "huge logit takes all the mass, the allowed weights underflow to 0, and you "
                                  "divide 0 by 0. Block BEFORE the softmax: fill the blocked logits with -inf.")
HUGE_BLOCKED_LOGIT = Mistake("huge_blocked_logit_took_the_mass", "the blocked key with a huge logit took all of "
                             "the softmax's mass: blocking after the softmax (zeroing the weights, with or without "
                             "renormalising) leaves nothing for the allowed keys. Fill the blocked logits with -inf "
                             "BEFORE the softmax.")
NAN_IN_GRADIENT = Mistake(
    "nan_in_gradient", "The gradient of {what} with respect to {name} contains NaN or inf, although the result "
    "itself is finite. Most likely the softmax computed NaN for a fully masked row (all -inf) and the NaN was "
    "replaced afterwards (torch.nan_to_num, torch.where). Whether that NaN reaches the gradients depends on how "
    "the -inf got into the logits: masked_fill and torch.where send no gradient at all to the positions they "
    "filled, so the NaN stops there; ADDING a tensor that holds -inf (logits + bias) passes the NaN gradient "
    "straight through to the logits, and on to q and k. Fill the blocked logits instead of adding to them, or "
    "keep all -inf rows away from the softmax.")


def _logits(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


def _rounded(x: torch.Tensor) -> list:
    """Values for a message, rounded to 3 decimals."""
    return torch.round(x.detach().double().cpu(), decimals=3).tolist()


def _mistakes(q, k, v, mask) -> tuple[dict, dict]:
    """What the common masking mistakes would produce, as (weights, outputs) dicts."""
    with torch.no_grad():
        logits = _logits(q, k)
        m = mask.expand(logits.shape)
        plain = torch.softmax(logits, -1)
        w = {
            NO_SCALING: masks.masked_softmax(logits * math.sqrt(q.shape[-1]), m),
            MASK_INVERTED: masks.masked_softmax(logits, ~m),
            MASK_IGNORED: plain,
            MASK_AFTER_SOFTMAX: plain * m,
            MASK_FILLED_WITH_ZERO: torch.softmax(logits.masked_fill(~m, 0.0), -1),
            LARGE_NEGATIVE_FILL: masks.masked_softmax(logits, m, fill=-1e9, zero_empty_rows=False),
            LARGE_NEGATIVE_ADDED: torch.softmax(logits + (~m) * -1e9, -1),
            UNIFORM_EMPTY_ROWS: torch.where(m.any(-1, keepdim=True), masks.masked_softmax(logits, m),
                                            torch.full_like(plain, 1 / plain.shape[-1])),
        }
        if m.shape[-1] == m.shape[-2]:
            w[MASK_TRANSPOSED] = masks.masked_softmax(logits, m.transpose(-2, -1))
        out = {mistake: weights @ v for mistake, weights in w.items()}
    return w, out


def _attend(fn, q, k, v, mask, label, *, pass_mask=True):
    """Call the student's function, check it returns (output, weights) of the right shapes."""
    __tracebackhide__ = True
    if pass_mask:
        result = call(fn, q, k, v, mask=mask, what=f"scaled_dot_product_attention(q, k, v, mask) ({label})")
    else:
        result = call(fn, q, k, v, what=f"scaled_dot_product_attention(q, k, v) ({label})")
    out, w = expect_outputs(result, "scaled_dot_product_attention")
    logits_shape = torch.broadcast_shapes(tuple(q.shape[:-1]) + (k.shape[-2],),
                                          tuple(mask.shape) if mask is not None else (1,))
    expect_tensor(w, f"weights ({label})", shape=logits_shape, dtype=q.dtype, device=q.device)
    expect_tensor(out, f"output ({label})", shape=(*logits_shape[:-1], v.shape[-1]), dtype=q.dtype,
                  device=q.device)
    return out, w


def _expect_no_nan(out, w, mask, label):
    """NaN in the result: name the fully masked rows when that is where it comes from."""
    __tracebackhide__ = True
    bad = torch.isnan(w).any(-1) | torch.isnan(out).any(-1)
    if not bad.any():
        return
    if mask is not None:
        empty = ~mask.expand(w.shape).any(-1).to(bad.device)
        if empty.any() and bool((bad <= empty).all()):
            fail(NAN_IN_EMPTY_ROWS, label=label)
        if bool((bad <= mask.expand(w.shape).all(-1).to(bad.device)).all()):
            fail(NAN_WHERE_ALL_ALLOWED, label=label)
    fail(NAN_IN_RESULT, label=label)


def _compare(fn, q, k, v, mask, label, *, pass_mask=True) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, weights) against the expected ones, naming the masking mistakes."""
    __tracebackhide__ = True
    out, w = _attend(fn, q, k, v, mask, label, pass_mask=pass_mask)
    _expect_no_nan(out, w, mask, label)
    with torch.no_grad():
        want_out, want_w = masks.attention(q, k, v, mask)
    everything = torch.ones((), dtype=torch.bool, device=q.device)
    wrong_w, wrong_out = _mistakes(q, k, v, everything if mask is None else mask)
    expect_close(w, want_w, f"weights ({label})", mistakes=wrong_w)
    blocked = w.detach()[~mask.expand(want_w.shape).to(w.device)] if mask is not None else w.new_zeros(0)
    if blocked.numel() and not bool((blocked == 0).all()):
        fail(BLOCKED_WEIGHT, label=label, largest=float(blocked.abs().max()))
    expect_close(out, want_out, f"output ({label})", mistakes=wrong_out)
    return out, w


def _check_without_mask(fn, device) -> int:
    """Without a mask it is chapter 1's attention (mask omitted, and mask=None)."""
    __tracebackhide__ = True
    q, k, v = randn_qkv((2, 3, 8), (2, 5, 8), 6, seed=1, device=device)
    _compare(fn, q, k, v, None, "no mask argument", pass_mask=False)
    _compare(fn, q, k, v, None, "mask=None")
    return 2


def _check_causal(fn, device) -> int:
    """A causal mask (L, L) broadcast over the batch; rows still sum to 1."""
    __tracebackhide__ = True
    q, k, v = randn_qkv((2, 5, 8), (2, 5, 8), 6, seed=4, device=device)
    _, w = _compare(fn, q, k, v, causal(5, device), "causal mask (5, 5), batch of 2")
    sums = w.detach().sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
        fail(CAUSAL_ROWS_SUM, sums=sums.tolist())
    return 3


def _check_no_peeking(fn, device) -> int:
    """With a causal mask, what happens after position t never changes the result up to t."""
    __tracebackhide__ = True
    b, length, d, d_v = 2, 7, 8, 5
    q, k, v = randn_qkv((b, length, d), (b, length, d), d_v, seed=40, device=device)
    mask = causal(length, device)
    out, w = _attend(fn, q, k, v, mask, "causal mask, for the no-peeking test")
    rtol, atol = tolerance(q.dtype)
    for t in (0, 3, length - 2):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for i, x in enumerate((q2, k2, v2)):
            x[:, t + 1:] = randn(b, length - t - 1, x.shape[-1], seed=50 + 3 * t + i, device=device, scale=3.0)
        out2, w2 = _attend(fn, q2, k2, v2, mask, f"causal mask, future positions > {t} changed")
        same_out = torch.allclose(out2[:, :t + 1], out[:, :t + 1], rtol=rtol, atol=atol, equal_nan=True)
        same_w = torch.allclose(w2[:, :t + 1], w[:, :t + 1], rtol=rtol, atol=atol, equal_nan=True)
        if not (same_out and same_w):
            fail(PEEKING, t=t, part="output" if not same_out else "weights")
    return 3


def _check_padding(fn, device) -> int:
    """A padding mask (B, 1, L_k) in cross-attention (L_q = 3 queries, L_k = 6 keys)."""
    __tracebackhide__ = True
    q, k, v = randn_qkv((3, 3, 8), (3, 6, 8), 4, seed=7, device=device)
    _compare(fn, q, k, v, padding([6, 2, 4], 6, device), "padding mask (3, 1, 6), lengths 6, 2, 4")
    return 2


def _check_heads(fn, device) -> int:
    """Causal and padding combined, broadcast over a head dimension: q (B, H, L, d), mask (B, 1, L, L)."""
    __tracebackhide__ = True
    q, k, v = randn_qkv((2, 3, 5, 8), (2, 3, 5, 8), 4, seed=10, device=device)
    combined = (causal(5, device) & padding([5, 3], 5, device))[:, None]
    _compare(fn, q, k, v, combined, "causal & padding mask (2, 1, 5, 5), 3 heads")
    return 2


def _check_no_batch(fn, device) -> int:
    __tracebackhide__ = True
    q, k, v = randn_qkv((4, 16), (4, 16), 16, seed=13, device=device)
    _compare(fn, q, k, v, causal(4, device), "causal mask, no batch dimension")
    return 2


def _check_fully_masked_rows(fn, device) -> int:
    """A query that may attend to no key: zero weights, zero output, no NaN."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(16)
    mask = (torch.rand(2, 5, 6, generator=g) < 0.6)
    mask[:, :, 0] = True
    mask[0, 1] = False
    mask[1, 4] = False
    mask = mask.to(device)
    q, k, v = randn_qkv((2, 5, 8), (2, 6, 8), 3, seed=17, device=device)
    label = "random mask (2, 5, 6) in which queries 1 and 4 of batch items 0 and 1 may attend to nothing"
    out, w = _attend(fn, q, k, v, mask, label)
    _expect_no_nan(out, w, mask, label)
    empty = ~mask.any(-1)
    if not bool((w.detach()[empty] == 0).all()):
        fail(EMPTY_ROW_WEIGHTS, got=_rounded(w.detach()[empty]), label=label)
    if not bool((out.detach()[empty].abs() <= tolerance(q.dtype)[1]).all()):
        fail(EMPTY_ROW_OUTPUT, got=_rounded(out.detach()[empty]), label=label)
    _compare(fn, q, k, v, mask, label)
    # A padding mask with a sequence of length 0: every query of that item sees nothing.
    q, k, v = randn_qkv((2, 4, 8), (2, 4, 8), 8, seed=20, device=device)
    _compare(fn, q, k, v, padding([0, 3], 4, device), "padding mask with lengths 0 and 3")
    return 4


def _check_huge_blocked_logit(fn, device) -> int:
    """A blocked key with a huge logit must have no influence at all."""
    __tracebackhide__ = True
    q = torch.ones(1, 3, 4, device=device)
    k = torch.stack([torch.tensor([0.5, 0.0, 0.0, 0.0]), torch.tensor([0.0, -0.5, 0.0, 0.0]),
                     torch.full((4,), 1000.0)])[None].to(device)
    v = randn(1, 3, 2, seed=23, device=device)
    label = "causal mask; the blocked key 2 has logits of 2000 for queries 0 and 1"
    out, w = _attend(fn, q, k, v, causal(3, device), label)
    if torch.isnan(w).any() or torch.isnan(out).any():
        fail(NAN_AFTER_RENORMALISING, label=label)
    want_out, want_w = masks.attention(q, k, v, causal(3, device))
    zeroed = torch.softmax(_logits(q, k), -1) * causal(3, device)
    expect_close(w, want_w, f"weights ({label})", mistakes={HUGE_BLOCKED_LOGIT: zeroed})
    expect_close(out, want_out, f"output ({label})", mistakes={HUGE_BLOCKED_LOGIT: zeroed @ v})
    return 2


def _check_masked_grads(fn, device) -> int:
    """Gradients (float64) are finite and match PyTorch's, fully masked row included."""
    __tracebackhide__ = True
    q, k, v = randn_qkv((2, 3, 5, 8), (2, 3, 5, 8), 4, seed=24, device=device, dtype=torch.float64,
                        requires_grad=True)
    mask = (causal(5, device) & padding([5, 3], 5, device))[:, None].clone()
    mask[0, 0, 2] = False   # batch item 0: query 2 may attend to nothing (every head)
    label = "causal & padding mask with a fully masked row, float64"
    out, _ = _attend(fn, q, k, v, mask, label)
    _, w = _attend(fn, q, k, v, mask, label)   # a second call: a graph of its own for the weights
    _expect_no_nan(out, w, mask, label)
    ref = {name: t.detach().clone().requires_grad_() for name, t in zip("qkv", (q, k, v))}
    want_out, want_w = masks.attention(*ref.values(), mask)
    upstream = randn(*out.shape, seed=27, dtype=torch.float64, device=device)
    n = expect_grads_close(out, want_out, dict(zip("qkv", (q, k, v))), ref, f"the masked attention output ({label})",
                           upstream=upstream, nonfinite=NAN_IN_GRADIENT)
    upstream = randn(*w.shape, seed=28, dtype=torch.float64, device=device)
    return n + expect_grads_close(w, want_w, {"q": q, "k": k}, {"q": ref["q"], "k": ref["k"]},
                                  f"the masked attention weights ({label})", upstream=upstream,
                                  nonfinite=NAN_IN_GRADIENT)


MASKED_ATTENTION_CHECKS = (_check_without_mask, _check_causal, _check_no_peeking, _check_padding, _check_heads,
                           _check_no_batch, _check_fully_masked_rows, _check_huge_blocked_logit, _check_masked_grads)


def _masked_attention_checks(fn) -> int:
    __tracebackhide__ = True
    forbid_names(fn, forbidden.ATTENTION, "scaled_dot_product_attention",
                 "Compute QKᵀ/√d_k, mask the logits, take a softmax and multiply by V yourself.")
    return on_devices(MASKED_ATTENTION_CHECKS, fn)


def check_masked_attention(scaled_dot_product_attention) -> None:
    """Visible tests for exercise 3. ``scaled_dot_product_attention(q, k, v, mask=None)`` ->
    ``(output, weights)`` with q ``(..., L_q, d_k)``, k ``(..., L_k, d_k)``, v ``(..., L_k, d_v)``,
    mask a boolean tensor broadcastable to ``(..., L_q, L_k)``, True where a query may attend."""
    __tracebackhide__ = True
    passed("scaled_dot_product_attention with a mask", _masked_attention_checks(scaled_dot_product_attention))


def masked_attention_failure(scaled_dot_product_attention) -> CheckFailure | None:
    """For later chapters, which call the student's chapter-2 function (pasted into their notebook):
    the first failure of exercise 3's checks on it, or None when it passes them; prints nothing.
    A later check can then say "your scaled_dot_product_attention fails chapter 2's checks: fix it
    first" (with this failure's message and mistake id) instead of blaming the layer built on it."""
    try:
        _masked_attention_checks(scaled_dot_product_attention)
    except CheckFailure as exc:
        return exc
    return None
