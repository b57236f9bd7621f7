"""Checks for chapter 1: softmax, scaled dot-product attention, a self-attention module.

Expected values come from PyTorch's own operations (public references), never from the course's
solution. Each public check runs a list of ``_check_<property>(fn, device)`` functions on the CPU
and, when present, on CUDA; each returns how many checks it made.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from . import forbidden
from .core import (CheckFailure, Mistake, call, expect_close, expect_module, expect_outputs, expect_tensor,
                   fail, is_close, on_devices, passed, randn, randn_qkv)
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
SHIFTED_UNNORMALISED = Mistake("shifted_exp_not_normalised", "these are exp(x - max) without the division: each "
                               "slice along `dim` must also be divided by its own sum, so that it sums to 1.")
GLOBAL_MAX = Mistake("global_max_subtracted", "rows whose logits are far below the largest logit of the whole "
                     "tensor come out as NaN: you subtract one maximum for the whole tensor, so exp() of those "
                     "rows underflows to 0 and 0 / 0 = NaN. Subtract each slice's own maximum along `dim`.")
MAX_NAMED_TUPLE = Mistake("max_returns_values_and_indices", "{what} raised {kind}: {error}. With a `dim`, "
                          "torch.max (x.max) returns a pair (values, indices), not a tensor: take its `.values`, "
                          "or use a reduction that returns only the values.")


def _softmax_mistakes(x: torch.Tensor, dim: int) -> dict[Mistake, torch.Tensor]:
    e = torch.exp(x - x.max())
    m = {SOFTMAX_OVER_ALL: e / e.sum(), UNNORMALISED: torch.exp(x), LOG_SOFTMAX: torch.log_softmax(x, dim),
         SHIFTED_UNNORMALISED: torch.exp(x - x.amax(dim, keepdim=True))}
    if x.dim() > 1:
        other = 0 if (dim % x.dim()) != 0 else x.dim() - 1
        m[SOFTMAX_WRONG_AXIS.format(other=0 if other == 0 else -1, dim=dim)] = torch.softmax(x, dim=other)
    return m


def _call_softmax(softmax, *args, what: str, **kwargs):
    """``call``, naming the classic error of ``x - x.max(dim, keepdim=True)`` (a (values, indices)
    pair, not a tensor) instead of reporting a bare TypeError."""
    __tracebackhide__ = True
    try:
        return call(softmax, *args, what=what, **kwargs)
    except CheckFailure as failure:
        text = str(failure)
        if failure.mistake == "raised" and re.search(r"return_types\.(max|min)\b", text):
            kind, _, error = text[len(what) + len(" raised "):].partition(": ")
            fail(MAX_NAMED_TUPLE, what=what, kind=kind, error=error)
        raise


def _check_values(softmax, device) -> int:
    """Shape, dtype, device and values on an ordinary input."""
    __tracebackhide__ = True
    x = randn(3, 5, seed=1, device=device)
    out = _call_softmax(softmax, x, what="softmax(x)")
    expect_tensor(out, "softmax(x)", shape=x.shape, dtype=x.dtype, device=device)
    expect_close(out, torch.softmax(x, -1), "softmax(x) for x of shape (3, 5)", mistakes=_softmax_mistakes(x, -1))
    return 1


def _check_rows_sum_to_one(softmax, device) -> int:
    __tracebackhide__ = True
    sums = _call_softmax(softmax, randn(3, 5, seed=1, device=device), what="softmax(x)").sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
        fail(ROWS_DO_NOT_SUM_TO_ONE, sums=sums.tolist())
    return 1


def _check_dim_argument(softmax, device) -> int:
    __tracebackhide__ = True
    x3 = randn(2, 3, 4, seed=2, device=device)
    for dim in (0, 1, -1):
        got = _call_softmax(softmax, x3, dim=dim, what=f"softmax(x, dim={dim})")
        expect_close(got, torch.softmax(x3, dim), f"softmax(x, dim={dim}) for x of shape (2, 3, 4)",
                     mistakes=_softmax_mistakes(x3, dim))
    return 3


def _check_stability(softmax, device) -> int:
    """Logits of size 1e4 do not overflow, and adding 100 changes nothing."""
    __tracebackhide__ = True
    big = torch.tensor([[1e4, 0.0, -1e4], [1e4, 1e4 - 1.0, 0.0]], device=device)
    got = _call_softmax(softmax, big, what="softmax(x) with logits of ±1e4")
    expect_tensor(got, "softmax(x) with logits of ±1e4", shape=big.shape)
    if not torch.isfinite(got).all():
        fail(OVERFLOW)
    # float32 resolves 1e4 only to about 1e-3, so any correct formulation may differ by that.
    expect_close(got, torch.softmax(big, -1), "softmax(x) with logits of ±1e4", tol=(1e-2, 2e-3))
    x = randn(3, 5, seed=1, device=device)
    shifted = call(softmax, x + 100.0, what="softmax(x + 100)")
    expect_close(shifted, torch.softmax(x, -1), "softmax(x + 100) (softmax is shift-invariant)")
    return 2


def _check_rows_of_different_scales(softmax, device) -> int:
    """Each slice is shifted by its own maximum: a row of logits near 1000 next to rows near 0
    and -500 changes nothing in those rows (one maximum for the whole tensor turns them into NaN)."""
    __tracebackhide__ = True
    x = torch.tensor([[1000.0, 999.0, 997.0, 998.5], [0.0, 1.0, 2.0, -1.0], [-500.0, -499.0, -501.0, -500.5]],
                     device=device)
    what = "softmax(x) for rows of logits near 1000, 0 and -500"
    n = 0
    for dim, x_dim in ((-1, x), (0, x.T.contiguous())):
        label = what if dim == -1 else what.replace("rows", "columns") + ", dim=0"
        got = _call_softmax(softmax, x_dim, dim=dim, what=label)
        expect_tensor(got, label, shape=x_dim.shape)
        want = torch.softmax(x_dim, dim)
        e = torch.exp(x_dim - x_dim.max())
        if not is_close(got, want) and is_close(got, e / e.sum(dim, keepdim=True)):
            fail(GLOBAL_MAX)
        expect_close(got, want, label, mistakes=_softmax_mistakes(x_dim, dim))
        n += 1
    return n


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
                                  _check_stability, _check_minus_inf, _check_rows_of_different_scales,
                                  _check_softmax_grads], softmax))


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
OUTPUTS_SWAPPED = Mistake("outputs_swapped", "{what} returns (weights, output): the first item has the shape "
                          "of the weights {w_shape} and the second the shape of the output {out_shape}. Return "
                          "(output, weights), in that order.")
K_TRANSPOSED_ALL_DIMS = Mistake("k_transposed_all_dims", "{what} fails on batched inputs the way `q @ k.T` "
                                "does ({kind}: {error}). `k.T` reverses *all* the dimensions of a batched k "
                                "(and `k.t()` accepts matrices only): swap only its last two dimensions, so "
                                "that (..., L_k, d_k) becomes (..., d_k, L_k).")

# float32: d_k = 8 here. The float64 checks (gradients, and the hidden tests) use d_k = 4^n, whose
# √d_k is exact in float32 too: `/ torch.sqrt(torch.tensor(d_k))`, a float32 constant in a float64
# computation, is then judged on its attention, not on a rounding error of 1e-8 in the constant.
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


def _transposed_all_dims(q, k, v) -> tuple[str | None, tuple | None]:
    """What code with `k.T` does on these inputs: (the error it raises, or None; the shape of its
    weights, or None). `.T` reverses every dimension of a batched tensor."""
    reversed_k = k.permute(*range(k.dim() - 1, -1, -1))   # k.T, without its deprecation warning
    try:
        return None, tuple((q @ reversed_k).shape)
    except RuntimeError as exc:
        return str(exc), None


def _call_attention(fn, q, k, v, *, what: str):
    """``call``, naming `k.T` on batched inputs (an error, or weights of the wrong shape)."""
    __tracebackhide__ = True
    if q.dim() <= 2:
        return call(fn, q, k, v, what=what)
    error, shape = _transposed_all_dims(q, k, v)
    try:
        result = call(fn, q, k, v, what=what)
    except CheckFailure as failure:
        text = str(failure)
        if failure.mistake == "raised" and ((error and error in text) or "t() expects a tensor with <= 2" in text
                                            or "`x.T`" in text):
            kind, _, message = text[len(what) + len(" raised "):].partition(": ")
            fail(K_TRANSPOSED_ALL_DIMS, what=what, kind=kind, error=message)
        raise
    if shape is not None and isinstance(result, tuple) and len(result) == 2 and type(result[1]) is torch.Tensor \
            and tuple(result[1].shape) == shape != (*q.shape[:-1], k.shape[-2]):
        fail(K_TRANSPOSED_ALL_DIMS, what=what, kind="weights of shape", error=str(shape))
    return result


def _expect_not_swapped(result, what: str, out_shape: tuple, w_shape: tuple) -> None:
    """(weights, output) instead of (output, weights), told apart by their shapes."""
    __tracebackhide__ = True
    if out_shape != w_shape and isinstance(result, tuple) and len(result) == 2 and \
            all(type(t) is torch.Tensor for t in result) and \
            (tuple(result[0].shape), tuple(result[1].shape)) == (w_shape, out_shape):
        fail(OUTPUTS_SWAPPED, what=what, w_shape=w_shape, out_shape=out_shape)


def _check_attention_values(fn, device) -> int:
    """Shapes, dtype, device and values of (output, weights), with and without batch dimensions."""
    __tracebackhide__ = True
    for i, (sq, sk, dv, label) in enumerate(_CASES):
        q, k, v = randn_qkv(sq, sk, dv, seed=10 * i, device=device)
        what = f"scaled_dot_product_attention(q, k, v) ({label})"
        result = _call_attention(fn, q, k, v, what=what)
        _expect_not_swapped(result, what, (*sq[:-1], dv), (*sq[:-1], sk[-2]))
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
    """Gradients with respect to q, k and v, against PyTorch's fused attention (float64; d_k = 16,
    see _CASES)."""
    __tracebackhide__ = True
    q, k, v = (t.double().requires_grad_() for t in randn_qkv((2, 3, 16), (2, 5, 16), 4, seed=7, device=device))
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
SCALED_BY_D_MODEL = Mistake("scaled_by_sqrt_d_model", "the scores are divided by √d_model; divide by √d_head, "
                            "the width of the queries and keys that are compared (here d_model={d_model}, "
                            "d_head={d_head}).")

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
    result = call(module, x, what="SelfAttention.forward(x)")
    _expect_not_swapped(result, "SelfAttention.forward(x)", (2, 5, D_HEAD), (2, 5, 5))
    out, w = expect_outputs(result, "SelfAttention.forward")
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
    by_d_model = SCALED_BY_D_MODEL.format(d_model=D_MODEL, d_head=D_HEAD)
    expect_close(out, F.scaled_dot_product_attention(q, k, v), "SelfAttention output", mistakes={
        KEYS_FROM_Q_PROJ: F.scaled_dot_product_attention(q, xr @ weights["q_proj.weight"].T, v),
        Q_K_SWAPPED: F.scaled_dot_product_attention(k, q, v),
        VALUES_NOT_PROJECTED: F.scaled_dot_product_attention(q, k, xr[..., :D_HEAD]) if D_HEAD <= D_MODEL else None,
        by_d_model: F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(D_MODEL)),
        NO_SCALING: F.scaled_dot_product_attention(q, k, v, scale=1.0),
    })
    logits = q @ k.transpose(-2, -1)
    scores = logits / math.sqrt(D_HEAD)
    expect_close(w, torch.softmax(scores, -1), "SelfAttention weights", mistakes={
        Q_K_SWAPPED: torch.softmax(k @ q.transpose(-2, -1) / math.sqrt(D_HEAD), -1),
        RAW_SCORES: scores,
        by_d_model: torch.softmax(logits / math.sqrt(D_MODEL), -1),
        NO_SCALING: torch.softmax(logits, -1),
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


# --------------------------------------------------------------------------------------------
# Demo cells (not a check): a demo run before its exercise is done says so
# --------------------------------------------------------------------------------------------

EXERCISES = {1: "softmax", 2: "scaled_dot_product_attention", 3: "SelfAttention"}


class ExerciseNotDone(RuntimeError):
    """A demo cell ran before the exercise whose code it uses was done."""


class needs_exercise:
    """``with needs_exercise(2):`` around a demo that uses the student's code: while that code
    (or an earlier exercise's it builds on) still raises NotImplementedError, the demo stops with
    "finish Exercise 2 first" instead of an error from the middle of the demo."""

    def __init__(self, number: int):
        self.number = number

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        __tracebackhide__ = True
        if kind is not None and issubclass(kind, NotImplementedError):
            earlier = {1: "", 2: " (and Exercise 1, which it builds on)",
                       3: " (and Exercises 1 and 2, which it builds on)"}[self.number]
            raise ExerciseNotDone(
                f"This demo uses your `{EXERCISES[self.number]}`, which still raises NotImplementedError: "
                f"finish Exercise {self.number}{earlier}, run its test cell, then run this cell again.") from None
        return False
