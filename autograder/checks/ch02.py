"""Checks for chapter 2: the causal mask, the padding mask, and attention with a boolean mask.

The course-wide mask convention (chapters 3+ rely on it): a mask is a **boolean** tensor in which
**True means "this query may attend to this key"** and False means blocked, broadcastable against
the attention logits of shape ``(..., L_q, L_k)``. It is the convention of the boolean
``attn_mask`` of ``torch.nn.functional.scaled_dot_product_attention`` (``nn.MultiheadAttention``'s
masks use the opposite one).

Expected values come from PyTorch's own operations (``torch.tril``, ``torch.arange`` comparisons,
``F.scaled_dot_product_attention`` with a boolean ``attn_mask``, ``torch.softmax`` after
``masked_fill(-inf)``), never from the course's solution. Every check runs on the CPU and, when
present, on CUDA.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .core import (call, devices, expect_close, expect_tensor, fail, forbid_names, grads, passed,
                   randn, tolerance)

MASKED_ATTENTION_FORBIDDEN = ("scaled_dot_product_attention", "_scaled_dot_product_attention_math",
                              "MultiheadAttention", "multi_head_attention_forward")

_NAN_FULLY_MASKED = (
    "Make sure you aren't computing 0 * -inf or softmax of an all -inf row: a query that may "
    "attend to no key has every logit at -inf, and a softmax of that row is -inf - (-inf) = NaN "
    "(zeroing its weights and dividing by their sum is 0 / 0 = NaN too). "
    "Give such rows a harmless finite logit (e.g. 0) before the softmax and set their weights "
    "to 0 afterwards (masked_fill or torch.where with mask.any(dim=-1, keepdim=True)).")


# --------------------------------------------------------------------------------------------
# Masks as values: comparison and readable printing
# --------------------------------------------------------------------------------------------

def _show(mask: torch.Tensor) -> str:
    """A small boolean mask as rows of 0/1 (for messages)."""
    m = mask.detach().cpu()
    if m.numel() > 64:
        return f"a mask of shape {tuple(m.shape)}"
    return str(m.to(torch.int64).tolist())


def _rounded(x: torch.Tensor) -> list:
    """Values for a message, rounded to 3 decimals."""
    return torch.round(x.detach().double().cpu(), decimals=3).tolist()


def _expect_mask_tensor(m, what: str, shape: tuple, device: str) -> torch.Tensor:
    """Type, shape, dtype bool, device — with mask-specific messages."""
    expect_tensor(m, what, shape=shape)
    if m.dtype != torch.bool:
        fail(f"{what} has dtype {m.dtype}; a mask must be a boolean tensor (dtype torch.bool), True "
             "where a query may attend. A comparison such as `a <= b` gives booleans directly; "
             "torch.ones/torch.zeros take dtype=torch.bool.")
    if m.device.type != torch.device(device).type:
        fail(f"{what} is on {m.device}, but it should be on {device}: create the mask on the "
             "requested device (device=... in torch.ones / torch.arange) rather than on the default "
             "one, and never call .cpu()/.cuda() inside.")
    return m


def _expect_mask(got: torch.Tensor, want: torch.Tensor, what: str, mistakes: dict) -> None:
    """Exact equality of boolean masks; a mismatch that equals a known mistake names it."""
    if torch.equal(got.cpu(), want.cpu()):
        return
    for message, wrong in mistakes.items():
        if wrong is not None and wrong.shape == got.shape and torch.equal(got.cpu(), wrong.cpu()):
            fail(f"{what} is wrong: {message}")
    fail(f"{what} is wrong: expected {_show(want)} (1 = may attend), got {_show(got)}.")


# --------------------------------------------------------------------------------------------
# Exercise 1: causal_mask(n, device=None) -> (n, n) bool
# --------------------------------------------------------------------------------------------

def check_causal_mask(causal_mask) -> None:
    """Visible tests for exercise 1. ``causal_mask(n, device=None)`` -> ``(n, n)`` bool, True on
    and below the diagonal (query i may attend to keys j <= i)."""
    n_checks = 0
    for device in devices():
        for n in (5, 2, 1):
            what = f"causal_mask({n}, device={device!r})"
            m = call(causal_mask, n, device=device, what=what)
            _expect_mask_tensor(m, what, (n, n), device)
            ones = torch.ones(n, n, dtype=torch.bool, device=device)
            want = torch.tril(ones)
            _expect_mask(m, want, what, mistakes={
                "it is inverted (True where a key is blocked). In this course True means \"this "
                "query may attend to this key\", as in F.scaled_dot_product_attention's boolean "
                "attn_mask.": ~want,
                "it is the upper triangle. Row i is query i and column j is key j; query i may see "
                "keys j <= i, which is the lower triangle (torch.tril), not torch.triu.": torch.triu(ones),
                "the diagonal is excluded: a position may attend to itself (keys j <= i, not j < i).":
                    torch.tril(ones, diagonal=-1),
                "the diagonal is excluded and the triangle is the upper one.": torch.triu(ones, diagonal=1),
                "every entry is True, which blocks nothing: only keys j <= i are allowed for query i.": ones,
            })
            n_checks += 4
    # Default device: the CPU.
    m = call(causal_mask, 3, what="causal_mask(3)")
    _expect_mask_tensor(m, "causal_mask(3) (no device given)", (3, 3), "cpu")
    _expect_mask(m, torch.tril(torch.ones(3, 3, dtype=torch.bool)), "causal_mask(3)", {})
    n_checks += 1
    passed("causal_mask", n_checks)


# --------------------------------------------------------------------------------------------
# Exercise 2: padding_mask(lengths, max_len) -> (B, 1, max_len) bool
# --------------------------------------------------------------------------------------------

def check_padding_mask(padding_mask) -> None:
    """Visible tests for exercise 2. ``padding_mask(lengths, max_len)`` with ``lengths`` a 1-D
    integer tensor of B lengths -> ``(B, 1, max_len)`` bool on ``lengths.device``, True at the
    real tokens (positions < length), False at the padding."""
    cases = [([3, 1, 5], 5, torch.int64), ([2, 4], 6, torch.int64), ([0, 2, 3], 3, torch.int64),
             ([4, 1], 4, torch.int32), ([2], 2, torch.int64)]
    n_checks = 0
    for device in devices():
        for lens, max_len, int_dtype in cases:
            lengths = torch.tensor(lens, dtype=int_dtype, device=device)
            what = f"padding_mask(torch.tensor({lens}, dtype={int_dtype}), {max_len}) on {device}"
            m = call(padding_mask, lengths, max_len, what=what)
            b = len(lens)
            expect_tensor(m, what)
            if tuple(m.shape) == (b, max_len) and b != 1:
                fail(f"{what} has shape {tuple(m.shape)} = (B, max_len); it should be (B, 1, max_len). "
                     "The middle axis is the query axis, of size 1, so that the mask broadcasts over "
                     "every query of the (B, L_q, L_k) logits: add it with mask[:, None, :] or "
                     ".unsqueeze(1).")
            if tuple(m.shape) == (b, max_len, 1) and max_len != 1:
                fail(f"{what} has shape (B, max_len, 1): such a mask would block queries (rows), not "
                     "keys. Padding hides keys, the last axis: the shape is (B, 1, max_len).")
            _expect_mask_tensor(m, what, (b, 1, max_len), device)
            positions = torch.arange(max_len, device=device)
            want = (positions < lengths[:, None])[:, None, :]
            _expect_mask(m, want, what, mistakes={
                "it is inverted (True at the padding). In this course True means \"may attend\": "
                "True at the real tokens, False at the padding.": ~want,
                "it is off by one: a sequence of length n has real tokens at positions 0, ..., n-1 "
                "(use position < length, not <=).": (positions <= lengths[:, None])[:, None, :],
                "it is off by one: a sequence of length n has real tokens at positions 0, ..., n-1, "
                "so position n-1 is real too.": (positions < lengths[:, None] - 1)[:, None, :],
                "the padding is at the start of the sequences; in this course the real tokens come "
                "first and the padding last.": (positions >= max_len - lengths[:, None])[:, None, :],
            })
            n_checks += 3
    passed("padding_mask", n_checks)


# --------------------------------------------------------------------------------------------
# Exercise 3: scaled_dot_product_attention(q, k, v, mask=None) -> (output, weights)
# --------------------------------------------------------------------------------------------

def _logits(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


def _masked_softmax(logits, mask, fill=float("-inf"), zero_empty_rows=True):
    """torch.softmax after masked_fill; rows with no allowed key give zeros (the course's rule)."""
    mask = mask.expand(logits.shape)
    w = torch.softmax(logits.masked_fill(~mask, fill), dim=-1)
    if zero_empty_rows:
        w = w.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return w


def _expected(q, k, v, mask):
    """Expected (output, weights): F.scaled_dot_product_attention with a boolean attn_mask for the
    output, torch.softmax after masked_fill(-inf) for the weights; rows with no allowed key are
    zero in both (spelled out so that no kernel's choice for such rows matters)."""
    with torch.no_grad():
        logits = _logits(q, k)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v), torch.softmax(logits, -1)
        m = mask.expand(logits.shape)
        visible = m.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(visible, m, True))
        return out.masked_fill(~visible, 0.0), _masked_softmax(logits, m)


def _mistakes(q, k, v, mask) -> tuple[dict, dict]:
    """What the common masking mistakes would produce, as (weights, outputs) dicts."""
    with torch.no_grad():
        logits = _logits(q, k)
        m = mask.expand(logits.shape)
        plain = torch.softmax(logits, -1)
        zeroed = plain * m
        w = {
            "no scaling: divide the logits QKᵀ by √d_k before masking and the softmax.":
                _masked_softmax(logits * math.sqrt(q.shape[-1]), m),
            "the mask is inverted (it blocks the keys where it is True). In this course True means "
            "\"this query may attend to this key\", as in F.scaled_dot_product_attention's boolean "
            "attn_mask: fill the logits where the mask is False (~mask) with -inf.": _masked_softmax(logits, ~m),
            "the mask has no effect: fill the logits where the mask is False with -inf before the "
            "softmax.": plain,
            "the mask is applied AFTER the softmax by zeroing weights, so the rows no longer sum to "
            "1 (and the blocked keys still shrank the allowed weights through the softmax's "
            "denominator). Apply it to the logits BEFORE the softmax: masked_fill(~mask, -inf).": zeroed,
            "a query that may attend to no key must get all-zero weights and a zero output. It looks "
            "like the blocked logits were set to a large finite negative number (e.g. -1e9) instead "
            "of -inf: a row in which every logit is -1e9 is an ordinary softmax (uniform weights). "
            "Use -inf, and zero the rows that have no allowed key.": _masked_softmax(logits, m, -1e9, False),
            "a query that may attend to no key must get all-zero weights and a zero output. It looks "
            "like a large finite negative number (e.g. -1e9) was added to the blocked logits instead "
            "of filling them with -inf: such a row is still an ordinary softmax. Use -inf, and zero "
            "the rows that have no allowed key.": torch.softmax(logits + (~m) * -1e9, -1),
            "a query that may attend to no key must get all-zero weights and a zero output, not "
            "uniform weights over the blocked keys.": torch.where(
                m.any(-1, keepdim=True), _masked_softmax(logits, m), torch.full_like(plain, 1 / plain.shape[-1])),
        }
        if m.shape[-1] == m.shape[-2]:
            w["the mask is transposed: its rows are the queries and its columns the keys, like the "
              "logits (..., L_q, L_k); use it as it is."] = _masked_softmax(logits, m.transpose(-2, -1))
        out = {message: weights @ v for message, weights in w.items()}
    return w, out


def _attend(fn, q, k, v, mask, label, *, pass_mask=True):
    """Call the student's function, check it returns (output, weights) of the right shapes."""
    if pass_mask:
        result = call(fn, q, k, v, mask=mask, what=f"scaled_dot_product_attention(q, k, v, mask) ({label})")
    else:
        result = call(fn, q, k, v, what=f"scaled_dot_product_attention(q, k, v) ({label})")
    if not isinstance(result, tuple) or len(result) != 2:
        fail("scaled_dot_product_attention should return a tuple (output, weights), but it returned "
             f"{type(result).__name__}.")
    out, w = result
    logits_shape = torch.broadcast_shapes(tuple(q.shape[:-1]) + (k.shape[-2],),
                                          tuple(mask.shape) if mask is not None else (1,))
    expect_tensor(w, f"weights ({label})", shape=logits_shape, dtype=q.dtype, device=q.device)
    expect_tensor(out, f"output ({label})", shape=(*logits_shape[:-1], v.shape[-1]), dtype=q.dtype,
                  device=q.device)
    return out, w


def _expect_no_nan(out, w, mask, label):
    """NaN in the result: name the fully masked rows when that is where it comes from."""
    bad = torch.isnan(w).any(-1) | torch.isnan(out).any(-1)
    if not bad.any():
        return
    if mask is not None:
        empty = ~mask.expand(w.shape).any(-1).to(bad.device)
        if empty.any() and bool((bad <= empty).all()):
            fail(f"The result ({label}) is NaN exactly in the rows where the query may attend to no "
                 f"key (a fully masked row). {_NAN_FULLY_MASKED}")
        if bool((bad <= mask.expand(w.shape).all(-1).to(bad.device)).all()):
            fail(f"The result ({label}) is NaN in rows where the mask allows every key, i.e. where an "
                 "INVERTED mask would block everything. True means \"may attend\": fill the logits "
                 "where the mask is False (~mask) with -inf.")
    fail(f"The result ({label}) contains NaN. {_NAN_FULLY_MASKED} Also look for 0 * inf, and for "
         "exp() of large numbers (subtract the row maximum first).")


def _compare(fn, q, k, v, mask, label, *, pass_mask=True) -> tuple[torch.Tensor, torch.Tensor]:
    out, w = _attend(fn, q, k, v, mask, label, pass_mask=pass_mask)
    _expect_no_nan(out, w, mask, label)
    want_out, want_w = _expected(q, k, v, mask)
    if mask is None:
        wrong_w, wrong_out = _mistakes(q, k, v, torch.ones((), dtype=torch.bool, device=q.device))
        expect_close(w, want_w, f"weights ({label})", mistakes=wrong_w)
        expect_close(out, want_out, f"output ({label})", mistakes=wrong_out)
        return out, w
    wrong_w, wrong_out = _mistakes(q, k, v, mask)
    expect_close(w, want_w, f"weights ({label})", mistakes=wrong_w)
    blocked = w.detach()[~mask.expand(want_w.shape).to(w.device)]
    if blocked.numel() and not bool((blocked == 0).all()):
        fail(f"weights ({label}): keys the mask blocks (False) must get exactly zero weight, but some "
             f"get up to {float(blocked.abs().max()):.3g}. Fill the blocked logits with -inf before "
             "the softmax: exp(-inf) is exactly 0, exp of a merely large negative number may not be.")
    expect_close(out, want_out, f"output ({label})", mistakes=wrong_out)
    return out, w


def _pad(lengths, max_len, device):
    return (torch.arange(max_len, device=device) < torch.tensor(lengths, device=device)[:, None])[:, None, :]


def _tril(n, device):
    return torch.tril(torch.ones(n, n, dtype=torch.bool, device=device))


def _check_no_peeking(fn, device) -> int:
    """With a causal mask, what happens after position t never changes the result up to t."""
    b, length, d, d_v = 2, 7, 8, 5
    q, k, v = (randn(b, length, dd, seed=s, device=device) for s, dd in ((40, d), (41, d), (42, d_v)))
    causal = _tril(length, device)
    out, w = _attend(fn, q, k, v, causal, "causal mask, for the no-peeking test")
    rtol, atol = tolerance(q.dtype)
    n = 0
    for t in (0, 3, length - 2):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for i, x in enumerate((q2, k2, v2)):
            x[:, t + 1:] = randn(b, length - t - 1, x.shape[-1], seed=50 + 3 * t + i, device=device, scale=3.0)
        out2, w2 = _attend(fn, q2, k2, v2, causal, f"causal mask, future positions > {t} changed")
        same_out = torch.allclose(out2[:, :t + 1], out[:, :t + 1], rtol=rtol, atol=atol, equal_nan=True)
        same_w = torch.allclose(w2[:, :t + 1], w[:, :t + 1], rtol=rtol, atol=atol, equal_nan=True)
        if not (same_out and same_w):
            fail(f"No peeking: with a causal mask, changing q, k and v only at positions > {t} changed "
                 f"the {'output' if not same_out else 'weights'} at positions <= {t}, so those positions "
                 "can see the future. The blocked keys must have no influence at all: not through "
                 "their weights, and not through the softmax's denominator (which is what happens "
                 "when the weights are zeroed after the softmax). Fill the blocked logits with -inf "
                 "before the softmax.")
        n += 1
    return n


def check_masked_attention(scaled_dot_product_attention) -> None:
    """Visible tests for exercise 3. ``scaled_dot_product_attention(q, k, v, mask=None)`` ->
    ``(output, weights)`` with q ``(..., L_q, d_k)``, k ``(..., L_k, d_k)``, v ``(..., L_k, d_v)``,
    mask a boolean tensor broadcastable to ``(..., L_q, L_k)``, True where a query may attend."""
    fn = scaled_dot_product_attention
    forbid_names(fn, MASKED_ATTENTION_FORBIDDEN, "scaled_dot_product_attention",
                 "Compute QKᵀ/√d_k, mask the logits, take a softmax and multiply by V yourself.")
    n = 0
    for device in devices():
        # 1. Without a mask it is chapter 1's attention (mask omitted, and mask=None).
        q, k, v = randn(2, 3, 8, seed=1, device=device), randn(2, 5, 8, seed=2, device=device), \
            randn(2, 5, 6, seed=3, device=device)
        _compare(fn, q, k, v, None, "no mask argument", pass_mask=False)
        _compare(fn, q, k, v, None, "mask=None")
        n += 2
        # 2. A causal mask (L, L) broadcast over the batch.
        q, k, v = randn(2, 5, 8, seed=4, device=device), randn(2, 5, 8, seed=5, device=device), \
            randn(2, 5, 6, seed=6, device=device)
        _, w = _compare(fn, q, k, v, _tril(5, device), "causal mask (5, 5), batch of 2")
        sums = w.detach().sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
            fail(f"With a causal mask every row of weights should still sum to 1, got {sums.tolist()}.")
        n += 3
        # 3. No peeking: the future never changes the past.
        n += _check_no_peeking(fn, device)
        # 4. A padding mask (B, 1, L_k): padded keys get exactly zero weight, every query alike
        #    (cross-attention: L_q = 3 queries, L_k = 6 keys).
        q, k, v = randn(3, 3, 8, seed=7, device=device), randn(3, 6, 8, seed=8, device=device), \
            randn(3, 6, 4, seed=9, device=device)
        _compare(fn, q, k, v, _pad([6, 2, 4], 6, device), "padding mask (3, 1, 6), lengths 6, 2, 4")
        n += 2
        # 5. Causal and padding combined, broadcast over a head dimension: q (B, H, L, d) and a
        #    mask (B, 1, L, L).
        q, k, v = (randn(2, 3, 5, dd, seed=s, device=device) for s, dd in ((10, 8), (11, 8), (12, 4)))
        combined = (_tril(5, device) & _pad([5, 3], 5, device))[:, None]
        _compare(fn, q, k, v, combined, "causal & padding mask (2, 1, 5, 5), 3 heads")
        n += 2
        # 6. No batch dimension at all.
        q, k, v = randn(4, 16, seed=13, device=device), randn(4, 16, seed=14, device=device), \
            randn(4, 16, seed=15, device=device)
        _compare(fn, q, k, v, _tril(4, device), "causal mask, no batch dimension")
        n += 2
        # 7. Fully masked rows: zero weights, zero output, no NaN.
        g = torch.Generator().manual_seed(16)
        mask = (torch.rand(2, 5, 6, generator=g) < 0.6)
        mask[:, :, 0] = True
        mask[0, 1] = False
        mask[1, 4] = False
        mask = mask.to(device)
        q, k, v = randn(2, 5, 8, seed=17, device=device), randn(2, 6, 8, seed=18, device=device), \
            randn(2, 6, 3, seed=19, device=device)
        label = "random mask (2, 5, 6) in which queries 1 and 4 of batch items 0 and 1 may attend to nothing"
        out, w = _attend(fn, q, k, v, mask, label)
        _expect_no_nan(out, w, mask, label)
        empty = ~mask.any(-1)
        if not bool((w.detach()[empty] == 0).all()):
            fail(f"A query that may attend to no key (a fully masked row) must get all-zero weights, "
                 f"got {_rounded(w.detach()[empty])} ({label}). If you used a large negative number "
                 "instead of -inf, such a row is an ordinary softmax; use -inf and zero these rows.")
        if not bool((out.detach()[empty].abs() <= tolerance(q.dtype)[1]).all()):
            fail(f"A query that may attend to no key must get a zero output, got "
                 f"{_rounded(out.detach()[empty])} ({label}).")
        _compare(fn, q, k, v, mask, label)
        # A padding mask with a sequence of length 0: every query of that item sees nothing.
        q, k, v = (randn(2, 4, 8, seed=s, device=device) for s in (20, 21, 22))
        _compare(fn, q, k, v, _pad([0, 3], 4, device), "padding mask with lengths 0 and 3")
        n += 4
        # 8. A blocked key with a huge logit must have no influence at all.
        q = torch.ones(1, 3, 4, device=device)
        k = torch.stack([torch.tensor([0.5, 0.0, 0.0, 0.0]), torch.tensor([0.0, -0.5, 0.0, 0.0]),
                         torch.full((4,), 1000.0)])[None].to(device)
        v = randn(1, 3, 2, seed=23, device=device)
        label = "causal mask; the blocked key 2 has logits of 2000 for queries 0 and 1"
        out, w = _attend(fn, q, k, v, _tril(3, device), label)
        if torch.isnan(w).any() or torch.isnan(out).any():
            fail(f"The result ({label}) contains NaN. If you zero the blocked weights after the "
                 "softmax and then renormalise, the blocked key's huge logit takes all the mass, the "
                 "allowed weights underflow to 0, and you divide 0 by 0. Block BEFORE the softmax: "
                 "fill the blocked logits with -inf.")
        want_out, want_w = _expected(q, k, v, _tril(3, device))
        huge = ("the blocked key with a huge logit took all of the softmax's mass: blocking after the "
                "softmax (zeroing the weights, with or without renormalising) leaves nothing for the "
                "allowed keys. Fill the blocked logits with -inf BEFORE the softmax.")
        zeroed = torch.softmax(_logits(q, k), -1) * _tril(3, device)
        expect_close(w, want_w, f"weights ({label})", mistakes={huge: zeroed})
        expect_close(out, want_out, f"output ({label})", mistakes={huge: zeroed @ v})
        n += 2
        # 9. Gradients (float64) are finite and match PyTorch's, fully masked row included.
        q, k, v = (randn(2, 3, 5, dd, seed=s, dtype=torch.float64, device=device, requires_grad=True)
                   for s, dd in ((24, 8), (25, 8), (26, 4)))
        mask = (_tril(5, device) & _pad([5, 3], 5, device))[:, None].clone()
        mask[0, 0, 2] = False   # batch item 0: query 2 may attend to nothing (every head)
        label = "causal & padding mask with a fully masked row, float64"
        out, _ = _attend(fn, q, k, v, mask, label)
        _, w = _attend(fn, q, k, v, mask, label)   # a second call: a graph of its own for the weights
        _expect_no_nan(out, w, mask, label)
        upstream = randn(*out.shape, seed=27, dtype=torch.float64, device=device)
        upstream_w = randn(*w.shape, seed=28, dtype=torch.float64, device=device)
        got = grads(out, [q, k, v], upstream, "the attention output")
        got_w = grads(w, [q, k], upstream_w, "the attention weights")
        for name, g_ in zip("qkvqk", [*got, *got_w]):
            if not torch.isfinite(g_).all():
                fail(f"The gradient with respect to {name} contains NaN or inf ({label}), although the "
                     f"result itself is finite. {_NAN_FULLY_MASKED} Replacing NaN afterwards (e.g. "
                     "torch.nan_to_num) fixes the forward pass only: the NaN still flows backward.")
        q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
        visible = mask.expand(2, 3, 5, 5).any(-1, keepdim=True)
        ref = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=torch.where(visible, mask, True))
        want = torch.autograd.grad(ref.masked_fill(~visible, 0.0), [q2, k2, v2], upstream)
        for name, g_, w_ in zip("qkv", got, want):
            expect_close(g_, w_, f"the gradient of the masked attention output with respect to {name}")
            n += 1
        q3, k3 = (t.detach().clone().requires_grad_() for t in (q, k))
        want_w = torch.autograd.grad(_masked_softmax(_logits(q3, k3), mask), [q3, k3], upstream_w)
        for name, g_, w_ in zip("qk", got_w, want_w):
            expect_close(g_, w_, f"the gradient of the masked attention weights with respect to {name}")
            n += 1
    passed("scaled_dot_product_attention with a mask", n)
