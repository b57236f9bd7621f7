"""Checks for chapter 6: the decoder layer, the decoder stack, shift-right and the target mask.

Expected values come from PyTorch's own modules and operations, never from the course's solution:
``nn.TransformerDecoderLayer`` / ``nn.TransformerDecoder`` (``batch_first=True``, ReLU, eval mode)
run with the student's weights through ``torch.func.functional_call`` (the separate
``q_proj``/``k_proj``/``v_proj`` stacked into PyTorch's ``in_proj_weight``), and plain tensor ops
for the small functions. The course's masks (boolean, True = may attend) become PyTorch's here: the
target mask an additive float mask (0 where allowed, -inf where blocked) or a boolean mask with
True = blocked, the source padding mask ``memory_key_padding_mask`` (True = ignore this key).
The mistakes are plain-torch variants of the same computation (:func:`layer_variant`,
:func:`decoder_variant`).

Besides equivalence: no peeking (target positions after t never change the output at t), source
padding never changes the output, every target position depends on the memory, and dropout is
checked by its properties only (a student's module runs in the sandbox with its own random stream).
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from . import forbidden
from .ch05 import (DROPOUT_IN_EVAL, DROPOUT_NEVER, DROPOUT_NOT_REPRODUCIBLE, DROPOUT_RATE_IGNORED, _build,
                   _expect_dropout_active, _expect_eval_deterministic, _expect_rate_zero_is_eval, _ff_apply, _leaf,
                   _load, _quietly, _random_value, _randomised, _seeded)
from .core import (CheckFailure, Mistake, call, expect_close, expect_tensor, fail, on_devices, passed, randn)
from .gradients import expect_grads_close, grads
from .layers import compare_by_role, stack_names
from .masks import MASK_NOT_BOOL, causal, expect_mask, expect_mask_tensor, padding
from .mha import MHA_PARAMS, mha_loop, packed
from .scan import forbid_names

__all__ = ["check_decoder_layer", "check_decoder", "check_decoder_inputs", "layer_variant", "decoder_variant",
           "torch_decoder_layer", "torch_decoder", "compare_with_reference_weights"]

# Imported so that the catalogue lists them: the dropout helpers of chapter 5 raise them here too.
_SHARED = (DROPOUT_IN_EVAL, DROPOUT_NEVER, DROPOUT_NOT_REPRODUCIBLE, DROPOUT_RATE_IGNORED, MASK_NOT_BOOL)

_D, _H, _DFF, _N = 12, 3, 20, 3
_NORMS = tuple(f"norm{i}.{k}" for i in (1, 2, 3) for k in ("weight", "bias"))
_FF_KEYS = ("ff.w1", "ff.b1", "ff.w2", "ff.b2")

# --------------------------------------------------------------------------------------------
# Exercise 1: DecoderLayer
# --------------------------------------------------------------------------------------------

KV_FROM_DECODER = Mistake("cross_attention_reads_decoder", "the cross-attention takes its keys and values from the "
                          "decoder's own stream instead of the encoder's output: call cross_attn(query, memory, "
                          "memory, memory_mask), the queries from the decoder, keys and values from memory.")
QUERY_FROM_MEMORY = Mistake("cross_attention_roles_swapped", "the cross-attention's roles are swapped: the queries "
                            "come from memory and the keys and values from the decoder. The decoder asks (queries), "
                            "the encoder's output answers (keys and values): cross_attn(x, memory, memory, ...), "
                            "which returns one row per target position.")
MEMORY_IGNORED = Mistake("memory_ignored", "{what}: changing the memory (the encoder's output) changed nothing: "
                         "the cross-attention must read its keys and values from memory (and a Decoder must hand "
                         "memory to every layer).")
MEMORY_HIDDEN = Mistake("memory_hidden_from_early_positions", "{what}: changing the memory at source position "
                        "{src} changed nothing at target positions {positions}: every target position must see the "
                        "whole source. A causal mask in the cross-attention does this; the cross-attention takes "
                        "memory_mask (the source padding) only.")
TGT_MASK_IGNORED = Mistake("causal_mask_missing", "the self-attention ignores tgt_mask, so each target position sees "
                           "the whole target, future tokens included: pass tgt_mask (the causal mask, with the "
                           "target padding) to self_attn.")
CAUSAL_IN_CROSS = Mistake("causal_mask_in_cross_attention", "tgt_mask was applied in the cross-attention{detail}: "
                          "target position t then sees only the source positions up to t. The causal mask "
                          "belongs to the self-attention; the cross-attention takes memory_mask only.")
MASKS_SWAPPED = Mistake("masks_swapped", "tgt_mask and memory_mask are swapped: the self-attention needs tgt_mask "
                        "(causal and target padding), the cross-attention memory_mask (source padding).")
MEMORY_MASK_IGNORED = Mistake("memory_mask_not_passed", "the source padding mask (memory_mask) does not reach the "
                              "cross-attention, so the decoder attends to the source's padding positions: pass "
                              "memory_mask to cross_attn.")
WRONG_ORDER = Mistake("sublayers_in_wrong_order", "the sub-layers run in the wrong order ({order}): masked "
                      "self-attention first, then cross-attention, then the feed-forward network, each on the "
                      "previous one's output.")
NO_CROSS_RESIDUAL = Mistake("no_residual_around_cross_attention", "the cross-attention sub-layer has no residual "
                            "connection: its input must be added back to its output ({formula}).")
NO_RESIDUAL = Mistake("no_residual", "the {which} sub-layer has no residual connection: its input must be added back "
                      "to its output ({formula}).")
PLACEMENT_SWAPPED = Mistake("norm_placement_swapped", "with norm_first={norm_first} the layer computed the {other} "
                            "layer: {formula} is expected for each of the three sub-layers.")
NORM_BEFORE_SUM = Mistake("norm_before_residual_sum", "in a post-norm layer (norm_first=False) the norm comes after "
                          "the residual sum, LayerNorm(x + Sublayer(x)); you normalised the sub-layer's output "
                          "before adding it, x + LayerNorm(Sublayer(x)).")
RESIDUAL_FROM_NORMALISED = Mistake("residual_from_normalised_input", "in a pre-norm layer the residual adds the "
                                   "un-normalised input, x + Sublayer(LayerNorm(x)); you added the normalised one.")
MEMORY_NORMALISED = Mistake("memory_normalised", "in pre-norm, the cross-attention's queries are norm2(x), but "
                            "memory is used as it is (a pre-norm encoder already ends with its own LayerNorm): "
                            "you normalised memory with norm2 too.")
NORMS_SWAPPED = Mistake("norms_swapped", "the norms are used in the wrong places ({detail}): norm1 belongs to the "
                        "self-attention, norm2 to the cross-attention, norm3 to the feed-forward sub-layer.")
PEEKING = Mistake("peeks_at_the_future", "No peeking: {what}: changing the target after position {t} changed the "
                  "output at positions <= {t}. The self-attention must use tgt_mask (causal) in every layer, and "
                  "nothing else may mix target positions.")
SOURCE_PADDING_LEAKS = Mistake("source_padding_changes_output", "{what}: changing or appending source padding "
                               "changed the output by up to {diff:.3g}. Pass memory_mask to the cross-attention"
                               "{every}, so that no target position attends to a padding position of the source.")
NO_DROPOUT_ON = Mistake("sublayer_output_not_dropped", "in train mode the {path} sub-layer's output is never dropped "
                        "(with the other two sub-layers' output weights set to zero, the train-mode output equalled "
                        "the eval-mode one): apply dropout to each sub-layer's output before the residual sum.")
PASTED_MHA_FAILS = Mistake(
    "pasted_attention_fails", "{module} failed its checks ({layer}), but the culprit is probably earlier: the "
    "MultiHeadAttention you pasted from chapter 3 (the cell under \"Your multi-head attention from chapter 3\") "
    "fails chapter 3's own checks: {earlier} Fix the paste first (with everything it calls).")
PASTED_MHA_MISSING = Mistake(
    "pasted_attention_missing", "{module} failed its checks ({layer}), and MultiHeadAttention is not defined: paste "
    "your chapter-3 MultiHeadAttention (with everything it calls) into the cell under \"Your multi-head attention "
    "from chapter 3\" and run it first.")
PASTED_LAYER_NORM_FAILS = Mistake(
    "pasted_layer_norm_fails", "{module} failed its checks ({layer}), but the culprit is probably earlier: the "
    "LayerNorm you pasted from chapter 5 fails chapter 5's own checks: {earlier} Fix the paste first.")
PASTED_FEED_FORWARD_FAILS = Mistake(
    "pasted_feed_forward_fails", "{module} failed its checks ({layer}), but the culprit is probably earlier: the "
    "FeedForward you pasted from chapter 5 fails chapter 5's own checks: {earlier} Fix the paste first.")
PASTED_LAYERS_MISSING = Mistake(
    "pasted_layers_missing", "{module} failed its checks ({layer}), and {name} is not defined: paste your chapter-5 "
    "LayerNorm, FeedForward, EncoderLayer and Encoder into the cell under \"Your encoder from chapter 5\" and run "
    "it first.")


def _layer_names(params: dict, what: str, prefix: str = "") -> dict:
    """canonical name -> the student's parameter name for one decoder layer (under ``prefix``):
    both attentions and the three norms by the exercise's names, the feed-forward's four
    parameters (under ``ff.``) by their shapes."""
    __tracebackhide__ = True
    fixed = [f"{a}.{n}" for a in ("self_attn", "cross_attn") for n in MHA_PARAMS] + list(_NORMS)
    mine = {n[len(prefix):]: t for n, t in params.items() if n.startswith(prefix)}
    missing = [n for n in fixed if n not in mine]
    rest = {n: t for n, t in mine.items() if n not in fixed}
    layout = ("self_attn and cross_attn (your MultiHeadAttention: q_proj, k_proj, v_proj, out_proj), ff (your "
              "FeedForward), norm1, norm2 and norm3 (your LayerNorm)")
    if missing or len(rest) != 4 or not all(n.startswith("ff.") for n in rest):
        fail(f"{what}'s parameters should be those of {layout}, but they are {sorted(mine)}"
             + (f" (missing: {missing})" if missing else "") + ".", mistake="wrong_parameters")
    d = mine["norm1.weight"].shape[0]
    for n in fixed:
        want = (d, d) if n.endswith("weight") and "_attn." in n else (d,)
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


def _attend(p, which, query, kv, mask, prefix):
    """One attention sub-layer of canonical weights; None where the masks' shapes do not fit."""
    try:
        return mha_loop({n: p[f"{prefix}{which}.{n}"] for n in MHA_PARAMS}, query, kv, kv, _H, mask)[0]
    except RuntimeError:
        return None


def _ln(p, i, t, prefix):
    return torch.nn.functional.layer_norm(t, t.shape[-1:], p[f"{prefix}norm{i}.weight"], p[f"{prefix}norm{i}.bias"],
                                          1e-5)


def _masks_for(kind, tgt_mask, memory_mask):
    """(self-attention mask, cross-attention mask) that a layer making mistake ``kind`` uses;
    RuntimeError where tgt_mask & memory_mask do not broadcast (L_t != L_s)."""
    if kind == "causal_in_cross":
        return tgt_mask, None if tgt_mask is None else tgt_mask if memory_mask is None else tgt_mask & memory_mask
    return {"tgt_mask_ignored": (None, memory_mask), "memory_mask_ignored": (tgt_mask, None),
            "causal_in_cross_only": (tgt_mask, tgt_mask),
            "masks_swapped": (memory_mask, tgt_mask)}.get(kind, (tgt_mask, memory_mask))


def layer_variant(p: dict, x, memory, tgt_mask, memory_mask, norm_first: bool, kind: str = "right",
                  prefix: str = ""):
    """A decoder layer in plain torch (dropout off) from canonical parameters, with one deliberate
    mistake ``kind`` (or none); None where that mistake cannot run on these shapes. Masks: the
    course's convention, True = may attend."""
    try:
        self_mask, cross_mask = _masks_for(kind, tgt_mask, memory_mask)
    except RuntimeError:                       # tgt_mask & memory_mask do not broadcast (L_t != L_s)
        return None
    norms = {"norms_12": (2, 1, 3), "norms_23": (1, 3, 2)}.get(kind, (1, 2, 3))

    def n(i, t):
        return _ln(p, norms[i - 1], t, prefix)

    def sa(t):
        return _attend(p, "self_attn", t, t, self_mask, prefix)

    def ca(t):
        if kind == "kv_from_decoder":
            return _attend(p, "cross_attn", t, t, cross_mask, prefix)
        if kind == "query_from_memory":
            return _attend(p, "cross_attn", memory, t, cross_mask, prefix) if memory.shape == t.shape else None
        mem = n(2, memory) if kind == "memory_normalised" else memory
        return _attend(p, "cross_attn", t, mem, cross_mask, prefix)

    def ff(t):
        return _ff_apply({k: p[prefix + k] for k in _FF_KEYS}, t)

    order = {"cross_first": ("cross", "self", "ff"), "ff_before_cross": ("self", "ff", "cross")}.get(
        kind, ("self", "cross", "ff"))
    subs = {"self": (sa, 1), "cross": (ca, 2), "ff": (ff, 3)}
    pre = norm_first != (kind == "placement_swapped")
    out = x
    for step, name in enumerate(order):
        sub, i = subs[name]
        no_residual = (name == "cross" and kind == "no_cross_residual") or kind == f"no_residual_{name}"
        if pre:
            h = n(i, out)
            s = sub(h)
            if s is None:
                return None
            base = h if kind == "residual_from_normalised" else out
            out = s if no_residual else base + s
        else:
            s = sub(out)
            if s is None:
                return None
            if kind == "norm_before_sum":
                out = out + n(i, s)
            else:
                out = n(i, s if no_residual else out + s)
    return out


_POST, _PRE = "LayerNorm(x + Sublayer(x)) (post-norm)", "x + Sublayer(LayerNorm(x)) (pre-norm)"


def _layer_mistakes(p, x, memory, tgt_mask, memory_mask, norm_first, prefix="") -> dict:
    formula = _PRE if norm_first else _POST
    kinds = {PLACEMENT_SWAPPED.format(norm_first=norm_first, other="post-norm" if norm_first else "pre-norm",
                                      formula=formula): "placement_swapped",
             KV_FROM_DECODER: "kv_from_decoder", QUERY_FROM_MEMORY: "query_from_memory",
             WRONG_ORDER.format(order="cross-attention before self-attention"): "cross_first",
             WRONG_ORDER.format(order="feed-forward before cross-attention"): "ff_before_cross",
             NO_CROSS_RESIDUAL.format(formula=formula): "no_cross_residual",
             NO_RESIDUAL.format(which="self-attention", formula=formula): "no_residual_self",
             NO_RESIDUAL.format(which="feed-forward", formula=formula): "no_residual_ff",
             NORMS_SWAPPED.format(detail="norm1 and norm2 swapped"): "norms_12",
             NORMS_SWAPPED.format(detail="norm2 and norm3 swapped"): "norms_23"}
    if norm_first:
        kinds.update({RESIDUAL_FROM_NORMALISED: "residual_from_normalised", MEMORY_NORMALISED: "memory_normalised"})
    else:
        kinds[NORM_BEFORE_SUM] = "norm_before_sum"
    if tgt_mask is not None:
        kinds.update({TGT_MASK_IGNORED: "tgt_mask_ignored",
                      CAUSAL_IN_CROSS.format(detail=" together with memory_mask"): "causal_in_cross",
                      CAUSAL_IN_CROSS.format(detail=" instead of memory_mask"): "causal_in_cross_only"})
    if memory_mask is not None:
        kinds[MEMORY_MASK_IGNORED] = "memory_mask_ignored"
    if tgt_mask is not None:
        kinds[MASKS_SWAPPED] = "masks_swapped"
    with torch.no_grad():
        return {m: layer_variant(p, x, memory, tgt_mask, memory_mask, norm_first, kind, prefix)
                for m, kind in kinds.items()}


def _torch_layer_params(p: dict, names: dict, to: str = "") -> dict:
    """One layer's weights (``p``: student name -> tensor; ``names``: canonical -> student name)
    named as nn.TransformerDecoderLayer's (under ``to``)."""
    get = {k: p[v] for k, v in names.items()}
    out = packed(get, "self_attn.", f"{to}self_attn.")
    out.update(packed(get, "cross_attn.", f"{to}multihead_attn."))
    out.update({f"{to}linear1.weight": get["ff.w1"], f"{to}linear1.bias": get["ff.b1"],
                f"{to}linear2.weight": get["ff.w2"], f"{to}linear2.bias": get["ff.b2"]})
    out.update({f"{to}{n}": get[n] for n in _NORMS})
    return out


def torch_masks(tgt_mask, memory_mask, b: int, lt: int, ls: int, style: str = "float") -> dict:
    """The course's masks (True = may attend) as keyword arguments of nn.TransformerDecoder(Layer):
    ``tgt_mask`` additive (``style="float"``: 0 allowed, -inf blocked) or boolean with True =
    blocked (``"bool"``), 2-d or (B * heads, L_t, L_t); a (B, 1, L_s) source padding mask as
    ``memory_key_padding_mask`` (True = ignore), any other memory mask as ``memory_mask``."""
    def convert(mask, lk):
        if mask.dim() == 2:
            m = mask
        else:
            m = mask.expand(b, lt, lk)[:, None].expand(b, _H, lt, lk).reshape(b * _H, lt, lk)
        if style == "bool":
            return ~m
        return torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf"))

    kwargs = {}
    if tgt_mask is not None:
        kwargs["tgt_mask"] = convert(tgt_mask, lt)
    if memory_mask is not None:
        if memory_mask.dim() == 3 and memory_mask.shape[:2] == (b, 1):
            kwargs["memory_key_padding_mask"] = ~memory_mask[:, 0]
        else:
            kwargs["memory_mask"] = convert(memory_mask, ls)
    return kwargs


def _typed(kwargs: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in kwargs.items()}


def torch_decoder_layer(p: dict, names: dict, x, memory, tgt_mask, memory_mask, norm_first: bool,
                        style: str = "float"):
    """nn.TransformerDecoderLayer (eval, ReLU, batch_first) with the student's weights ``p``
    (student name -> tensor; gradients flow back to them)."""
    d_ff = p[names["ff.w1"]].shape[0]
    ref = torch.nn.TransformerDecoderLayer(x.shape[-1], _H, d_ff, dropout=0.0, batch_first=True,
                                           norm_first=norm_first).to(device=x.device, dtype=x.dtype).eval()
    kwargs = _typed(torch_masks(tgt_mask, memory_mask, x.shape[0], x.shape[1], memory.shape[1], style), x.dtype)
    with torch.enable_grad():
        return functional_call(ref, _torch_layer_params(p, names), (x, memory), kwargs)


def _layer_module(DecoderLayer, norm_first, device, dtype, seed, dropout=0.1):
    """The student's DecoderLayer(12, 3, 20, dropout, norm_first) holding random weights, in eval
    mode; the weights by the student's names and canonical name -> student name."""
    __tracebackhide__ = True
    what = f"DecoderLayer({_D}, {_H}, {_DFF}, {dropout}, norm_first={norm_first})"
    module = _build(DecoderLayer, (_D, _H, _DFF, dropout), {"norm_first": norm_first}, what)
    names = _layer_names(dict(module.named_parameters()), what)
    return (*_randomised(module, device, dtype, seed, what), names)


def _case(device, dtype=torch.float32, seed=0, lt=5, ls=5, tgt_lengths=(5, 4), src_lengths=(5, 3), masks=True):
    """(x, memory, tgt_mask, memory_mask, label): a batch of 2, the target mask causal with the
    target padding (B, L_t, L_t), the memory mask the source padding (B, 1, L_s)."""
    x = randn(2, lt, _D, seed=seed, device=device, dtype=dtype)
    memory = randn(2, ls, _D, seed=seed + 1, device=device, dtype=dtype)
    if not masks:
        return x, memory, None, None, f"L_t={lt}, L_s={ls}, no masks"
    tgt_mask = causal(lt, device) & padding(list(tgt_lengths), lt, device)
    memory_mask = padding(list(src_lengths), ls, device)
    label = (f"L_t={lt}, L_s={ls}, tgt_mask causal & target padding {tuple(tgt_mask.shape)}, memory_mask source "
             f"padding {tuple(memory_mask.shape)} for source lengths {list(src_lengths)}")
    return x, memory, tgt_mask, memory_mask, label


def _run(module, args, what):
    __tracebackhide__ = True
    x, memory = args[0], args[1]
    got = call(module, *args, what=what)
    if (type(got) is torch.Tensor and memory.shape[1] != x.shape[1] and tuple(got.shape) == tuple(memory.shape)):
        fail(QUERY_FROM_MEMORY)
    return expect_tensor(got, what, shape=x.shape, dtype=x.dtype, device=x.device)


def _canonical(p: dict, names: dict) -> dict:
    return {k: p[v] for k, v in names.items()}


def _check_layer_structure(DecoderLayer, device) -> int:
    __tracebackhide__ = True
    for norm_first in (False, True):
        what = f"DecoderLayer(12, 3, 20, 0.1, norm_first={norm_first})"
        _layer_names(dict(_build(DecoderLayer, (_D, _H, _DFF, 0.1), {"norm_first": norm_first}, what)
                          .named_parameters()), what)
    return 2


def _check_layer_eval_deterministic(DecoderLayer, device) -> int:
    __tracebackhide__ = True
    module, _, _ = _layer_module(DecoderLayer, False, device, torch.float32, seed=400, dropout=0.5)
    return _expect_eval_deterministic(module, _case(device, seed=401)[:4], f"DecoderLayer(12, 3, 20, 0.5) on {device}")


#: (L_t, L_s, masks, tgt_mask 2-d, PyTorch mask style): equal lengths first, where every mask
#: mistake can run (and be named), then the usual L_t != L_s.
_CASES = [(5, 5, False, True, "bool"), (5, 5, True, False, "float"), (4, 6, True, False, "bool")]


def _case_of(device, dtype, seed, lt, ls, masks, two_d):
    x, memory, tgt_mask, memory_mask, label = _case(device, dtype, seed, lt, ls, tgt_lengths=(lt, lt - 1),
                                                    src_lengths=(ls, ls - 2), masks=masks)
    if two_d:
        tgt_mask, label = causal(lt, device), f"L_t={lt}, L_s={ls}, tgt_mask causal ({lt}, {lt}), no memory_mask"
    return x, memory, tgt_mask, memory_mask, label


def _check_layer_against_torch(DecoderLayer, device) -> int:
    """Eval mode, both placements, against nn.TransformerDecoderLayer with the student's weights."""
    __tracebackhide__ = True
    n = 0
    for norm_first in (False, True):
        module, p, names = _layer_module(DecoderLayer, norm_first, device, torch.float32, seed=410 + norm_first)
        for j, (lt, ls, masks, two_d, style) in enumerate(_CASES):
            x, memory, tgt_mask, memory_mask, label = _case_of(device, torch.float32, 420 + j, lt, ls, masks, two_d)
            what = f"DecoderLayer(12, 3, 20, norm_first={norm_first}) in eval mode on {device}, {label}"
            got = _run(module, (x, memory, tgt_mask, memory_mask), what)
            want = torch_decoder_layer(p, names, x, memory, tgt_mask, memory_mask, norm_first, style).detach()
            expect_close(got, want, f"{what} (compared with nn.TransformerDecoderLayer with your weights)",
                         mistakes=_layer_mistakes(_canonical(p, names), x, memory, tgt_mask, memory_mask, norm_first))
            n += 1
    return n


def _expect_grads_like_torch(module, p, names, args, torch_fn, mistakes_fn, what, seed) -> int:
    """float64: the output and its gradients with respect to x, memory and every parameter,
    against autograd through ``torch_fn(p, names, x, memory, tgt_mask, memory_mask)``."""
    __tracebackhide__ = True
    x, memory, tgt_mask, memory_mask = args
    x.requires_grad_()
    memory.requires_grad_()
    got = _run(module, args, what)
    ref = {"x": _leaf(x), "memory": _leaf(memory), **{k: _leaf(t) for k, t in p.items()}}
    want = torch_fn(ref, names, ref["x"], ref["memory"], tgt_mask, memory_mask)
    expect_close(got, want, what, mistakes=mistakes_fn(_canonical(p, names), x.detach(), memory.detach(),
                                                       tgt_mask, memory_mask))
    params = dict(module.named_parameters())
    return 1 + expect_grads_close(got, want, {"x": x, "memory": memory, **{k: params[k] for k in p}}, ref,
                                  f"the output of {what}", seed=seed)


def _check_layer_grads(DecoderLayer, device) -> int:
    """float64, both placements, both masks: gradients with respect to x, memory and every parameter."""
    __tracebackhide__ = True
    n = 0
    for norm_first in (False, True):
        module, p, names = _layer_module(DecoderLayer, norm_first, device, torch.float64, seed=430 + norm_first)
        x, memory, tgt_mask, memory_mask, label = _case(device, torch.float64, 440 + norm_first, lt=4, ls=6,
                                                        tgt_lengths=(4, 2), src_lengths=(6, 3))
        what = f"DecoderLayer(12, 3, 20, norm_first={norm_first}) on {device}, float64, {label}"
        n += _expect_grads_like_torch(
            module, p, names, (x, memory, tgt_mask, memory_mask),
            lambda q, nm, *a, nf=norm_first: torch_decoder_layer(q, nm, *a, nf),
            lambda c, *a, nf=norm_first: _layer_mistakes(c, *a, nf), what, seed=450 + norm_first)
    return n


def _no_peeking(module, what, device) -> int:
    """With a causal tgt_mask and the memory fixed, the target after position t never changes the
    output up to t (t = 0, 2, 4 of 6)."""
    __tracebackhide__ = True
    x = randn(2, 6, _D, seed=460, device=device)
    memory = randn(2, 5, _D, seed=461, device=device)
    mask, memory_mask = causal(6, device), padding([5, 3], 5, device)
    out = _run(module, (x, memory, mask, memory_mask), what)
    for t in (0, 2, 4):
        x2 = x.clone()
        x2[:, t + 1:] = randn(2, 5 - t, _D, seed=462 + t, device=device, scale=3.0)
        out2 = _run(module, (x2, memory, mask, memory_mask), f"{what}, another target after position {t}")
        if not torch.allclose(out2[:, :t + 1], out[:, :t + 1], rtol=1e-4, atol=1e-5):
            fail(PEEKING, what=what, t=t)
    return 3


def _source_padding(module, what, device, every="") -> int:
    """The source's padding positions (other values, three more of them) never change the output."""
    __tracebackhide__ = True
    x = randn(3, 4, _D, seed=470, device=device)
    memory = randn(3, 6, _D, seed=471, device=device)
    lengths = [6, 4, 1]
    tgt_mask = causal(4, device)
    real = padding(lengths, 6, device)[:, 0, :, None]
    junk = randn(3, 9, _D, seed=472, device=device, scale=5.0)
    memory2 = torch.where(real, memory, junk[:, :6])
    memory3 = torch.cat([memory2, junk[:, 6:]], dim=1)
    out1 = _run(module, (x, memory, tgt_mask, padding(lengths, 6, device)), what)
    out2 = _run(module, (x, memory2, tgt_mask, padding(lengths, 6, device)), f"{what}, other values in the padding")
    out3 = _run(module, (x, memory3, tgt_mask, padding(lengths, 9, device)), f"{what}, 3 more padding positions")
    diff = max(float((o - out1).detach().abs().max()) for o in (out2, out3))
    if diff > 1e-4:
        fail(SOURCE_PADDING_LEAKS, what=what, diff=diff, every=every)
    return 2


def _memory_reaches_every_position(module, what, device) -> int:
    """Changing the memory at its last position changes the output at every target position
    (L_t = L_s, no memory mask: a causal mask in the cross-attention would hide it from t < 4)."""
    __tracebackhide__ = True
    x = randn(2, 5, _D, seed=480, device=device)
    memory = randn(2, 5, _D, seed=481, device=device)
    memory2 = memory.clone()
    memory2[:, -1] = randn(2, _D, seed=482, device=device, scale=3.0)
    mask = causal(5, device)
    out = _run(module, (x, memory, mask, None), what)
    out2 = _run(module, (x, memory2, mask, None), f"{what}, another memory at source position 4")
    changed = ((out2 - out).detach().abs().amax(dim=-1) > 1e-5).all(dim=0)
    if not bool(changed.any()):
        fail(MEMORY_IGNORED, what=what)
    if not bool(changed.all()):
        fail(MEMORY_HIDDEN, what=what, src=4, positions=[int(i) for i in torch.nonzero(~changed).flatten()])
    return 1


def _check_layer_properties(DecoderLayer, device) -> int:
    __tracebackhide__ = True
    module, _, _ = _layer_module(DecoderLayer, False, device, torch.float32, seed=490)
    what = f"DecoderLayer(12, 3, 20) in eval mode on {device}"
    return (_memory_reaches_every_position(module, what, device) + _no_peeking(module, what, device)
            + _source_padding(module, what, device))


def _finite_difference(module, args, seed, what, eps=1e-6) -> int:
    """Train mode, float64, fixed seed: the gradient with respect to x along a random direction
    against central differences of the same function (same seed, same dropout masks)."""
    __tracebackhide__ = True
    x, rest = args[0], args[1:]
    w = randn(*x.shape, seed=seed + 1, device=x.device, dtype=x.dtype)
    v = randn(*x.shape, seed=seed + 2, device=x.device, dtype=x.dtype)
    out = _seeded(seed, module, x, *rest, what=what)
    (g,) = grads(expect_tensor(out, what, shape=x.shape), [x], w, what)
    with torch.no_grad():
        plus = _seeded(seed, module, x + eps * v, *rest, what=what)
        minus = _seeded(seed, module, x - eps * v, *rest, what=what)
    expect_close((g * v).sum(), ((plus - minus) * w).sum() / (2 * eps),
                 f"the gradient of {what} along a random direction, compared with finite differences of the same "
                 "function (same seed, same dropout masks)", tol=(1e-5, 1e-7))
    return 1


_PATH_WEIGHTS = {"self-attention": ("self_attn.out_proj.weight", "self_attn.out_proj.bias"),
                 "cross-attention": ("cross_attn.out_proj.weight", "cross_attn.out_proj.bias"),
                 "feed-forward": ("ff.w2", "ff.b2")}


def _check_layer_dropout(DecoderLayer, device) -> int:
    """Train mode: dropout=0 is eval; each sub-layer's path is dropped; a seed fixes the masks; the
    gradient is the derivative of the function the forward computed."""
    __tracebackhide__ = True
    args = _case(device, seed=500)[:4]
    module0, _, _ = _layer_module(DecoderLayer, False, device, torch.float32, seed=501, dropout=0.0)
    n = _expect_rate_zero_is_eval(module0, args, f"DecoderLayer(12, 3, 20, 0.0) on {device}")
    module, p, names = _layer_module(DecoderLayer, False, device, torch.float32, seed=502, dropout=0.3)
    what = f"DecoderLayer(12, 3, 20, 0.3) on {device}"
    for path in _PATH_WEIGHTS:
        silenced = {names[k]: torch.zeros_like(p[names[k]]) for other, keys in _PATH_WEIGHTS.items()
                    if other != path for k in keys}
        _load(module, {**p, **silenced}, what)
        want = _run(module.eval(), args, f"{what} in eval mode")
        n += _expect_dropout_active(module, args, want, what, NO_DROPOUT_ON.format(path=path))
    module.eval()
    module64, _, _ = _layer_module(DecoderLayer, True, device, torch.float64, seed=503, dropout=0.3)
    module64.train()
    x, memory, tgt_mask, memory_mask, _ = _case(device, torch.float64, seed=504)
    x.requires_grad_()
    n += _finite_difference(module64, (x, memory, tgt_mask, memory_mask), 505,
                            f"DecoderLayer(12, 3, 20, 0.3, norm_first=True) in train mode on {device}, float64")
    module64.eval()
    return n


def _blame_earlier(failure: CheckFailure, module: str, pastes: dict) -> None:
    """The layer (or the stack) failed: if a paste it builds on fails its own chapter's checks,
    or is missing, say so."""
    __tracebackhide__ = True
    if failure.mistake == "not_implemented":
        return
    text = str(failure).rstrip(".")
    for name in ("MultiHeadAttention", "LayerNorm", "FeedForward"):
        if pastes.get(name) is None and f"'{name}' is not defined" in str(failure):
            mistake = PASTED_MHA_MISSING if name == "MultiHeadAttention" else PASTED_LAYERS_MISSING
            fail(mistake, module=module, layer=text, name=name)
    from .ch03 import check_multi_head_attention
    from .ch05 import check_feed_forward, check_layer_norm
    for mistake, check, name in ((PASTED_MHA_FAILS, check_multi_head_attention, "MultiHeadAttention"),
                                 (PASTED_LAYER_NORM_FAILS, check_layer_norm, "LayerNorm"),
                                 (PASTED_FEED_FORWARD_FAILS, check_feed_forward, "FeedForward")):
        if pastes.get(name) is not None:
            exc = _quietly(check, pastes[name])
            if exc is not None:
                fail(mistake, layer=text, module=module, earlier=str(exc))


_HINT = ("Use your MultiHeadAttention (pasted from chapter 3), your LayerNorm and your FeedForward (pasted from "
         "chapter 5).")


def check_decoder_layer(DecoderLayer, MultiHeadAttention=None, LayerNorm=None, FeedForward=None) -> None:
    """Visible tests for exercise 1. ``DecoderLayer(d_model, num_heads, d_ff, dropout=0.1,
    norm_first=False)`` with submodules ``self_attn``, ``cross_attn``, ``ff``, ``norm1``, ``norm2``,
    ``norm3``; ``forward(x, memory, tgt_mask=None, memory_mask=None)``: x (B, L_t, d_model),
    memory (B, L_s, d_model), boolean masks with True = may attend, tgt_mask broadcastable to
    (B, L_t, L_t), memory_mask to (B, L_t, L_s) -> (B, L_t, d_model).

    The pasted code it builds on, when given, is checked only if the layer fails, to name it as the
    likely culprit."""
    __tracebackhide__ = True
    forbid_names(DecoderLayer, forbidden.ATTENTION + forbidden.LAYER_NORM + forbidden.TRANSFORMER_LAYERS,
                 "DecoderLayer", _HINT)
    try:
        count = on_devices([_check_layer_structure, _check_layer_eval_deterministic, _check_layer_against_torch,
                            _check_layer_grads, _check_layer_properties, _check_layer_dropout], DecoderLayer)
    except CheckFailure as exc:
        _blame_earlier(exc, "DecoderLayer", {"MultiHeadAttention": MultiHeadAttention, "LayerNorm": LayerNorm,
                                             "FeedForward": FeedForward})
        raise
    passed("DecoderLayer", count)


# --------------------------------------------------------------------------------------------
# Exercise 2: Decoder
# --------------------------------------------------------------------------------------------

SHARED_LAYER = Mistake("one_layer_repeated", "{detail}: the layers share their parameters, so the stack is one "
                       "layer applied {n} times. Create a new DecoderLayer for each position in the stack (a list "
                       "comprehension inside nn.ModuleList); [layer] * n repeats one object.")
LAYERS_NOT_REGISTERED = Mistake("layers_not_registered", "the Decoder has no parameters named layers.0..., so its "
                                "layers are not registered as submodules (a plain Python list hides them from "
                                ".parameters(), .to() and the optimiser): keep them in an nn.ModuleList named "
                                "`layers`.")
WRONG_NUM_LAYERS = Mistake("wrong_number_of_layers", "Decoder({n}, ...) has {got} layers: it should stack num_layers "
                           "= {n} DecoderLayers.")
FINAL_NORM_MISSING = Mistake("final_norm_missing", "a pre-norm stack (norm_first=True) ends with one more LayerNorm, "
                             "named `norm`: the last layer's output is an un-normalised residual sum.")
FINAL_NORM_IN_POST_NORM = Mistake("final_norm_in_post_norm", "a post-norm stack (norm_first=False) has no final norm: "
                                  "its last layer already ends with one. Create `self.norm` only when norm_first is "
                                  "True.")
FINAL_NORM_NOT_APPLIED = Mistake("final_norm_not_applied", "the pre-norm stack's final LayerNorm (self.norm) is not "
                                 "applied to the output of the last layer.")
NOT_CHAINED = Mistake("layers_not_chained", "each layer is applied to the Decoder's input, and only the last result "
                      "is kept: feed each layer's output into the next one (memory stays the same for all).")
LAYERS_REVERSED = Mistake("layers_in_reverse_order", "the layers run in reverse order: layers[0] first.")
NORM_FIRST_NOT_PASSED = Mistake("norm_first_not_passed", "norm_first={norm_first} is not passed on to the layers: "
                                "they compute the {other} layer. Give each DecoderLayer the Decoder's norm_first.")
TGT_MASK_ONLY_FIRST = Mistake("tgt_mask_only_first_layer", "tgt_mask reaches only the first layer: every layer's "
                              "self-attention needs the causal mask, or the later layers peek at the future.")
MEMORY_MASK_ONLY_FIRST = Mistake("memory_mask_only_first_layer", "memory_mask reaches only the first layer: every "
                                 "layer's cross-attention needs the source padding mask.")
DECODER_TGT_MASK_IGNORED = Mistake("decoder_tgt_mask_ignored", "the Decoder does not pass tgt_mask to its layers: "
                                   "call each layer with x, memory, tgt_mask and memory_mask.")
DECODER_MEMORY_MASK_IGNORED = Mistake("decoder_memory_mask_ignored", "the Decoder does not pass memory_mask to its "
                                      "layers: call each layer with x, memory, tgt_mask and memory_mask.")
DECODER_MASKS_SWAPPED = Mistake("decoder_masks_swapped", "the Decoder passes the two masks to its layers in the wrong "
                                "order: layer(x, memory, tgt_mask, memory_mask).")
DECODER_LAYER_FAILS = Mistake(
    "decoder_layer_fails", "Decoder failed its checks ({layer}), but the culprit is probably earlier: your "
    "DecoderLayer fails exercise 1's checks: {earlier} Fix exercise 1 first.")

_STACK_MISTAKES = {"not_registered": LAYERS_NOT_REGISTERED, "wrong_number": WRONG_NUM_LAYERS, "shared": SHARED_LAYER,
                   "final_norm_missing": FINAL_NORM_MISSING, "final_norm_in_post_norm": FINAL_NORM_IN_POST_NORM}


def decoder_variant(p: dict, x, memory, tgt_mask, memory_mask, norm_first: bool, kind: str = "right", n: int = _N):
    """A decoder stack in plain torch from canonical names ``layers.{i}.<canonical>`` and
    ``norm.*``, with one deliberate mistake ``kind`` (or none); None where it cannot run."""
    layer_norm_first = norm_first != (kind == "norm_first_not_passed")
    order = list(range(n))[::-1] if kind == "reversed" else list(range(n))
    layer_kind = {"tgt_mask_ignored": "tgt_mask_ignored", "memory_mask_ignored": "memory_mask_ignored",
                  "masks_swapped": "masks_swapped"}.get(kind, "right")
    out = x
    for j, i in enumerate(order):
        tm = None if kind == "tgt_mask_only_first" and j > 0 else tgt_mask
        mm = None if kind == "memory_mask_only_first" and j > 0 else memory_mask
        out = layer_variant(p, x if kind == "not_chained" else out, memory, tm, mm, layer_norm_first, layer_kind,
                            prefix=f"layers.{i}.")
        if out is None:
            return None
    if norm_first and kind != "final_norm_not_applied":
        out = torch.nn.functional.layer_norm(out, out.shape[-1:], p["norm.weight"], p["norm.bias"], 1e-5)
    return out


def _decoder_mistakes(p, x, memory, tgt_mask, memory_mask, norm_first) -> dict:
    kinds = {NOT_CHAINED: "not_chained", LAYERS_REVERSED: "reversed",
             NORM_FIRST_NOT_PASSED.format(norm_first=norm_first, other="post-norm" if norm_first else "pre-norm"):
             "norm_first_not_passed"}
    if tgt_mask is not None:
        kinds.update({TGT_MASK_ONLY_FIRST: "tgt_mask_only_first", DECODER_TGT_MASK_IGNORED: "tgt_mask_ignored"})
    if memory_mask is not None:
        kinds.update({MEMORY_MASK_ONLY_FIRST: "memory_mask_only_first",
                      DECODER_MEMORY_MASK_IGNORED: "memory_mask_ignored"})
        if tgt_mask is not None:
            kinds[DECODER_MASKS_SWAPPED] = "masks_swapped"
    if norm_first:
        kinds[FINAL_NORM_NOT_APPLIED] = "final_norm_not_applied"
    with torch.no_grad():
        return {m: decoder_variant(p, x, memory, tgt_mask, memory_mask, norm_first, kind)
                for m, kind in kinds.items()}


def _decoder_names(module, norm_first: bool, what: str, n: int = _N) -> dict:
    __tracebackhide__ = True
    return stack_names(module, n, norm_first, what, _layer_names, _STACK_MISTAKES)


def _decoder_module(Decoder, norm_first, device, dtype, seed, dropout=0.1):
    __tracebackhide__ = True
    what = f"Decoder({_N}, {_D}, {_H}, {_DFF}, {dropout}, norm_first={norm_first})"
    module = _build(Decoder, (_N, _D, _H, _DFF, dropout), {"norm_first": norm_first}, what)
    names = _decoder_names(module, norm_first, what)
    return (*_randomised(module, device, dtype, seed, what), names)


def torch_decoder(p: dict, names: dict, x, memory, tgt_mask, memory_mask, norm_first: bool, style: str = "float"):
    """nn.TransformerDecoder (eval) of nn.TransformerDecoderLayer with the student's weights."""
    d_ff = p[names["layers.0.ff.w1"]].shape[0]
    layer = torch.nn.TransformerDecoderLayer(x.shape[-1], _H, d_ff, dropout=0.0, batch_first=True,
                                             norm_first=norm_first)
    norm = torch.nn.LayerNorm(x.shape[-1]) if norm_first else None
    n = len({k.split(".")[1] for k in names if k.startswith("layers.")})
    ref = torch.nn.TransformerDecoder(layer, n, norm=norm).to(device=x.device, dtype=x.dtype).eval()
    weights = {}
    for i in range(n):
        layer_names = {k[len(f"layers.{i}."):]: v for k, v in names.items() if k.startswith(f"layers.{i}.")}
        weights.update(_torch_layer_params(p, layer_names, to=f"layers.{i}."))
    if norm_first:
        weights.update({"norm.weight": p[names["norm.weight"]], "norm.bias": p[names["norm.bias"]]})
    kwargs = _typed(torch_masks(tgt_mask, memory_mask, x.shape[0], x.shape[1], memory.shape[1], style), x.dtype)
    with torch.enable_grad():
        return functional_call(ref, weights, (x, memory), kwargs)


def _check_decoder_structure(Decoder, device) -> int:
    __tracebackhide__ = True
    for norm_first in (False, True):
        what = f"Decoder(3, 12, 3, 20, 0.1, norm_first={norm_first})"
        _decoder_names(_build(Decoder, (_N, _D, _H, _DFF, 0.1), {"norm_first": norm_first}, what), norm_first, what)
    return 2


def _check_decoder_eval_deterministic(Decoder, device) -> int:
    __tracebackhide__ = True
    module, _, _ = _decoder_module(Decoder, True, device, torch.float32, seed=600, dropout=0.5)
    return _expect_eval_deterministic(module, _case(device, seed=601)[:4], f"Decoder(3, 12, 3, 20, 0.5) on {device}")


def _check_decoder_against_torch(Decoder, device) -> int:
    """Eval mode, both placements, against nn.TransformerDecoder with the student's weights."""
    __tracebackhide__ = True
    n = 0
    for norm_first in (False, True):
        module, p, names = _decoder_module(Decoder, norm_first, device, torch.float32, seed=610 + norm_first)
        for j, (lt, ls, masks, two_d, style) in enumerate(_CASES[1:]):
            x, memory, tgt_mask, memory_mask, label = _case_of(device, torch.float32, 620 + j, lt, ls, masks, two_d)
            what = f"Decoder(3, 12, 3, 20, norm_first={norm_first}) in eval mode on {device}, {label}"
            got = _run(module, (x, memory, tgt_mask, memory_mask), what)
            want = torch_decoder(p, names, x, memory, tgt_mask, memory_mask, norm_first, style).detach()
            expect_close(got, want, f"{what} (compared with nn.TransformerDecoder with your weights)",
                         mistakes=_decoder_mistakes(_canonical(p, names), x, memory, tgt_mask, memory_mask,
                                                    norm_first))
            n += 1
    return n


def _check_decoder_grads(Decoder, device) -> int:
    """float64, pre-norm, both masks: gradients with respect to x, memory and every parameter."""
    __tracebackhide__ = True
    module, p, names = _decoder_module(Decoder, True, device, torch.float64, seed=630)
    x, memory, tgt_mask, memory_mask, label = _case(device, torch.float64, 631, lt=4, ls=6, tgt_lengths=(4, 2),
                                                    src_lengths=(6, 3))
    what = f"Decoder(3, 12, 3, 20, norm_first=True) on {device}, float64, {label}"
    return _expect_grads_like_torch(module, p, names, (x, memory, tgt_mask, memory_mask),
                                    lambda q, nm, *a: torch_decoder(q, nm, *a, True),
                                    lambda c, *a: _decoder_mistakes(c, *a, True), what, seed=632)


def _check_decoder_properties(Decoder, device) -> int:
    """No peeking through the whole stack, source padding never matters, the memory reaches every position."""
    __tracebackhide__ = True
    module, _, _ = _decoder_module(Decoder, False, device, torch.float32, seed=640)
    what = f"Decoder(3, 12, 3, 20) in eval mode on {device}"
    return (_memory_reaches_every_position(module, what, device) + _no_peeking(module, what, device)
            + _source_padding(module, what, device, every=" of every layer"))


def _check_decoder_dropout(Decoder, device) -> int:
    """Train mode: the same seed gives the same output, another seed another one."""
    __tracebackhide__ = True
    module, _, _ = _decoder_module(Decoder, False, device, torch.float32, seed=650, dropout=0.3)
    args = _case(device, seed=651)[:4]
    what = f"Decoder(3, 12, 3, 20, 0.3) on {device}"
    want = _run(module, args, f"{what} in eval mode")
    n = _expect_dropout_active(module, args, want, what, fields=dict(
        what=what, p=0.3, where="in every layer: build the layers with the Decoder's dropout"))
    module.eval()
    return n


def check_decoder(Decoder, DecoderLayer=None) -> None:
    """Visible tests for exercise 2. ``Decoder(num_layers, d_model, num_heads, d_ff, dropout=0.1,
    norm_first=False)`` with submodules ``layers`` (nn.ModuleList of DecoderLayer) and, when
    norm_first, ``norm``; ``forward(x, memory, tgt_mask=None, memory_mask=None)`` as
    DecoderLayer's: (B, L_t, d_model) -> (B, L_t, d_model)."""
    __tracebackhide__ = True
    forbid_names(Decoder, forbidden.ATTENTION + forbidden.LAYER_NORM + forbidden.TRANSFORMER_LAYERS, "Decoder",
                 "Stack your DecoderLayer; the final norm of a pre-norm stack is your LayerNorm.")
    try:
        count = on_devices([_check_decoder_structure, _check_decoder_eval_deterministic, _check_decoder_against_torch,
                            _check_decoder_grads, _check_decoder_properties, _check_decoder_dropout], Decoder)
    except CheckFailure as exc:
        if DecoderLayer is not None and exc.mistake != "not_implemented":
            earlier = _quietly(check_decoder_layer, DecoderLayer)
            if earlier is not None:
                fail(DECODER_LAYER_FAILS, layer=str(exc).rstrip("."), earlier=str(earlier))
        raise
    passed("Decoder", count)


# --------------------------------------------------------------------------------------------
# Exercise 3: shift_right and target_mask
# --------------------------------------------------------------------------------------------

DROPS_FIRST = Mistake("shift_drops_wrong_end", "the shift drops the first target token instead of the last: the "
                      "decoder input at position t must be the target token at t - 1 (the start token at t = 0), so "
                      "the first token is kept and the last one falls off the end.")
SHIFTED_LEFT = Mistake("shifted_left", "the sequence is shifted to the left, with the start token at the end: shift "
                       "it to the right, the start token first.")
NO_START = Mistake("start_token_missing", "{detail}: the decoder input starts with start_id, then the target "
                   "without its last token, the same length as the target.")
PAD_NOT_KEPT = Mistake("padding_not_kept", "where the target is padding, the decoder input must be padding too "
                       "(pad_id): your input still holds the last real target token (usually the end-of-sequence "
                       "token) at the first padding position.")
IDS_SWAPPED = Mistake("start_and_pad_swapped", "start_id and pad_id are swapped: the argument order is "
                      "shift_right(tgt, start_id, pad_id).")
MODIFIES_INPUT = Mistake("modifies_target_in_place", "shift_right changed the tensor it was given (tgt): build a new "
                         "tensor (torch.full_like, torch.cat, .clone()) instead of writing into tgt.")
MASK_NOT_CAUSAL = Mistake("target_mask_not_causal", "the target mask has the padding but no causal part: query i "
                          "may attend only to keys j <= i.")
MASK_NO_PADDING = Mistake("target_mask_ignores_padding", "the target mask is causal but lets queries attend to "
                          "padding keys: combine it (&) with a padding mask on the keys, tgt_in != pad_id.")
MASK_FUTURE = Mistake("target_mask_transposed", "the causal part is transposed: query i may attend to keys j >= i "
                      "(the future). It must be j <= i, the lower triangle.")
MASK_PAD_QUERIES = Mistake("target_mask_pads_queries", "the padding part masks the rows (queries) instead of the "
                           "columns (keys): what must never be attended to is a padding key, mask[b, i, j] False "
                           "where tgt_in[b, j] is padding.")
MASK_PAD_INVERTED = Mistake("target_mask_padding_inverted", "the padding part is inverted: True (may attend) must be "
                            "where the key is a real token, tgt_in != pad_id.")


def _targets(device, seed, start=11, pad=10, lengths=(6, 4, 1, 5), length=6):
    """Targets (B, L) of random tokens 0..9 followed by padding, as int64."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 10, (len(lengths), length), generator=g)
    real = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return tokens.masked_fill(~real, pad).to(device), start, pad


def _shift_expected(tgt, start, pad):
    first = torch.full_like(tgt[:, :1], start)
    return torch.cat([first, tgt[:, :-1]], dim=1).masked_fill(tgt == pad, pad)


def _shift_mistakes(tgt, start, pad) -> list:
    """(Mistake, what it gives) pairs: several outputs may share one mistake."""
    first = torch.full_like(tgt[:, :1], start)
    pads = torch.full_like(first, pad)
    keep = tgt == pad
    return [(DROPS_FIRST, torch.cat([first, tgt[:, 1:]], 1).masked_fill(keep, pad)),
            (DROPS_FIRST, torch.cat([first, tgt[:, 1:]], 1)),
            (SHIFTED_LEFT, torch.cat([tgt[:, 1:], first], 1)),
            (SHIFTED_LEFT, torch.cat([tgt[:, 1:], first], 1).masked_fill(keep, pad)),
            (NO_START.format(detail="the first position holds pad_id instead of start_id"),
             torch.cat([pads, tgt[:, :-1]], 1).masked_fill(keep, pad)),
            (PAD_NOT_KEPT, torch.cat([first, tgt[:, :-1]], 1)),
            (IDS_SWAPPED, torch.cat([pads, tgt[:, :-1]], 1))]


def _check_shift_values(shift_right, device) -> int:
    """Against torch.cat([start, tgt[:, :-1]]) with padding kept, for two pairs of ids and L = 1."""
    __tracebackhide__ = True
    n = 0
    for seed, (start, pad), lengths, length in ((700, (11, 10), (6, 4, 1, 5), 6), (701, (1, 0), (3, 2), 3),
                                                (702, (2, 0), (1, 1), 1)):
        tgt, start, pad = _targets(device, seed, start, pad, lengths, length)
        before = tgt.clone()
        what = f"shift_right(tgt, start_id={start}, pad_id={pad}) on {device} for tgt = {tgt.tolist()}"
        got = call(shift_right, tgt, start, pad, what=what)
        if not torch.equal(tgt, before):
            fail(MODIFIES_INPUT)
        if type(got) is torch.Tensor and tuple(got.shape) == (tgt.shape[0], tgt.shape[1] - 1):
            fail(NO_START, detail=f"{what} has shape {tuple(got.shape)}: the start token is missing")
        if type(got) is torch.Tensor and tuple(got.shape) == (tgt.shape[0], tgt.shape[1] + 1):
            fail(NO_START, detail=f"{what} has shape {tuple(got.shape)}: the start token was prepended but the "
                 "last token not dropped")
        expect_tensor(got, what, shape=tgt.shape, dtype=tgt.dtype, device=device)
        want = _shift_expected(tgt, start, pad)
        if not torch.equal(got, want):
            for mistake, wrong in _shift_mistakes(tgt, start, pad):
                if torch.equal(got, wrong):
                    fail(f"{what} is wrong: {mistake.message}", mistake=mistake.id)
            fail(f"{what} is {got.tolist()}, expected {want.tolist()}.", mistake="values_differ")
        n += 1
    return n


def _mask_expected(tgt_in, pad):
    return causal(tgt_in.shape[1], tgt_in.device) & (tgt_in != pad)[:, None, :]


def _check_target_mask(target_mask, device) -> int:
    """Causal & key padding, (B, L, L) boolean; rows of padding queries may also be all False."""
    __tracebackhide__ = True
    n = 0
    for seed, (start, pad), lengths, length in ((710, (11, 10), (6, 4, 1, 5), 6), (711, (1, 0), (2, 3), 3)):
        tgt, _, _ = _targets(device, seed, start, pad, lengths, length)
        tgt_in = _shift_expected(tgt, start, pad)
        what = f"target_mask(tgt_in, pad_id={pad}) on {device} for tgt_in = {tgt_in.tolist()}"
        got = expect_mask_tensor(call(target_mask, tgt_in, pad, what=what), what, (len(lengths), length, length),
                                 device)
        want = _mask_expected(tgt_in, pad)
        real_q = (tgt_in != pad)[:, :, None]
        if torch.equal(got & real_q, want & real_q) and not bool((got & ~real_q & ~want).any()):
            n += 1         # rows of padding queries: as specified, or all False (both are ignored later)
            continue
        b = len(lengths)
        c = causal(length, device).expand(b, length, length)
        keys, queries = (tgt_in != pad)[:, None, :], (tgt_in != pad)[:, :, None]
        expect_mask(got, want, what, {MASK_NOT_CAUSAL: keys.expand(b, length, length),
                                      MASK_NO_PADDING: c, MASK_FUTURE: c.transpose(1, 2) & keys,
                                      MASK_PAD_QUERIES: c & queries, MASK_PAD_INVERTED: c & ~keys})
    return n


def check_decoder_inputs(shift_right, target_mask) -> None:
    """Visible tests for exercise 3. ``shift_right(tgt, start_id, pad_id)``: (B, L) int64 ->
    (B, L), start_id then tgt[:, :-1], pad_id wherever tgt is pad_id. ``target_mask(tgt_in,
    pad_id)``: (B, L) -> (B, L, L) boolean, True where query i may attend key j (j <= i and
    tgt_in[b, j] is not padding)."""
    __tracebackhide__ = True
    passed("shift_right and target_mask", on_devices([_check_shift_values], shift_right)
           + on_devices([_check_target_mask], target_mask))


# --------------------------------------------------------------------------------------------
# Hidden tests: the student's modules against the reference's, weights matched by role
# --------------------------------------------------------------------------------------------

def compare_with_reference_weights(kind: str, student_cls, reference_cls, init_args: tuple, inputs, *, what: str,
                                   init_kwargs: dict | None = None, seeds=(0, 1)) -> int:
    """``kind``: decoder_layer or decoder. Same random weights by role in both modules; outputs
    and gradients (inputs and parameters) compared in eval mode. ``inputs(dtype, device, seed)``
    -> (x, memory, tgt_mask, memory_mask)."""
    __tracebackhide__ = True
    init_kwargs = init_kwargs or {}
    if kind == "decoder_layer":
        def names_of(m, label):
            return _layer_names(dict(m.named_parameters()), label)
    else:
        def names_of(m, label):
            return _decoder_names(m, init_kwargs.get("norm_first", False), label, n=init_args[0])
    return compare_by_role(names_of, student_cls, reference_cls, init_args, inputs, what=what,
                           random_value=_random_value, load=_load, init_kwargs=init_kwargs, seeds=seeds)
