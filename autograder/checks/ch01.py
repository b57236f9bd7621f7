"""Checks for chapter 1: softmax, scaled dot-product attention, a self-attention module.

Expected values come from PyTorch's own operations (public references), never from the course's
solution. Each public check runs a list of ``_check_<property>(fn, device)`` functions on the CPU
and, when present, on CUDA; each returns how many checks it made.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import forbidden
from .core import (Mistake, call, expect_close, expect_module, expect_outputs, expect_tensor, fail,
                   on_devices, passed, randn, randn_qkv)
from .gradients import expect_grads_close
from .scan import forbid_names

# --------------------------------------------------------------------------------------------
# Exercise 1: softmax(x, dim=-1)
# --------------------------------------------------------------------------------------------

SOFTMAX_OVER_ALL = Mistake("softmax_over_all_elements", "it sums to 1 over all elements instead of along "
                           "`dim`: divide by the sum along `dim` with keepdim=True.")
UNNORMALISED = Mistake("unnormalised", "these are unnormalised exponentials: divide by their sum along `dim`.")
LOG_SOFTMAX = Mistake("log_softmax", "it looks like log-softmax: softmax is exp(x - max) / sum(exp(x - max)).")
SOFTMAX_WRONG_AXIS = Mistake("softmax_wrong_axis", "the weights sum to 1 along dim {other}, not along dim "
                             "{dim}: softmax over the wrong axis? Use the `dim` argument.")
ROWS_DO_NOT_SUM_TO_ONE = Mistake("rows_do_not_sum_to_one", "Rows of softmax(x) should sum to 1 along dim -1, "
                                 "but they sum to {sums}.")
OVERFLOW = Mistake("overflow", "softmax overflows for logits around 1e4 (you get inf or NaN): subtract the "
                   "maximum along `dim` before exp(); it changes nothing mathematically.")
NAN_WITH_MINUS_INF = Mistake("nan_with_minus_inf", "softmax gives NaN when some entries are -inf. Subtract the "
                             "row maximum (a finite number when a row has any finite entry) rather than, "
                             "e.g., the mean.")
MINUS_INF_WEIGHT = Mistake("minus_inf_weight_not_zero", "Entries that are -inf must get weight exactly 0, "
                           "got {got}.")


def _softmax_mistakes(x: torch.Tensor, dim: int) -> dict[Mistake, torch.Tensor]:
    e = torch.exp(x - x.max())
    m = {SOFTMAX_OVER_ALL: e / e.sum(), UNNORMALISED: torch.exp(x), LOG_SOFTMAX: torch.log_softmax(x, dim)}
    if x.dim() > 1:
        other = 0 if (dim % x.dim()) != 0 else x.dim() - 1
        m[SOFTMAX_WRONG_AXIS.format(other=0 if other == 0 else -1, dim=dim)] = torch.softmax(x, dim=other)
    return m


def _check_values(softmax, device) -> int:
    """Shape, dtype, device and values on an ordinary input."""
    __tracebackhide__ = True
    x = randn(3, 5, seed=1, device=device)
    out = call(softmax, x, what="softmax(x)")
    expect_tensor(out, "softmax(x)", shape=x.shape, dtype=x.dtype, device=device)
    expect_close(out, torch.softmax(x, -1), "softmax(x) for x of shape (3, 5)", mistakes=_softmax_mistakes(x, -1))
    return 1


def _check_rows_sum_to_one(softmax, device) -> int:
    __tracebackhide__ = True
    sums = call(softmax, randn(3, 5, seed=1, device=device), what="softmax(x)").sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
        fail(ROWS_DO_NOT_SUM_TO_ONE, sums=sums.tolist())
    return 1


def _check_dim_argument(softmax, device) -> int:
    __tracebackhide__ = True
    x3 = randn(2, 3, 4, seed=2, device=device)
    for dim in (0, 1, -1):
        got = call(softmax, x3, dim=dim, what=f"softmax(x, dim={dim})")
        expect_close(got, torch.softmax(x3, dim), f"softmax(x, dim={dim}) for x of shape (2, 3, 4)",
                     mistakes=_softmax_mistakes(x3, dim))
    return 3


def _check_stability(softmax, device) -> int:
    """Logits of size 1e4 do not overflow, and adding 100 changes nothing."""
    __tracebackhide__ = True
    big = torch.tensor([[1e4, 0.0, -1e4], [1e4, 1e4 - 1.0, 0.0]], device=device)
    got = call(softmax, big, what="softmax(x) with logits of ±1e4")
    expect_tensor(got, "softmax(x) with logits of ±1e4", shape=big.shape)
    if not torch.isfinite(got).all():
        fail(OVERFLOW)
    # float32 resolves 1e4 only to about 1e-3, so any correct formulation may differ by that.
    expect_close(got, torch.softmax(big, -1), "softmax(x) with logits of ±1e4", tol=(1e-2, 2e-3))
    x = randn(3, 5, seed=1, device=device)
    shifted = call(softmax, x + 100.0, what="softmax(x + 100)")
    expect_close(shifted, torch.softmax(x, -1), "softmax(x + 100) (softmax is shift-invariant)")
    return 2


def _check_minus_inf(softmax, device) -> int:
    """-inf means "no weight": exactly zero, and the other entries still sum to 1."""
    __tracebackhide__ = True
    masked = randn(3, 5, seed=1, device=device)
    masked[:, 1] = float("-inf")
    got = call(softmax, masked, what="softmax(x) with -inf entries")
    expect_tensor(got, "softmax(x) with -inf entries", shape=masked.shape)
    if torch.isnan(got).any():
        fail(NAN_WITH_MINUS_INF)
    if not (got[:, 1] == 0).all():
        fail(MINUS_INF_WEIGHT, got=got[:, 1].tolist())
    expect_close(got, torch.softmax(masked, -1), "softmax(x) with -inf entries")
    return 1


def _check_softmax_grads(softmax, device) -> int:
    """Float64 stays float64; gradients match PyTorch's."""
    __tracebackhide__ = True
    x64 = randn(4, 6, seed=3, dtype=torch.float64, device=device, requires_grad=True)
    out64 = call(softmax, x64, what="softmax(x) in float64")
    expect_tensor(out64, "softmax(x) for float64 x", dtype=torch.float64, device=device)
    ref_x = x64.detach().clone().requires_grad_()
    return 1 + expect_grads_close(out64, torch.softmax(ref_x, -1), {"x": x64}, {"x": ref_x}, "softmax(x)",
                                  upstream=randn(4, 6, seed=4, dtype=torch.float64, device=device))


def check_softmax(softmax) -> None:
    """Visible tests for exercise 1. ``softmax(x, dim=-1)`` -> tensor shaped like ``x``."""
    __tracebackhide__ = True
    forbid_names(softmax, forbidden.SOFTMAX, "softmax", "Build it from torch.exp, .max and .sum.")
    passed("softmax", on_devices([_check_values, _check_rows_sum_to_one, _check_dim_argument,
                                  _check_stability, _check_minus_inf, _check_softmax_grads], softmax))


# --------------------------------------------------------------------------------------------
# Exercise 2: scaled_dot_product_attention(q, k, v) -> (output, weights)
# --------------------------------------------------------------------------------------------

NO_SCALING = Mistake("no_scaling", "no scaling: divide the logits QKᵀ by √d_k before the softmax.")
SCALED_BY_D_K = Mistake("scaled_by_d_k", "scaled by d_k instead of √d_k.")
SCALED_AFTER_SOFTMAX = Mistake("scaled_after_softmax", "the scaling is applied after the softmax; divide the "
                               "logits, then take the softmax.")
SOFTMAX_OVER_QUERIES = Mistake("softmax_over_queries", "the weights sum to 1 over the queries (dim -2), not "
                               "over the keys (dim -1): softmax over the wrong axis?")
MULTIPLIED_BY_SQRT = Mistake("multiplied_by_sqrt_d_k", "multiplied by √d_k instead of dividing by it.")
OUTPUT_TIMES_K = Mistake("output_times_k", "the output should be the weights times V (weights @ v), not times K.")
OUTPUT_SCALED = Mistake("output_scaled", "the output is off by a factor of about √d_k: did you scale the "
                        "output instead of the logits?")
OUTPUT_WIDTH_OF_KEYS = Mistake("output_width_of_keys", "output ({label}) has the width of the keys (d_k={d_k}), "
                               "not of the values (d_v={d_v}): the output is weights @ v, not weights @ k.")

_CASES = [((2, 3, 8), (2, 5, 8), 6, "batched, L_q=3 ≠ L_k=5, d_v=6 ≠ d_k=8"),
          ((4, 16), (4, 16), 16, "no batch dimension"),
          ((2, 3, 4, 8), (2, 3, 7, 8), 5, "two leading batch dimensions")]


def _attention_mistakes(q, k, v) -> tuple[dict, dict]:
    d_k = q.shape[-1]
    logits = q @ k.transpose(-2, -1)
    right = torch.softmax(logits / math.sqrt(d_k), -1)
    wrong_w = {
        NO_SCALING: torch.softmax(logits, -1),
        SCALED_BY_D_K: torch.softmax(logits / d_k, -1),
        SCALED_AFTER_SOFTMAX: torch.softmax(logits, -1) / math.sqrt(d_k),
        SOFTMAX_OVER_QUERIES: torch.softmax(logits / math.sqrt(d_k), -2),
        MULTIPLIED_BY_SQRT: torch.softmax(logits * math.sqrt(d_k), -1),
    }
    wrong_out = {m: w @ v for m, w in wrong_w.items()}
    wrong_out[OUTPUT_TIMES_K] = right @ k if k.shape[-1] == v.shape[-1] else None
    wrong_out[OUTPUT_SCALED] = (right @ v) * math.sqrt(d_k)
    return wrong_w, wrong_out


def _check_attention_values(fn, device) -> int:
    """Shapes, dtype, device and values of (output, weights), with and without batch dimensions."""
    __tracebackhide__ = True
    for i, (sq, sk, dv, label) in enumerate(_CASES):
        q, k, v = randn_qkv(sq, sk, dv, seed=10 * i, device=device)
        result = call(fn, q, k, v, what=f"scaled_dot_product_attention(q, k, v) ({label})")
        out, w = expect_outputs(result, "scaled_dot_product_attention")
        if type(out) is torch.Tensor and dv != sq[-1] and out.shape[-1] == sk[-1]:
            fail(OUTPUT_WIDTH_OF_KEYS, label=label, d_k=sk[-1], d_v=dv)
        expect_tensor(w, f"weights ({label})", shape=(*sq[:-1], sk[-2]), dtype=q.dtype, device=device)
        expect_tensor(out, f"output ({label})", shape=(*sq[:-1], dv), dtype=q.dtype, device=device)
        wrong_w, wrong_out = _attention_mistakes(q, k, v)
        want_w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(sq[-1]), -1)
        expect_close(w, want_w, f"weights ({label})", mistakes=wrong_w)
        expect_close(out, F.scaled_dot_product_attention(q, k, v), f"output ({label})", mistakes=wrong_out)
    return 2 * len(_CASES)


def _check_attention_grads(fn, device) -> int:
    """Gradients with respect to q, k and v, against PyTorch's fused attention (float64)."""
    __tracebackhide__ = True
    q, k, v = (t.double().requires_grad_() for t in randn_qkv((2, 3, 8), (2, 5, 8), 4, seed=7, device=device))
    out, _ = call(fn, q, k, v, what="scaled_dot_product_attention(q, k, v) in float64")
    expect_tensor(out, "output for float64 inputs", dtype=torch.float64, device=device)
    ref = {name: t.detach().clone().requires_grad_() for name, t in zip("qkv", (q, k, v))}
    return expect_grads_close(out, F.scaled_dot_product_attention(*ref.values()), dict(zip("qkv", (q, k, v))),
                              ref, "the attention output", upstream=randn(2, 3, 4, seed=99, dtype=torch.float64,
                                                                          device=device))


def check_attention(scaled_dot_product_attention) -> None:
    """Visible tests for exercise 2. ``(q, k, v) -> (output, weights)``."""
    __tracebackhide__ = True
    fn = scaled_dot_product_attention
    forbid_names(fn, forbidden.ATTENTION, "scaled_dot_product_attention",
                 "Compute QKᵀ/√d_k, a softmax and a matmul with V yourself.")
    passed("scaled_dot_product_attention", on_devices([_check_attention_values, _check_attention_grads], fn))


# --------------------------------------------------------------------------------------------
# Exercise 3: SelfAttention(d_model, d_head); forward(x) -> (output, weights)
# --------------------------------------------------------------------------------------------

KEYS_FROM_Q_PROJ = Mistake("keys_from_q_proj", "keys seem to be computed with q_proj: use k_proj for keys.")
Q_K_SWAPPED = Mistake("q_k_swapped", "q_proj and k_proj are swapped (queries come from q_proj, keys from k_proj).")
VALUES_NOT_PROJECTED = Mistake("values_not_projected", "the output does not use v_proj: values are v_proj(x).")
RAW_SCORES = Mistake("raw_scores_as_weights", "these are the raw scores: return the softmax weights.")

SELF_ATTENTION_PARAMS = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
D_MODEL, D_HEAD = 12, 8


def _weights(device, requires_grad=False) -> dict[str, torch.Tensor]:
    return {name: randn(D_HEAD, D_MODEL, seed=20 + i, device=device, scale=0.3, requires_grad=requires_grad)
            for i, name in enumerate(SELF_ATTENTION_PARAMS)}


def _self_attention(SelfAttention, device):
    """The student's module on ``device`` with known weights, and its (output, weights) on an x."""
    __tracebackhide__ = True
    module = call(SelfAttention, D_MODEL, D_HEAD, what=f"SelfAttention({D_MODEL}, {D_HEAD})").to(device)
    module.load_state_dict(_weights(device))
    x = randn(2, 5, D_MODEL, seed=30, device=device, requires_grad=True)
    out, w = expect_outputs(call(module, x, what="SelfAttention.forward(x)"), "SelfAttention.forward")
    expect_tensor(out, "SelfAttention output", shape=(2, 5, D_HEAD), dtype=x.dtype, device=device)
    expect_tensor(w, "SelfAttention weights", shape=(2, 5, 5), dtype=x.dtype, device=device)
    return module, x, out, w


def _check_parameters(SelfAttention, device) -> int:
    __tracebackhide__ = True
    module = call(SelfAttention, D_MODEL, D_HEAD, what=f"SelfAttention({D_MODEL}, {D_HEAD})")
    expect_module(module, "SelfAttention", {name: (D_HEAD, D_MODEL) for name in SELF_ATTENTION_PARAMS},
                  layout="three nn.Linear(d_model, d_head, bias=False) named q_proj, k_proj, v_proj",
                  shape_hint="nn.Linear(d_model, d_head) stores its weight as (out, in)")
    return 2


def _check_self_attention_values(SelfAttention, device) -> int:
    __tracebackhide__ = True
    _, x, out, w = _self_attention(SelfAttention, device)
    weights, xr = _weights(device), x.detach()
    q, k, v = (xr @ weights[name].T for name in SELF_ATTENTION_PARAMS)
    expect_close(out, F.scaled_dot_product_attention(q, k, v), "SelfAttention output", mistakes={
        KEYS_FROM_Q_PROJ: F.scaled_dot_product_attention(q, xr @ weights["q_proj.weight"].T, v),
        Q_K_SWAPPED: F.scaled_dot_product_attention(k, q, v),
        VALUES_NOT_PROJECTED: F.scaled_dot_product_attention(q, k, xr[..., :D_HEAD]) if D_HEAD <= D_MODEL else None,
    })
    scores = q @ k.transpose(-2, -1) / math.sqrt(D_HEAD)
    expect_close(w, torch.softmax(scores, -1), "SelfAttention weights", mistakes={
        Q_K_SWAPPED: torch.softmax(k @ q.transpose(-2, -1) / math.sqrt(D_HEAD), -1),
        RAW_SCORES: scores,
    })
    return 2


def _check_self_attention_grads(SelfAttention, device) -> int:
    """Gradients with respect to x and the three weights."""
    __tracebackhide__ = True
    module, x, out, _ = _self_attention(SelfAttention, device)
    params = dict(module.named_parameters())
    ref = {"x": x.detach().clone().requires_grad_(), **_weights(device, requires_grad=True)}
    q, k, v = (ref["x"] @ ref[name].T for name in SELF_ATTENTION_PARAMS)
    return expect_grads_close(out, F.scaled_dot_product_attention(q, k, v),
                              {"x": x, **{name: params[name] for name in SELF_ATTENTION_PARAMS}}, ref,
                              "SelfAttention's output", upstream=randn(2, 5, D_HEAD, seed=31, device=device))


def check_self_attention(SelfAttention) -> None:
    """Visible tests for exercise 3. ``SelfAttention(d_model, d_head)``; ``forward(x)`` with
    ``x: (..., L, d_model)`` returns ``(output (..., L, d_head), weights (..., L, L))``."""
    __tracebackhide__ = True
    forbid_names(SelfAttention, forbidden.ATTENTION, "SelfAttention",
                 "Build it on your own scaled_dot_product_attention.")
    passed("SelfAttention", on_devices([_check_parameters, _check_self_attention_values,
                                        _check_self_attention_grads], SelfAttention))
