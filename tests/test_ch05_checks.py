"""The chapter-5 checks pass correct code written differently and name each common mistake
(asserted by its mistake id); the plain-torch layer and stack they use as mistakes agree with
PyTorch's nn.TransformerEncoderLayer / nn.TransformerEncoder when no mistake is made."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from autograder.checks import ch05
from autograder.checks.ch05 import check_encoder, check_encoder_layer, check_feed_forward, check_layer_norm
from autograder.checks.masks import padding
from autograder.checks.mha import MHA_PARAMS, random_params
from checking import FAST, mistake_of

pytestmark = pytest.mark.filterwarnings("error")     # a warning in a check would zero a student's cell


# --------------------------------------------------------------------------------------------
# Correct code written differently from the reference
# --------------------------------------------------------------------------------------------

class MHA(nn.Module):
    """Chapter 3's module (True = may attend), einsum-based."""

    def __init__(self, d_model, num_heads):
        super().__init__()
        if d_model % num_heads:
            raise ValueError("d_model must be divisible by num_heads")
        self.h = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, query, key, value, mask=None):
        q, k, v = (p(t).unflatten(-1, (self.h, -1)).transpose(1, 2)
                   for p, t in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = logits.masked_fill(~(mask[:, None] if mask.dim() == 3 else mask), float("-inf"))
        w = torch.softmax(logits, -1).nan_to_num(0.0)
        return self.out_proj((w @ v).transpose(1, 2).flatten(-2)), w


class LN(nn.Module):
    def __init__(self, d_model, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def stats(self, x):
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, unbiased=False)
        return mean, var

    def forward(self, x):
        mean, var = self.stats(x)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class LNVar(LN):
    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        return self.weight * (x - mean) / (x.var(-1, keepdim=True, unbiased=False) + self.eps).sqrt() + self.bias


class LNEpsBuffer(nn.Module):
    """eps kept as a buffer, the affine part with addcmul."""

    def __init__(self, d_model, eps=1e-5):
        super().__init__()
        self.register_buffer("eps", torch.tensor(eps))
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        xhat = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        return torch.addcmul(self.bias, xhat, self.weight)


class FFN(nn.Module):
    def __init__(self, d_model, d_ff, dropout=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))

    def forward(self, x):
        return self.net(x)


class FFNFunctional(nn.Module):
    """Functional dropout that follows the mode, clamp for ReLU, dropout after the second layer."""

    def __init__(self, d_model, d_ff, dropout=0.1):
        super().__init__()
        self.up, self.down, self.p = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model), dropout

    def forward(self, x):
        return F.dropout(self.down(self.up(x).clamp(min=0)), self.p, training=self.training)


class Layer(nn.Module):
    """A correct layer; mutants override one of its small methods."""
    Attention, Norm, FeedForward = MHA, LN, FFN

    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = type(self).Attention(d_model, num_heads)
        self.ff = type(self).FeedForward(d_model, d_ff, dropout)
        self.norm1, self.norm2 = type(self).Norm(d_model), type(self).Norm(d_model)
        self.drop = nn.Dropout(dropout)

    def attend(self, x, mask):
        return self.drop(self.self_attn(x, x, x, mask)[0])

    def feed(self, x):
        return self.drop(self.ff(x))

    def post(self, x, mask):
        x = self.norm1(x + self.attend(x, mask))
        return self.norm2(x + self.feed(x))

    def pre(self, x, mask):
        x = x + self.attend(self.norm1(x), mask)
        return x + self.feed(self.norm2(x))

    def forward(self, x, mask=None):
        return self.pre(x, mask) if self.norm_first else self.post(x, mask)


class Stack(nn.Module):
    """A correct encoder; mutants override make_layers or forward."""
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

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask=mask)
        return self.finish(x)


class StackDeepcopy(Stack):
    """The annotated implementation's clones: deep copies of one layer (separate parameters)."""

    def make_layers(self, n, *args):
        layer = Layer(*args)
        return nn.ModuleList(copy.deepcopy(layer) for _ in range(n))


class StackSequential(Stack):
    def make_layers(self, n, *args):
        return nn.Sequential(*(Layer(*args) for _ in range(n)))

    def forward(self, x, mask=None):
        out = x
        for i in range(len(self.layers)):
            out = self.layers[i](out, mask)
        return self.finish(out)


@pytest.mark.parametrize("cls", [LN, LNVar, LNEpsBuffer])
def test_correct_layer_norms_pass(cls, capsys):
    check_layer_norm(cls)
    assert "LayerNorm: all" in capsys.readouterr().out


@pytest.mark.parametrize("cls", [FFN, FFNFunctional])
def test_correct_feed_forwards_pass(cls, capsys):
    check_feed_forward(cls)
    assert "FeedForward: all" in capsys.readouterr().out


class LayerOwnNames(Layer):
    """The functional FFN, extra non-parameter attributes, dropout modules per sub-layer."""
    FeedForward = FFNFunctional

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dropout1, self.dropout2 = nn.Dropout(self.drop.p), nn.Dropout(self.drop.p)

    def attend(self, x, mask):
        return self.dropout1(self.self_attn(x, x, x, mask=mask)[0])

    def feed(self, x):
        return self.dropout2(self.ff(x))


def test_correct_layers_pass(capsys):
    check_encoder_layer(Layer)
    check_encoder_layer(LayerOwnNames, MHA, LN, FFNFunctional)
    assert capsys.readouterr().out.count("EncoderLayer: all") == 2


@pytest.mark.parametrize("cls", [Stack, StackDeepcopy, StackSequential])
def test_correct_encoders_pass(cls, capsys):
    check_encoder(cls, Layer)
    assert "Encoder: all" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# LayerNorm mutants
# --------------------------------------------------------------------------------------------

def ln_mutant(normalise):
    class Mutant(LN):
        def forward(self, x):
            return normalise(self, x)
    return Mutant


def _biased(x, dims=-1):
    return x.var(dims, keepdim=True, unbiased=False)


class LNBadInit(LN):
    def __init__(self, d_model, eps=1e-5):
        super().__init__(d_model, eps)
        self.weight = nn.Parameter(torch.randn(d_model))


class LNGammaBeta(nn.Module):
    def __init__(self, d_model, eps=1e-5):
        super().__init__()
        self.gamma, self.beta, self.eps = nn.Parameter(torch.ones(d_model)), nn.Parameter(torch.zeros(d_model)), eps

    def forward(self, x):
        return LN.forward(self, x)


class LNTorch(LN):
    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class LNModuleInside(LN):
    def forward(self, x):
        return nn.LayerNorm(x.shape[-1]).to(x)(x) * self.weight + self.bias


class LNGroupNorm(LN):
    def forward(self, x):
        flat = x.reshape(-1, 1, x.shape[-1])
        return F.group_norm(flat, 1, eps=self.eps).reshape(x.shape) * self.weight + self.bias


class LNStub(LN):
    def forward(self, x):
        raise NotImplementedError()


def _ln(self, x, *, var=_biased, eps_outside=False, eps=None, dims=-1, affine=True, swap=False):
    mean = x.mean(dims, keepdim=True)
    e = self.eps if eps is None else eps
    denom = var(x, dims).sqrt() + e if eps_outside else (var(x, dims) + e).sqrt()
    xhat = (x - mean) / denom
    if not affine:
        return xhat
    return xhat * self.bias + self.weight if swap else xhat * self.weight + self.bias


@pytest.mark.parametrize("cls, mistake", [
    (ln_mutant(lambda s, x: _ln(s, x, eps_outside=True)), "eps_outside_sqrt"),
    (ln_mutant(lambda s, x: _ln(s, x, var=lambda t, d: t.var(d, keepdim=True))), "unbiased_variance"),
    (ln_mutant(lambda s, x: s.weight * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + s.eps) + s.bias),
     "unbiased_std_eps_outside"),
    (ln_mutant(lambda s, x: _ln(s, x, eps=0.0)), "eps_missing"),
    (ln_mutant(lambda s, x: _ln(s, x, eps=1e-5)), "eps_argument_ignored"),
    (ln_mutant(lambda s, x: _ln(s, x, dims=-2)), "normalised_over_wrong_dim"),
    (ln_mutant(lambda s, x: _ln(s, x, dims=0)), "normalised_over_wrong_dim"),
    (ln_mutant(lambda s, x: _ln(s, x, dims=tuple(range(x.dim())))), "normalised_over_wrong_dim"),
    (ln_mutant(lambda s, x: _ln(s, x, swap=True)), "weight_and_bias_swapped"),
    (ln_mutant(lambda s, x: _ln(s, x, affine=False)), "weight_and_bias_unused"),
    (ln_mutant(lambda s, x: _ln(s, x).detach()), "no_gradient"),
    (LNBadInit, "layer_norm_init"),
    (LNGammaBeta, "wrong_parameters"),
    (LNTorch, "forbidden:layer_norm"),
    (LNModuleInside, "forbidden:LayerNorm"),
    (LNGroupNorm, "forbidden:group_norm"),
    (LNStub, "not_implemented"),
])
def test_layer_norm_mutants(cls, mistake):
    assert mistake_of(check_layer_norm, cls) == mistake


# --------------------------------------------------------------------------------------------
# FeedForward mutants
# --------------------------------------------------------------------------------------------

class FFNBase(nn.Module):
    def __init__(self, d_model, d_ff, dropout=0.1):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.p = dropout


def ffn_mutant(forward):
    return type("Mutant", (FFNBase,), {"forward": forward})


class FFNNumpyDropout(FFNBase):
    def forward(self, x):
        h = torch.relu(self.linear1(x))
        if self.training and self.p > 0:
            keep = torch.from_numpy(np.random.rand(*h.shape) > self.p).to(h)
            h = h * keep / (1 - self.p)
        return self.linear2(h)


class FFNUnscaledDropout(FFNBase):
    def forward(self, x):
        h = torch.relu(self.linear1(x))
        if self.training:
            h = h * (torch.rand_like(h) >= self.p)           # dropped, but the kept ones not scaled up
        return self.linear2(h)


class FFNFixedRate(FFNBase):
    def __init__(self, d_model, d_ff, dropout=0.1):
        super().__init__(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.linear2(self.dropout(torch.relu(self.linear1(x))))


class FFNNoBias(FFNBase):
    def __init__(self, d_model, d_ff, dropout=0.1):
        super().__init__(d_model, d_ff, dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.linear2(torch.relu(self.linear1(x)))


class FFNTorchLayer(FFNBase):
    def forward(self, x):
        return nn.TransformerEncoderLayer(x.shape[-1], 1)(x)


@pytest.mark.parametrize("cls, mistake", [
    (ffn_mutant(lambda s, x: s.linear2(s.dropout(s.linear1(x)))), "relu_missing"),
    (ffn_mutant(lambda s, x: torch.relu(s.linear2(s.dropout(s.linear1(x))))), "relu_in_wrong_place"),
    (ffn_mutant(lambda s, x: torch.relu(s.linear2(s.dropout(torch.relu(s.linear1(x)))))), "relu_in_wrong_place"),
    (ffn_mutant(lambda s, x: s.linear2(s.dropout(s.linear1(torch.relu(x))))), "relu_in_wrong_place"),
    (ffn_mutant(lambda s, x: s.linear2(s.dropout(F.gelu(s.linear1(x))))), "activation_not_relu"),
    (ffn_mutant(lambda s, x: s.linear2(F.dropout(torch.relu(s.linear1(x)), s.p))), "dropout_in_eval_mode"),
    (ffn_mutant(lambda s, x: s.linear2(torch.relu(s.linear1(x)))), "dropout_never_applied"),
    (FFNUnscaledDropout, "dropout_not_rescaled"),
    (ffn_mutant(lambda s, x: s.linear2(s.dropout(torch.relu(s.linear1(x + 0.5 * x.roll(1, dims=-2)))))),
     "mixes_positions"),
    (FFNNumpyDropout, "dropout_not_reproducible"),
    (FFNFixedRate, "dropout_rate_ignored"),
    (FFNNoBias, "wrong_parameters"),
    (FFNTorchLayer, "forbidden:TransformerEncoderLayer"),
    (ffn_mutant(lambda s, x: s.linear2(s.dropout(torch.relu(s.linear1(x)))).detach()), "no_gradient"),
])
def test_feed_forward_mutants(cls, mistake):
    assert mistake_of(check_feed_forward, cls) == mistake


# --------------------------------------------------------------------------------------------
# EncoderLayer mutants
# --------------------------------------------------------------------------------------------

def layer_mutant(**methods):
    return type("Mutant", (Layer,), methods)


class LayerRenamedNorms(Layer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm_a, self.norm_b = self.norm1, self.norm2
        del self.norm1, self.norm2

    def forward(self, x, mask=None):
        x = self.norm_a(x + self.attend(x, mask))
        return self.norm_b(x + self.feed(x))


class LayerTorchNorm(Layer):
    Norm = nn.LayerNorm


class LayerTorchMHA(Layer):
    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__(d_model, num_heads, d_ff, dropout, norm_first)
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)

    def attend(self, x, mask):
        return self.drop(self.self_attn(x, x, x, key_padding_mask=None if mask is None else ~mask[:, 0])[0])


class LayerWrapsTorch(Layer):
    def forward(self, x, mask=None):
        return nn.TransformerEncoderLayer(x.shape[-1], 3, 20, batch_first=True)(x)


class FFNNoDropout(FFN):
    def __init__(self, d_model, d_ff, dropout=0.1):
        super().__init__(d_model, d_ff, 0.0)


class LayerNoFFDropout(Layer):
    FeedForward = FFNNoDropout

    def feed(self, x):
        return self.ff(x)


class LayerFixedDropout(Layer):
    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__(d_model, num_heads, d_ff, 0.1, norm_first)


@pytest.mark.parametrize("cls, mistake", [
    (layer_mutant(forward=lambda s, x, mask=None: s.post(x, mask)), "norm_placement_swapped"),
    (layer_mutant(forward=lambda s, x, mask=None: s.pre(x, mask)), "norm_placement_swapped"),
    (layer_mutant(post=lambda s, x, mask: (lambda y: y + s.norm2(s.feed(y)))(x + s.norm1(s.attend(x, mask)))),
     "norm_before_residual_sum"),
    (layer_mutant(post=lambda s, x, mask: s.norm2(s.feed(s.norm1(s.attend(x, mask))))), "no_residual"),
    (layer_mutant(post=lambda s, x, mask: s.norm2(x + s.feed(s.norm1(x + s.attend(x, mask))))),
     "residual_from_layer_input"),
    (layer_mutant(pre=lambda s, x, mask: (lambda a: (lambda y: s.norm2(y) + s.feed(s.norm2(y)))(a + s.attend(a, mask)))(
        s.norm1(x))), "residual_from_normalised_input"),
    (layer_mutant(post=lambda s, x, mask: s.norm2(s.norm1(x + s.attend(x, mask)) + s.feed(x))),
     "ffn_reads_layer_input"),
    (layer_mutant(post=lambda s, x, mask: (lambda y: s.norm1(y + s.feed(y)))(s.norm2(x + s.attend(x, mask)))),
     "norms_swapped"),
    (layer_mutant(attend=lambda s, x, mask: s.drop(s.self_attn(x, x, x)[0])), "mask_not_passed_to_attention"),
    (layer_mutant(attend=lambda s, x, mask: s.drop(s.self_attn(x, x, x, None if mask is None else ~mask)[0])),
     "mask_inverted"),
    (layer_mutant(feed=lambda s, x: F.dropout(s.ff(x), s.drop.p)), "dropout_in_eval_mode"),
    (layer_mutant(attend=lambda s, x, mask: s.self_attn(x, x, x, mask)[0]), "attention_output_not_dropped"),
    (LayerNoFFDropout, "feed_forward_output_not_dropped"),
    (LayerFixedDropout, "dropout_rate_ignored"),
    (LayerRenamedNorms, "wrong_parameters"),
    (LayerTorchNorm, "forbidden:LayerNorm"),
    (LayerTorchMHA, "forbidden:MultiheadAttention"),
    (LayerWrapsTorch, "forbidden:TransformerEncoderLayer"),
    (layer_mutant(forward=lambda s, x, mask=None: Layer.forward(s, x, mask).detach()), "no_gradient"),
])
def test_encoder_layer_mutants(cls, mistake):
    assert mistake_of(check_encoder_layer, cls) == mistake


def test_padding_invariance_names_an_ignored_mask():
    mutant = layer_mutant(attend=lambda s, x, mask: s.drop(s.self_attn(x, x, x)[0]))
    assert mistake_of(ch05._check_layer_padding, mutant, "cpu") == "padding_changes_real_positions"
    assert ch05._check_layer_padding(Layer, "cpu") == 2


# --------------------------------------------------------------------------------------------
# The code a layer builds on is named as the culprit
# --------------------------------------------------------------------------------------------

class MHAInvertedMask(MHA):
    def forward(self, query, key, value, mask=None):
        return super().forward(query, key, value, None if mask is None else ~mask)


class LNUnbiased(LN):
    def stats(self, x):
        return x.mean(-1, keepdim=True), x.var(-1, keepdim=True)


class FFNNoReLU(FFNBase):
    def forward(self, x):
        return self.linear2(self.dropout(self.linear1(x)))


def test_a_buggy_paste_or_earlier_exercise_is_named():
    class OnBuggyMHA(Layer):
        Attention = MHAInvertedMask

    class OnBuggyNorm(Layer):
        Norm = LNUnbiased

    class OnBuggyFFN(Layer):
        FeedForward = FFNNoReLU

    assert mistake_of(check_encoder_layer, OnBuggyMHA, MHAInvertedMask, LN, FFN) == "pasted_attention_fails"
    assert mistake_of(check_encoder_layer, OnBuggyMHA) == "mask_inverted"          # alone: the layer's own failure
    assert mistake_of(check_encoder_layer, OnBuggyNorm, MHA, LNUnbiased, FFN) == "layer_norm_fails"
    assert mistake_of(check_encoder_layer, OnBuggyFFN, MHA, LN, FFNNoReLU) == "feed_forward_fails"


def test_a_missing_paste_is_named():
    class NeedsPaste(Layer):
        def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
            super().__init__(d_model, num_heads, d_ff, dropout, norm_first)
            self.self_attn = MultiHeadAttention(d_model, num_heads)  # noqa: F821 - never pasted

    assert mistake_of(check_encoder_layer, NeedsPaste, None, LN, FFN) == "pasted_attention_missing"


def test_earlier_code_is_not_blamed_when_the_layer_passes(capsys):
    check_encoder_layer(Layer, MHAInvertedMask, LNUnbiased, FFNNoReLU)
    assert "EncoderLayer: all" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Encoder mutants
# --------------------------------------------------------------------------------------------

def stack_mutant(**methods):
    return type("Mutant", (Stack,), methods)


class StackRepeated(Stack):
    def make_layers(self, n, *args):
        return nn.ModuleList([Layer(*args)] * n)


class StackSharedNorm(Stack):
    def make_layers(self, n, *args):
        layers = nn.ModuleList(Layer(*args) for _ in range(n))
        for layer in layers:
            layer.norm2 = layers[0].norm2
        return layers


class StackPlainList(Stack):
    def make_layers(self, n, *args):
        return [Layer(*args) for _ in range(n)]


class StackOneMore(Stack):
    def make_layers(self, n, *args):
        return super().make_layers(n + 1, *args)


class StackNoFinalNorm(Stack):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm_first = False
        if hasattr(self, "norm"):
            del self.norm


class StackNormAlways(Stack):
    def __init__(self, num_layers, d_model, *args, **kwargs):
        super().__init__(num_layers, d_model, *args, **kwargs)
        self.norm = LN(d_model)


class StackNormNotApplied(Stack):
    def finish(self, x):
        return x


class StackNormFirstNotPassed(Stack):
    def make_layers(self, n, d_model, num_heads, d_ff, dropout, norm_first):
        return nn.ModuleList(Layer(d_model, num_heads, d_ff, dropout) for _ in range(n))


class StackNoDropout(Stack):
    def make_layers(self, n, d_model, num_heads, d_ff, dropout, norm_first):
        return nn.ModuleList(Layer(d_model, num_heads, d_ff, 0.0, norm_first) for _ in range(n))


def _mask_first_only(self, x, mask=None):
    for i, layer in enumerate(self.layers):
        x = layer(x, mask if i == 0 else None)
    return self.finish(x)


def _not_chained(self, x, mask=None):
    out = x
    for layer in self.layers:
        out = layer(x, mask)
    return self.finish(out)


def _reversed(self, x, mask=None):
    for layer in list(self.layers)[::-1]:
        x = layer(x, mask)
    return self.finish(x)


def _no_mask(self, x, mask=None):
    for layer in self.layers:
        x = layer(x)
    return self.finish(x)


def _dropout_always(self, x, mask=None):
    return F.dropout(Stack.forward(self, x, mask), 0.1)


class StackTorchNorm(Stack):
    def finish(self, x):
        return F.layer_norm(x, x.shape[-1:], self.norm.weight, self.norm.bias) if self.norm_first else x


@pytest.mark.parametrize("cls, mistake", [
    (StackRepeated, "one_layer_repeated"),
    (StackSharedNorm, "one_layer_repeated"),
    (StackPlainList, "layers_not_registered"),
    (StackOneMore, "wrong_number_of_layers"),
    (StackNoFinalNorm, "final_norm_missing"),
    (StackNormAlways, "final_norm_in_post_norm"),
    (StackNormNotApplied, "final_norm_not_applied"),
    (StackNormFirstNotPassed, "norm_first_not_passed"),
    (stack_mutant(forward=_mask_first_only), "mask_dropped_after_first_layer"),
    (stack_mutant(forward=_no_mask), "encoder_mask_ignored"),
    (stack_mutant(forward=_not_chained), "layers_not_chained"),
    (stack_mutant(forward=_reversed), "layers_in_reverse_order"),
    (stack_mutant(forward=_dropout_always), "dropout_in_eval_mode"),
    (StackNoDropout, "dropout_never_applied"),
    (StackTorchNorm, "forbidden:layer_norm"),
])
def test_encoder_mutants(cls, mistake):
    assert mistake_of(check_encoder, cls) == mistake


def test_a_buggy_layer_is_named_as_the_culprit_of_the_stack():
    class BuggyLayer(Layer):
        def forward(self, x, mask=None):
            return self.post(x, None)

    class OnBuggyLayer(Stack):
        LayerClass = BuggyLayer

    assert mistake_of(check_encoder, OnBuggyLayer, BuggyLayer) == "encoder_layer_fails"
    assert mistake_of(check_encoder, OnBuggyLayer) == "encoder_mask_ignored"


def test_padding_invariance_of_the_stack_names_a_mask_dropped_after_the_first_layer():
    assert mistake_of(ch05._check_encoder_padding, stack_mutant(forward=_mask_first_only), "cpu") \
        == "padding_changes_real_positions"


# --------------------------------------------------------------------------------------------
# The checks' own plain-torch helpers agree with PyTorch
# --------------------------------------------------------------------------------------------

def _random_layer(d, d_ff, seed, prefix=""):
    p = {f"{prefix}self_attn.{k}": v for k, v in random_params(d, seed, "cpu", torch.float64).items()}
    g = torch.Generator().manual_seed(seed)
    for key, shape in (("ff.w1", (d_ff, d)), ("ff.b1", (d_ff,)), ("ff.w2", (d, d_ff)), ("ff.b2", (d,)),
                       ("norm1.weight", (d,)), ("norm1.bias", (d,)), ("norm2.weight", (d,)), ("norm2.bias", (d,))):
        p[prefix + key] = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3 + (key.endswith("weight") and
                                                                                        "norm" in key)
    return p


@FAST
@given(st.integers(1, 3), st.integers(1, 6), st.booleans(), st.booleans(), st.integers(0, 2 ** 16))
def test_layer_variant_matches_torch(b, length, norm_first, masked, seed):
    p = _random_layer(ch05._D, 16, seed)
    names = {k: k for k in p}
    x = torch.randn(b, length, ch05._D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (b,), generator=torch.Generator().manual_seed(seed + 1))
    mask = padding(lengths, length) if masked else None
    want = ch05.torch_encoder_layer(p, names, x, mask, norm_first, 16)
    assert torch.allclose(ch05.layer_variant(p, x, mask, ch05._H, norm_first), want, atol=1e-10)
    for m, wrong in ch05._layer_mistakes(p, x, mask, norm_first).items():
        if wrong is not None and m.id != "mask_inverted" and not (m.id == "mask_not_passed_to_attention"
                                                                  and bool(mask.all())):
            assert not torch.allclose(wrong, want, atol=1e-6), m.id        # every mistake is visible here


@FAST
@given(st.booleans(), st.integers(0, 2 ** 16))
def test_encoder_variant_matches_torch(norm_first, seed):
    p = {}
    for i in range(ch05._N):
        p.update(_random_layer(ch05._D, ch05._DFF, seed + i, prefix=f"layers.{i}."))
    p["norm.weight"], p["norm.bias"] = torch.rand(ch05._D, dtype=torch.float64) + 0.5, torch.randn(ch05._D).double()
    names = {k: k for k in p}
    x = torch.randn(2, 5, ch05._D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mask = padding([5, 2], 5)
    want = ch05.torch_encoder(p, names, x, mask, norm_first)
    assert torch.allclose(ch05.encoder_variant(p, x, mask, norm_first), want, atol=1e-10)


@FAST
@given(st.integers(1, 4), st.integers(2, 9), st.integers(0, 2 ** 16))
def test_layer_norm_mistakes_differ_from_the_right_answer(rows, d, seed):
    x = ch05._ln_inputs((rows, 3, d), seed, "cpu", torch.float64)
    w, b = torch.rand(d, dtype=torch.float64) + 0.5, torch.randn(d, dtype=torch.float64)
    want = F.layer_norm(x, (d,), w, b, 1e-5)
    assert torch.allclose(ch05._ln_variant(x, w, b, 1e-5), want, atol=1e-9)
    for m, wrong in ch05._ln_mistakes(x, w, b, 1e-5).items():
        if wrong is not None and m.id not in ("eps_outside_sqrt", "unbiased_std_eps_outside", "eps_missing"):
            assert not torch.allclose(wrong, want), m.id


def test_every_named_mistake_has_a_mutant_here():
    """The catalogue and this file agree: each chapter-5 id is asserted by some test above."""
    from autograder.checks import catalogue
    source = Path(__file__).read_text()
    missing = [m for m in catalogue.mistakes("ch05_encoder") if f'"{m}"' not in source]
    assert not missing, missing
