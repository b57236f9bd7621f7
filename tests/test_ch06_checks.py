"""The chapter-6 checks pass correct code written differently and name each common mistake
(asserted by its mistake id); the plain-torch decoder layer and stack they use as mistakes agree
with PyTorch's nn.TransformerDecoderLayer / nn.TransformerDecoder when no mistake is made."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from autograder.checks import ch06
from autograder.checks.ch06 import check_decoder, check_decoder_inputs, check_decoder_layer
from autograder.checks.masks import causal, padding
from autograder.checks.mha import MHA_PARAMS
from checking import FAST, mistake_of
from test_ch05_checks import FFN, LN, MHA, FFNFunctional, FFNNoReLU, LNUnbiased, MHAInvertedMask

pytestmark = pytest.mark.filterwarnings("error")     # a warning in a check would zero a student's cell


# --------------------------------------------------------------------------------------------
# Correct code written differently from the reference
# --------------------------------------------------------------------------------------------

class Layer(nn.Module):
    """A correct decoder layer; mutants override one of its small methods."""
    Attention, Norm, FeedForward = MHA, LN, FFN

    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = type(self).Attention(d_model, num_heads)
        self.cross_attn = type(self).Attention(d_model, num_heads)
        self.ff = type(self).FeedForward(d_model, d_ff, dropout)
        self.norm1, self.norm2, self.norm3 = (type(self).Norm(d_model) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def sa(self, x, mask):
        return self.drop(self.self_attn(x, x, x, mask)[0])

    def ca(self, x, memory, mask):
        return self.drop(self.cross_attn(x, memory, memory, mask)[0])

    def feed(self, x):
        return self.drop(self.ff(x))

    def post(self, x, memory, tgt_mask, memory_mask):
        x = self.norm1(x + self.sa(x, tgt_mask))
        x = self.norm2(x + self.ca(x, memory, memory_mask))
        return self.norm3(x + self.feed(x))

    def pre(self, x, memory, tgt_mask, memory_mask):
        x = x + self.sa(self.norm1(x), tgt_mask)
        x = x + self.ca(self.norm2(x), memory, memory_mask)
        return x + self.feed(self.norm3(x))

    def forward(self, x, memory, tgt_mask=None, memory_mask=None):
        return (self.pre if self.norm_first else self.post)(x, memory, tgt_mask, memory_mask)


class LayerSublayers(nn.Module):
    """A list of (sub-layer, norm) pairs and one residual helper; functional FFN; keyword masks."""

    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.pre = norm_first
        self.self_attn, self.cross_attn = MHA(d_model, num_heads), MHA(d_model, num_heads)
        self.ff = FFNFunctional(d_model, d_ff, dropout)
        self.norm1, self.norm2, self.norm3 = LN(d_model), LN(d_model), LN(d_model)
        self.dropouts = nn.ModuleList(nn.Dropout(dropout) for _ in range(3))

    def forward(self, x, memory, tgt_mask=None, memory_mask=None):
        steps = [(lambda h: self.self_attn(h, h, h, mask=tgt_mask)[0], self.norm1),
                 (lambda h: self.cross_attn(query=h, key=memory, value=memory, mask=memory_mask)[0], self.norm2),
                 (self.ff, self.norm3)]
        for (sub, norm), drop in zip(steps, self.dropouts):
            x = x + drop(sub(norm(x))) if self.pre else norm(x + drop(sub(x)))
        return x


class Stack(nn.Module):
    """A correct decoder; mutants override make_layers or forward."""
    LayerClass = Layer

    def __init__(self, num_layers, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.layers = self.make_layers(num_layers, d_model, num_heads, d_ff, dropout, norm_first)
        if norm_first:
            self.norm = LN(d_model)
        self.norm_first = norm_first

    def make_layers(self, n, *args):
        return nn.ModuleList(type(self).LayerClass(*args) for _ in range(n))

    def finish(self, x):
        return self.norm(x) if self.norm_first else x

    def forward(self, x, memory, tgt_mask=None, memory_mask=None):
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask)
        return self.finish(x)


class StackDeepcopy(Stack):
    def make_layers(self, n, *args):
        layer = LayerSublayers(*args)
        return nn.ModuleList(copy.deepcopy(layer) for _ in range(n))


class StackSequential(Stack):
    def make_layers(self, n, *args):
        return nn.Sequential(*(Layer(*args) for _ in range(n)))

    def forward(self, x, memory, tgt_mask=None, memory_mask=None):
        out = x
        for i in range(len(self.layers)):
            out = self.layers[i](out, memory, tgt_mask, memory_mask)
        return self.finish(out)


def test_correct_layers_pass(capsys):
    check_decoder_layer(Layer)
    check_decoder_layer(LayerSublayers, MHA, LN, FFNFunctional)
    assert capsys.readouterr().out.count("DecoderLayer: all") == 2


@pytest.mark.parametrize("cls", [Stack, StackDeepcopy, StackSequential])
def test_correct_decoders_pass(cls, capsys):
    check_decoder(cls, Layer)
    assert "Decoder: all" in capsys.readouterr().out


def shift_cat(tgt, start_id, pad_id):
    start = torch.full_like(tgt[:, :1], start_id)
    return torch.cat([start, tgt[:, :-1]], 1).masked_fill(tgt == pad_id, pad_id)


def shift_roll(tgt, start_id, pad_id):
    out = torch.roll(tgt, 1, dims=1)
    out[:, 0] = start_id
    out[tgt == pad_id] = pad_id
    return out


def shift_loop(tgt, start_id, pad_id):
    out = tgt.clone()
    for t in range(tgt.shape[1] - 1, 0, -1):
        out[:, t] = tgt[:, t - 1]
    out[:, 0] = start_id
    return torch.where(tgt.eq(pad_id), torch.full_like(tgt, pad_id), out)


def mask_tril(tgt_in, pad_id):
    n = tgt_in.shape[1]
    return torch.ones(n, n, dtype=torch.bool, device=tgt_in.device).tril() & (tgt_in != pad_id).unsqueeze(1)


def mask_both_sides(tgt_in, pad_id):
    """Also blanks the rows of padding queries: ignored later, so accepted."""
    real = tgt_in != pad_id
    return mask_tril(tgt_in, pad_id) & real[:, :, None]


@pytest.mark.parametrize("shift", [shift_cat, shift_roll, shift_loop])
@pytest.mark.parametrize("mask", [mask_tril, mask_both_sides])
def test_correct_inputs_pass(shift, mask, capsys):
    check_decoder_inputs(shift, mask)
    assert "all" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# DecoderLayer mutants
# --------------------------------------------------------------------------------------------

def layer_mutant(**methods):
    return type("Mutant", (Layer,), methods)


def _post(s, x, memory, tm, mm, *, self_mask="tgt", cross_mask="memory", kv="memory", order="sc", cross_res=True,
          norms=(1, 2, 3)):
    masks = {"tgt": tm, "memory": mm, "none": None}
    if cross_mask == "both":
        masks["both"] = None if tm is None else (tm if mm is None else tm & mm)
    n = [getattr(s, f"norm{i}") for i in norms]

    def cross(h):
        return s.ca(h, h if kv == "decoder" else memory, masks[cross_mask])

    if order == "cs":
        x = n[1](x + cross(x))
        x = n[0](x + s.sa(x, masks[self_mask]))
        return n[2](x + s.feed(x))
    x = n[0](x + s.sa(x, masks[self_mask]))
    if order == "fc":
        x = n[2](x + s.feed(x))
        return n[1](x + cross(x))
    x = n[1](x + cross(x)) if cross_res else n[1](cross(x))
    return n[2](x + s.feed(x))


def post_mutant(**kw):
    return layer_mutant(post=lambda s, x, memory, tm, mm: _post(s, x, memory, tm, mm, **kw))


class LayerQueryFromMemory(Layer):
    def ca(self, x, memory, mask):
        return self.drop(self.cross_attn(memory, x, x, mask)[0])


class LayerMemoryNormalised(Layer):
    def pre(self, x, memory, tgt_mask, memory_mask):
        x = x + self.sa(self.norm1(x), tgt_mask)
        x = x + self.ca(self.norm2(x), self.norm2(memory), memory_mask)
        return x + self.feed(self.norm3(x))


class LayerResidualFromNormalised(Layer):
    def pre(self, x, memory, tgt_mask, memory_mask):
        h = self.norm1(x)
        x = h + self.sa(h, tgt_mask)
        h = self.norm2(x)
        x = h + self.ca(h, memory, memory_mask)
        h = self.norm3(x)
        return h + self.feed(h)


class LayerNoFFResidual(Layer):
    def post(self, x, memory, tgt_mask, memory_mask):
        x = self.norm1(x + self.sa(x, tgt_mask))
        x = self.norm2(x + self.ca(x, memory, memory_mask))
        return self.norm3(self.feed(x))


class LayerNormBeforeSum(Layer):
    def post(self, x, memory, tgt_mask, memory_mask):
        x = x + self.norm1(self.sa(x, tgt_mask))
        x = x + self.norm2(self.ca(x, memory, memory_mask))
        return x + self.norm3(self.feed(x))


class LayerAlwaysPostNorm(Layer):
    def forward(self, x, memory, tgt_mask=None, memory_mask=None):
        return self.post(x, memory, tgt_mask, memory_mask)


class LayerNoCrossDropout(Layer):
    def ca(self, x, memory, mask):
        return self.cross_attn(x, memory, memory, mask)[0]


class LayerDropoutAlwaysOn(Layer):
    def feed(self, x):
        return F.dropout(self.ff(x), 0.1, training=True)


class LayerNumpyDropout(Layer):
    def feed(self, x):
        out = self.ff(x)
        if not self.training:
            return out
        keep = torch.from_numpy(np.random.rand(*out.shape) > self.drop.p).to(out)
        return out * keep / (1 - self.drop.p)


class LayerFixedRate(Layer):
    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__(d_model, num_heads, d_ff, 0.1, norm_first)


class LayerTorchDecoder(Layer):
    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__(d_model, num_heads, d_ff, dropout, norm_first)
        self.helper = nn.TransformerDecoderLayer(d_model, num_heads, d_ff, batch_first=True)


class LayerPyTorchNames(Layer):
    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__(d_model, num_heads, d_ff, dropout, norm_first)
        self.multihead_attn = self.cross_attn
        del self.cross_attn


@pytest.mark.parametrize("cls, mistake", [
    (post_mutant(kv="decoder"), "cross_attention_reads_decoder"),
    (LayerQueryFromMemory, "cross_attention_roles_swapped"),
    (post_mutant(self_mask="none"), "causal_mask_missing"),
    (post_mutant(cross_mask="both"), "causal_mask_in_cross_attention"),
    (post_mutant(cross_mask="tgt"), "causal_mask_in_cross_attention"),
    (post_mutant(self_mask="memory", cross_mask="tgt"), "masks_swapped"),
    (post_mutant(cross_mask="none"), "memory_mask_not_passed"),
    (post_mutant(order="cs"), "sublayers_in_wrong_order"),
    (post_mutant(order="fc"), "sublayers_in_wrong_order"),
    (post_mutant(cross_res=False), "no_residual_around_cross_attention"),
    (LayerNoFFResidual, "no_residual"),
    (post_mutant(norms=(2, 1, 3)), "norms_swapped"),
    (post_mutant(norms=(1, 3, 2)), "norms_swapped"),
    (LayerNormBeforeSum, "norm_before_residual_sum"),
    (LayerAlwaysPostNorm, "norm_placement_swapped"),
    (LayerResidualFromNormalised, "residual_from_normalised_input"),
    (LayerMemoryNormalised, "memory_normalised"),
    (LayerNoCrossDropout, "sublayer_output_not_dropped"),
    (LayerDropoutAlwaysOn, "dropout_in_eval_mode"),
    (LayerNumpyDropout, "dropout_not_reproducible"),
    (LayerFixedRate, "dropout_rate_ignored"),
    (LayerTorchDecoder, "forbidden:TransformerDecoderLayer"),
    (LayerPyTorchNames, "wrong_parameters"),
])
def test_decoder_layer_mutants(cls, mistake):
    assert mistake_of(check_decoder_layer, cls) == mistake


def test_the_properties_name_what_they_see():
    """No peeking, source padding, the memory reaching every position: run directly (the comparison
    with PyTorch names these mutants first)."""
    what = "a mutant"
    for cls, check, mistake in [
            (post_mutant(self_mask="none"), ch06._no_peeking, "peeks_at_the_future"),
            (post_mutant(cross_mask="none"), ch06._source_padding, "source_padding_changes_output"),
            (post_mutant(kv="decoder"), ch06._memory_reaches_every_position, "memory_ignored"),
            (post_mutant(cross_mask="both"), ch06._memory_reaches_every_position,
             "memory_hidden_from_early_positions")]:
        module = cls(ch06._D, ch06._H, ch06._DFF).eval()
        assert mistake_of(check, module, what, "cpu") == mistake
    assert ch06._check_layer_properties(Layer, "cpu") == 6


def test_a_buggy_paste_is_named():
    class OnBuggyMHA(Layer):
        Attention = MHAInvertedMask

    class OnBuggyNorm(Layer):
        Norm = LNUnbiased

    class OnBuggyFFN(Layer):
        FeedForward = FFNNoReLU

    assert mistake_of(check_decoder_layer, OnBuggyMHA, MHAInvertedMask, LN, FFN) == "pasted_attention_fails"
    assert mistake_of(check_decoder_layer, OnBuggyNorm, MHA, LNUnbiased, FFN) == "pasted_layer_norm_fails"
    assert mistake_of(check_decoder_layer, OnBuggyFFN, MHA, LN, FFNNoReLU) == "pasted_feed_forward_fails"


def test_a_missing_paste_is_named():
    class NeedsMHA(Layer):
        def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
            super().__init__(d_model, num_heads, d_ff, dropout, norm_first)
            self.cross_attn = MultiHeadAttention(d_model, num_heads)  # noqa: F821 - never pasted

    class NeedsNorm(Layer):
        def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
            super().__init__(d_model, num_heads, d_ff, dropout, norm_first)
            self.norm3 = LayerNorm(d_model)  # noqa: F821 - never pasted

    assert mistake_of(check_decoder_layer, NeedsMHA, None, LN, FFN) == "pasted_attention_missing"
    assert mistake_of(check_decoder_layer, NeedsNorm, MHA, None, FFN) == "pasted_layers_missing"


def test_pastes_are_not_blamed_when_the_layer_passes(capsys):
    check_decoder_layer(Layer, MHAInvertedMask, LNUnbiased, FFNNoReLU)
    assert "DecoderLayer: all" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Decoder mutants
# --------------------------------------------------------------------------------------------

def stack_mutant(**methods):
    return type("Mutant", (Stack,), methods)


def _loop(s, x, memory, tm, mm, *, chain=True, reverse=False, tm_first=False, mm_first=False, swap=False,
          drop_tm=False, drop_mm=False):
    layers = list(s.layers)[::-1] if reverse else list(s.layers)
    out = x
    for i, layer in enumerate(layers):
        t = None if drop_tm or (tm_first and i) else tm
        m = None if drop_mm or (mm_first and i) else mm
        out = layer(out if chain else x, memory, *((m, t) if swap else (t, m)))
    return s.finish(out)


def loop_mutant(**kw):
    return stack_mutant(forward=lambda s, x, memory, tgt_mask=None, memory_mask=None: _loop(
        s, x, memory, tgt_mask, memory_mask, **kw))


class StackRepeated(Stack):
    def make_layers(self, n, *args):
        return nn.ModuleList([Layer(*args)] * n)


class StackPlainList(Stack):
    def make_layers(self, n, *args):
        self.plain = [Layer(*args) for _ in range(n)]
        return None

    def forward(self, x, memory, tgt_mask=None, memory_mask=None):
        for layer in self.plain:
            x = layer(x, memory, tgt_mask, memory_mask)
        return self.finish(x)


class StackOneTooFew(Stack):
    def make_layers(self, n, *args):
        return super().make_layers(n - 1, *args)


class StackNoNorm(Stack):
    def __init__(self, *args, norm_first=False):
        super().__init__(*args, norm_first=False)
        self.norm_first = norm_first

    def finish(self, x):
        return x


class StackNormAlways(Stack):
    def __init__(self, *args, norm_first=False):
        super().__init__(*args, norm_first=norm_first)
        self.norm = LN(self.layers[0].norm1.weight.shape[0])


class StackNormNotApplied(Stack):
    def finish(self, x):
        return x


class StackNormFirstLost(Stack):
    def make_layers(self, n, d_model, num_heads, d_ff, dropout, norm_first):
        return nn.ModuleList(Layer(d_model, num_heads, d_ff, dropout) for _ in range(n))


class StackNoDropout(Stack):
    def make_layers(self, n, d_model, num_heads, d_ff, dropout, norm_first):
        return nn.ModuleList(Layer(d_model, num_heads, d_ff, 0.0, norm_first) for _ in range(n))


class StackTorch(Stack):
    def make_layers(self, n, d_model, num_heads, d_ff, dropout, norm_first):
        self.helper = nn.TransformerDecoder(nn.TransformerDecoderLayer(d_model, num_heads, d_ff), 1)
        return super().make_layers(n, d_model, num_heads, d_ff, dropout, norm_first)


@pytest.mark.parametrize("cls, mistake", [
    (StackRepeated, "one_layer_repeated"),
    (StackPlainList, "layers_not_registered"),
    (StackOneTooFew, "wrong_number_of_layers"),
    (StackNoNorm, "final_norm_missing"),
    (StackNormAlways, "final_norm_in_post_norm"),
    (StackNormNotApplied, "final_norm_not_applied"),
    (StackNormFirstLost, "norm_first_not_passed"),
    (loop_mutant(chain=False), "layers_not_chained"),
    (loop_mutant(reverse=True), "layers_in_reverse_order"),
    (loop_mutant(tm_first=True), "tgt_mask_only_first_layer"),
    (loop_mutant(mm_first=True), "memory_mask_only_first_layer"),
    (loop_mutant(drop_tm=True), "decoder_tgt_mask_ignored"),
    (loop_mutant(drop_mm=True), "decoder_memory_mask_ignored"),
    (loop_mutant(swap=True), "decoder_masks_swapped"),
    (StackNoDropout, "dropout_never_applied"),
    (StackTorch, "forbidden:TransformerDecoder"),
])
def test_decoder_mutants(cls, mistake):
    assert mistake_of(check_decoder, cls) == mistake


def test_a_buggy_layer_is_named_as_the_culprit_of_the_stack():
    class OnBuggyLayer(Stack):
        LayerClass = post_mutant(cross_res=False)

    assert mistake_of(check_decoder, OnBuggyLayer, OnBuggyLayer.LayerClass) == "decoder_layer_fails"
    assert mistake_of(check_decoder, OnBuggyLayer) == "values_differ"


def test_the_stack_properties_name_a_mask_dropped_after_the_first_layer():
    module = loop_mutant(tm_first=True)(ch06._N, ch06._D, ch06._H, ch06._DFF).eval()
    assert mistake_of(ch06._no_peeking, module, "a mutant", "cpu") == "peeks_at_the_future"
    module = loop_mutant(mm_first=True)(ch06._N, ch06._D, ch06._H, ch06._DFF).eval()
    assert mistake_of(ch06._source_padding, module, "a mutant", "cpu") == "source_padding_changes_output"


# --------------------------------------------------------------------------------------------
# shift_right and target_mask mutants
# --------------------------------------------------------------------------------------------

def shift_in_place(tgt, start_id, pad_id):
    pad = tgt == pad_id
    tgt[:, 1:] = tgt[:, :-1].clone()
    tgt[:, 0] = start_id
    return tgt.masked_fill(pad, pad_id)


@pytest.mark.parametrize("shift, mistake", [
    (lambda t, s, p: torch.cat([torch.full_like(t[:, :1], s), t[:, 1:]], 1), "shift_drops_wrong_end"),
    (lambda t, s, p: torch.cat([t[:, 1:], torch.full_like(t[:, :1], s)], 1), "shifted_left"),
    (lambda t, s, p: t[:, :-1].clone(), "start_token_missing"),
    (lambda t, s, p: torch.cat([torch.full_like(t[:, :1], s), t], 1), "start_token_missing"),
    (lambda t, s, p: torch.cat([torch.full_like(t[:, :1], p), t[:, :-1]], 1).masked_fill(t == p, p),
     "start_token_missing"),
    (lambda t, s, p: torch.cat([torch.full_like(t[:, :1], s), t[:, :-1]], 1), "padding_not_kept"),
    (lambda t, s, p: shift_cat(t, p, s), "start_and_pad_swapped"),
    (shift_in_place, "modifies_target_in_place"),
    (lambda t, s, p: shift_cat(t, s, p).float(), "wrong_dtype"),
])
def test_shift_right_mutants(shift, mistake):
    assert mistake_of(check_decoder_inputs, shift, mask_tril) == mistake


def _causal(t):
    return causal(t.shape[1], t.device)


@pytest.mark.parametrize("mask, mistake", [
    (lambda t, p: (t != p)[:, None, :].expand(-1, t.shape[1], -1), "target_mask_not_causal"),
    (lambda t, p: _causal(t).expand(t.shape[0], -1, -1), "target_mask_ignores_padding"),
    (lambda t, p: _causal(t).T & (t != p)[:, None, :], "target_mask_transposed"),
    (lambda t, p: _causal(t) & (t != p)[:, :, None], "target_mask_pads_queries"),
    (lambda t, p: _causal(t) & (t == p)[:, None, :], "target_mask_padding_inverted"),
    (lambda t, p: mask_tril(t, p).int(), "mask_not_bool"),
    (lambda t, p: mask_tril(t, p)[:, None], "wrong_shape"),
])
def test_target_mask_mutants(mask, mistake):
    assert mistake_of(check_decoder_inputs, shift_cat, mask) == mistake


# --------------------------------------------------------------------------------------------
# The plain-torch variants agree with PyTorch; the mistakes are visible
# --------------------------------------------------------------------------------------------

def _random_layer(d, d_ff, seed, prefix=""):
    g = torch.Generator().manual_seed(seed)
    p = {}
    for attn in ("self_attn", "cross_attn"):
        for name in MHA_PARAMS:
            shape = (d, d) if name.endswith("weight") else (d,)
            p[f"{prefix}{attn}.{name}"] = torch.randn(shape, generator=g, dtype=torch.float64) / d ** 0.5
    for key, shape in (("ff.w1", (d_ff, d)), ("ff.b1", (d_ff,)), ("ff.w2", (d, d_ff)), ("ff.b2", (d,))):
        p[prefix + key] = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    for i in (1, 2, 3):
        p[f"{prefix}norm{i}.weight"] = 1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
        p[f"{prefix}norm{i}.bias"] = 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    return p


@FAST
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.booleans(), st.booleans(),
       st.sampled_from(["float", "bool"]), st.integers(0, 2 ** 16))
def test_layer_variant_matches_torch(b, lt, ls, norm_first, masked, style, seed):
    p = _random_layer(ch06._D, 16, seed)
    names = {k: k for k in p}
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, lt, ch06._D, generator=g, dtype=torch.float64)
    memory = torch.randn(b, ls, ch06._D, generator=g, dtype=torch.float64)
    tgt_mask = causal(lt) & padding(torch.randint(1, lt + 1, (b,), generator=g), lt) if masked else causal(lt)
    memory_mask = padding(torch.randint(1, ls + 1, (b,), generator=g), ls) if masked else None
    want = ch06.torch_decoder_layer(p, names, x, memory, tgt_mask, memory_mask, norm_first, style)
    assert torch.allclose(ch06.layer_variant(p, x, memory, tgt_mask, memory_mask, norm_first), want, atol=1e-10)
    for m, wrong in ch06._layer_mistakes(p, x, memory, tgt_mask, memory_mask, norm_first).items():
        if wrong is not None and lt > 1 and ls > 1 and m.id in ("cross_attention_reads_decoder",
                                                                "sublayers_in_wrong_order", "norms_swapped"):
            assert not torch.allclose(wrong, want, atol=1e-6), m.id        # these are visible on any input


@FAST
@given(st.booleans(), st.integers(0, 2 ** 16))
def test_decoder_variant_matches_torch(norm_first, seed):
    p = {}
    for i in range(ch06._N):
        p.update(_random_layer(ch06._D, ch06._DFF, seed + i, prefix=f"layers.{i}."))
    p["norm.weight"], p["norm.bias"] = torch.rand(ch06._D, dtype=torch.float64) + 0.5, torch.randn(ch06._D).double()
    names = {k: k for k in p}
    g = torch.Generator().manual_seed(seed)
    x, memory = torch.randn(2, 5, ch06._D, generator=g).double(), torch.randn(2, 4, ch06._D, generator=g).double()
    tgt_mask, memory_mask = causal(5) & padding([5, 2], 5), padding([4, 1], 4)
    want = ch06.torch_decoder(p, names, x, memory, tgt_mask, memory_mask, norm_first)
    assert torch.allclose(ch06.decoder_variant(p, x, memory, tgt_mask, memory_mask, norm_first), want, atol=1e-10)


def test_every_named_mistake_has_a_mutant_here():
    """The catalogue and this file agree: each chapter-6 id is asserted by some test above."""
    from autograder.checks import catalogue
    source = Path(__file__).read_text()
    missing = [m for m in catalogue.mistakes("ch06_decoder") if f'"{m}"' not in source]
    assert not missing, missing
