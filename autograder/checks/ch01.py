"""Checks for chapter 1: softmax, scaled dot-product attention, a self-attention module.

Expected values come from PyTorch's own operations (public references), never from the course's
solution. Every check runs on the CPU and, when present, on CUDA.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .core import (call, devices, expect_close, expect_module, expect_tensor, fail, forbid_names,
                   grads, passed, randn)

SOFTMAX_FORBIDDEN = ("softmax", "log_softmax", "Softmax", "LogSoftmax", "_softmax", "_log_softmax")
ATTENTION_FORBIDDEN = ("scaled_dot_product_attention", "_scaled_dot_product_attention_math",
                       "MultiheadAttention", "multi_head_attention_forward")


def _softmax_mistakes(x: torch.Tensor, dim: int) -> dict[str, torch.Tensor]:
    other = 0 if (dim % x.dim()) != 0 else x.dim() - 1
    e = torch.exp(x - x.max())
    m = {
        "it sums to 1 over all elements instead of along `dim`: divide by the sum along `dim` "
        "with keepdim=True.": e / e.sum(),
        "these are unnormalised exponentials: divide by their sum along `dim`.": torch.exp(x),
        "it looks like log-softmax: softmax is exp(x - max) / sum(exp(x - max)).": torch.log_softmax(x, dim),
    }
    if x.dim() > 1:
        other_label = 0 if other == 0 else -1
        m[f"the weights sum to 1 along dim {other_label}, not along dim {dim}: softmax over the "
          "wrong axis? Use the `dim` argument."] = torch.softmax(x, dim=other)
    return m


def check_softmax(softmax) -> None:
    """Visible tests for exercise 1. ``softmax(x, dim=-1)`` -> tensor shaped like ``x``."""
    forbid_names(softmax, SOFTMAX_FORBIDDEN, "softmax",
                 "Build it from torch.exp, .max and .sum.")
    n = 0
    for device in devices():
        # 1. Shape, dtype, device, values on an ordinary input, with named mistakes.
        x = randn(3, 5, seed=1, device=device)
        out = call(softmax, x, what="softmax(x)")
        expect_tensor(out, "softmax(x)", shape=x.shape, dtype=x.dtype, device=device)
        expect_close(out, torch.softmax(x, -1), "softmax(x) for x of shape (3, 5)",
                     mistakes=_softmax_mistakes(x, -1))
        n += 1
        # 2. Every row sums to 1.
        sums = out.sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
            fail(f"Rows of softmax(x) should sum to 1 along dim -1, but they sum to {sums.tolist()}.")
        n += 1
        # 3. The `dim` argument, on a 3-d input.
        x3 = randn(2, 3, 4, seed=2, device=device)
        for dim in (0, 1, -1):
            got = call(softmax, x3, dim=dim, what=f"softmax(x, dim={dim})")
            expect_close(got, torch.softmax(x3, dim), f"softmax(x, dim={dim}) for x of shape (2, 3, 4)",
                         mistakes=_softmax_mistakes(x3, dim))
            n += 1
        # 4. Shift invariance and stability: +100 and logits of size 1e4.
        big = torch.tensor([[1e4, 0.0, -1e4], [1e4, 1e4 - 1.0, 0.0]], device=device)
        got = call(softmax, big, what="softmax(x) with logits of ±1e4")
        expect_tensor(got, "softmax(x) with logits of ±1e4", shape=big.shape)
        if not torch.isfinite(got).all():
            fail("softmax overflows for logits around 1e4 (you get inf or NaN): subtract the "
                 "maximum along `dim` before exp(); it changes nothing mathematically.")
        # float32 resolves 1e4 only to about 1e-3, so any correct formulation may differ by that.
        expect_close(got, torch.softmax(big, -1), "softmax(x) with logits of ±1e4", tol=(1e-2, 2e-3))
        shifted = call(softmax, x + 100.0, what="softmax(x + 100)")
        expect_close(shifted, torch.softmax(x, -1), "softmax(x + 100) (softmax is shift-invariant)")
        n += 2
        # 5. -inf means "no weight": exactly zero, and the other entries still sum to 1.
        masked = x.clone()
        masked[:, 1] = float("-inf")
        got = call(softmax, masked, what="softmax(x) with -inf entries")
        expect_tensor(got, "softmax(x) with -inf entries", shape=x.shape)
        if torch.isnan(got).any():
            fail("softmax gives NaN when some entries are -inf. Subtract the row maximum (a finite "
                 "number when a row has any finite entry) rather than, e.g., the mean.")
        if not (got[:, 1] == 0).all():
            fail(f"Entries that are -inf must get weight exactly 0, got {got[:, 1].tolist()}.")
        expect_close(got, torch.softmax(masked, -1), "softmax(x) with -inf entries")
        n += 1
        # 6. Float64 stays float64; gradients match PyTorch's.
        x64 = randn(4, 6, seed=3, dtype=torch.float64, device=device, requires_grad=True)
        out64 = call(softmax, x64, what="softmax(x) in float64")
        expect_tensor(out64, "softmax(x) for float64 x", dtype=torch.float64, device=device)
        upstream = randn(4, 6, seed=4, dtype=torch.float64, device=device)
        (g,) = grads(out64, [x64], upstream, "softmax(x)")
        ref_x = x64.detach().clone().requires_grad_()
        (want,) = torch.autograd.grad(torch.softmax(ref_x, -1), [ref_x], upstream)
        expect_close(g, want, "the gradient of softmax(x)")
        n += 2
    passed("softmax", n)


def _attention_inputs(shape_q, shape_k, d_v, seed, device, dtype=torch.float32):
    q = randn(*shape_q, seed=seed, device=device, dtype=dtype)
    k = randn(*shape_k, seed=seed + 1, device=device, dtype=dtype)
    v = randn(*shape_k[:-1], d_v, seed=seed + 2, device=device, dtype=dtype)
    return q, k, v


def _attention_mistakes(q, k, v) -> tuple[dict, dict]:
    d_k = q.shape[-1]
    logits = q @ k.transpose(-2, -1)
    right = torch.softmax(logits / math.sqrt(d_k), -1)
    wrong_w = {
        "no scaling: divide the logits QKᵀ by √d_k before the softmax.": torch.softmax(logits, -1),
        "scaled by d_k instead of √d_k.": torch.softmax(logits / d_k, -1),
        "the scaling is applied after the softmax; divide the logits, then take the softmax.":
            torch.softmax(logits, -1) / math.sqrt(d_k),
        "the weights sum to 1 over the queries (dim -2), not over the keys (dim -1): softmax over "
        "the wrong axis?": torch.softmax(logits / math.sqrt(d_k), -2),
        "multiplied by √d_k instead of dividing by it.": torch.softmax(logits * math.sqrt(d_k), -1),
    }
    wrong_out = {m: w @ v for m, w in wrong_w.items()}
    wrong_out["the output should be the weights times V (weights @ v), not times K."] = \
        right @ k if k.shape[-1] == v.shape[-1] else None
    wrong_out["the output is off by a factor of about √d_k: did you scale the output instead of "
              "the logits?"] = (right @ v) * math.sqrt(d_k)
    return wrong_w, wrong_out


def check_attention(scaled_dot_product_attention) -> None:
    """Visible tests for exercise 2. ``(q, k, v) -> (output, weights)``."""
    fn = scaled_dot_product_attention
    forbid_names(fn, ATTENTION_FORBIDDEN, "scaled_dot_product_attention",
                 "Compute QKᵀ/√d_k, a softmax and a matmul with V yourself.")
    n = 0
    cases = [((2, 3, 8), (2, 5, 8), 6, "batched, L_q=3 ≠ L_k=5, d_v=6 ≠ d_k=8"),
             ((4, 16), (4, 16), 16, "no batch dimension"),
             ((2, 3, 4, 8), (2, 3, 7, 8), 5, "two leading batch dimensions")]
    for device in devices():
        for i, (sq, sk, dv, label) in enumerate(cases):
            q, k, v = _attention_inputs(sq, sk, dv, 10 * i, device)
            result = call(fn, q, k, v, what=f"scaled_dot_product_attention(q, k, v) ({label})")
            if not isinstance(result, tuple) or len(result) != 2:
                fail("scaled_dot_product_attention should return a tuple (output, weights), but it "
                     f"returned {type(result).__name__}.")
            out, w = result
            what = f"({label})"
            if type(out) is torch.Tensor and dv != sq[-1] and out.shape[-1] == sk[-1]:
                fail(f"output ({label}) has the width of the keys (d_k={sk[-1]}), not of the values "
                     f"(d_v={dv}): the output is weights @ v, not weights @ k.")
            expect_tensor(w, f"weights {what}", shape=(*sq[:-1], sk[-2]), dtype=q.dtype, device=device)
            expect_tensor(out, f"output {what}", shape=(*sq[:-1], dv), dtype=q.dtype, device=device)
            wrong_w, wrong_out = _attention_mistakes(q, k, v)
            want_w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(sq[-1]), -1)
            expect_close(w, want_w, f"weights {what}", mistakes=wrong_w)
            expect_close(out, F.scaled_dot_product_attention(q, k, v), f"output {what}",
                         mistakes=wrong_out)
            n += 2
        # Gradients with respect to q, k and v, against PyTorch's fused attention.
        q, k, v = (t.double().requires_grad_() for t in _attention_inputs((2, 3, 8), (2, 5, 8), 4, 7, device))
        out, _ = call(fn, q, k, v, what="scaled_dot_product_attention(q, k, v) in float64")
        expect_tensor(out, "output for float64 inputs", dtype=torch.float64, device=device)
        upstream = randn(2, 3, 4, seed=99, dtype=torch.float64, device=device)
        got = grads(out, [q, k, v], upstream, "the attention output")
        q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
        want = torch.autograd.grad(F.scaled_dot_product_attention(q2, k2, v2), [q2, k2, v2], upstream)
        for name, g, w in zip("qkv", got, want):
            expect_close(g, w, f"the gradient of the attention output with respect to {name}")
            n += 1
    passed("scaled_dot_product_attention", n)


SELF_ATTENTION_PARAMS = ("q_proj.weight", "k_proj.weight", "v_proj.weight")


def check_self_attention(SelfAttention) -> None:
    """Visible tests for exercise 3. ``SelfAttention(d_model, d_head)``; ``forward(x)`` with
    ``x: (..., L, d_model)`` returns ``(output (..., L, d_head), weights (..., L, L))``."""
    forbid_names(SelfAttention, ATTENTION_FORBIDDEN, "SelfAttention",
                 "Build it on your own scaled_dot_product_attention.")
    d_model, d_head = 12, 8
    n = 0
    for device in devices():
        module = call(SelfAttention, d_model, d_head, what=f"SelfAttention({d_model}, {d_head})")
        expect_module(module, "SelfAttention", {name: (d_head, d_model) for name in SELF_ATTENTION_PARAMS},
                      layout="three nn.Linear(d_model, d_head, bias=False) named q_proj, k_proj, v_proj",
                      shape_hint="nn.Linear(d_model, d_head) stores its weight as (out, in)")
        n += 2
        weights = {name: randn(d_head, d_model, seed=20 + i, device=device, scale=0.3)
                   for i, name in enumerate(SELF_ATTENTION_PARAMS)}
        module = module.to(device)
        module.load_state_dict(weights)
        x = randn(2, 5, d_model, seed=30, device=device, requires_grad=True)
        result = call(module, x, what="SelfAttention.forward(x)")
        if not isinstance(result, tuple) or len(result) != 2:
            fail("SelfAttention.forward should return a tuple (output, weights).")
        out, w = result
        expect_tensor(out, "SelfAttention output", shape=(2, 5, d_head), dtype=x.dtype, device=device)
        expect_tensor(w, "SelfAttention weights", shape=(2, 5, 5), dtype=x.dtype, device=device)
        xr = x.detach().clone().requires_grad_()
        q, k, v = (xr @ weights[n_].T for n_ in SELF_ATTENTION_PARAMS)
        want = F.scaled_dot_product_attention(q, k, v)
        keys_from_q = F.scaled_dot_product_attention(q, xr @ weights["q_proj.weight"].T, v)
        swapped = F.scaled_dot_product_attention(k, q, v)
        expect_close(out, want, "SelfAttention output", mistakes={
            "keys seem to be computed with q_proj: use k_proj for keys.": keys_from_q,
            "q_proj and k_proj are swapped (queries come from q_proj, keys from k_proj).": swapped,
            "the output does not use v_proj: values are v_proj(x).":
                F.scaled_dot_product_attention(q, k, xr[..., :d_head]) if d_head <= d_model else None,
        })
        want_w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d_head), -1)
        expect_close(w, want_w, "SelfAttention weights", mistakes={
            "q_proj and k_proj are swapped (queries come from q_proj, keys from k_proj).":
                torch.softmax(k @ q.transpose(-2, -1) / math.sqrt(d_head), -1),
            "these are the raw scores: return the softmax weights.": q @ k.transpose(-2, -1) / math.sqrt(d_head),
        })
        n += 2
        upstream = randn(2, 5, d_head, seed=31, device=device)
        got = grads(out, [x, *(dict(module.named_parameters())[p] for p in SELF_ATTENTION_PARAMS)],
                    upstream, "SelfAttention output")
        ref_w = {p: weights[p].clone().requires_grad_() for p in SELF_ATTENTION_PARAMS}
        q, k, v = (xr @ ref_w[p].T for p in SELF_ATTENTION_PARAMS)
        want_g = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), [xr, *ref_w.values()], upstream)
        for name, g, w_ in zip(("x", *SELF_ATTENTION_PARAMS), got, want_g):
            expect_close(g, w_, f"the gradient of SelfAttention's output with respect to {name}")
            n += 1
    passed("SelfAttention", n)
