"""Checks for chapter 8: the online softmax, tiled (Flash-style) attention, and the KV cache.

Expected values come from PyTorch's own operations, never from the course's solution:
``torch.amax``/``torch.logsumexp`` for the online softmax, :func:`.masks.attention` (PyTorch's
``F.scaled_dot_product_attention`` with the course's mask convention) for tiled attention, and a
plain-torch forward of the chapter's ``TinyLM`` from the weights the check loaded for greedy
decoding. The mistakes are plain-torch variants of the same computations (:func:`tiled_variant`,
:func:`decode_variant`).

Two properties are measured rather than compared: tiled attention's peak memory (it must never
hold an L x L matrix, nor a block of queries against every key; :mod:`.memory`, measured where the
student's code runs, CPU only), and the KV cache's use. The cache is observed through a model
*without* its causal mask: there the keys and values of earlier positions change as the sequence
grows, so a real cache (which keeps them) and recomputation (which does not) write different
tokens, and only the first is what ``use_cache=True`` specifies.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from . import forbidden
from .ch02 import MASK_IGNORED, NO_SCALING
from .ch05 import _build, _load, _quietly
from .core import (CheckFailure, Mistake, call, expect_close, expect_outputs, expect_tensor, fail, on_devices,
                   passed, randn, randn_qkv)
from .gradients import expect_grads_close
from .masks import attention, causal, padding
from .memory import measure_call, peak_memory
from .scan import forbid_names, source_of

__all__ = ["check_online_softmax", "check_tiled_attention", "check_generate", "tiled_variant", "lm_logits",
           "decode_variant", "random_lm_weights"]

_SHARED = (MASK_IGNORED, NO_SCALING)      # imported so that the catalogue lists them

_INF = float("inf")

# --------------------------------------------------------------------------------------------
# Exercise 1: online_softmax_update(m, l, block) -> (m_new, l_new)
# --------------------------------------------------------------------------------------------

RUNNING_MAX_IGNORED = Mistake(
    "block_max_instead_of_running_max", "the maximum must be the running one, max(m, the block's "
    "maximum), over everything seen so far; you used the block's maximum alone. When a block's values are all "
    "smaller than an earlier one's, the rescaling factor exp(m_old - m_new) then exceeds 1 and overflows (exp(200) "
    "is inf in float32); in attention, a fully masked block (maximum -inf) wipes out everything accumulated.")
SUM_NOT_RESCALED = Mistake(
    "running_sum_not_rescaled", "the running sum was not rescaled when the maximum grew. Every term in it "
    "is exp(x - m_old); measured against the new maximum it is exp(x - m_new), so multiply the old sum by "
    "exp(m_old - m_new) before adding the block's terms.")
RESCALE_INVERTED = Mistake(
    "rescale_factor_inverted", "the rescaling factor is upside down: the old terms exp(x - m_old) become "
    "exp(x - m_new) when multiplied by exp(m_old - m_new) (at most 1), not by exp(m_new - m_old).")
SHIFTED_BY_OLD_MAX = Mistake(
    "block_shifted_by_old_max", "the block's terms were computed against the old maximum, exp(block - m_old), while "
    "the running sum is kept against the new one: compute the new maximum first, then exp(block - m_new).")
NOT_SHIFTED = Mistake(
    "exp_not_shifted", "the result overflowed: exp() of the block's raw values is inf in float32 beyond about 88. "
    "Subtract the (new) running maximum before exp(), so that every exponent is at most 0.")
NAN_NOTHING_SEEN = Mistake(
    "nan_when_everything_masked", "the result contains NaN for a row in which every value so far is -inf (everything "
    "masked): m_new is then -inf and exp(-inf - (-inf)) is NaN. Such a row must stay at m = -inf, l = 0: where the "
    "new maximum is -inf, subtract 0 (or any finite number) instead of it.")


def _fail_at(mistake: Mistake, what: str):
    """Fail with ``mistake``, its message preceded by what was called."""
    __tracebackhide__ = True
    fail(f"{what}: {mistake.message}", mistake=mistake.id)


def _update_expected(m, l, block):
    """(m_new, l_new) in float64 from torch.amax / torch.logsumexp, in the inputs' dtype."""
    m64, l64, b64 = m.double(), l.double(), block.double()
    m_new = torch.maximum(m64, b64.amax(-1))
    log_l = torch.logsumexp(torch.stack([m64 + torch.log(l64), torch.logsumexp(b64, -1)]), 0)
    l_new = torch.where(torch.isinf(m_new), torch.zeros_like(log_l), torch.exp(log_l - m_new))
    return m_new.to(m.dtype), l_new.to(l.dtype)


def _update_mistakes(m, l, block) -> dict:
    """What each mistake gives for l_new (with the right m_new); float64, in the inputs' dtype."""
    m64, l64, b64 = m.double(), l.double(), block.double()
    m_new = torch.maximum(m64, b64.amax(-1))
    safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    terms = torch.exp(b64 - safe[..., None]).sum(-1)
    old = torch.where(torch.isinf(m64), torch.zeros_like(m64), m64)
    wrong = {SUM_NOT_RESCALED: l64 + terms, RESCALE_INVERTED: l64 * torch.exp(safe - m64) + terms,
             SHIFTED_BY_OLD_MAX: l64 * torch.exp(m64 - safe) + torch.exp(b64 - old[..., None]).sum(-1)}
    return {k: v.to(l.dtype) for k, v in wrong.items()}


def _update(fn, m, l, block, what):
    __tracebackhide__ = True
    result = expect_outputs(call(fn, m, l, block, what=what), what, ("m_new", "l_new"))
    return (expect_tensor(result[0], f"m_new of {what}", shape=m.shape, dtype=m.dtype, device=m.device),
            expect_tensor(result[1], f"l_new of {what}", shape=l.shape, dtype=l.dtype, device=l.device))


def _expect_update(fn, m, l, block, label):
    """One call, m_new then l_new against the expected values, mistakes named."""
    __tracebackhide__ = True
    what = f"online_softmax_update(m, l, block) ({label})"
    got_m, got_l = _update(fn, m, l, block, what)
    want_m, want_l = _update_expected(m, l, block)
    bad = torch.isnan(got_m) | ~torch.isfinite(got_l)            # the expected l is always finite
    if bool(bad.any()):
        if bool((bad & torch.isinf(want_m)).any()):
            _fail_at(NAN_NOTHING_SEEN, what)
        older = torch.isfinite(m) & (block.amax(-1) < m)
        if bool((bad & older).any()) and not bool((bad & ~older).any()):
            _fail_at(RUNNING_MAX_IGNORED, what)
        if float(block[torch.isfinite(block)].abs().max()) > 80:
            _fail_at(NOT_SHIFTED, what)
    expect_close(got_m, want_m, f"m_new of {what}", mistakes={RUNNING_MAX_IGNORED: block.amax(-1)})
    expect_close(got_l, want_l, f"l_new of {what}", mistakes=_update_mistakes(m, l, block))
    return got_m, got_l


def _state_of(prefix):
    """(m, l) of a prefix of values, from torch: its maximum and the sum of exp(x - max)."""
    m = prefix.amax(-1)
    return m, torch.exp(prefix - m[..., None]).sum(-1)


def _check_update_values(fn, device) -> int:
    """A state from a prefix of 5 values, a block of 6; in some rows the block holds the new maximum,
    in others the old maximum stands; float32 and float64, one row and a batch of rows."""
    __tracebackhide__ = True
    n = 0
    for dtype, shape in ((torch.float32, (3, 4)), (torch.float64, (2,)), (torch.float32, ())):
        prefix = randn(*shape, 5, seed=800 + n, device=device, dtype=dtype, scale=2.0)
        block = randn(*shape, 6, seed=801 + n, device=device, dtype=dtype, scale=2.0)
        if shape:
            block[..., ::2, :] += 3.0          # alternate rows: the block holds the new maximum
        else:
            block = block + 3.0
        m, l = _state_of(prefix)
        _expect_update(fn, m, l, block, f"state of shape {tuple(shape)}, {dtype}, block of 6")
        n += 2
    return n


def _check_update_old_max_stands(fn, device) -> int:
    """A block entirely below the running maximum: m stays, the sum grows without rescaling."""
    __tracebackhide__ = True
    m, l = _state_of(randn(4, 3, seed=810, device=device) + 5.0)
    _expect_update(fn, m, l, randn(4, 7, seed=811, device=device) - 3.0, "a block below the running maximum")
    return 2


def _check_update_first_block(fn, device) -> int:
    """Nothing seen yet (m = -inf, l = 0): the block's own maximum and sum."""
    __tracebackhide__ = True
    m = torch.full((3,), -_INF, device=device)
    _expect_update(fn, m, torch.zeros(3, device=device), randn(3, 4, seed=820, device=device),
                   "the first block: m = -inf, l = 0")
    return 2


def _check_update_masked(fn, device) -> int:
    """-inf entries (masked) in the block; a row that has seen nothing but -inf stays (-inf, 0)."""
    __tracebackhide__ = True
    m = torch.tensor([-_INF, -_INF, 0.5, 1.0], device=device)
    l = torch.tensor([0.0, 0.0, 1.5, 2.0], device=device)
    block = randn(4, 5, seed=830, device=device)
    block[0] = -_INF
    block[1, :3] = -_INF
    block[2, 1:] = -_INF
    block[3] = -_INF
    _expect_update(fn, m, l, block, "masked entries (-inf); row 0 has seen nothing but -inf")
    return 2


def _check_update_large(fn, device) -> int:
    """Values around 1000 (float32): nothing may overflow; a later block lower by 200."""
    __tracebackhide__ = True
    m, l = _state_of(randn(3, 4, seed=840, device=device) + 1000.0)
    block = randn(3, 4, seed=841, device=device) + torch.tensor([[1002.0], [800.0], [1000.0]], device=device)
    _expect_update(fn, m, l, block, "values around 1000, float32")
    return 2


def _check_update_folds_to_softmax(fn, device) -> int:
    """Folding the update over the blocks of a row, from (-inf, 0), gives m + log(l) = logsumexp
    and exp(x - m) / l = softmax (blocks of 5 of 23 values, the last one shorter)."""
    __tracebackhide__ = True
    x = randn(3, 23, seed=850, device=device, scale=3.0)
    m, l = torch.full((3,), -_INF, device=device), torch.zeros(3, device=device)
    for j in range(0, 23, 5):
        m, l = _update(fn, m, l, x[:, j:j + 5], f"online_softmax_update over the blocks of a row, block at {j}")
    expect_close(m + torch.log(l), torch.logsumexp(x, -1), "m + log(l) after the last block (the row's logsumexp)")
    expect_close(torch.exp(x - m[:, None]) / l[:, None], torch.softmax(x, -1),
                 "exp(x - m) / l after the last block (the row's softmax)")
    return 2


def check_online_softmax(online_softmax_update) -> None:
    """Visible tests for exercise 1. ``online_softmax_update(m, l, block)``: m, l of shape (...),
    block of shape (..., n) -> (m_new, l_new) of shape (...), with m_new = max(m, max of block) and
    l_new the sum of exp(x - m_new) over everything seen; (-inf, 0) before the first block."""
    __tracebackhide__ = True
    passed("online_softmax_update", on_devices([
        _check_update_values, _check_update_old_max_stands, _check_update_first_block, _check_update_large,
        _check_update_masked, _check_update_folds_to_softmax], online_softmax_update))


# --------------------------------------------------------------------------------------------
# Exercise 2: tiled_attention(q, k, v, block_size, mask=None, causal=False) -> output
# --------------------------------------------------------------------------------------------

ACC_NOT_RESCALED = Mistake(
    "output_accumulator_not_rescaled", "the running sum was rescaled when the maximum grew, but the output "
    "accumulator was not. It holds a sum of exp(s - m_old) * v, so it needs the same factor exp(m_old - m_new) "
    "as the running sum, before the block's exp(s - m_new) @ v is added.")
CAUSAL_OFFSET = Mistake(
    "causal_offset_missing", "the causal mask inside a block compares positions within the block (row r, "
    "column c: c <= r){detail} instead of the positions in the sequence. Query i + r may attend key j + c when "
    "j + c <= i + r, where i and j are the first query and key of the block.")
CAUSAL_IGNORED = Mistake("causal_ignored", "with causal=True the result is the unmasked attention: "
                         "query i may attend only keys j <= i.")
NAN_MASKED_ROWS = Mistake(
    "nan_in_fully_masked_rows", "the output is NaN in the rows of queries that may attend to no key (a fully masked "
    "row). There the running maximum stays -inf, exp(-inf - (-inf)) is NaN, and the final division is 0 / 0: shift "
    "by 0 where the maximum is -inf, and divide by 1 where the running sum is 0 (the output is then 0, the course's "
    "rule for such rows).")
LAST_BLOCK_DROPPED = Mistake(
    "last_partial_block_dropped", "the last, shorter block was dropped ({which}). When block_size does not "
    "divide the length, range(0, L, block_size) still reaches it, and slicing x[i:i + block_size] cuts it short by "
    "itself.")
FULL_MATRIX = Mistake(
    "forms_full_score_matrix", "{what} raised the memory in use by {mib:.0f} MiB, more than half of one {n} x {n} "
    "float32 score matrix ({full:.0f} MiB): your code forms all the scores at once. Tiled attention "
    "holds one block of scores at a time: loop over blocks of queries and, inside, over blocks of keys.")
KEYS_NOT_TILED = Mistake(
    "keys_not_tiled", "{what} raised the memory in use by {mib:.1f} MiB: it holds a block of queries against every "
    "key ({rows} x {cols} scores, {row_mib:.0f} MiB in float32) instead of one block of keys at a time. Loop over the "
    "keys in blocks too, keeping the running maximum, sum and output (the online softmax).")

TAMPERS = Mistake(
    "tampers_with_memory_meter", "tiled_attention's code touches the memory measurement (it uses `{what}`): the "
    "tests measure your function's peak memory, and code that resets or replaces the measurement gets no points. "
    "Remove it.")
_METER = re.compile(r"clear_refs|VmHWM|checks\.memory|checks\s+import\s+memory")


def _scores(q, k, scale):
    return (q @ k.transpose(-2, -1)) * scale


def tiled_variant(q, k, v, block, mask=None, is_causal=False, kind="right"):
    """Tiled attention in plain torch with one deliberate mistake ``kind``; keys in ascending
    blocks, any query blocking (rows are independent). Kinds: right, acc_not_rescaled,
    sum_not_rescaled, block_max, offset_missing, offset_missing_skip, tail_dropped, keys_tail_dropped."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1])
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
    if mask is not None:
        allowed = allowed & mask.to(q.device)
    allowed = allowed.expand(*torch.broadcast_shapes(allowed.shape, q.shape[:-2] + (n_q, n_k)))
    q_end = n_q - n_q % block if kind == "tail_dropped" else n_q
    k_end = n_k - n_k % block if kind in ("tail_dropped", "keys_tail_dropped") else n_k
    rows = torch.arange(n_q, device=q.device)[:, None]
    shape = q.shape[:-1]
    m = torch.full(shape, -_INF, dtype=q.dtype, device=q.device)
    l = torch.zeros(shape, dtype=q.dtype, device=q.device)
    acc = torch.zeros(*shape, v.shape[-1], dtype=q.dtype, device=q.device)
    for j in range(0, k_end, block):
        cols = torch.arange(j, min(j + block, k_end), device=q.device)[None, :]
        s = _scores(q, k[..., cols[0], :], scale)
        ok = allowed[..., cols[0]]
        if is_causal:
            if kind == "offset_missing":
                local = (cols - j) <= (rows % block)
            elif kind == "offset_missing_skip":
                local = ((cols - j) <= (rows % block)) & (j // block <= rows // block)
            else:
                local = cols <= rows
            ok = ok & local
        s = s.masked_fill(~ok, -_INF)
        m_new = s.amax(-1) if kind == "block_max" else torch.maximum(m, s.amax(-1))
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - shift[..., None])
        factor = torch.exp(m - shift)
        l = l + p.sum(-1) if kind == "sum_not_rescaled" else l * factor + p.sum(-1)
        pv = p @ v[..., cols[0], :]
        acc = acc + pv if kind == "acc_not_rescaled" else acc * factor[..., None] + pv
        m = m_new
    out = acc / torch.where(l > 0, l, torch.ones_like(l))[..., None]
    if q_end < n_q:
        out[..., q_end:, :] = 0
    return out


def _tiled_mistakes(q, k, v, block, mask, is_causal, what) -> dict:
    n_q, n_k = q.shape[-2], k.shape[-2]
    wrong = {ACC_NOT_RESCALED: tiled_variant(q, k, v, block, mask, is_causal, "acc_not_rescaled"),
             SUM_NOT_RESCALED: tiled_variant(q, k, v, block, mask, is_causal, "sum_not_rescaled"),
             RUNNING_MAX_IGNORED: tiled_variant(q, k, v, block, mask, is_causal, "block_max"),
             NO_SCALING: attention(q * math.sqrt(q.shape[-1]), k, v, _full_mask(mask, is_causal, n_q, n_k, q))[0]}
    if n_q % block or n_k % block:
        wrong[LAST_BLOCK_DROPPED.format(which="its queries' rows are zero and its keys ignored")] = \
            tiled_variant(q, k, v, block, mask, is_causal, "tail_dropped")
    if n_k % block:
        wrong[LAST_BLOCK_DROPPED.format(which="its keys are ignored")] = \
            tiled_variant(q, k, v, block, mask, is_causal, "keys_tail_dropped")
    if is_causal:
        wrong[CAUSAL_OFFSET.format(detail="")] = tiled_variant(q, k, v, block, mask, True, "offset_missing")
        wrong[CAUSAL_OFFSET.format(detail=", in every block below the diagonal too,")] = \
            tiled_variant(q, k, v, block, mask, True, "offset_missing_skip")
        wrong[CAUSAL_IGNORED] = attention(q, k, v, mask)[0]
    if mask is not None:
        wrong[MASK_IGNORED] = attention(q, k, v, causal(n_q, q.device) if is_causal else None)[0]
    return wrong


def _full_mask(mask, is_causal, n_q, n_k, q):
    if not is_causal:
        return mask
    c = torch.arange(n_k, device=q.device)[None, :] <= torch.arange(n_q, device=q.device)[:, None]
    return c if mask is None else c & mask.to(q.device)


def _tiled(fn, q, k, v, block, mask, is_causal, what):
    __tracebackhide__ = True
    kwargs = {} if mask is None and not is_causal else {"mask": mask, "causal": is_causal}
    got = call(fn, q, k, v, block, what=what, **kwargs)
    return expect_tensor(got, what, shape=q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)


def _compare_tiled(fn, q, k, v, block, mask=None, is_causal=False, label=""):
    """One call against F.scaled_dot_product_attention (masks.attention), mistakes named."""
    __tracebackhide__ = True
    what = f"tiled_attention(q, k, v, block_size={block}{', causal=True' if is_causal else ''}) ({label})"
    got = _tiled(fn, q, k, v, block, mask, is_causal, what)
    full = _full_mask(mask, is_causal, q.shape[-2], k.shape[-2], q)
    want = attention(q, k, v, full)[0]
    if full is not None and torch.isnan(got).any():
        empty = ~full.expand(*want.shape[:-1], k.shape[-2]).any(-1)
        if bool(torch.isnan(got[empty]).any()) and not bool(torch.isnan(got[~empty]).any()):
            _fail_at(NAN_MASKED_ROWS, what)
    with torch.no_grad():
        expect_close(got, want, what, mistakes=_tiled_mistakes(q, k, v, block, mask, is_causal, what))
    return got


def _check_tiled_no_mask(fn, device) -> int:
    """Without a mask: block sizes that divide L, that do not, larger than L, and L_q != L_k, d_v != d_k."""
    __tracebackhide__ = True
    q, k, v = randn_qkv((2, 3, 12, 8), (2, 3, 12, 8), 6, seed=900, device=device)
    for block in (4, 5, 12, 16):
        _compare_tiled(fn, q, k, v, block, label=f"q, k, v of shape (2, 3, 12, 8), d_v = 6, block {block}")
    q, k, v = randn_qkv((7, 8), (13, 8), 4, seed=903, device=device)
    _compare_tiled(fn, q, k, v, 3, label="7 queries, 13 keys, no batch dimension")
    return 5


def _check_tiled_causal(fn, device) -> int:
    """causal=True, with blocks of 4 and 5 (not dividing 13) and one block of all 13."""
    __tracebackhide__ = True
    q, k, v = randn_qkv((2, 2, 13, 8), (2, 2, 13, 8), 8, seed=910, device=device)
    for block in (4, 5, 13):
        _compare_tiled(fn, q, k, v, block, is_causal=True, label=f"L = 13, causal, block {block}")
    return 3


def _check_tiled_masks(fn, device) -> int:
    """A boolean mask (True = may attend) with fully masked rows, a padding mask (B, 1, 1, L), and a
    mask together with causal=True."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(920)
    mask = torch.rand(2, 1, 10, 10, generator=g) < 0.6
    mask[0, 0, 3] = False
    mask[1, 0, 7] = False
    mask = mask.to(device)
    q, k, v = randn_qkv((2, 3, 10, 8), (2, 3, 10, 8), 5, seed=921, device=device)
    _compare_tiled(fn, q, k, v, 4, mask, label="random mask (2, 1, 10, 10) with two fully masked rows")
    pad = padding([10, 6], 10, device)[:, None]
    _compare_tiled(fn, q, k, v, 3, pad, label="padding mask (2, 1, 1, 10), lengths 10 and 6")
    _compare_tiled(fn, q, k, v, 4, pad, True, label="padding mask (2, 1, 1, 10) and causal")
    return 3


def _check_tiled_large_logits(fn, device) -> int:
    """Logits of +-100 that change by 200 from one block of keys to the next (in both orders):
    nothing may overflow, float32."""
    __tracebackhide__ = True
    direction = torch.zeros(4, device=device)
    direction[0] = 1.0
    big = torch.tensor([10.0] * 4 + [-10.0] * 4 + [0.0] * 4, device=device)[:, None] * direction * 2
    k = big + randn(12, 4, seed=930, device=device, scale=0.1)
    q = torch.stack([direction * 10, -direction * 10, direction * 5]) + randn(3, 4, seed=931, device=device, scale=0.1)
    v = randn(12, 3, seed=932, device=device)
    what = "tiled_attention(q, k, v, block_size=4) (logits of +-100 changing by 200 from block to block, float32)"
    got = _tiled(fn, q, k, v, 4, None, False, what)
    want = attention(q, k, v)[0]
    if not bool(torch.isfinite(got).all()):
        _fail_at(RUNNING_MAX_IGNORED, what)
    expect_close(got, want, what, mistakes=_tiled_mistakes(q, k, v, 4, None, False, what))
    return 1


def _check_tiled_grads(fn, device) -> int:
    """float64, causal and a padding mask, blocks of 3: gradients with respect to q, k and v."""
    __tracebackhide__ = True
    q, k, v = randn_qkv((2, 2, 7, 4), (2, 2, 7, 4), 5, seed=940, device=device, dtype=torch.float64,
                        requires_grad=True)
    pad = padding([7, 5], 7, device)[:, None]
    got = _compare_tiled(fn, q, k, v, 3, pad, True, label="float64, causal and padding, for the gradients")
    ref = {name: t.detach().clone().requires_grad_() for name, t in zip("qkv", (q, k, v))}
    want = attention(*ref.values(), _full_mask(pad, True, 7, 7, q))[0]
    return 1 + expect_grads_close(got, want, dict(zip("qkv", (q, k, v))), ref,
                                  "the output of tiled_attention (float64, causal and padding, blocks of 3)", seed=941)


def _measure(fn, q, k, v, block, is_causal):
    """Peak memory growth (bytes) of one call, or None where it cannot be measured."""
    __tracebackhide__ = True
    what = f"tiled_attention on q {tuple(q.shape)}, k {tuple(k.shape)}, block_size={block}"
    with peak_memory() as meter:
        try:
            got = measure_call(fn, q, k, v, block, causal=is_causal) if is_causal else measure_call(fn, q, k, v, block)
        except CheckFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - student code
            fail(f"{what} raised {getattr(exc, 'student_type', type(exc).__name__)}: {exc}", mistake="raised")
    expect_tensor(got, what, shape=q.shape[:-1] + (v.shape[-1],))
    return meter.bytes, what


#: Square: (L, d, block) of the memory check: the L x L float32 matrix is 64 MiB, a tiled call a few.
_SQUARE = (4096, 16, 256)
#: Wide: one block of queries against many keys (L_q, L_k, d, block): the row of scores is 16 MiB.
_WIDE = (128, 32768, 8, 128)


def check_tiled_memory(fn) -> str:
    """CPU only, once: peak memory of a causal call at L = 4096 (no L x L matrix: less than half of
    it) and of one block of queries against 32768 keys (no block x L_k row: less than half of it)."""
    __tracebackhide__ = True
    n, d, block = _SQUARE
    q, k, v = (randn(n, d, seed=950 + i) for i in range(3))
    grown, what = _measure(fn, q, k, v, block, True)
    if grown is None:
        return "peak memory not measured on this system"
    full = n * n * 4
    if grown >= full / 2:
        fail(FULL_MATRIX, what=what, mib=grown / 2**20, n=n, full=full / 2**20)
    lq, lk, d, block = _WIDE
    q = randn(lq, d, seed=960)
    k, v = randn(lk, d, seed=961), randn(lk, d, seed=962)
    grown_wide, what = _measure(fn, q, k, v, block, False)
    row = lq * lk * 4
    if grown_wide is not None and grown_wide >= row / 2:
        fail(KEYS_NOT_TILED, what=what, mib=grown_wide / 2**20, rows=lq, cols=lk, row_mib=row / 2**20)
    return (f"peak memory {grown / 2**20:.1f} MiB at L = {n} (the L x L matrix: {full / 2**20:.0f} MiB), "
            f"{(grown_wide or 0) / 2**20:.1f} MiB for {lq} queries against {lk} keys")


def check_tiled_attention(tiled_attention) -> None:
    """Visible tests for exercise 2. ``tiled_attention(q, k, v, block_size, mask=None, causal=False)``:
    q (..., L_q, d), k (..., L_k, d), v (..., L_k, d_v), mask None or boolean broadcastable to
    (..., L_q, L_k) with True = may attend -> output (..., L_q, d_v), equal to attention's, without
    ever holding an L_q x L_k matrix of scores (its peak memory is measured)."""
    __tracebackhide__ = True
    forbid_names(tiled_attention, forbidden.ATTENTION, "tiled_attention",
                 "Compute each block's scores, the running maximum and sums, and the output accumulator yourself.")
    found = _METER.search(source_of(tiled_attention) or "")
    if found:                                  # before any call: the code may patch the meter
        fail(TAMPERS, what=found.group(0))
    n = on_devices([_check_tiled_no_mask, _check_tiled_causal, _check_tiled_masks, _check_tiled_large_logits,
                    _check_tiled_grads], tiled_attention)
    note = check_tiled_memory(tiled_attention)
    passed(f"tiled_attention ({note})", n + 2)


# --------------------------------------------------------------------------------------------
# Exercise 3: generate(model, prompt, n_tokens, use_cache=True) with a KV cache
# --------------------------------------------------------------------------------------------

CACHE_TWICE = Mistake(
    "cache_appended_twice", "{what}: each position's keys and values must enter the cache exactly once; {detail}. "
    "The new position then attends to a duplicate of a key, which counts twice in the softmax.")
CACHE_PADDING = Mistake(
    "cache_shared_across_batch_without_padding_mask", "{what}: the sequences of a batch share one cache tensor, "
    "and the shorter prompts' padding positions (left padding) sit in it like real keys; {detail}. The attention "
    "over the cache needs the padding mask too: True for every real position, False for each prompt's padding.")
CACHE_NOT_USED = Mistake(
    "cache_not_used", "{what}: with use_cache=True the keys and values of earlier positions must be kept, and only "
    "the new position's computed. On a TinyLM(causal=False), where earlier positions read later ones, keeping them "
    "and recomputing them give different tokens, and yours are the recomputed ones: use_cache=True recomputes "
    "the whole sequence.")
CACHE_POSITIONS = Mistake(
    "cached_positions_wrong", "{what}: the new token's position is wrong ({detail}). Each sequence counts positions "
    "from its first real token (model.positions(tokens)), so after a left-padded prompt of n real tokens the next "
    "token is at position n, then n + 1, ...")
PREFILL_NOT_CAUSAL = Mistake(
    "prefill_not_causal", "{what}: when the prompt goes through the blocks in one pass (filling the cache), its "
    "positions must not see later ones: the prompt needs the causal mask (and the padding mask), as in the "
    "model's own forward.")
PASTED_MHA_FAILS = Mistake(
    "pasted_attention_fails", "{module} failed its checks ({failure}), but the culprit is probably earlier: the "
    "MultiHeadAttention you pasted from chapter 3 fails chapter 3's own checks: {earlier} Fix the paste first.")

#: The check's TinyLM: vocab_size, d_model, num_heads, d_ff, num_layers, max_len.
_LM = (11, 16, 2, 32, 2, 32)
_NAMES = ["embed.weight", "pos.weight", "norm.weight", "norm.bias", "readout.weight", "readout.bias"] + [
    f"blocks.{i}.{n}" for i in range(_LM[4]) for n in (
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "ff.0.weight", "ff.0.bias", "ff.2.weight",
        "ff.2.bias", *(f"attn.{p}_proj.{w}" for p in ("q", "k", "v", "out") for w in ("weight", "bias")))]


def random_lm_weights(shapes: dict, seed: int, device="cpu", dtype=torch.float32) -> dict:
    """Weights for a TinyLM: unit-scale embeddings, 1/sqrt(fan_in) matrices, norm gains near 1,
    a read-out three times larger so that greedy decoding's choices are far from ties."""
    out = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        if name.endswith("embed.weight") or name.endswith("pos.weight"):
            scale = 1.0
        elif len(shape) == 2:
            scale = (3.0 if name.startswith("readout") else 1.0) / math.sqrt(shape[1])
        else:
            scale = 0.2
        value = randn(*shape, seed=seed + i, device=device, dtype=dtype, scale=scale)
        out[name] = 1 + value if "norm" in name and name.endswith("weight") else value
    return out


def _ln(x, p, name):
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"])


def _block(p, i, x, heads, mask, cache=None, repeat=1):
    """One pre-norm block on new positions x (B, T, d) with cached (k, v) (B, H, t, d_k) or None;
    ``repeat``: how many times the new keys enter the cache. Returns (x, (k, v))."""
    pre = f"blocks.{i}."
    h = _ln(x, p, pre + "norm1")
    b, t, d = x.shape

    def proj(name):
        y = F.linear(h, p[f"{pre}attn.{name}_proj.weight"], p[f"{pre}attn.{name}_proj.bias"])
        return y.reshape(b, t, heads, d // heads).transpose(1, 2)
    q, k, v = proj("q"), proj("k"), proj("v")
    k, v = torch.cat([k] * repeat, 2), torch.cat([v] * repeat, 2)
    if cache is not None:
        k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
    out = attention(q, k, v, mask)[0].transpose(1, 2).reshape(b, t, d)
    x = x + F.linear(out, p[pre + "attn.out_proj.weight"], p[pre + "attn.out_proj.bias"])
    h = F.relu(F.linear(_ln(x, p, pre + "norm2"), p[pre + "ff.0.weight"], p[pre + "ff.0.bias"]))
    return x + F.linear(h, p[pre + "ff.2.weight"], p[pre + "ff.2.bias"]), (k, v)


def _positions(tokens, pad_id):
    return ((tokens != pad_id).cumsum(-1) - 1).clamp(min=0)


def lm_logits(p, tokens, heads, pad_id, is_causal=True):
    """The TinyLM's forward in plain torch from its weights ``p``: (B, L) -> (B, L, vocab)."""
    real = tokens != pad_id
    mask = real[:, None, None, :]
    if is_causal:
        mask = mask & causal(tokens.shape[1], tokens.device)
    x = p["embed.weight"][tokens] + p["pos.weight"][_positions(tokens, pad_id)]
    for i in range(sum(1 for n in p if n.endswith("norm1.weight"))):
        x, _ = _block(p, i, x, heads, mask)
    return F.linear(_ln(x, p, "norm"), p["readout.weight"], p["readout.bias"])


def decode_variant(p, prompt, n, heads, pad_id, is_causal=True, kind="cache"):
    """Greedy decoding in plain torch: ``kind`` recompute (the model on the whole sequence at
    every step), cache (a KV cache, right), or a cache with one mistake: appended_twice,
    last_prompt_twice, no_padding_mask, no_padding_mask_steps, positions_count_padding,
    no_positions, prefill_not_causal."""
    tokens = prompt
    if kind == "recompute":
        for _ in range(n):
            tokens = torch.cat([tokens, lm_logits(p, tokens, heads, pad_id, is_causal)[:, -1].argmax(-1, keepdim=True)], 1)
        return tokens
    n_layers = sum(1 for name in p if name.endswith("norm1.weight"))
    caches = [None] * n_layers
    keys_real = prompt != pad_id
    lengths = keys_real.sum(-1, keepdim=True)
    new, positions = prompt, _positions(prompt, pad_id)
    prefill = True
    steps = n
    if kind == "last_prompt_twice" and n:
        _step(p, new, positions, caches, keys_real, heads, is_causal, 1, True)
        new, positions = prompt[:, -1:], positions[:, -1:]
        keys_real = torch.cat([keys_real, torch.ones_like(lengths, dtype=torch.bool)], 1)
        prefill = False
    for s in range(steps):
        pad_mask = not (kind == "no_padding_mask" or (kind == "no_padding_mask_steps" and not prefill))
        mask_keys = keys_real if pad_mask else torch.ones_like(keys_real)
        logits = _step(p, new, positions, caches, mask_keys, heads,
                       is_causal and not (prefill and kind == "prefill_not_causal"),
                       2 if kind == "appended_twice" and not prefill else 1, prefill)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        new = nxt
        positions = {"positions_count_padding": torch.full_like(lengths, prompt.shape[1] + s),
                     "no_positions": torch.zeros_like(lengths)}.get(kind, lengths + s)
        grow = 2 if kind == "appended_twice" and s + 1 < steps else 1
        keys_real = torch.cat([keys_real] + [torch.ones_like(lengths, dtype=torch.bool)] * grow, 1)
        prefill = False
    return tokens


def _step(p, new, positions, caches, keys_real, heads, is_causal, repeat, prefill):
    """New tokens (B, T) through every block with the caches (updated in place); the logits."""
    x = p["embed.weight"][new] + p["pos.weight"][positions]
    total, t = keys_real.shape[1], new.shape[1]
    mask = keys_real[:, None, None, :]
    if is_causal and prefill:
        rows = torch.arange(total - t, total, device=new.device)[:, None]
        mask = mask & (torch.arange(total, device=new.device)[None, :] <= rows)
    for i in range(len(caches)):
        x, caches[i] = _block(p, i, x, heads, mask, caches[i], repeat)
    return F.linear(_ln(x, p, "norm"), p["readout.weight"], p["readout.bias"])


def _lm(TinyLM, device, seed, is_causal=True):
    """The student's TinyLM(11, 16, 2, 32, 2, 32) (causal or not) with random weights, eval mode."""
    __tracebackhide__ = True
    kwargs = {} if is_causal else {"causal": False}
    what = f"TinyLM{_LM}" + ("" if is_causal else " with causal=False")
    model = _build(TinyLM, _LM, kwargs, what)
    shapes = {n: tuple(t.shape) for n, t in model.named_parameters()}
    if sorted(shapes) != sorted(_NAMES):
        fail(f"{what}'s parameters are {sorted(shapes)}; the TinyLM given in the notebook has {sorted(_NAMES)}. "
             "Use the class as given (with your MultiHeadAttention as attn).", mistake="wrong_parameters")
    model = model.to(device).eval()
    p = random_lm_weights(shapes, seed, device)
    _load(model, p, what)
    return model, p


def _prompt(lengths, width, seed, device, pad_id=_LM[0]):
    """Left-padded prompts: (B, width) int64, each row's real tokens at its end."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, _LM[0], (len(lengths), width), generator=g)
    real = torch.arange(width)[None, :] >= width - torch.tensor(lengths)[:, None]
    return tokens.masked_fill(~real, pad_id).to(device)


def _generate(fn, model, prompt, n, use_cache, what):
    __tracebackhide__ = True
    args = (model, prompt, n) if use_cache is None else (model, prompt, n, use_cache)
    got = expect_tensor(call(fn, *args, what=what), what, shape=(prompt.shape[0], prompt.shape[1] + n),
                        dtype=prompt.dtype, device=prompt.device)
    if not torch.equal(got[:, :prompt.shape[1]], prompt):
        fail(f"{what} should start with the prompt as given (padding included), then the {n} new tokens; its first "
             f"{prompt.shape[1]} columns are {got[:, :prompt.shape[1]].tolist()}, the prompt {prompt.tolist()}.",
             mistake="values_differ")
    return got


def _expect_tokens(got, want, what, mistakes: dict):
    """Exact equality of token ids; a mismatch that equals a known mistake's tokens names it."""
    __tracebackhide__ = True
    if torch.equal(got, want):
        return
    for mistake, wrong in mistakes.items():
        if not torch.equal(wrong, want) and torch.equal(got, wrong):
            fail(mistake)
    fail(f"{what} wrote {got.tolist()}, expected {want.tolist()} (greedy decoding, computed from the model's "
         "weights).", mistake="values_differ")


def _cache_mistakes(p, prompt, n, what, padded: bool) -> dict:
    heads, pad_id = _LM[2], _LM[0]

    def run(kind):
        return decode_variant(p, prompt, n, heads, pad_id, True, kind)
    wrong = {CACHE_TWICE.format(what=what, detail="each new token's keys and values are appended twice"):
             run("appended_twice"),
             CACHE_TWICE.format(what=what, detail="the prompt's last token goes through the blocks a second time "
                                "after the prompt filled the cache, so its keys and values are in it twice"):
             run("last_prompt_twice"),
             PREFILL_NOT_CAUSAL.format(what=what): run("prefill_not_causal"),
             CACHE_POSITIONS.format(what=what, detail="no position embedding was added"): run("no_positions")}
    if padded:
        wrong[CACHE_PADDING.format(what=what, detail="the new tokens attend to them")] = run("no_padding_mask_steps")
        wrong[CACHE_PADDING.format(what=what, detail="no position attends past them")] = run("no_padding_mask")
        wrong[CACHE_POSITIONS.format(what=what, detail="counted from the start of the padded prompt")] = \
            run("positions_count_padding")
    return wrong


def _check_generate_without_cache(fn, TinyLM, device) -> int:
    """use_cache=False: greedy decoding by running the model on the whole sequence at each step."""
    __tracebackhide__ = True
    model, p = _lm(TinyLM, device, 1000)
    prompt = _prompt([4, 4], 4, 1001, device)
    what = f"generate(model, prompt, 6, use_cache=False) on {device}, prompts {prompt.tolist()}"
    want = decode_variant(p, prompt, 6, _LM[2], _LM[0], kind="recompute")
    _expect_tokens(_generate(fn, model, prompt, 6, False, what), want, what, {})
    return 1


def _check_generate_with_cache(fn, TinyLM, device) -> int:
    """use_cache=True (the default): the same tokens as recomputing, for prompts of 4 and of 1 token."""
    __tracebackhide__ = True
    model, p = _lm(TinyLM, device, 1010)
    n = 0
    for lengths, width, steps, seed in (([4, 4], 4, 8, 1011), ([1], 1, 5, 1012)):
        prompt = _prompt(lengths, width, seed, device)
        what = f"generate(model, prompt, {steps}) (use_cache=True) on {device}, prompts {prompt.tolist()}"
        want = decode_variant(p, prompt, steps, _LM[2], _LM[0], kind="recompute")
        _expect_tokens(_generate(fn, model, prompt, steps, None, what), want, what,
                       _cache_mistakes(p, prompt, steps, what, padded=False))
        n += 1
    prompt = _prompt([3], 3, 1013, device)
    _generate(fn, model, prompt, 0, True, f"generate(model, prompt, 0) on {device}")     # nothing to write
    return n + 1


def _check_generate_padded_batch(fn, TinyLM, device) -> int:
    """A batch of left-padded prompts of 5, 2 and 4 tokens, with and without the cache."""
    __tracebackhide__ = True
    model, p = _lm(TinyLM, device, 1020)
    prompt = _prompt([5, 2, 4], 5, 1021, device)
    want = decode_variant(p, prompt, 7, _LM[2], _LM[0], kind="recompute")
    n = 0
    for use_cache in (True, False):
        what = (f"generate(model, prompt, 7, use_cache={use_cache}) on {device}, left-padded prompts "
                f"{prompt.tolist()} (padding id {_LM[0]})")
        mistakes = _cache_mistakes(p, prompt, 7, what, padded=True) if use_cache else {}
        _expect_tokens(_generate(fn, model, prompt, 7, use_cache, what), want, what, mistakes)
        n += 1
    return n


def _check_cache_is_used(fn, TinyLM, device) -> int:
    """A TinyLM without its causal mask, one-token prompts: the cached path must keep the earlier
    positions' keys and values (they would change if recomputed)."""
    __tracebackhide__ = True
    model, p = _lm(TinyLM, device, 1030, is_causal=False)
    prompt = _prompt([1, 1], 1, 1031, device)
    what = (f"generate(model, prompt, 8, use_cache=True) on {device} for a TinyLM(causal=False), prompts "
            f"{prompt.tolist()}")
    want = decode_variant(p, prompt, 8, _LM[2], _LM[0], False, "cache")
    recomputed = decode_variant(p, prompt, 8, _LM[2], _LM[0], False, "recompute")
    _expect_tokens(_generate(fn, model, prompt, 8, True, what), want, what,
                   {CACHE_NOT_USED.format(what=what): recomputed})
    return 1


def _blame_paste(failure: CheckFailure, MultiHeadAttention) -> None:
    __tracebackhide__ = True
    if MultiHeadAttention is None or failure.mistake == "not_implemented":
        return
    from .ch03 import check_multi_head_attention
    earlier = _quietly(check_multi_head_attention, MultiHeadAttention)
    if earlier is not None:
        fail(PASTED_MHA_FAILS, module="generate", failure=str(failure).rstrip("."), earlier=str(earlier))


def check_generate(generate, TinyLM, MultiHeadAttention=None) -> None:
    """Visible tests for exercise 3. ``generate(model, prompt, n_tokens, use_cache=True)``: model a
    TinyLM, prompt (B, P) int64 left-padded with model.pad_id -> (B, P + n_tokens), the prompt then
    n_tokens greedy tokens; the same tokens with and without the cache."""
    __tracebackhide__ = True
    try:
        count = on_devices([_check_generate_without_cache, _check_generate_with_cache, _check_generate_padded_batch,
                            _check_cache_is_used], generate, TinyLM)
    except CheckFailure as exc:
        _blame_paste(exc, MultiHeadAttention)
        raise
    passed("generate with and without the KV cache", count)
