"""Checks for chapter 3: splitting and merging heads, a multi-head attention module.

Expected values come from PyTorch's own operations (``torch.nn.MultiheadAttention`` with the
student's weights copied in, and a plain-torch loop over single heads, both in :mod:`.mha`),
never from the course's solution. Each public check runs a list of ``_check_<property>``
functions on the CPU and, when present, on CUDA. Masks follow the course's convention
(:mod:`.masks`, True = may attend); ``nn.MultiheadAttention`` gets ``~mask``.
"""
from __future__ import annotations

import contextlib
import io

import torch

from . import forbidden
from .core import (CheckFailure, Mistake, call, expect_close, expect_module, expect_outputs, expect_raises, expect_tensor,
                   fail, on_devices, passed, randn)
from .gradients import expect_grads_close, grads
from .masks import causal, padding
from .mha import MHA_PARAMS, merge, mha_loop, mha_variant, random_params, split, torch_mha
from .scan import forbid_names

# --------------------------------------------------------------------------------------------
# Exercise 1: split_heads / merge_heads
# --------------------------------------------------------------------------------------------

_SPLIT_FIX = "reshape to (B, L, H, d_k) and then transpose(1, 2)."
SPLIT_NO_TRANSPOSE = Mistake("split_without_transpose", "you reshaped to (B, H, L, d_k) directly, which mixes "
                             f"positions and heads; {_SPLIT_FIX}")
SPLIT_INTERLEAVED = Mistake("split_interleaved", "head i should get the consecutive features [i*d_k, (i+1)*d_k) "
                            "of each position, but you gave it every H-th feature (a reshape to (B, L, d_k, H)); "
                            f"{_SPLIT_FIX}")
MERGE_NO_TRANSPOSE = Mistake("merge_without_transpose", "you reshaped (B, H, L, d_k) to (B, L, H*d_k) directly, "
                             "which mixes positions and heads; transpose(1, 2) back to (B, L, H, d_k) first, then "
                             "reshape to (B, L, H*d_k).")
MERGE_INTERLEAVED = Mistake("merge_interleaved", "the features of head i should end up side by side at "
                            "[i*d_k, (i+1)*d_k), but you interleaved the heads (a permute to (B, L, d_k, H)); "
                            "transpose(1, 2) to (B, L, H, d_k), then reshape.")
HEAD_SLICE = Mistake("head_is_not_its_slice", "split_heads(x, {h})[:, {head}] should be exactly the features "
                     "x[..., {start}:{stop}] (head {head}'s slice of d_model).")
ROUND_TRIP = Mistake("round_trip_differs", "{label} should give x back exactly (splitting and merging only move "
                     "numbers around), but it differs.")

_SHAPES = [(2, 5, 12, 3), (1, 7, 8, 2), (3, 4, 16, 4), (2, 6, 12, 6)]   # (B, L, d_model, H)


def _check_split(split_heads, merge_heads, device) -> int:
    """Values of split_heads, and each head is exactly its slice of the features."""
    __tracebackhide__ = True
    for i, (b, length, d, h) in enumerate(_SHAPES):
        d_k, label = d // h, f"split_heads(x, num_heads={h}) for x of shape {(b, length, d)}"
        x = randn(b, length, d, seed=100 + i, device=device)
        got = call(split_heads, x, h, what=label)
        expect_tensor(got, label, shape=(b, h, length, d_k), dtype=x.dtype, device=device)
        expect_close(got, split(x, h), label, mistakes={SPLIT_NO_TRANSPOSE: split(x, h, "no_transpose"),
                                                        SPLIT_INTERLEAVED: split(x, h, "interleaved")})
        for head in (0, h - 1):
            if not torch.equal(got[:, head], x[..., head * d_k:(head + 1) * d_k]):
                fail(HEAD_SLICE, h=h, head=head, start=head * d_k, stop=(head + 1) * d_k)
    return 2 * len(_SHAPES)


def _check_merge(split_heads, merge_heads, device) -> int:
    """merge_heads on a contiguous (B, H, L, d_k) input and on a transposed (non-contiguous) one."""
    __tracebackhide__ = True
    for i, (b, length, d, h) in enumerate(_SHAPES):
        y = randn(b, h, length, d // h, seed=200 + i, device=device)
        y_t = randn(b, length, h, d // h, seed=300 + i, device=device).transpose(1, 2)
        for name, inp in (("a contiguous", y), ("a transposed (non-contiguous)", y_t)):
            label = f"merge_heads(y) for {name} y of shape {(b, h, length, d // h)}"
            got = call(merge_heads, inp, what=label)
            expect_tensor(got, label, shape=(b, length, d), dtype=inp.dtype, device=device)
            expect_close(got, merge(inp), label, mistakes={MERGE_NO_TRANSPOSE: merge(inp, "no_transpose"),
                                                           MERGE_INTERLEAVED: merge(inp, "interleaved")})
    return 2 * len(_SHAPES)


def _check_round_trip(split_heads, merge_heads, device) -> int:
    """merge_heads(split_heads(x, h)) == x exactly."""
    __tracebackhide__ = True
    for i, (b, length, d, h) in enumerate(_SHAPES):
        x = randn(b, length, d, seed=100 + i, device=device)
        label = f"merge_heads(split_heads(x, {h})) for x of shape {(b, length, d)}"
        back = call(merge_heads, call(split_heads, x, h, what=f"split_heads(x, {h})"), what=label)
        expect_tensor(back, label, shape=x.shape, device=device)
        if not torch.equal(back, x):
            fail(ROUND_TRIP, label=label)
    return len(_SHAPES)


def _check_split_merge_grads(split_heads, merge_heads, device) -> int:
    """float64 stays float64, and gradients flow (both are permutations of the entries)."""
    __tracebackhide__ = True
    x = randn(2, 3, 8, seed=7, dtype=torch.float64, device=device, requires_grad=True)
    s = call(split_heads, x, 2, what="split_heads(x, 2) in float64")
    expect_tensor(s, "split_heads(x, 2) for float64 x", shape=(2, 2, 3, 4), dtype=torch.float64, device=device)
    upstream = randn(2, 2, 3, 4, seed=8, dtype=torch.float64, device=device)
    (g,) = grads(s, [x], upstream, "split_heads(x, 2)")
    expect_close(g, merge(upstream), "the gradient of split_heads(x, 2) with respect to x")
    y = randn(2, 2, 3, 4, seed=9, dtype=torch.float64, device=device, requires_grad=True)
    m = call(merge_heads, y, what="merge_heads(y) in float64")
    expect_tensor(m, "merge_heads(y) for float64 y", shape=(2, 3, 8), dtype=torch.float64, device=device)
    upstream = randn(2, 3, 8, seed=10, dtype=torch.float64, device=device)
    (g,) = grads(m, [y], upstream, "merge_heads(y)")
    expect_close(g, split(upstream, 2), "the gradient of merge_heads(y) with respect to y")
    return 2


def check_split_merge(split_heads, merge_heads) -> None:
    """Visible tests for exercise 1. ``split_heads(x, num_heads)``: (B, L, d_model) ->
    (B, num_heads, L, d_model // num_heads); ``merge_heads(x)``: (B, H, L, d_k) -> (B, L, H*d_k)."""
    __tracebackhide__ = True
    passed("split_heads and merge_heads", on_devices(
        [_check_split, _check_merge, _check_round_trip, _check_split_merge_grads], split_heads, merge_heads))


# --------------------------------------------------------------------------------------------
# Exercise 2: MultiHeadAttention
# --------------------------------------------------------------------------------------------

HEADS_SPLIT_NO_TRANSPOSE = Mistake("heads_split_without_transpose", "the heads are split wrongly: "
                                   f"{SPLIT_NO_TRANSPOSE.message} (Use your split_heads.)")
HEADS_SPLIT_INTERLEAVED = Mistake("heads_split_interleaved",
                                  f"the heads are split wrongly: {SPLIT_INTERLEAVED.message}")
SCALED_BY_D_MODEL = Mistake("scaled_by_sqrt_d_model", "the logits are divided by √d_model, but each head works in "
                            "d_k = d_model / num_heads dimensions: divide by √d_k (your attention function does "
                            "it when you pass it the split q and k).")
NO_SCALING = Mistake("no_scaling", "the logits are not scaled: divide by √d_k.")
HEADS_MERGED_NO_TRANSPOSE = Mistake("heads_merged_without_transpose", "the heads are merged wrongly: "
                                    f"{MERGE_NO_TRANSPOSE.message} (Use your merge_heads.)")
HEADS_MERGED_INTERLEAVED = Mistake("heads_merged_interleaved",
                                   f"the heads are merged wrongly: {MERGE_INTERLEAVED.message}")
NO_OUT_PROJ = Mistake("no_output_projection", "the output skips the output projection: apply self.out_proj (W_O) "
                      "to the merged heads.")
VALUES_FROM_KEY = Mistake("values_from_key", "the values are computed from `key`, not from `value`: "
                          "v = v_proj(value).")
MASK_IGNORED = Mistake("mask_ignored", "the mask is ignored: pass it on to scaled_dot_product_attention.")
MASK_INVERTED = Mistake("mask_inverted", "the mask is inverted: in this course True means 'may attend' "
                        "(nn.MultiheadAttention uses the opposite convention).")
MASK_NO_HEAD_DIM = Mistake("mask_without_head_dim", "a 3-d mask (B, L_q, L_k) needs a head dimension before it "
                           "meets the (B, H, L_q, L_k) logits: use mask.unsqueeze(1), giving (B, 1, L_q, L_k).")
AVERAGED_WEIGHTS = Mistake("weights_averaged_over_heads", "the weights of {what} have shape {shape}: return the "
                           "weights of every head, shaped (B, num_heads, L_q, L_k) = {want}, without averaging "
                           "over heads.")
KEYS_FROM_QUERY = Mistake("keys_from_query", "the weights of {what} have shape {shape}, i.e. (B, H, L_q, L_q): the "
                          "keys seem to come from `query`. In cross-attention keys and values come from the `key` "
                          "and `value` arguments: k = k_proj(key), v = v_proj(value).")

#: mistake -> (the mha_variant settings that make it, whether it changes the weights too)
_VARIANTS = {
    HEADS_SPLIT_NO_TRANSPOSE: (dict(split_kind="no_transpose"), True),
    HEADS_SPLIT_INTERLEAVED: (dict(split_kind="interleaved"), True),
    SCALED_BY_D_MODEL: (dict(scale="d_model"), True),
    NO_SCALING: (dict(scale="none"), True),
    HEADS_MERGED_NO_TRANSPOSE: (dict(merge_kind="no_transpose"), False),
    HEADS_MERGED_INTERLEAVED: (dict(merge_kind="interleaved"), False),
    NO_OUT_PROJ: (dict(out_proj=False), False),
    VALUES_FROM_KEY: (dict(value_from="key"), False),
}
_MASK_VARIANTS = {MASK_IGNORED: (dict(mask_mode="ignored"), True), MASK_INVERTED: (dict(mask_mode="inverted"), True)}

D_MODEL, H = 12, 3
_PARAM_SHAPES = {name: (D_MODEL, D_MODEL) if name.endswith("weight") else (D_MODEL,) for name in MHA_PARAMS}


def _mha_mistakes(p, query, key, value, h, mask):
    """(mistakes for the weights, mistakes for the output) as Mistake -> wrong tensor."""
    variants = dict(_VARIANTS)
    if mask is not None:
        variants.update(_MASK_VARIANTS)
        if mask.dim() == 3:
            variants[MASK_NO_HEAD_DIM] = (dict(mask_mode="no_head_dim"), True)
    wrong_w, wrong_out = {}, {}
    for mistake, (kwargs, affects_weights) in variants.items():
        result = mha_variant(p, query, key, value, h, mask, **kwargs)
        if result is None:
            continue
        wrong_out[mistake] = result[0]
        if affects_weights:
            wrong_w[mistake] = result[1]
    return wrong_w, wrong_out


def _module(MultiHeadAttention, params: dict, device):
    """The student's module on ``device`` (in the params' dtype) holding ``params``."""
    __tracebackhide__ = True
    module = call(MultiHeadAttention, D_MODEL, H, what=f"MultiHeadAttention({D_MODEL}, {H})")
    module = module.to(device=device, dtype=params["q_proj.weight"].dtype)
    try:
        module.load_state_dict(params)
    except Exception as exc:  # noqa: BLE001 - the student's module is student code
        fail(f"Could not load weights into your MultiHeadAttention: {exc}. Keep the submodules "
             "q_proj, k_proj, v_proj, out_proj, each nn.Linear(d_model, d_model) with a bias.",
             mistake="weights_not_loaded")
    return module


def _run(module, query, key, value, mask, what):
    """Call the module; check it returns (output, weights) of the right shapes."""
    __tracebackhide__ = True
    args = (query, key, value) if mask is None else (query, key, value, mask)
    out, w = expect_outputs(call(module, *args, what=what), f"MultiHeadAttention.forward ({what})")
    b, l_q, l_k, d_model = query.shape[0], query.shape[1], key.shape[1], query.shape[2]
    expect_tensor(out, f"the output of {what}", shape=(b, l_q, d_model), dtype=query.dtype, device=query.device)
    shape = tuple(w.shape) if type(w) is torch.Tensor else None
    if shape == (b, l_q, l_k):
        fail(AVERAGED_WEIGHTS, what=what, shape=shape, want=(b, H, l_q, l_k))
    if shape == (b, H, l_q, l_q) and l_q != l_k:
        fail(KEYS_FROM_QUERY, what=what, shape=shape)
    expect_tensor(w, f"the weights of {what}", shape=(b, H, l_q, l_k), dtype=query.dtype, device=query.device)
    return out, w


def _check_mha_parameters(MultiHeadAttention, device) -> int:
    __tracebackhide__ = True
    module = call(MultiHeadAttention, D_MODEL, H, what=f"MultiHeadAttention({D_MODEL}, {H})")
    expect_module(module, "MultiHeadAttention", _PARAM_SHAPES,
                  layout="four nn.Linear(d_model, d_model) with bias, named q_proj, k_proj, v_proj, out_proj",
                  shape_hint="all four projections are nn.Linear(d_model, d_model): the h heads' "
                             "d_k-wide projections stacked")
    return 2


def _check_divisibility(MultiHeadAttention, device) -> int:
    """d_model not divisible by num_heads: a ValueError."""
    __tracebackhide__ = True
    for d_model, h in ((10, 3), (12, 5)):
        expect_raises(ValueError, MultiHeadAttention, d_model, h, what=f"MultiHeadAttention({d_model}, {h})",
                      hint=f"d_model={d_model} is not divisible by num_heads={h}, so the heads cannot have equal "
                           "width. Check it in __init__ and raise ValueError with a clear message.")
    return 2


def _check_against_torch(MultiHeadAttention, device) -> int:
    """Against torch.nn.MultiheadAttention with the same weights: self- and cross-attention, with
    and without masks."""
    __tracebackhide__ = True
    p = random_params(D_MODEL, seed=40, device=device)
    module = _module(MultiHeadAttention, p, device)
    x = randn(2, 5, D_MODEL, seed=50, device=device)
    xq, xk, xv = (randn(3, length, D_MODEL, seed=51 + i, device=device) for i, length in enumerate((4, 6, 6)))
    cases = [
        ("self-attention, x of shape (2, 5, 12), no mask", (x, x, x), None),
        ("cross-attention, query (3, 4, 12), key/value (3, 6, 12), no mask", (xq, xk, xv), None),
        ("self-attention with a (5, 5) causal mask", (x, x, x), causal(5, device)),
        ("cross-attention with a (3, 1, 6) key-padding mask", (xq, xk, xv), padding([6, 4, 2], 6, device)),
    ]
    for label, inputs, mask in cases:
        what = f"MultiHeadAttention(12, 3) on {device}, {label}"
        out, w = _run(module, *inputs, mask, what)
        want_out, want_w = torch_mha(p, *inputs, H, mask)
        wrong_w, wrong_out = _mha_mistakes(p, *inputs, H, mask)
        expect_close(w, want_w, f"the weights of {what} (compared with nn.MultiheadAttention's per-head weights)",
                     mistakes=wrong_w)
        expect_close(out, want_out, f"the output of {what} (compared with nn.MultiheadAttention)",
                     mistakes=wrong_out)
        _, want_avg = torch_mha(p, *inputs, H, mask, average=True)
        expect_close(w.mean(1), want_avg, f"the weights of {what}, averaged over heads (compared with "
                     "nn.MultiheadAttention's averaged weights)")
    return 3 * len(cases)


def _check_against_head_loop(MultiHeadAttention, device) -> int:
    """Against a loop over single heads: masks of every rank, including fully masked rows."""
    __tracebackhide__ = True
    p = random_params(D_MODEL, seed=40, device=device)
    module = _module(MultiHeadAttention, p, device)
    xq, xk, xv = (randn(3, length, D_MODEL, seed=51 + i, device=device) for i, length in enumerate((4, 6, 6)))
    g = torch.Generator().manual_seed(60)
    rand_mask = (torch.rand(3, 4, 6, generator=g) > 0.4).to(device)
    rand_mask[:, :, 0] = True
    rand_mask[1, 2, :] = False                       # a query that may attend to nothing
    head_mask = (torch.rand(3, H, 4, 6, generator=g) > 0.5).to(device)
    head_mask[..., 1] = True
    head_mask[0, 1, 3, :] = False
    for label, mask in [("a (B, L_q, L_k) = (3, 4, 6) mask with one fully masked row", rand_mask),
                        ("a (B, H, L_q, L_k) = (3, 3, 4, 6) per-head mask with one fully masked row", head_mask)]:
        what = f"MultiHeadAttention(12, 3) on {device}, cross-attention with {label}"
        out, w = _run(module, xq, xk, xv, mask, what)
        want_out, want_w = mha_loop(p, xq, xk, xv, H, mask)
        wrong_w, wrong_out = _mha_mistakes(p, xq, xk, xv, H, mask)
        expect_close(w, want_w, f"the weights of {what} (compared with a loop over single heads)", mistakes=wrong_w)
        expect_close(out, want_out, f"the output of {what} (compared with a loop over single heads; a fully "
                     "masked query gets zero weights, so its output is out_proj's bias)", mistakes=wrong_out)
    return 4


def _check_mha_grads(MultiHeadAttention, device) -> int:
    """Gradients with respect to query, key, value and every parameter (float64)."""
    __tracebackhide__ = True
    p64 = random_params(D_MODEL, seed=70, device=device, dtype=torch.float64)
    module = _module(MultiHeadAttention, p64, device)
    inputs = {name: randn(2, 4, D_MODEL, seed=80 + i, dtype=torch.float64, device=device, requires_grad=True)
              for i, name in enumerate(("query", "key", "value"))}
    what = f"MultiHeadAttention(12, 3) on {device}, float64, with a causal mask"
    out, _ = _run(module, *inputs.values(), causal(4, device), what)
    ref = {name: t.detach().clone().requires_grad_() for name, t in {**inputs, **p64}.items()}
    want_out, _ = mha_loop(ref, ref["query"], ref["key"], ref["value"], H, causal(4, device))
    expect_close(out, want_out, f"the output of {what}")
    params = dict(module.named_parameters())
    return expect_grads_close(out, want_out, {**inputs, **{name: params[name] for name in MHA_PARAMS}},
                              {name: ref[name] for name in (*inputs, *MHA_PARAMS)}, f"the output of {what}",
                              upstream=randn(2, 4, D_MODEL, seed=90, dtype=torch.float64, device=device))


PASTED_ATTENTION_FAILS = Mistake(
    "pasted_attention_fails", "MultiHeadAttention failed its checks ({mha}), but the culprit is probably "
    "earlier: the scaled_dot_product_attention you pasted from chapter 2 (section 0, the cell under \"Your "
    "masked attention from chapter 2\") fails chapter 2's own checks: {earlier} Fix the pasted function first "
    "(run chapter 2's tests on it); your module runs through it, so its bugs show up here.")
PASTED_ATTENTION_MISSING = Mistake(
    "pasted_attention_missing", "MultiHeadAttention failed its checks ({mha}), and scaled_dot_product_attention "
    "is not defined: paste your chapter-2 function into the cell of section 0 (\"Your masked attention from "
    "chapter 2\") and run that cell first.")
EARLIER_SPLIT_MERGE_FAILS = Mistake(
    "split_merge_fails", "MultiHeadAttention failed its checks ({mha}), but the culprit is probably earlier: "
    "your split_heads/merge_heads fail exercise 1's checks: {earlier} Fix exercise 1 first; your module uses "
    "them, so their bugs show up here.")


def _blame_earlier(mha_failure: CheckFailure, scaled_dot_product_attention, split_heads, merge_heads) -> None:
    """MultiHeadAttention failed: if a function it builds on fails its own chapter's checks, say so
    (a chapter-2 bug pasted into chapter 3 is not a multi-head attention bug). A module that does not
    use the earlier functions fails only on its own merits: this runs only after it failed."""
    __tracebackhide__ = True
    if mha_failure.mistake == "not_implemented":
        return
    if scaled_dot_product_attention is None and "'scaled_dot_product_attention' is not defined" in str(mha_failure):
        fail(PASTED_ATTENTION_MISSING, mha=str(mha_failure).rstrip("."))
    from .ch02 import check_masked_attention
    earlier = [(PASTED_ATTENTION_FAILS, check_masked_attention, (scaled_dot_product_attention,)),
               (EARLIER_SPLIT_MERGE_FAILS, check_split_merge, (split_heads, merge_heads))]
    for mistake, check, functions in earlier:
        if any(f is None for f in functions):
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                check(*functions)
        except CheckFailure as exc:
            fail(mistake, mha=str(mha_failure).rstrip("."), earlier=str(exc))
        except Exception:  # noqa: BLE001 - no verdict on the earlier function: judge the module alone
            continue


def check_multi_head_attention(MultiHeadAttention, scaled_dot_product_attention=None, split_heads=None,
                               merge_heads=None) -> None:
    """Visible tests for exercise 2. ``MultiHeadAttention(d_model, num_heads)``;
    ``forward(query, key, value, mask=None)`` returns ``(output (B, L_q, d_model),
    weights (B, num_heads, L_q, L_k))``; True in ``mask`` = may attend.

    The student's earlier functions (the pasted chapter-2 attention, exercise 1's split/merge), when
    given, are checked only if the module fails, to name them as the likely culprit."""
    __tracebackhide__ = True
    forbid_names(MultiHeadAttention, forbidden.ATTENTION, "MultiHeadAttention",
                 "Use your split_heads and merge_heads and your own scaled_dot_product_attention(q, k, v, mask) "
                 "from chapter 2 (calling it by its plain name is fine; torch's versions are not).")
    try:
        count = on_devices([_check_mha_parameters, _check_divisibility, _check_against_torch,
                            _check_against_head_loop, _check_mha_grads], MultiHeadAttention)
    except CheckFailure as exc:
        _blame_earlier(exc, scaled_dot_product_attention, split_heads, merge_heads)
        raise
    passed("MultiHeadAttention", count)
