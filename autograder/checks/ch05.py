"""Checks for chapter 5: layer normalisation, the feed-forward network, the encoder layer, the stack.

Expected values come from PyTorch's own operations, never from the course's solution:
``F.layer_norm``, ``F.linear``/``torch.relu``, and ``nn.TransformerEncoderLayer`` /
``nn.TransformerEncoder`` (``batch_first=True``, ReLU) run with the student's weights through
``torch.func.functional_call``. The student's separate ``q_proj``/``k_proj``/``v_proj`` are
stacked into PyTorch's packed ``in_proj_weight`` here (:func:`.mha.packed`), and the course's
padding mask (True = a real token, may be attended) becomes PyTorch's ``src_key_padding_mask``
(True = ignore this key) by negation. The mistakes are plain-torch variants of the same
computation (:func:`layer_variant`, :func:`encoder_variant`).

Dropout is checked by its properties only (a student's module runs in the sandbox with its own
random stream): eval mode is deterministic and equals the reference, train mode changes the
output, the same seed gives the same output, ``dropout=0`` in train mode is eval, the mean over
many masks is the eval output (inverted dropout), and the gradient is the derivative of the
function the forward computed.
"""
from __future__ import annotations

import contextlib
import io
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from . import forbidden
from .layers import compare_by_role
from .core import (CheckFailure, Mistake, call, expect_close, expect_module, expect_tensor, fail,
                   on_devices, passed, randn)
from .gradients import expect_grads_close, grads
from .masks import padding
from .mha import MHA_PARAMS, mha_loop, mha_variant, packed
from .scan import forbid_names

_NORMS = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")
_FF_KEYS = ("ff.w1", "ff.b1", "ff.w2", "ff.b2")


def _seeded(seed: int, fn, *args, what: str):
    """Call student code right after ``torch.manual_seed(seed)`` (same seed, same dropout masks)."""
    __tracebackhide__ = True
    torch.manual_seed(seed)
    return call(fn, *args, what=what)


def _load(module, values: dict, what: str) -> None:
    """Load ``values`` (name -> tensor, a subset of the parameters) into the student's module."""
    __tracebackhide__ = True
    state = module.state_dict()
    state.update(values)
    try:
        module.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - the student's module is student code
        fail(f"Could not load weights into your {what}: {exc}. Keep the parameter names the exercise gives.",
             mistake="weights_not_loaded")


def _random_value(name: str, shape, seed: int, device, dtype) -> torch.Tensor:
    """Weights of the usual scale (1/√fan_in), norm gains near 1, small biases."""
    if len(shape) == 2:
        return randn(*shape, seed=seed, device=device, dtype=dtype, scale=1 / math.sqrt(shape[1]))
    if "norm" in name and name.endswith("weight"):
        return 1 + randn(*shape, seed=seed, device=device, dtype=dtype, scale=0.3)
    return randn(*shape, seed=seed, device=device, dtype=dtype, scale=0.2)


def _build(cls, args: tuple, kwargs: dict, what: str):
    """The student's module ``cls(*args, **kwargs)``; it must be an nn.Module."""
    __tracebackhide__ = True
    module = call(cls, *args, what=what, **kwargs)
    if not isinstance(module, torch.nn.Module):
        fail(f"{what} should create a torch.nn.Module.", mistake="not_a_module")
    return module


def _randomised(module, device, dtype, seed: int, what: str):
    """``module`` on ``device``/``dtype`` in eval mode, every parameter replaced by a random value;
    returns (module, student name -> the values)."""
    __tracebackhide__ = True
    module = module.to(device=device, dtype=dtype).eval()
    shapes = {n: tuple(t.shape) for n, t in module.named_parameters()}
    p = {n: _random_value(n, s, seed + i, device, dtype) for i, (n, s) in enumerate(sorted(shapes.items()))}
    _load(module, p, what)
    return module, p


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _dropout_scale_probe(module, d_model: int, seed: int, device, what: str) -> tuple[torch.Tensor, ...]:
    """(mean over 2048 train-mode calls on one input, its standard error, eval output)."""
    x = randn(1, 1, d_model, seed=seed, device=device).expand(2048, 1, d_model).contiguous()
    module.eval()
    want = call(module, x[:1], what=f"{what} in eval mode")
    module.train()
    got = _seeded(seed, module, x, what=f"{what} in train mode")
    module.eval()
    got = expect_tensor(got, f"{what} in train mode", shape=x.shape, device=device).detach()
    want = expect_tensor(want, f"{what} in eval mode", shape=x[:1].shape, device=device).detach()
    return got.mean(0, keepdim=True), got.std(0, keepdim=True) / math.sqrt(x.shape[0]), want


# --------------------------------------------------------------------------------------------
# Exercise 1: LayerNorm
# --------------------------------------------------------------------------------------------

LN_EPS_OUTSIDE = Mistake("eps_outside_sqrt", "ε is added outside the square root, (x - mean) / (√var + ε); it "
                         "belongs inside, (x - mean) / √(var + ε), as in nn.LayerNorm (the two differ most "
                         "where the variance is small).")
LN_UNBIASED = Mistake("unbiased_variance", "the variance is the unbiased one (divided by d - 1, the default of "
                      "torch.var and torch.std); layer normalisation uses the biased variance, the plain mean of "
                      "(x - mean)² over the d features: torch.var(..., unbiased=False) or correction=0.")
LN_STD_EPS_OUTSIDE = Mistake("unbiased_std_eps_outside", "this is (x - mean) / (x.std() + ε): the unbiased standard "
                             "deviation (torch.std divides by d - 1) with ε outside the square root, as a well-known "
                             "annotated implementation writes it. nn.LayerNorm computes (x - mean) / √(var + ε) with "
                             "the biased variance (divide by d).")
LN_EPS_MISSING = Mistake("eps_missing", "ε is missing: (x - mean) / √var is NaN for a row whose features are all "
                         "equal (its variance is 0, and 0 / 0 is NaN) and blows up where the variance is tiny. "
                         "Divide by √(var + ε).")
LN_EPS_IGNORED = Mistake("eps_argument_ignored", "the eps argument is ignored: LayerNorm(d_model, eps=0.5) computed "
                         "with ε = 1e-5. Store eps in __init__ and use it in forward.")
LN_WRONG_DIM = Mistake("normalised_over_wrong_dim", "the statistics are taken over {dims} instead of over the last "
                       "dimension alone: each position's d_model features get their own mean and variance "
                       "(mean(dim=-1, keepdim=True)), independent of the other positions and sequences.")
LN_SWAPPED = Mistake("weight_and_bias_swapped", "weight and bias are swapped: the normalised x is multiplied by "
                     "weight (the gain γ) and then bias (β) is added.")
LN_NO_AFFINE = Mistake("weight_and_bias_unused", "the learned weight and bias are not applied: return "
                       "weight * x̂ + bias, where x̂ is the normalised x.")
LN_INIT = Mistake("layer_norm_init", "{name} starts as {got}; a new LayerNorm must be a pure normalisation: weight "
                  "(the gain) all ones and bias all zeros, as nn.LayerNorm starts.")

_LN_D = 4


def _ln_variant(x, w, b, eps, *, var="biased", eps_at="inside", dims=(-1,), affine="right"):
    """Layer normalisation with one deliberate mistake (or none)."""
    mean = x.mean(dim=dims, keepdim=True)
    n = math.prod(x.shape[d] for d in dims)
    if n < 2 and var == "unbiased":
        return None
    v = ((x - mean) ** 2).sum(dim=dims, keepdim=True) / (n - 1 if var == "unbiased" else n)
    denom = {"inside": torch.sqrt(v + eps), "outside": torch.sqrt(v) + eps, "none": torch.sqrt(v)}[eps_at]
    xhat = (x - mean) / denom
    return {"right": xhat * w + b, "swapped": xhat * b + w, "none": xhat}[affine]


def _ln_inputs(shape, seed, device, dtype=torch.float32) -> torch.Tensor:
    """Rows of very different scales (1e-3 to 10) and offsets: where ε's place and the variance matter
    (offsets in units of the row's scale, so float32 cancellation stays far below the tolerance)."""
    x = randn(*shape, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    rows = shape[:-1]
    scale = torch.tensor([1e-3, 3e-3, 1.0, 10.0], dtype=torch.float64)[torch.randint(0, 4, rows, generator=g)]
    offset = torch.randn(rows, generator=g, dtype=torch.float64) * 3        # in units of the row's scale
    return ((x + offset[..., None]) * scale[..., None]).to(device=device, dtype=dtype)


def _ln_module(LayerNorm, d, device, dtype, seed, eps=None):
    """The student's LayerNorm(d) (or LayerNorm(d, eps=eps)) holding random weight and bias."""
    __tracebackhide__ = True
    what = f"LayerNorm({d})" if eps is None else f"LayerNorm({d}, eps={eps})"
    module = call(LayerNorm, d, what=what) if eps is None else call(LayerNorm, d, eps=eps, what=what)
    expect_module(module, what, {"weight": (d,), "bias": (d,)}, layout="a gain `weight` and a bias `bias`, "
                  "both nn.Parameter of shape (d_model,)", shape_hint="one gain and one bias per feature")
    module = module.to(device=device, dtype=dtype)
    w = _random_value("norm.weight", (d,), seed, device, dtype)
    b = _random_value("norm.bias", (d,), seed + 1, device, dtype)
    _load(module, {"weight": w, "bias": b}, what)
    return module, w, b


def _ln_mistakes(x, w, b, eps) -> dict:
    wrong = {LN_UNBIASED: _ln_variant(x, w, b, eps, var="unbiased"),
             LN_STD_EPS_OUTSIDE: _ln_variant(x, w, b, eps, var="unbiased", eps_at="outside"),
             LN_EPS_OUTSIDE: _ln_variant(x, w, b, eps, eps_at="outside"),
             LN_EPS_MISSING: _ln_variant(x, w, b, eps, eps_at="none"),
             LN_SWAPPED: _ln_variant(x, w, b, eps, affine="swapped"),
             LN_NO_AFFINE: _ln_variant(x, w, b, eps, affine="none")}
    if eps != 1e-5:
        wrong[LN_EPS_IGNORED] = _ln_variant(x, w, b, 1e-5)
    last = x.dim() - 1
    wrong_dims = [((last - 1,), "the positions (dim -2)"), ((0,), "the batch (dim 0)"),
                  (tuple(range(1, last + 1)), "each whole sequence (every dimension but the batch)"),
                  (tuple(range(last + 1)), "the whole tensor")]
    for dims, label in wrong_dims:
        if last > 0 and dims != (last,) and LN_WRONG_DIM.format(dims=label) not in wrong:
            wrong[LN_WRONG_DIM.format(dims=label)] = _ln_variant(x, w, b, eps, dims=dims)
    return wrong


def _check_ln_init(LayerNorm, device) -> int:
    __tracebackhide__ = True
    module = call(LayerNorm, 6, what="LayerNorm(6)")
    expect_module(module, "LayerNorm(6)", {"weight": (6,), "bias": (6,)}, layout="a gain `weight` and a bias "
                  "`bias`, both nn.Parameter of shape (d_model,)", shape_hint="one gain and one bias per feature")
    params = dict(module.named_parameters())
    for name, want in (("weight", 1.0), ("bias", 0.0)):
        got = params[name].detach()
        if not torch.equal(got.cpu(), torch.full((6,), want, dtype=got.dtype)):
            fail(LN_INIT, name=name, got=[round(v, 3) for v in got.cpu().tolist()])
    return 2


def _check_ln_values(LayerNorm, device) -> int:
    """Against F.layer_norm over the last dimension: rows of every scale, 2-d to 4-d inputs, eps given."""
    __tracebackhide__ = True
    n = 0
    for i, (shape, eps) in enumerate([((2, 5, _LN_D), None), ((3, 8), None), ((2, 3, 2, 6), None),
                                      ((2, 4, _LN_D), 0.5)]):
        d = shape[-1]
        module, w, b = _ln_module(LayerNorm, d, device, torch.float32, seed=10 * i, eps=eps)
        x = _ln_inputs(shape, seed=10 * i + 5, device=device)
        what = f"LayerNorm({d}{'' if eps is None else f', eps={eps}'}) on {device}, x of shape {shape}"
        got = call(module, x, what=what)
        expect_tensor(got, what, shape=shape, dtype=x.dtype, device=device)
        e = 1e-5 if eps is None else eps
        expect_close(got, F.layer_norm(x, (d,), w, b, e), f"{what} (compared with F.layer_norm)",
                     mistakes=_ln_mistakes(x, w, b, e))
        n += 1
    return n


def _check_ln_constant_rows(LayerNorm, device) -> int:
    """A row whose features are all equal has variance 0: the result is the bias, never NaN."""
    __tracebackhide__ = True
    module, w, b = _ln_module(LayerNorm, 5, device, torch.float32, seed=50)
    x = randn(2, 3, 5, seed=51, device=device)
    x[1, 2] = 2.0
    x[0, 0] = 0.0
    what = f"LayerNorm(5) on {device} for x with constant rows (x[1, 2] all 2.0, x[0, 0] all 0.0)"
    got = expect_tensor(call(module, x, what=what), what, shape=x.shape, device=device)
    if not bool(torch.isfinite(got).all()):
        fail(LN_EPS_MISSING)
    expect_close(got, F.layer_norm(x, (5,), w, b, 1e-5), f"{what} (a constant row gives the bias)")
    return 2


def _check_ln_grads(LayerNorm, device) -> int:
    """float64: gradients with respect to x, weight and bias against autograd through F.layer_norm."""
    __tracebackhide__ = True
    module, w, b = _ln_module(LayerNorm, 6, device, torch.float64, seed=60)
    x = _ln_inputs((2, 3, 6), seed=61, device=device, dtype=torch.float64).requires_grad_()
    what = f"LayerNorm(6) on {device}, float64"
    got = call(module, x, what=what)
    expect_tensor(got, what, shape=x.shape, dtype=torch.float64, device=device)
    ref = {"x": _leaf(x), "weight": _leaf(w), "bias": _leaf(b)}
    want = F.layer_norm(ref["x"], (6,), ref["weight"], ref["bias"], 1e-5)
    expect_close(got, want, what, mistakes=_ln_mistakes(x.detach(), w, b, 1e-5))
    params = dict(module.named_parameters())
    wrong = {m: out for m, out in _ln_mistakes(ref["x"], ref["weight"], ref["bias"], 1e-5).items()}
    return 1 + expect_grads_close(got, want, {"x": x, "weight": params["weight"], "bias": params["bias"]}, ref,
                                  f"the output of {what}", seed=62, mistakes=wrong)


def check_layer_norm(LayerNorm) -> None:
    """Visible tests for exercise 1. ``LayerNorm(d_model, eps=1e-5)`` with parameters ``weight``
    (ones) and ``bias`` (zeros); ``forward(x)``: (..., d_model) -> (..., d_model)."""
    __tracebackhide__ = True
    forbid_names(LayerNorm, forbidden.LAYER_NORM, "LayerNorm",
                 "Compute the mean and the (biased) variance over the last dimension yourself; torch.mean, "
                 "torch.var, torch.var_mean, torch.sqrt and torch.rsqrt are all fine.")
    passed("LayerNorm", on_devices([_check_ln_init, _check_ln_values, _check_ln_constant_rows, _check_ln_grads],
                                   LayerNorm))


# --------------------------------------------------------------------------------------------
# Exercise 2: FeedForward
# --------------------------------------------------------------------------------------------

FF_NO_RELU = Mistake("relu_missing", "there is no ReLU between the two linear layers, so the network is one "
                     "linear map: apply ReLU to the hidden layer (the d_ff features).")
FF_RELU_PLACE = Mistake("relu_in_wrong_place", "the ReLU is in the wrong place ({where}): it goes between the two "
                        "linear layers, on the hidden d_ff features only.")
FF_GELU = Mistake("activation_not_relu", "the activation between the two layers is not ReLU ({which}); the paper, "
                  "and this exercise, use ReLU.")
FF_MIXES_POSITIONS = Mistake("mixes_positions", "the network mixes positions: permuting the positions of x should "
                             "permute the output the same way, because the same MLP is applied to each position "
                             "separately. Apply the linear layers to the last dimension only.")
DROPOUT_IN_EVAL = Mistake("dropout_in_eval_mode", "{what} in eval mode gave different results for two calls: "
                          "dropout must be off after .eval(). Use nn.Dropout (it follows the module's mode), or "
                          "F.dropout(..., training=self.training).")
DROPOUT_NEVER = Mistake("dropout_never_applied", "{what} in train mode, with dropout={p}, gave the same output as in "
                        "eval mode: apply dropout ({where}) in train mode.")
DROPOUT_NOT_REPRODUCIBLE = Mistake("dropout_not_reproducible", "{what} in train mode gave different outputs for two "
                                   "calls after the same torch.manual_seed: draw the dropout masks from torch's "
                                   "generator (nn.Dropout, F.dropout, torch.rand), not from Python's or NumPy's.")
DROPOUT_RATE_IGNORED = Mistake("dropout_rate_ignored", "{what} with dropout=0.0 in train mode differs from eval "
                               "mode: use the dropout probability given to __init__ (0.0 drops nothing).")
DROPOUT_NOT_RESCALED = Mistake("dropout_not_rescaled", "in train mode the average of {what} over many dropout masks "
                               "should equal the eval-mode output (it is {err:.3g} away, {se:.3g} standard errors "
                               "of the average): drop the hidden ReLU features and scale the kept ones by "
                               "1 / (1 - p), as nn.Dropout does.")

_FF_D, _FF_DFF = 8, 24


def _expect_eval_deterministic(module, args: tuple, what: str) -> int:
    """Eval mode: two calls after different seeds give the same output (dropout is off)."""
    __tracebackhide__ = True
    a, b = _seeded(1, module, *args, what=what), _seeded(2, module, *args, what=what)
    shape = args[0].shape
    expect_tensor(a, what, shape=shape, dtype=args[0].dtype, device=args[0].device)
    if not torch.equal(a, expect_tensor(b, what, shape=shape)):
        fail(DROPOUT_IN_EVAL, what=what)
    return 1


def _expect_dropout_active(module, args: tuple, want, what: str, mistake: Mistake = DROPOUT_NEVER,
                           fields: dict | None = None) -> int:
    """Train mode: the same seed gives the same output; two seeds do not both give the eval output
    ``want`` (else ``mistake``, formatted with ``fields``)."""
    __tracebackhide__ = True
    module.train()
    a, b, c = (expect_tensor(_seeded(s, module, *args, what=f"{what} in train mode"), f"{what} in train mode",
                             shape=want.shape) for s in (5, 5, 6))
    if not torch.equal(a, b):
        fail(DROPOUT_NOT_REPRODUCIBLE, what=what)
    if torch.allclose(a, want) and torch.allclose(c, want):
        fail(mistake, **(fields or {}))
    return 2


def _expect_rate_zero_is_eval(module, args: tuple, what: str) -> int:
    """A module built with dropout=0.0 computes in train mode what it computes in eval mode."""
    __tracebackhide__ = True
    want = expect_tensor(call(module.eval(), *args, what=f"{what} in eval mode"), what, shape=args[0].shape)
    got = expect_tensor(_seeded(3, module.train(), *args, what=f"{what} in train mode"), what, shape=args[0].shape)
    module.eval()
    if not torch.allclose(got, want):
        fail(DROPOUT_RATE_IGNORED, what=what)
    return 1


def _ff_names(module, d, d_ff, what) -> dict:
    """canonical key (ff.w1, ff.b1, ff.w2, ff.b2) -> the student's parameter name, found by shape."""
    __tracebackhide__ = True
    params = dict(module.named_parameters())
    want = {"ff.w1": (d_ff, d), "ff.b1": (d_ff,), "ff.w2": (d, d_ff), "ff.b2": (d,)}
    by_shape = {tuple(t.shape): name for name, t in params.items()}
    if len(params) != 4 or set(by_shape) != set(want.values()):
        fail(f"{what} should hold two nn.Linear layers with bias, {d} -> {d_ff} and {d_ff} -> {d} (four parameters "
             f"of shapes {list(want.values())}), but its parameters are "
             f"{ {n: tuple(t.shape) for n, t in params.items()} }.", mistake="wrong_parameters")
    return {key: by_shape[shape] for key, shape in want.items()}


def _ff_apply(p, x, act="relu", where="hidden"):
    """Position-wise feed-forward from canonical parameters, the activation placed per ``where``."""
    a = {"relu": torch.relu, "gelu": F.gelu, "none": lambda t: t}[act]
    x_in = a(x) if where == "input" else x
    h = F.linear(x_in, p["ff.w1"], p["ff.b1"])
    h = a(h) if where in ("hidden", "both") else h
    out = F.linear(h, p["ff.w2"], p["ff.b2"])
    return a(out) if where in ("output", "both") else out


def _ff_mistakes(p, x) -> dict:
    return {FF_NO_RELU: _ff_apply(p, x, "none"),
            FF_RELU_PLACE.format(where="after the second linear layer"): _ff_apply(p, x, where="output"),
            FF_RELU_PLACE.format(where="after both linear layers"): _ff_apply(p, x, where="both"),
            FF_RELU_PLACE.format(where="on the input, before the first linear layer"): _ff_apply(p, x, where="input"),
            FF_GELU.format(which="GELU"): _ff_apply(p, x, "gelu")}


def _ff_module(FeedForward, device, dtype, seed, dropout=0.1):
    """The student's FeedForward(8, 24, dropout) with random weights, in eval mode; and the canonical weights."""
    __tracebackhide__ = True
    what = f"FeedForward({_FF_D}, {_FF_DFF}, {dropout})"
    module = _build(FeedForward, (_FF_D, _FF_DFF, dropout), {}, what)
    names = _ff_names(module, _FF_D, _FF_DFF, what)
    module = module.to(device=device, dtype=dtype).eval()
    shapes = {"ff.w1": (_FF_DFF, _FF_D), "ff.b1": (_FF_DFF,), "ff.w2": (_FF_D, _FF_DFF), "ff.b2": (_FF_D,)}
    p = {key: _random_value(key, shape, seed + i, device, dtype) for i, (key, shape) in enumerate(shapes.items())}
    _load(module, {names[key]: t for key, t in p.items()}, what)
    return module, p, names


def _check_ff_parameters(FeedForward, device) -> int:
    __tracebackhide__ = True
    _ff_names(_build(FeedForward, (6, 10, 0.1), {}, "FeedForward(6, 10, 0.1)"), 6, 10, "FeedForward(6, 10, 0.1)")
    return 1


def _check_ff_eval_deterministic(FeedForward, device) -> int:
    __tracebackhide__ = True
    module, _, _ = _ff_module(FeedForward, device, torch.float32, seed=70, dropout=0.5)
    x = randn(2, 5, _FF_D, seed=71, device=device)
    return _expect_eval_deterministic(module, (x,), f"FeedForward(8, 24, 0.5) on {device}")


def _check_ff_values(FeedForward, device) -> int:
    """Eval mode, against linear2(relu(linear1(x))) for inputs with 2 and 3 dimensions."""
    __tracebackhide__ = True
    module, p, _ = _ff_module(FeedForward, device, torch.float32, seed=80)
    for i, shape in enumerate([(2, 5, _FF_D), (7, _FF_D)]):
        x = randn(*shape, seed=81 + i, device=device)
        what = f"FeedForward(8, 24, 0.1) in eval mode on {device}, x of shape {shape}"
        got = call(module, x, what=what)
        expect_tensor(got, what, shape=shape, dtype=x.dtype, device=device)
        expect_close(got, _ff_apply(p, x), f"{what} (compared with linear2(relu(linear1(x))))",
                     mistakes=_ff_mistakes(p, x))
    return 2


def _check_ff_position_wise(FeedForward, device) -> int:
    """Permuting the positions commutes with the network; one position alone gives the same result."""
    __tracebackhide__ = True
    module, _, _ = _ff_module(FeedForward, device, torch.float32, seed=90)
    x = randn(2, 6, _FF_D, seed=91, device=device)
    perm = torch.tensor([3, 0, 5, 1, 4, 2], device=device)
    what = f"FeedForward(8, 24) on {device}"
    out = expect_tensor(call(module, x, what=what), what, shape=x.shape)
    out_perm = expect_tensor(call(module, x[:, perm], what=f"{what} on permuted positions"), what, shape=x.shape)
    if not torch.allclose(out_perm, out[:, perm], rtol=1e-4, atol=1e-5):
        fail(FF_MIXES_POSITIONS)
    return 1


def _check_ff_grads(FeedForward, device) -> int:
    """float64, eval mode: gradients with respect to x and the four parameters."""
    __tracebackhide__ = True
    module, p, names = _ff_module(FeedForward, device, torch.float64, seed=100)
    x = randn(2, 4, _FF_D, seed=101, dtype=torch.float64, device=device, requires_grad=True)
    what = f"FeedForward(8, 24) on {device}, float64"
    got = call(module, x, what=what)
    ref = {"x": _leaf(x), **{names[k]: _leaf(t) for k, t in p.items()}}
    canon = {k: ref[names[k]] for k in p}
    want = _ff_apply(canon, ref["x"])
    expect_close(got, want, what, mistakes=_ff_mistakes(p, x.detach()))
    params = dict(module.named_parameters())
    return 1 + expect_grads_close(got, want, {"x": x, **{n: params[n] for n in names.values()}}, ref,
                                  f"the output of {what}", seed=102)


def _check_ff_dropout(FeedForward, device) -> int:
    """Train mode: dropout on, reproducible by seed, off for dropout=0, unbiased (rescaled by 1/(1-p))."""
    __tracebackhide__ = True
    x = randn(2, 5, _FF_D, seed=111, device=device)
    module0, _, _ = _ff_module(FeedForward, device, torch.float32, seed=110, dropout=0.0)
    n = _expect_rate_zero_is_eval(module0, (x,), f"FeedForward(8, 24, 0.0) on {device}")
    module, _, _ = _ff_module(FeedForward, device, torch.float32, seed=110, dropout=0.5)
    what = f"FeedForward(8, 24, 0.5) on {device}"
    want = expect_tensor(call(module, x, what=f"{what} in eval mode"), what, shape=x.shape)
    n += _expect_dropout_active(module, (x,), want, what,
                                fields=dict(what=what, p=0.5, where="to the hidden ReLU features"))
    mean, se, want1 = _dropout_scale_probe(module, _FF_D, seed=112, device=device, what=what)
    err = float((mean - want1).norm())
    if err > 6 * float(se.norm()) + 1e-4:
        fail(DROPOUT_NOT_RESCALED, what=what, err=err, se=err / float(se.norm()))
    return n + 1


def check_feed_forward(FeedForward) -> None:
    """Visible tests for exercise 2. ``FeedForward(d_model, d_ff, dropout)``; ``forward(x)``:
    (..., d_model) -> (..., d_model), linear (d_model -> d_ff), ReLU, dropout, linear (d_ff -> d_model)."""
    __tracebackhide__ = True
    forbid_names(FeedForward, forbidden.TRANSFORMER_LAYERS, "FeedForward",
                 "Build it from nn.Linear, a ReLU and nn.Dropout.")
    passed("FeedForward", on_devices([_check_ff_parameters, _check_ff_eval_deterministic, _check_ff_position_wise,
                                      _check_ff_values, _check_ff_grads, _check_ff_dropout], FeedForward))


# --------------------------------------------------------------------------------------------
# Exercise 3: EncoderLayer
# --------------------------------------------------------------------------------------------

PLACEMENT_SWAPPED = Mistake("norm_placement_swapped", "with norm_first={norm_first} the layer computed the "
                            "{other} layer: {want_formula} is expected. Read norm_first in __init__ and choose "
                            "the placement in forward.")
NORM_BEFORE_SUM = Mistake("norm_before_residual_sum", "in a post-norm layer (norm_first=False) the norm comes after "
                          "the residual sum, LayerNorm(x + Sublayer(x)); you normalised the sub-layer's output "
                          "before adding it, x + LayerNorm(Sublayer(x)).")
NO_RESIDUAL = Mistake("no_residual", "the residual connections are missing: each sub-layer's input is added back to "
                      "its output ({formula}).")
RESIDUAL_FROM_LAYER_INPUT = Mistake("residual_from_layer_input", "the feed-forward sub-layer's residual adds the "
                                    "layer's input x; it must add the feed-forward's own input, the output of the "
                                    "attention sub-layer: LayerNorm(y + FFN(y)) with y = LayerNorm(x + Attn(x)).")
RESIDUAL_FROM_NORMALISED = Mistake("residual_from_normalised_input", "in a pre-norm layer the residual adds the "
                                   "un-normalised input: x + Sublayer(LayerNorm(x)). You added the normalised one, "
                                   "LayerNorm(x) + Sublayer(LayerNorm(x)), which cuts the identity path.")
FFN_READS_LAYER_INPUT = Mistake("ffn_reads_layer_input", "the feed-forward sub-layer reads the layer's input x "
                                "instead of the output of the attention sub-layer: the two sub-layers run one "
                                "after the other.")
NORMS_SWAPPED = Mistake("norms_swapped", "norm1 and norm2 are swapped: norm1 belongs to the attention sub-layer, "
                        "norm2 to the feed-forward sub-layer.")
LAYER_MASK_IGNORED = Mistake("mask_not_passed_to_attention", "the mask is ignored: pass it to self_attn (padding "
                             "tokens must not be attended to).")
LAYER_MASK_INVERTED = Mistake("mask_inverted", "the mask is inverted: in this course True means 'may attend' (a real "
                              "token). PyTorch's src_key_padding_mask is True where a key is ignored: the opposite.")
PADDING_CHANGES_OUTPUT = Mistake("padding_changes_real_positions", "{what}: changing or appending padding changed the "
                                 "output at real (unpadded) positions by up to {diff:.3g}. Pass the padding mask "
                                 "to the attention{every}, so that no real token attends to a padding key.")
NO_ATTN_DROPOUT = Mistake("attention_output_not_dropped", "in train mode the attention sub-layer's output is never "
                          "dropped: apply dropout to Attn(...) before it is added to the residual (with the feed-"
                          "forward weights set to zero the train-mode output equalled the eval-mode one).")
NO_FF_DROPOUT = Mistake("feed_forward_output_not_dropped", "in train mode nothing on the feed-forward path is "
                        "dropped: use your FeedForward with the layer's dropout, and apply dropout to its output "
                        "before the residual sum (with the attention's output projection set to zero the train-mode "
                        "output equalled the eval-mode one).")
PASTED_MHA_FAILS = Mistake(
    "pasted_attention_fails", "EncoderLayer failed its checks ({layer}), but the culprit is probably earlier: the "
    "MultiHeadAttention you pasted from chapter 3 (the cell under \"Your multi-head attention from chapter 3\") "
    "fails chapter 3's own checks: {earlier} Fix the paste first (with everything it calls); the layer runs through "
    "it, so its bugs show up here.")
PASTED_MHA_MISSING = Mistake(
    "pasted_attention_missing", "EncoderLayer failed its checks ({layer}), and MultiHeadAttention is not defined: "
    "paste your chapter-3 MultiHeadAttention (with split_heads, merge_heads and scaled_dot_product_attention) into "
    "the cell under \"Your multi-head attention from chapter 3\" and run it first.")
EARLIER_LAYER_NORM_FAILS = Mistake(
    "layer_norm_fails", "{module} failed its checks ({layer}), but the culprit is probably earlier: your LayerNorm "
    "fails exercise 1's checks: {earlier} Fix exercise 1 first.")
EARLIER_FEED_FORWARD_FAILS = Mistake(
    "feed_forward_fails", "{module} failed its checks ({layer}), but the culprit is probably earlier: your "
    "FeedForward fails exercise 2's checks: {earlier} Fix exercise 2 first.")

_D, _H, _DFF = 12, 3, 20


def _layer_names(params: dict, what: str, prefix: str = "") -> dict:
    """canonical name -> the student's parameter name for one layer (under ``prefix``): the
    attention's q/k/v/out projections and the norms by the exercise's names, the feed-forward's
    four parameters (under ``ff.``) by their shapes."""
    __tracebackhide__ = True
    fixed = [f"self_attn.{n}" for n in MHA_PARAMS] + list(_NORMS)
    mine = {n[len(prefix):]: t for n, t in params.items() if n.startswith(prefix)}
    missing = [n for n in fixed if n not in mine]
    rest = {n: t for n, t in mine.items() if n not in fixed}
    layout = ("self_attn (your MultiHeadAttention: q_proj, k_proj, v_proj, out_proj), ff (your FeedForward), "
              "norm1 and norm2 (your LayerNorm)")
    if missing or len(rest) != 4 or not all(n.startswith("ff.") for n in rest):
        fail(f"{what}'s parameters should be those of {layout}, but they are {sorted(mine)}"
             + (f" (missing: {missing})" if missing else "") + ".", mistake="wrong_parameters")
    d = mine["norm1.weight"].shape[0]
    for n in fixed:
        want = (d, d) if n.endswith("weight") and n.startswith("self_attn") else (d,)
        if tuple(mine[n].shape) != want:
            fail(f"{prefix}{n} has shape {tuple(mine[n].shape)}, expected {want}: the projections are "
                 "nn.Linear(d_model, d_model), the norms LayerNorm(d_model).", mistake="wrong_parameter_shape")
    by_shape = {tuple(t.shape): n for n, t in rest.items()}
    d_ff = next((s[0] for s in by_shape if len(s) == 2 and s[1] == d), None)
    want = {"ff.w1": (d_ff, d), "ff.b1": (d_ff,), "ff.w2": (d, d_ff), "ff.b2": (d,)}
    if d_ff is None or set(by_shape) != set(want.values()):
        fail(f"{what}: ff should be your FeedForward (two nn.Linear with bias), but its parameters are "
             f"{ {n: tuple(t.shape) for n, t in rest.items()} }.", mistake="wrong_parameters")
    names = {n: prefix + n for n in fixed}
    names.update({key: prefix + by_shape[shape] for key, shape in want.items()})
    return names


def _attn(p: dict, prefix: str = "") -> dict:
    return {n: p[f"{prefix}self_attn.{n}"] for n in MHA_PARAMS}


def _norm(p, i, t, prefix=""):
    return F.layer_norm(t, t.shape[-1:], p[f"{prefix}norm{i}.weight"], p[f"{prefix}norm{i}.bias"], 1e-5)


def layer_variant(p: dict, x, mask, h: int, norm_first: bool, kind: str = "right", prefix: str = ""):
    """An encoder layer in plain torch (dropout off) from canonical parameters, with one deliberate
    mistake ``kind`` (or none). ``mask``: the course's convention, True = may attend."""
    mask_mode = {"mask_ignored": "ignored", "mask_inverted": "inverted"}.get(kind)
    attn = _attn(p, prefix)

    def sa(t):
        if mask_mode is None:
            return mha_loop(attn, t, t, t, h, mask)[0]
        result = mha_variant(attn, t, t, t, h, mask, mask_mode=mask_mode)
        return None if result is None else result[0]

    def ff(t):
        return _ff_apply({k: p[prefix + k] for k in _FF_KEYS}, t)

    first, second = (2, 1) if kind == "norms_swapped" else (1, 2)

    def n1(t):
        return _norm(p, first, t, prefix)

    def n2(t):
        return _norm(p, second, t, prefix)

    pre = norm_first != (kind == "placement_swapped")
    if pre:
        if kind == "no_residual":
            return ff(n2(sa(n1(x))))
        if kind == "residual_from_normalised":
            a = n1(x)
            y = a + sa(a)
            return n2(y) + ff(n2(y))
        y = x + sa(n1(x))
        return y + ff(n2(x if kind == "ffn_reads_layer_input" else y))
    if kind == "norm_before_sum":
        y = x + n1(sa(x))
        return y + n2(ff(y))
    if kind == "no_residual":
        return n2(ff(n1(sa(x))))
    y = n1(x + sa(x))
    if kind == "residual_from_layer_input":
        return n2(x + ff(y))
    return n2(y + ff(x if kind == "ffn_reads_layer_input" else y))


_POST, _PRE = "LayerNorm(x + Sublayer(x)) (post-norm)", "x + Sublayer(LayerNorm(x)) (pre-norm)"


def _layer_mistakes(p, x, mask, norm_first, prefix="") -> dict:
    kinds = {PLACEMENT_SWAPPED.format(norm_first=norm_first, other="pre-norm" if not norm_first else "post-norm",
                                      want_formula=_PRE if norm_first else _POST): "placement_swapped",
             NO_RESIDUAL.format(formula=_PRE if norm_first else _POST): "no_residual",
             FFN_READS_LAYER_INPUT: "ffn_reads_layer_input", NORMS_SWAPPED: "norms_swapped"}
    if norm_first:
        kinds[RESIDUAL_FROM_NORMALISED] = "residual_from_normalised"
    else:
        kinds.update({NORM_BEFORE_SUM: "norm_before_sum", RESIDUAL_FROM_LAYER_INPUT: "residual_from_layer_input"})
    if mask is not None:
        kinds.update({LAYER_MASK_IGNORED: "mask_ignored", LAYER_MASK_INVERTED: "mask_inverted"})
    with torch.no_grad():
        return {m: layer_variant(p, x, mask, _H, norm_first, kind, prefix) for m, kind in kinds.items()}


def _torch_layer_params(p: dict, names: dict, to: str = "") -> dict:
    """One layer's weights (``p``: student name -> tensor; ``names``: canonical -> student name)
    named as nn.TransformerEncoderLayer's (under ``to``)."""
    get = {k: p[v] for k, v in names.items()}
    out = packed(get, "self_attn.", f"{to}self_attn.")
    out.update({f"{to}linear1.weight": get["ff.w1"], f"{to}linear1.bias": get["ff.b1"],
                f"{to}linear2.weight": get["ff.w2"], f"{to}linear2.bias": get["ff.b2"]})
    out.update({f"{to}{n}": get[n] for n in _NORMS})
    return out


def _key_padding(mask):
    """The course's padding mask (B, 1, L), True = real token, as PyTorch's (B, L), True = ignore."""
    return None if mask is None else ~mask[:, 0, :]


def torch_encoder_layer(p: dict, names: dict, x, mask, norm_first: bool, d_ff: int):
    """nn.TransformerEncoderLayer (eval, ReLU, batch_first) with the student's weights ``p``
    (student name -> tensor; gradients flow back to them)."""
    ref = torch.nn.TransformerEncoderLayer(x.shape[-1], _H, d_ff, dropout=0.0, batch_first=True,
                                           norm_first=norm_first).to(device=x.device, dtype=x.dtype).eval()
    with torch.enable_grad():
        return functional_call(ref, _torch_layer_params(p, names), (x,), {"src_key_padding_mask": _key_padding(mask)})


def _layer_module(EncoderLayer, norm_first, device, dtype, seed, dropout=0.1):
    """The student's EncoderLayer(12, 3, 20, dropout, norm_first) holding random weights, in eval
    mode; the weights by the student's names and canonical name -> student name."""
    __tracebackhide__ = True
    what = f"EncoderLayer({_D}, {_H}, {_DFF}, {dropout}, norm_first={norm_first})"
    module = _build(EncoderLayer, (_D, _H, _DFF, dropout), {"norm_first": norm_first}, what)
    names = _layer_names(dict(module.named_parameters()), what)
    return (*_randomised(module, device, dtype, seed, what), names)


def _canonical(p: dict, names: dict) -> dict:
    return {k: p[v] for k, v in names.items()}


def _padding_case(device, dtype=torch.float32, seed=0):
    x = randn(2, 5, _D, seed=seed, device=device, dtype=dtype)
    return x, padding([5, 3], 5, device)


def _run_layer(module, x, mask, what):
    __tracebackhide__ = True
    got = call(module, x, what=what) if mask is None else call(module, x, mask, what=what)
    return expect_tensor(got, what, shape=x.shape, dtype=x.dtype, device=x.device)


def _check_layer_structure(EncoderLayer, device) -> int:
    __tracebackhide__ = True
    for norm_first in (False, True):
        what = f"EncoderLayer(12, 3, 20, 0.1, norm_first={norm_first})"
        module = _build(EncoderLayer, (_D, _H, _DFF, 0.1), {"norm_first": norm_first}, what)
        _layer_names(dict(module.named_parameters()), what)
    return 2


def _check_layer_eval_deterministic(EncoderLayer, device) -> int:
    __tracebackhide__ = True
    module, _, _ = _layer_module(EncoderLayer, False, device, torch.float32, seed=200, dropout=0.5)
    return _expect_eval_deterministic(module, _padding_case(device, seed=201), f"EncoderLayer(12, 3, 20, 0.5) on {device}")


def _expect_like_torch(module, p, names, x, mask, torch_fn, mistakes_fn, what, compared) -> int:
    """Eval mode: the student's output against ``torch_fn(p, names, x, mask)`` (PyTorch's module
    with the student's weights); ``mistakes_fn(canonical weights, x, mask)`` names what differs."""
    __tracebackhide__ = True
    got = _run_layer(module, x, mask, what)
    want = torch_fn(p, names, x, mask).detach()
    expect_close(got, want, f"{what} (compared with {compared} with your weights)",
                 mistakes=mistakes_fn(_canonical(p, names), x, mask))
    return 1


def _expect_grads_like_torch(module, p, names, x, mask, torch_fn, mistakes_fn, what, seed) -> int:
    """float64: the output and its gradients with respect to x and every parameter, against
    autograd through ``torch_fn`` on copies of the same weights."""
    __tracebackhide__ = True
    x.requires_grad_()
    got = _run_layer(module, x, mask, what)
    ref = {"x": _leaf(x), **{k: _leaf(t) for k, t in p.items()}}
    want = torch_fn(ref, names, ref["x"], mask)
    expect_close(got, want, what, mistakes=mistakes_fn(_canonical(p, names), x.detach(), mask))
    params = dict(module.named_parameters())
    return 1 + expect_grads_close(got, want, {"x": x, **{k: params[k] for k in p}}, ref, f"the output of {what}",
                                  seed=seed)


def _layer_fns(norm_first):
    return (lambda p, names, x, m: torch_encoder_layer(p, names, x, m, norm_first, _DFF),
            lambda canon, x, m: _layer_mistakes(canon, x, m, norm_first))


_MASK_LABEL = {None: "no mask", True: "a (2, 1, 5) padding mask for lengths [5, 3]"}


def _check_layer_against_torch(EncoderLayer, device) -> int:
    """Eval mode, both placements, with and without a padding mask, against nn.TransformerEncoderLayer."""
    __tracebackhide__ = True
    n = 0
    for norm_first in (False, True):
        module, p, names = _layer_module(EncoderLayer, norm_first, device, torch.float32, seed=210 + norm_first)
        x, mask = _padding_case(device, seed=220 + norm_first)
        for m in (None, mask):
            what = (f"EncoderLayer(12, 3, 20, norm_first={norm_first}) in eval mode on {device}, "
                    + _MASK_LABEL[m is not None or None])
            n += _expect_like_torch(module, p, names, x, m, *_layer_fns(norm_first), what,
                                    "nn.TransformerEncoderLayer")
    return n


def _check_layer_grads(EncoderLayer, device) -> int:
    """float64, both placements, padding mask: gradients with respect to x and every parameter."""
    __tracebackhide__ = True
    n = 0
    for norm_first in (False, True):
        module, p, names = _layer_module(EncoderLayer, norm_first, device, torch.float64, seed=230 + norm_first)
        x, mask = _padding_case(device, torch.float64, seed=240 + norm_first)
        what = f"EncoderLayer(12, 3, 20, norm_first={norm_first}) on {device}, float64, with a padding mask"
        n += _expect_grads_like_torch(module, p, names, x, mask, *_layer_fns(norm_first), what, seed=250 + norm_first)
    return n


def _padding_invariance(module, x, lengths, what, every=""):
    """Outputs at real positions with the given padding, with junk in the padding, and with 3 more
    padding positions appended, all equal."""
    __tracebackhide__ = True
    b, length, d = x.shape
    real = padding(lengths, length, x.device)[:, 0, :, None]
    junk = randn(b, length + 3, d, seed=7, device=x.device, dtype=x.dtype, scale=5.0)
    x2 = torch.where(real, x, junk[:, :length])
    x3 = torch.cat([x2, junk[:, length:]], dim=1)
    out1 = _run_layer(module, x, padding(lengths, length, x.device), what)
    out2 = _run_layer(module, x2, padding(lengths, length, x.device), f"{what}, other values in the padding")
    out3 = _run_layer(module, x3, padding(lengths, length + 3, x.device), f"{what}, 3 more padding positions")
    diff = max(float((torch.where(real, o, 0.0) - torch.where(real, out1, 0.0)).detach().abs().max())
               for o in (out2, out3[:, :length]))
    if diff > 1e-4:
        fail(PADDING_CHANGES_OUTPUT, what=what, diff=diff, every=every)
    return 2


def _check_layer_padding(EncoderLayer, device) -> int:
    __tracebackhide__ = True
    module, _, _ = _layer_module(EncoderLayer, False, device, torch.float32, seed=260)
    x = randn(3, 6, _D, seed=261, device=device)
    return _padding_invariance(module, x, [6, 4, 1], f"EncoderLayer(12, 3, 20) on {device} with padding masks")


def _finite_difference(module, x, seed, what, eps=1e-6):
    """Train mode, float64, fixed seed: the gradient along a random direction against central differences."""
    __tracebackhide__ = True
    w = randn(*x.shape, seed=seed + 1, device=x.device, dtype=x.dtype)
    v = randn(*x.shape, seed=seed + 2, device=x.device, dtype=x.dtype)
    out = _seeded(seed, module, x, what=what)
    (g,) = grads(expect_tensor(out, what, shape=x.shape), [x], w, what)
    with torch.no_grad():
        plus = _seeded(seed, module, x + eps * v, what=what)
        minus = _seeded(seed, module, x - eps * v, what=what)
    expect_close((g * v).sum(), ((plus - minus) * w).sum() / (2 * eps),
                 f"the gradient of {what} along a random direction, compared with finite differences of the same "
                 "function (same seed, same dropout masks)", tol=(1e-5, 1e-7))
    return 1


def _check_layer_dropout(EncoderLayer, device) -> int:
    """Train mode: dropout=0 is eval; each sub-layer's path is dropped; a seed fixes the masks; the
    gradient is the derivative of the function the forward computed."""
    __tracebackhide__ = True
    x, mask = _padding_case(device, seed=270)
    module0, _, _ = _layer_module(EncoderLayer, False, device, torch.float32, seed=271, dropout=0.0)
    n = _expect_rate_zero_is_eval(module0, (x, mask), f"EncoderLayer(12, 3, 20, 0.0) on {device}")
    for norm_first in (False, True):
        module, p, names = _layer_module(EncoderLayer, norm_first, device, torch.float32, seed=272, dropout=0.3)
        what = f"EncoderLayer(12, 3, 20, 0.3, norm_first={norm_first}) on {device}"
        zero = {names[k]: torch.zeros_like(p[names[k]]) for k in _FF_KEYS}
        for mistake, silenced in ((NO_ATTN_DROPOUT, zero),
                                  (NO_FF_DROPOUT, {names[f"self_attn.out_proj.{k}"]: torch.zeros_like(
                                      p[names[f"self_attn.out_proj.{k}"]]) for k in ("weight", "bias")})):
            _load(module, {**p, **silenced}, what)
            want = _run_layer(module.eval(), x, mask, f"{what} in eval mode")
            n += _expect_dropout_active(module, (x, mask), want, what, mistake)
    module64, _, _ = _layer_module(EncoderLayer, True, device, torch.float64, seed=280, dropout=0.3)
    module64.train()
    x64 = randn(2, 4, _D, seed=281, device=device, dtype=torch.float64, requires_grad=True)
    return n + _finite_difference(module64, x64, 282, f"EncoderLayer(12, 3, 20, 0.3, norm_first=True) in train "
                                  f"mode on {device}, float64")


def _quietly(check, *args) -> CheckFailure | None:
    """The failure of ``check(*args)`` (an earlier exercise's checks), or None; prints nothing."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            check(*args)
    except CheckFailure as exc:
        return exc
    except Exception:  # noqa: BLE001 - no verdict on the earlier code: judge the module alone
        return None
    return None


def _blame_earlier(failure: CheckFailure, module: str, MultiHeadAttention, LayerNorm, FeedForward) -> None:
    """The layer (or the stack) failed: if code it builds on fails its own checks, say so."""
    __tracebackhide__ = True
    if failure.mistake == "not_implemented":
        return
    text = str(failure).rstrip(".")
    if MultiHeadAttention is None and "'MultiHeadAttention' is not defined" in str(failure):
        fail(PASTED_MHA_MISSING, layer=text)
    from .ch03 import check_multi_head_attention
    earlier = [(PASTED_MHA_FAILS, check_multi_head_attention, MultiHeadAttention),
               (EARLIER_LAYER_NORM_FAILS, check_layer_norm, LayerNorm),
               (EARLIER_FEED_FORWARD_FAILS, check_feed_forward, FeedForward)]
    for mistake, check, obj in earlier:
        if obj is not None:
            exc = _quietly(check, obj)
            if exc is not None:
                fail(mistake, layer=text, module=module, earlier=str(exc))


def check_encoder_layer(EncoderLayer, MultiHeadAttention=None, LayerNorm=None, FeedForward=None) -> None:
    """Visible tests for exercise 3. ``EncoderLayer(d_model, num_heads, d_ff, dropout, norm_first=False)``
    with submodules ``self_attn``, ``ff``, ``norm1``, ``norm2``; ``forward(x, mask=None)``: x (B, L,
    d_model), mask boolean, True = may attend (e.g. padding (B, 1, L)) -> (B, L, d_model).

    The code it builds on (the pasted chapter-3 attention, exercises 1 and 2), when given, is
    checked only if the layer fails, to name it as the likely culprit."""
    __tracebackhide__ = True
    forbid_names(EncoderLayer, forbidden.ATTENTION + forbidden.LAYER_NORM + forbidden.TRANSFORMER_LAYERS,
                 "EncoderLayer", "Use your MultiHeadAttention (pasted from chapter 3), your LayerNorm and your "
                 "FeedForward.")
    try:
        count = on_devices([_check_layer_structure, _check_layer_eval_deterministic, _check_layer_against_torch,
                            _check_layer_grads, _check_layer_padding, _check_layer_dropout], EncoderLayer)
    except CheckFailure as exc:
        _blame_earlier(exc, "EncoderLayer", MultiHeadAttention, LayerNorm, FeedForward)
        raise
    passed("EncoderLayer", count)


# --------------------------------------------------------------------------------------------
# Exercise 4: Encoder
# --------------------------------------------------------------------------------------------

SHARED_LAYER = Mistake("one_layer_repeated", "{detail}: the layers share their parameters, so the stack is one "
                       "layer applied {n} times. Create a new EncoderLayer for each position in the stack (a list "
                       "comprehension inside nn.ModuleList); [layer] * n repeats one object.")
LAYERS_NOT_REGISTERED = Mistake("layers_not_registered", "the Encoder has no parameters named layers.0..., so its "
                                "layers are not registered as submodules (a plain Python list hides them from "
                                ".parameters(), .to() and the optimiser): keep them in an nn.ModuleList named "
                                "`layers`.")
WRONG_NUM_LAYERS = Mistake("wrong_number_of_layers", "Encoder({n}, ...) has {got} layers: it should stack num_layers "
                           "= {n} EncoderLayers.")
FINAL_NORM_MISSING = Mistake("final_norm_missing", "a pre-norm stack (norm_first=True) ends with one more LayerNorm, "
                             "named `norm`: the last layer's output is an un-normalised residual sum.")
FINAL_NORM_IN_POST_NORM = Mistake("final_norm_in_post_norm", "a post-norm stack (norm_first=False) has no final norm: "
                                  "its last layer already ends with one. Create `self.norm` only when norm_first is "
                                  "True.")
FINAL_NORM_NOT_APPLIED = Mistake("final_norm_not_applied", "the pre-norm stack's final LayerNorm (self.norm) is not "
                                 "applied to the output of the last layer.")
MASK_ONLY_FIRST = Mistake("mask_dropped_after_first_layer", "the padding mask reaches only the first layer: every "
                          "layer's attention needs it, or the later layers attend to the padding.")
ENCODER_MASK_IGNORED = Mistake("encoder_mask_ignored", "the mask is not passed to the layers: call each layer "
                               "with it.")
NOT_CHAINED = Mistake("layers_not_chained", "each layer is applied to the Encoder's input, and only the last result "
                      "is kept: feed each layer's output into the next one.")
LAYERS_REVERSED = Mistake("layers_in_reverse_order", "the layers run in reverse order: layers[0] first.")
NORM_FIRST_NOT_PASSED = Mistake("norm_first_not_passed", "norm_first={norm_first} is not passed on to the layers: "
                                "they compute the {other} layer. Give each EncoderLayer the Encoder's norm_first.")
ENCODER_LAYER_FAILS = Mistake(
    "encoder_layer_fails", "Encoder failed its checks ({layer}), but the culprit is probably earlier: your "
    "EncoderLayer fails exercise 3's checks: {earlier} Fix exercise 3 first.")

_N = 3


def encoder_variant(p: dict, x, mask, norm_first: bool, kind: str = "right", n: int = _N):
    """An encoder stack in plain torch from canonical names ``layers.{i}.<canonical>`` and
    ``norm.*``, with one deliberate mistake ``kind`` (or none)."""
    layer_norm_first = norm_first != (kind == "norm_first_not_passed")
    order = list(range(n))[::-1] if kind == "reversed" else list(range(n))
    out = x
    for j, i in enumerate(order):
        m = None if kind == "mask_ignored" or (kind == "mask_only_first" and j > 0) else mask
        out = layer_variant(p, x if kind == "not_chained" else out, m, _H, layer_norm_first, prefix=f"layers.{i}.")
    if norm_first and kind != "final_norm_not_applied":
        out = F.layer_norm(out, out.shape[-1:], p["norm.weight"], p["norm.bias"], 1e-5)
    return out


def _encoder_mistakes(p, x, mask, norm_first) -> dict:
    kinds = {NOT_CHAINED: "not_chained", LAYERS_REVERSED: "reversed",
             NORM_FIRST_NOT_PASSED.format(norm_first=norm_first, other="post-norm" if norm_first else "pre-norm"):
             "norm_first_not_passed"}
    if mask is not None:
        kinds.update({MASK_ONLY_FIRST: "mask_only_first", ENCODER_MASK_IGNORED: "mask_ignored"})
    if norm_first:
        kinds[FINAL_NORM_NOT_APPLIED] = "final_norm_not_applied"
    with torch.no_grad():
        return {m: encoder_variant(p, x, mask, norm_first, kind) for m, kind in kinds.items()}


def _encoder_names(module, norm_first: bool, what: str, n: int = _N) -> dict:
    """canonical ``layers.{i}.<canonical>`` / ``norm.*`` -> the student's parameter name; the
    structure checked on the way: registered layers, their number, separate parameters, the final norm."""
    __tracebackhide__ = True
    params = dict(module.named_parameters())
    if not any(n.startswith("layers.") for n in params):
        fail(LAYERS_NOT_REGISTERED)
    try:
        layers = list(module.layers)
    except Exception:  # noqa: BLE001 - a student's attribute
        layers = None
    if layers is not None and len(layers) != n:
        fail(WRONG_NUM_LAYERS, n=n, got=len(layers))
    if layers is not None:
        seen: dict[int, str] = {}
        for i, layer in enumerate(layers):
            for name, t in layer.named_parameters():
                if t.data_ptr() in seen:
                    fail(SHARED_LAYER, n=n, detail=f"layers[{i}].{name} is the same tensor as {seen[t.data_ptr()]}")
                seen[t.data_ptr()] = f"layers[{i}].{name}"
    indices = {n.split(".")[1] for n in params if n.startswith("layers.")}
    if indices != {str(i) for i in range(n)}:
        if indices == {"0"}:
            fail(SHARED_LAYER, n=n, detail="only layers.0 has parameters")
        fail(WRONG_NUM_LAYERS, n=n, got=len(indices))
    names = {}
    for i in range(n):
        names.update({f"layers.{i}.{k}": v for k, v in
                      _layer_names(params, f"{what}.layers[{i}]", prefix=f"layers.{i}.").items()})
    rest = sorted(set(params) - set(names.values()))
    has_norm = {"norm.weight", "norm.bias"} <= set(rest)
    if norm_first and not has_norm:
        fail(FINAL_NORM_MISSING)
    if not norm_first and has_norm:
        fail(FINAL_NORM_IN_POST_NORM)
    if set(rest) != ({"norm.weight", "norm.bias"} if norm_first else set()):
        fail(f"{what} has parameters besides its layers and the final norm: {rest}.", mistake="wrong_parameters")
    if norm_first:
        names.update({"norm.weight": "norm.weight", "norm.bias": "norm.bias"})
    return names


def _encoder_module(Encoder, norm_first, device, dtype, seed, dropout=0.1):
    __tracebackhide__ = True
    what = f"Encoder({_N}, {_D}, {_H}, {_DFF}, {dropout}, norm_first={norm_first})"
    module = _build(Encoder, (_N, _D, _H, _DFF, dropout), {"norm_first": norm_first}, what)
    names = _encoder_names(module, norm_first, what)
    return (*_randomised(module, device, dtype, seed, what), names)


def torch_encoder(p: dict, names: dict, x, mask, norm_first: bool):
    """nn.TransformerEncoder (eval, no nested tensors) of nn.TransformerEncoderLayer with the student's weights."""
    layer = torch.nn.TransformerEncoderLayer(x.shape[-1], _H, _DFF, dropout=0.0, batch_first=True,
                                             norm_first=norm_first)
    norm = torch.nn.LayerNorm(x.shape[-1]) if norm_first else None
    ref = torch.nn.TransformerEncoder(layer, _N, norm=norm, enable_nested_tensor=False)
    ref = ref.to(device=x.device, dtype=x.dtype).eval()
    weights = {}
    for i in range(_N):
        layer_names = {k[len(f"layers.{i}."):]: v for k, v in names.items() if k.startswith(f"layers.{i}.")}
        weights.update(_torch_layer_params(p, layer_names, to=f"layers.{i}."))
    if norm_first:
        weights.update({"norm.weight": p[names["norm.weight"]], "norm.bias": p[names["norm.bias"]]})
    with torch.enable_grad():
        return functional_call(ref, weights, (x,), {"src_key_padding_mask": _key_padding(mask)})


def _check_encoder_structure(Encoder, device) -> int:
    __tracebackhide__ = True
    for norm_first in (False, True):
        what = f"Encoder(3, 12, 3, 20, 0.1, norm_first={norm_first})"
        _encoder_names(_build(Encoder, (_N, _D, _H, _DFF, 0.1), {"norm_first": norm_first}, what), norm_first, what)
    return 2


def _check_encoder_eval_deterministic(Encoder, device) -> int:
    __tracebackhide__ = True
    module, _, _ = _encoder_module(Encoder, True, device, torch.float32, seed=300, dropout=0.5)
    return _expect_eval_deterministic(module, _padding_case(device, seed=301), f"Encoder(3, 12, 3, 20, 0.5) on {device}")


def _encoder_fns(norm_first):
    return (lambda p, names, x, m: torch_encoder(p, names, x, m, norm_first),
            lambda canon, x, m: _encoder_mistakes(canon, x, m, norm_first))


def _check_encoder_against_torch(Encoder, device) -> int:
    """Eval mode, both placements, with a padding mask (and once without), against nn.TransformerEncoder."""
    __tracebackhide__ = True
    n = 0
    for norm_first in (False, True):
        module, p, names = _encoder_module(Encoder, norm_first, device, torch.float32, seed=310 + norm_first)
        x, mask = _padding_case(device, seed=320 + norm_first)
        for m in ((None, mask) if norm_first else (mask,)):
            what = (f"Encoder(3, 12, 3, 20, norm_first={norm_first}) in eval mode on {device}, "
                    + _MASK_LABEL[m is not None or None])
            n += _expect_like_torch(module, p, names, x, m, *_encoder_fns(norm_first), what, "nn.TransformerEncoder")
    return n


def _check_encoder_grads(Encoder, device) -> int:
    """float64, pre-norm, padding mask: gradients with respect to x and every parameter of the stack."""
    __tracebackhide__ = True
    module, p, names = _encoder_module(Encoder, True, device, torch.float64, seed=330)
    x, mask = _padding_case(device, torch.float64, seed=331)
    what = f"Encoder(3, 12, 3, 20, norm_first=True) on {device}, float64, with a padding mask"
    return _expect_grads_like_torch(module, p, names, x, mask, *_encoder_fns(True), what, seed=332)


def _check_encoder_padding(Encoder, device) -> int:
    __tracebackhide__ = True
    module, _, _ = _encoder_module(Encoder, False, device, torch.float32, seed=340)
    x = randn(3, 6, _D, seed=341, device=device)
    return _padding_invariance(module, x, [6, 4, 1], f"Encoder(3, 12, 3, 20) on {device} with padding masks",
                               every=" of every layer")


def _check_encoder_dropout(Encoder, device) -> int:
    """Train mode: the same seed gives the same output, another seed another one."""
    __tracebackhide__ = True
    module, _, _ = _encoder_module(Encoder, False, device, torch.float32, seed=350, dropout=0.3)
    x, mask = _padding_case(device, seed=351)
    what = f"Encoder(3, 12, 3, 20, 0.3) on {device}"
    want = _run_layer(module, x, mask, f"{what} in eval mode")
    return _expect_dropout_active(module, (x, mask), want, what, fields=dict(
        what=what, p=0.3, where="in every layer: build the layers with the Encoder's dropout"))


def check_encoder(Encoder, EncoderLayer=None) -> None:
    """Visible tests for exercise 4. ``Encoder(num_layers, d_model, num_heads, d_ff, dropout,
    norm_first=False)`` with submodules ``layers`` (nn.ModuleList of EncoderLayer) and, when
    norm_first, ``norm``; ``forward(x, mask=None)``: (B, L, d_model) -> (B, L, d_model)."""
    __tracebackhide__ = True
    forbid_names(Encoder, forbidden.ATTENTION + forbidden.LAYER_NORM + forbidden.TRANSFORMER_LAYERS, "Encoder",
                 "Stack your EncoderLayer; the final norm of a pre-norm stack is your LayerNorm.")
    try:
        count = on_devices([_check_encoder_structure, _check_encoder_eval_deterministic, _check_encoder_against_torch,
                            _check_encoder_grads, _check_encoder_padding, _check_encoder_dropout], Encoder)
    except CheckFailure as exc:
        if EncoderLayer is not None and exc.mistake != "not_implemented":
            earlier = _quietly(check_encoder_layer, EncoderLayer)
            if earlier is not None:
                fail(ENCODER_LAYER_FAILS, layer=str(exc).rstrip("."), earlier=str(earlier))
        raise
    passed("Encoder", count)


# --------------------------------------------------------------------------------------------
# Hidden tests: the student's modules against the reference's, weights matched by role
# --------------------------------------------------------------------------------------------

def _names_of(kind: str, init_args: tuple, init_kwargs: dict):
    """canonical -> parameter name, for a module of this exercise (names may differ between honest
    solutions: an nn.Sequential feed-forward names its layers net.0, net.3)."""
    if kind == "layer_norm":
        return lambda m, what: {"weight": "weight", "bias": "bias"}
    if kind == "feed_forward":
        return lambda m, what: _ff_names(m, init_args[0], init_args[1], what)
    if kind == "encoder_layer":
        return lambda m, what: _layer_names(dict(m.named_parameters()), what)
    return lambda m, what: _encoder_names(m, init_kwargs.get("norm_first", False), what, n=init_args[0])


def compare_with_reference_weights(kind: str, student_cls, reference_cls, init_args: tuple, inputs, *, what: str,
                                   init_kwargs: dict | None = None, seeds=(0, 1)) -> int:
    """Hidden tests: :func:`compare_by_role` for ``kind`` (layer_norm, feed_forward,
    encoder_layer, encoder); these shallow modules compare gradients in float32 too.
    ``inputs(dtype, device, seed)`` -> forward args."""
    __tracebackhide__ = True
    init_kwargs = init_kwargs or {}
    return compare_by_role(_names_of(kind, init_args, init_kwargs), student_cls, reference_cls, init_args,
                           inputs, what=what, random_value=_random_value, load=_load,
                           init_kwargs=init_kwargs, seeds=seeds, grad_dtypes=(torch.float32, torch.float64))
