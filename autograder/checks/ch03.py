"""Checks for chapter 3: splitting and merging heads, a multi-head attention module.

Expected values come from PyTorch's own operations (``torch.nn.MultiheadAttention`` with the
student's weights copied in, and a plain-torch loop over single heads), never from the course's
solution. Every check runs on the CPU and, when present, on CUDA.

Mask convention (course-wide): a boolean mask, True = "this query may attend to this key",
broadcastable against the logits ``(..., L_q, L_k)``. ``nn.MultiheadAttention`` uses the opposite
(True = blocked), so the checks pass it ``~mask``.
"""
from __future__ import annotations

import math

import torch

from .core import (CheckFailure, call, devices, expect_close, expect_module, expect_tensor, fail,
                   forbid_names, grads, passed, raised, randn)

MHA_FORBIDDEN = ("MultiheadAttention", "multi_head_attention_forward", "scaled_dot_product_attention",
                 "_scaled_dot_product_attention_math")
MHA_PARAMS = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
              "v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias")

SPLIT_NO_TRANSPOSE = ("you reshaped to (B, H, L, d_k) directly, which mixes positions and heads; "
                      "reshape to (B, L, H, d_k) and then transpose(1, 2).")
SPLIT_INTERLEAVED = ("head i should get the consecutive features [i*d_k, (i+1)*d_k) of each "
                     "position, but you gave it every H-th feature (a reshape to (B, L, d_k, H)); "
                     "reshape to (B, L, H, d_k) and then transpose(1, 2).")
MERGE_NO_TRANSPOSE = ("you reshaped (B, H, L, d_k) to (B, L, H*d_k) directly, which mixes positions "
                      "and heads; transpose(1, 2) back to (B, L, H, d_k) first, then reshape to "
                      "(B, L, H*d_k).")
MERGE_INTERLEAVED = ("the features of head i should end up side by side at [i*d_k, (i+1)*d_k), "
                     "but you interleaved the heads (a permute to (B, L, d_k, H)); transpose(1, 2) "
                     "to (B, L, H, d_k), then reshape.")


# --------------------------------------------------------------------------------------------
# Plain-torch versions of the right answers and of the common mistakes
# --------------------------------------------------------------------------------------------

def _split(x: torch.Tensor, h: int, kind: str = "right") -> torch.Tensor:
    b, length, d = x.shape
    if kind == "right":
        return x.reshape(b, length, h, d // h).transpose(1, 2)
    if kind == "no_transpose":
        return x.reshape(b, h, length, d // h)
    if kind == "interleaved":
        return x.reshape(b, length, d // h, h).permute(0, 3, 1, 2)
    raise ValueError(kind)


def _merge(y: torch.Tensor, kind: str = "right") -> torch.Tensor:
    b, h, length, d_k = y.shape
    if kind == "right":
        return y.transpose(1, 2).reshape(b, length, h * d_k)
    if kind == "no_transpose":
        return y.reshape(b, length, h * d_k)
    if kind == "interleaved":
        return y.permute(0, 2, 3, 1).reshape(b, length, h * d_k)
    raise ValueError(kind)


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the keys; False entries get weight 0; fully masked rows are all zeros."""
    if mask is None:
        return torch.softmax(logits, -1)
    mask = mask.to(logits.device)
    w = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    keep = mask.expand(logits.shape).any(-1, keepdim=True)
    return torch.where(keep, w, torch.zeros_like(w))


def _project(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def mha_loop(p: dict, query, key, value, num_heads: int, mask=None):
    """Multi-head attention as a loop over single heads, with explicit slices of the weights.

    ``p`` holds the eight parameters named as in :data:`MHA_PARAMS`. Returns ``(output, weights)``
    with weights shaped (B, H, L_q, L_k).
    """
    d_model = p["q_proj.weight"].shape[0]
    d_k = d_model // num_heads
    if mask is not None and mask.dim() == 4:
        mask = mask.expand(mask.shape[0], num_heads, *mask.shape[2:])
    outs, weights = [], []
    for i in range(num_heads):
        rows = slice(i * d_k, (i + 1) * d_k)
        q = query @ p["q_proj.weight"][rows].T + p["q_proj.bias"][rows]
        k = key @ p["k_proj.weight"][rows].T + p["k_proj.bias"][rows]
        v = value @ p["v_proj.weight"][rows].T + p["v_proj.bias"][rows]
        m = mask[:, i] if mask is not None and mask.dim() == 4 else mask
        w = _masked_softmax(q @ k.transpose(-2, -1) / math.sqrt(d_k), m)
        outs.append(w @ v)
        weights.append(w)
    concat = torch.cat(outs, dim=-1)
    return _project(p, "out_proj", concat), torch.stack(weights, dim=1)


def mha_variant(p: dict, query, key, value, num_heads: int, mask=None, *, split="right",
                merge="right", scale="d_k", out_proj=True, mask_mode="right", value_from="value"):
    """Vectorised multi-head attention with one deliberate mistake (or none): what a student's
    module would return if it made that mistake. Returns None where the mistake cannot run."""
    d_model = p["q_proj.weight"].shape[0]
    d_k = d_model // num_heads
    try:
        q = _split(_project(p, "q_proj", query), num_heads, split)
        k = _split(_project(p, "k_proj", key), num_heads, split)
        v = _split(_project(p, "v_proj", key if value_from == "key" else value), num_heads, split)
        logits = q @ k.transpose(-2, -1)
        logits = logits / {"d_k": math.sqrt(d_k), "d_model": math.sqrt(d_model), "none": 1.0}[scale]
        if mask is not None and mask_mode != "ignored":
            m = ~mask if mask_mode == "inverted" else mask
            if m.dim() == 3 and mask_mode != "no_head_dim":
                m = m.unsqueeze(1)
            if m.dim() == 3 and (m.shape[0] not in (1, num_heads)):
                return None
            m = torch.broadcast_to(m, logits.shape)
        else:
            m = None
        w = _masked_softmax(logits, m)
        merged = _merge(w @ v, merge)
        out = _project(p, "out_proj", merged) if out_proj else merged
    except RuntimeError:
        return None
    return out, w


def _mha_mistakes(p, query, key, value, h, mask):
    """(mistakes for the weights, mistakes for the output) as message -> wrong tensor."""
    variants = {
        "the heads are split wrongly: " + SPLIT_NO_TRANSPOSE
        + " (Use your split_heads.)": (dict(split="no_transpose"), True),
        "the heads are split wrongly: " + SPLIT_INTERLEAVED: (dict(split="interleaved"), True),
        "the logits are divided by √d_model, but each head works in d_k = d_model / num_heads "
        "dimensions: divide by √d_k (your attention function does it when you pass it the split "
        "q and k).": (dict(scale="d_model"), True),
        "the logits are not scaled: divide by √d_k.": (dict(scale="none"), True),
        "the heads are merged wrongly: " + MERGE_NO_TRANSPOSE
        + " (Use your merge_heads.)": (dict(merge="no_transpose"), False),
        "the heads are merged wrongly: " + MERGE_INTERLEAVED: (dict(merge="interleaved"), False),
        "the output skips the output projection: apply self.out_proj (W_O) to the merged "
        "heads.": (dict(out_proj=False), False),
        "the values are computed from `key`, not from `value`: v = v_proj(value).":
            (dict(value_from="key"), False),
    }
    if mask is not None:
        variants.update({
            "the mask is ignored: pass it on to scaled_dot_product_attention.":
                (dict(mask_mode="ignored"), True),
            "the mask is inverted: in this course True means 'may attend' (nn.MultiheadAttention "
            "uses the opposite convention).": (dict(mask_mode="inverted"), True),
        })
        if mask.dim() == 3:
            variants["a 3-d mask (B, L_q, L_k) needs a head dimension before it meets the "
                     "(B, H, L_q, L_k) logits: use mask.unsqueeze(1), giving (B, 1, L_q, L_k)."] = \
                (dict(mask_mode="no_head_dim"), True)
    wrong_w, wrong_out = {}, {}
    for message, (kwargs, affects_weights) in variants.items():
        result = mha_variant(p, query, key, value, h, mask, **kwargs)
        if result is None:
            continue
        wrong_out[message] = result[0]
        if affects_weights:
            wrong_w[message] = result[1]
    return wrong_w, wrong_out


# --------------------------------------------------------------------------------------------
# Exercise 1: split_heads / merge_heads
# --------------------------------------------------------------------------------------------

def check_split_merge(split_heads, merge_heads) -> None:
    """Visible tests for exercise 1. ``split_heads(x, num_heads)``: (B, L, d_model) ->
    (B, num_heads, L, d_model // num_heads); ``merge_heads(x)``: (B, H, L, d_k) -> (B, L, H*d_k)."""
    n = 0
    shapes = [(2, 5, 12, 3), (1, 7, 8, 2), (3, 4, 16, 4), (2, 6, 12, 6)]
    for device in devices():
        for i, (b, length, d, h) in enumerate(shapes):
            d_k = d // h
            label = f"split_heads(x, num_heads={h}) for x of shape {(b, length, d)}"
            x = randn(b, length, d, seed=100 + i, device=device)
            got = call(split_heads, x, h, what=label)
            expect_tensor(got, label, shape=(b, h, length, d_k), dtype=x.dtype, device=device)
            expect_close(got, _split(x, h), label, mistakes={
                SPLIT_NO_TRANSPOSE: _split(x, h, "no_transpose"),
                SPLIT_INTERLEAVED: _split(x, h, "interleaved"),
            })
            n += 1
            for head in (0, h - 1):
                if not torch.equal(got[:, head], x[..., head * d_k:(head + 1) * d_k]):
                    fail(f"split_heads(x, {h})[:, {head}] should be exactly the features "
                         f"x[..., {head * d_k}:{(head + 1) * d_k}] (head {head}'s slice of d_model).")
            n += 1

            # merge_heads on a contiguous (B, H, L, d_k) input and on a transposed (non-contiguous) one.
            y = randn(b, h, length, d_k, seed=200 + i, device=device)
            y_t = randn(b, length, h, d_k, seed=300 + i, device=device).transpose(1, 2)
            for name, inp in (("a contiguous", y), ("a transposed (non-contiguous)", y_t)):
                label = f"merge_heads(y) for {name} y of shape {(b, h, length, d_k)}"
                got = call(merge_heads, inp, what=label)
                expect_tensor(got, label, shape=(b, length, d), dtype=inp.dtype, device=device)
                expect_close(got, _merge(inp), label, mistakes={
                    MERGE_NO_TRANSPOSE: _merge(inp, "no_transpose"),
                    MERGE_INTERLEAVED: _merge(inp, "interleaved"),
                })
                n += 1

            # Round trip: merge_heads(split_heads(x, h)) == x.
            label = f"merge_heads(split_heads(x, {h})) for x of shape {(b, length, d)}"
            back = call(merge_heads, call(split_heads, x, h, what=f"split_heads(x, {h})"), what=label)
            expect_tensor(back, label, shape=x.shape, device=device)
            if not torch.equal(back, x):
                fail(f"{label} should give x back exactly (splitting and merging only move numbers "
                     "around), but it differs.")
            n += 1

        # float64 stays float64, and gradients flow (both are permutations of the entries).
        x = randn(2, 3, 8, seed=7, dtype=torch.float64, device=device, requires_grad=True)
        s = call(split_heads, x, 2, what="split_heads(x, 2) in float64")
        expect_tensor(s, "split_heads(x, 2) for float64 x", shape=(2, 2, 3, 4), dtype=torch.float64,
                      device=device)
        upstream = randn(2, 2, 3, 4, seed=8, dtype=torch.float64, device=device)
        (g,) = grads(s, [x], upstream, "split_heads(x, 2)")
        expect_close(g, _merge(upstream), "the gradient of split_heads(x, 2) with respect to x")
        y = randn(2, 2, 3, 4, seed=9, dtype=torch.float64, device=device, requires_grad=True)
        m = call(merge_heads, y, what="merge_heads(y) in float64")
        expect_tensor(m, "merge_heads(y) for float64 y", shape=(2, 3, 8), dtype=torch.float64,
                      device=device)
        upstream = randn(2, 3, 8, seed=10, dtype=torch.float64, device=device)
        (g,) = grads(m, [y], upstream, "merge_heads(y)")
        expect_close(g, _split(upstream, 2), "the gradient of merge_heads(y) with respect to y")
        n += 2
    passed("split_heads and merge_heads", n)


# --------------------------------------------------------------------------------------------
# Exercise 2: MultiHeadAttention
# --------------------------------------------------------------------------------------------

def _random_params(d_model: int, seed: int, device, dtype=torch.float32) -> dict:
    scale = 1.0 / math.sqrt(d_model)
    return {name: randn(*((d_model, d_model) if name.endswith("weight") else (d_model,)),
                        seed=seed + i, device=device, dtype=dtype,
                        scale=scale if name.endswith("weight") else 0.1)
            for i, name in enumerate(MHA_PARAMS)}


def _torch_mha(p: dict, query, key, value, num_heads: int, mask=None, average=False):
    """torch.nn.MultiheadAttention with the same weights (and ~mask: it blocks where True)."""
    d_model = query.shape[-1]
    ref = torch.nn.MultiheadAttention(d_model, num_heads, batch_first=True).to(query.device, query.dtype)
    ref.eval()
    ref.load_state_dict({
        "in_proj_weight": torch.cat([p["q_proj.weight"], p["k_proj.weight"], p["v_proj.weight"]]),
        "in_proj_bias": torch.cat([p["q_proj.bias"], p["k_proj.bias"], p["v_proj.bias"]]),
        "out_proj.weight": p["out_proj.weight"], "out_proj.bias": p["out_proj.bias"],
    })
    attn_mask = None
    if mask is not None:
        b, l_q, l_k = query.shape[0], query.shape[1], key.shape[1]
        if mask.dim() == 2:
            attn_mask = ~mask
        else:
            m = mask.unsqueeze(1) if mask.dim() == 3 else mask
            attn_mask = ~m.expand(b, num_heads, l_q, l_k).reshape(b * num_heads, l_q, l_k)
    with torch.no_grad():
        return ref(query, key, value, attn_mask=attn_mask, need_weights=True,
                   average_attn_weights=average)


def _run(module, query, key, value, mask, h, what):
    args = (query, key, value) if mask is None else (query, key, value, mask)
    result = call(module, *args, what=what)
    if not isinstance(result, tuple) or len(result) != 2:
        fail(f"MultiHeadAttention.forward should return a tuple (output, weights), but {what} "
             f"returned {type(result).__name__}.")
    out, w = result
    b, l_q, l_k, d_model = query.shape[0], query.shape[1], key.shape[1], query.shape[2]
    expect_tensor(out, f"the output of {what}", shape=(b, l_q, d_model), dtype=query.dtype,
                  device=query.device)
    if type(w) is torch.Tensor and tuple(w.shape) == (b, l_q, l_k):
        fail(f"the weights of {what} have shape {tuple(w.shape)}: return the weights of every head, "
             f"shaped (B, num_heads, L_q, L_k) = {(b, h, l_q, l_k)}, without averaging over heads.")
    if type(w) is torch.Tensor and tuple(w.shape) == (b, h, l_q, l_q) and l_q != l_k:
        fail(f"the weights of {what} have shape {tuple(w.shape)}, i.e. (B, H, L_q, L_q): the keys "
             "seem to come from `query`. In cross-attention keys and values come from the `key` "
             "and `value` arguments: k = k_proj(key), v = v_proj(value).")
    expect_tensor(w, f"the weights of {what}", shape=(b, h, l_q, l_k), dtype=query.dtype,
                  device=query.device)
    return out, w


def _load(module, params: dict) -> None:
    try:
        module.load_state_dict(params)
    except Exception as exc:  # noqa: BLE001
        fail(f"Could not load weights into your MultiHeadAttention: {exc}. Keep the submodules "
             "q_proj, k_proj, v_proj, out_proj, each nn.Linear(d_model, d_model) with a bias.")


def check_multi_head_attention(MultiHeadAttention) -> None:
    """Visible tests for exercise 2. ``MultiHeadAttention(d_model, num_heads)``;
    ``forward(query, key, value, mask=None)`` returns ``(output (B, L_q, d_model),
    weights (B, num_heads, L_q, L_k))``; True in ``mask`` = may attend."""
    forbid_names(MultiHeadAttention, MHA_FORBIDDEN, "MultiHeadAttention",
                     "Use your split_heads and merge_heads and your own "
                     "scaled_dot_product_attention(q, k, v, mask) from chapter 2 (calling it by its "
                     "plain name is fine; torch's versions are not).")
    d_model, h = 12, 3
    n = 0
    for device in devices():
        # 1. Construction and parameters.
        module = call(MultiHeadAttention, d_model, h, what=f"MultiHeadAttention({d_model}, {h})")
        expect_module(module, "MultiHeadAttention",
                      {name: (d_model, d_model) if name.endswith("weight") else (d_model,) for name in MHA_PARAMS},
                      layout="four nn.Linear(d_model, d_model) with bias, named q_proj, k_proj, v_proj, out_proj",
                      shape_hint="all four projections are nn.Linear(d_model, d_model): the h heads' "
                                 "d_k-wide projections stacked")
        n += 2

        # 2. d_model not divisible by num_heads: a ValueError.
        for bad in ((10, 3), (12, 5)):
            try:
                MultiHeadAttention(*bad)
            except CheckFailure:
                raise
            except Exception as exc:  # noqa: BLE001
                # Errors from the grader's sandbox carry the student's exception type by name.
                kind = getattr(exc, "student_type", type(exc).__name__)
                if kind == "NotImplementedError":
                    fail(f"MultiHeadAttention{bad} raised NotImplementedError: replace `raise "
                         "NotImplementedError()` with your implementation and run that cell again.")
                if not raised(exc, ValueError):
                    fail(f"MultiHeadAttention{bad} should raise ValueError (d_model={bad[0]} is not "
                         f"divisible by num_heads={bad[1]}), but it raised {kind}: {exc}")
            else:
                fail(f"MultiHeadAttention{bad} should raise ValueError: d_model={bad[0]} is not "
                     f"divisible by num_heads={bad[1]}, so the heads cannot have equal width. "
                     "Check it in __init__ and raise ValueError with a clear message.")
            n += 1

        # 3. Against torch.nn.MultiheadAttention with the same weights: self- and cross-attention,
        #    with and without masks (True = may attend).
        module = module.to(device)
        p = _random_params(d_model, seed=40, device=device)
        _load(module, p)
        x = randn(2, 5, d_model, seed=50, device=device)
        xq = randn(3, 4, d_model, seed=51, device=device)
        xk = randn(3, 6, d_model, seed=52, device=device)
        xv = randn(3, 6, d_model, seed=53, device=device)
        causal = torch.ones(5, 5, dtype=torch.bool, device=device).tril()
        lengths = torch.tensor([6, 4, 2], device=device)
        padding = (torch.arange(6, device=device) < lengths[:, None])[:, None, :]  # (B, 1, L_k)
        cases = [
            ("self-attention, x of shape (2, 5, 12), no mask", (x, x, x), None),
            ("cross-attention, query (3, 4, 12), key/value (3, 6, 12), no mask", (xq, xk, xv), None),
            ("self-attention with a (5, 5) causal mask", (x, x, x), causal),
            ("cross-attention with a (3, 1, 6) key-padding mask", (xq, xk, xv), padding),
        ]
        for label, (q_in, k_in, v_in), mask in cases:
            what = f"MultiHeadAttention(12, 3) on {device}, {label}"
            out, w = _run(module, q_in, k_in, v_in, mask, h, what)
            want_out, want_w = _torch_mha(p, q_in, k_in, v_in, h, mask)
            wrong_w, wrong_out = _mha_mistakes(p, q_in, k_in, v_in, h, mask)
            expect_close(w, want_w, f"the weights of {what} (compared with "
                         "nn.MultiheadAttention's per-head weights)", mistakes=wrong_w)
            expect_close(out, want_out, f"the output of {what} (compared with "
                         "nn.MultiheadAttention)", mistakes=wrong_out)
            _, want_avg = _torch_mha(p, q_in, k_in, v_in, h, mask, average=True)
            expect_close(w.mean(1), want_avg, f"the weights of {what}, averaged over heads "
                         "(compared with nn.MultiheadAttention's averaged weights)")
            n += 3

        # 4. Against a loop over single heads: masks of every rank, including fully masked rows.
        g = torch.Generator().manual_seed(60)
        rand_mask = (torch.rand(3, 4, 6, generator=g) > 0.4).to(device)
        rand_mask[:, :, 0] = True
        rand_mask[1, 2, :] = False                       # a query that may attend to nothing
        head_mask = (torch.rand(3, h, 4, 6, generator=g) > 0.5).to(device)
        head_mask[..., 1] = True
        head_mask[0, 1, 3, :] = False
        loop_cases = [
            ("a (B, L_q, L_k) = (3, 4, 6) mask with one fully masked row", rand_mask),
            ("a (B, H, L_q, L_k) = (3, 3, 4, 6) per-head mask with one fully masked row", head_mask),
        ]
        for label, mask in loop_cases:
            what = f"MultiHeadAttention(12, 3) on {device}, cross-attention with {label}"
            out, w = _run(module, xq, xk, xv, mask, h, what)
            want_out, want_w = mha_loop(p, xq, xk, xv, h, mask)
            wrong_w, wrong_out = _mha_mistakes(p, xq, xk, xv, h, mask)
            expect_close(w, want_w, f"the weights of {what} (compared with a loop over single "
                         "heads)", mistakes=wrong_w)
            expect_close(out, want_out, f"the output of {what} (compared with a loop over single "
                         "heads; a fully masked query gets zero weights, so its output is "
                         "out_proj's bias)", mistakes=wrong_out)
            n += 2

        # 5. Gradients with respect to query, key, value and every parameter (float64).
        module = module.double()
        p64 = _random_params(d_model, seed=70, device=device, dtype=torch.float64)
        _load(module, p64)
        q_in, k_in, v_in = (randn(2, 4, d_model, seed=80 + i, dtype=torch.float64, device=device,
                                  requires_grad=True) for i in range(3))
        what = f"MultiHeadAttention(12, 3) on {device}, float64, with a causal mask"
        causal4 = torch.ones(4, 4, dtype=torch.bool, device=device).tril()
        out, _ = _run(module, q_in, k_in, v_in, causal4, h, what)
        upstream = randn(2, 4, d_model, seed=90, dtype=torch.float64, device=device)
        stu_params = dict(module.named_parameters())
        got = grads(out, [q_in, k_in, v_in, *(stu_params[name] for name in MHA_PARAMS)], upstream,
                    f"the output of {what}")
        ref_in = [t.detach().clone().requires_grad_() for t in (q_in, k_in, v_in)]
        ref_p = {name: t.clone().requires_grad_() for name, t in p64.items()}
        want_out, _ = mha_loop(ref_p, *ref_in, h, causal4)
        expect_close(out, want_out, f"the output of {what}")
        want = torch.autograd.grad(want_out, [*ref_in, *(ref_p[name] for name in MHA_PARAMS)], upstream)
        for name, have, w_ in zip(("query", "key", "value", *MHA_PARAMS), got, want):
            expect_close(have, w_, f"the gradient of the output of {what} with respect to {name}")
            n += 1
    passed("MultiHeadAttention", n)
