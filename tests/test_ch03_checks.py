"""The chapter-3 checks pass correct code written differently and name each common mistake
(asserted by its mistake id); the plain-torch multi-head attention (autograder.checks.mha) agrees
with itself and with PyTorch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from autograder.checks import mha, scan
from autograder.checks.ch03 import check_multi_head_attention, check_split_merge
from checking import SandboxError, mistake_of


# --------------------------------------------------------------------------------------------
# A correct solution written differently from the reference (unflatten/permute, einsum)
# --------------------------------------------------------------------------------------------

def good_split(x, num_heads):
    return x.unflatten(-1, (num_heads, -1)).permute(0, 2, 1, 3)


def good_merge(x):
    return x.permute(0, 2, 1, 3).flatten(-2)


def my_attention(q, k, v, mask=None):
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    w = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", w, v), w


class GoodMHA(nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of num_heads={num_heads}")
        self.h = num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def heads(self, query, key, value):
        return (good_split(self.q_proj(query), self.h), good_split(self.k_proj(key), self.h),
                good_split(self.v_proj(value), self.h))

    def prepare_mask(self, mask):
        return mask[:, None] if mask is not None and mask.dim() == 3 else mask

    def attend(self, q, k, v, mask):
        return my_attention(q, k, v, mask)

    def finish(self, o):
        return self.out_proj(good_merge(o))

    def forward(self, query, key, value, mask=None):
        q, k, v = self.heads(query, key, value)
        o, w = self.attend(q, k, v, self.prepare_mask(mask))
        return self.finish(o), w


def test_correct_split_merge_passes(capsys):
    check_split_merge(good_split, good_merge)
    assert "all" in capsys.readouterr().out


def test_correct_mha_passes(capsys):
    check_multi_head_attention(GoodMHA)
    assert "MultiHeadAttention: all" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# split / merge mutants
# --------------------------------------------------------------------------------------------

def split_no_transpose(x, num_heads):
    b, length, d = x.shape
    return x.reshape(b, num_heads, length, d // num_heads)


def merge_no_transpose(x):
    b, h, length, d_k = x.shape
    return x.reshape(b, length, h * d_k)


def split_interleaved(x, num_heads):
    b, length, d = x.shape
    return x.reshape(b, length, d // num_heads, num_heads).permute(0, 3, 1, 2)


def merge_view(x):
    b, h, length, d_k = x.shape
    return x.transpose(1, 2).view(b, length, h * d_k)


def split_stub(x, num_heads):
    raise NotImplementedError()


def split_detached(x, num_heads):
    return good_split(x, num_heads).detach()


def merge_interleaved(x):
    return x.permute(0, 2, 3, 1).flatten(-2)


def split_last_head_wrong(x, num_heads):
    s = good_split(x, num_heads).clone()
    s[:, -1] = s[:, -1].flip(-1)
    return s


def merge_drops_a_value(x):
    m = good_merge(x).clone()
    m[..., 0] = 0.0
    return m


@pytest.mark.parametrize("split, merge, mistake", [
    (split_no_transpose, good_merge, "split_without_transpose"),
    (good_split, merge_no_transpose, "merge_without_transpose"),
    (split_interleaved, good_merge, "split_interleaved"),
    (good_split, merge_interleaved, "merge_interleaved"),
    (good_split, merge_view, "raised"),           # view() of a non-contiguous tensor
    (split_stub, good_merge, "not_implemented"),
    (split_detached, good_merge, "no_gradient"),
    (split_last_head_wrong, good_merge, "values_differ"),
    (good_split, merge_drops_a_value, "values_differ"),
])
def test_split_merge_mutants(split, merge, mistake):
    assert mistake_of(check_split_merge, split, merge) == mistake


# --------------------------------------------------------------------------------------------
# MultiHeadAttention mutants
# --------------------------------------------------------------------------------------------

class SplitNoTranspose(GoodMHA):
    def heads(self, query, key, value):
        return (split_no_transpose(self.q_proj(query), self.h),
                split_no_transpose(self.k_proj(key), self.h),
                split_no_transpose(self.v_proj(value), self.h))


class MergeNoTranspose(GoodMHA):
    def finish(self, o):
        return self.out_proj(merge_no_transpose(o))


class NoOutProj(GoodMHA):
    def finish(self, o):
        return good_merge(o)


class ScaleByDModel(GoodMHA):
    def attend(self, q, k, v, mask):
        d_model = q.shape[1] * q.shape[-1]
        logits = q @ k.transpose(-2, -1) / math.sqrt(d_model)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        w = torch.softmax(logits, -1).nan_to_num(0.0)
        return w @ v, w


class MaskIgnored(GoodMHA):
    def prepare_mask(self, mask):
        return None


class MaskInverted(GoodMHA):
    def prepare_mask(self, mask):
        mask = super().prepare_mask(mask)
        return None if mask is None else ~mask


class NoHeadDim(GoodMHA):
    def prepare_mask(self, mask):
        return mask


class AveragedWeights(GoodMHA):
    def forward(self, query, key, value, mask=None):
        out, w = super().forward(query, key, value, mask)
        return out, w.mean(1)


class KeysFromQuery(GoodMHA):
    def heads(self, query, key, value):
        return super().heads(query, query, query)


class ValueFromKey(GoodMHA):
    def heads(self, query, key, value):
        return super().heads(query, key, key)


class NoValueError(GoodMHA):
    def __init__(self, d_model, num_heads):
        nn.Module.__init__(self)
        self.h = num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)


class NoBias(GoodMHA):
    def __init__(self, d_model, num_heads):
        super().__init__(d_model, num_heads)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)


class WrapsTorchMHA(nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        self.inner = nn.MultiheadAttention(d_model, num_heads, batch_first=True)

    def forward(self, query, key, value, mask=None):
        return self.inner(query, key, value, attn_mask=None if mask is None else ~mask,
                          average_attn_weights=False)


class UsesTorchSDPA(GoodMHA):
    def attend(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None


class Stub(nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        raise NotImplementedError()

    def forward(self, query, key, value, mask=None):
        raise NotImplementedError()


class Unscaled(GoodMHA):
    def attend(self, q, k, v, mask):
        return my_attention(q * math.sqrt(q.shape[-1]), k, v, mask)


class DetachedOutput(GoodMHA):
    def forward(self, query, key, value, mask=None):
        out, w = super().forward(query, key, value, mask)
        return out.detach(), w


@pytest.mark.parametrize("cls, mistake", [
    (SplitNoTranspose, "heads_split_without_transpose"),
    (MergeNoTranspose, "heads_merged_without_transpose"),
    (NoOutProj, "no_output_projection"),
    (ScaleByDModel, "scaled_by_sqrt_d_model"),
    (Unscaled, "no_scaling"),
    (MaskIgnored, "mask_ignored"),
    (MaskInverted, "mask_inverted"),
    (NoHeadDim, "mask_without_head_dim"),
    (AveragedWeights, "weights_averaged_over_heads"),
    (KeysFromQuery, "keys_from_query"),
    (ValueFromKey, "values_from_key"),
    (NoValueError, "no_exception"),
    (NoBias, "wrong_parameters"),
    (WrapsTorchMHA, "forbidden:MultiheadAttention"),
    (UsesTorchSDPA, "forbidden:scaled_dot_product_attention"),
    (Stub, "not_implemented"),
    (DetachedOutput, "no_gradient"),
])
def test_mha_mutants(cls, mistake):
    assert mistake_of(check_multi_head_attention, cls) == mistake


# --------------------------------------------------------------------------------------------
# An earlier function is the culprit: named, not blamed on multi-head attention
# --------------------------------------------------------------------------------------------

def ch02_attention(q, k, v, mask=None):
    """A chapter-2 answer that passes chapter 2's checks (any leading dimensions)."""
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    w = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return w @ v, w


def attention_masks_after_softmax(q, k, v, mask=None):
    """Chapter 2's classic mistake, pasted into chapter 3."""
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    if mask is not None:
        w = w * mask
    return w @ v, w


class UsesPastedAttention(GoodMHA):
    attention = staticmethod(my_attention)

    def attend(self, q, k, v, mask):
        return type(self).attention(q, k, v, mask)


class UsesBuggyPaste(UsesPastedAttention):
    attention = staticmethod(attention_masks_after_softmax)


def test_a_buggy_pasted_attention_is_named_as_the_culprit():
    assert mistake_of(check_multi_head_attention, UsesBuggyPaste, attention_masks_after_softmax) \
        == "pasted_attention_fails"
    # Without the pasted function the module's own failure is reported (a mask mistake).
    assert mistake_of(check_multi_head_attention, UsesBuggyPaste) != "pasted_attention_fails"


def test_a_missing_paste_is_named():
    def calls_a_missing_function(q, k, v, mask=None):
        return scaled_dot_product_attention(q, k, v, mask)  # noqa: F821 - never pasted

    class UsesMissingPaste(UsesPastedAttention):
        attention = staticmethod(calls_a_missing_function)

    assert mistake_of(check_multi_head_attention, UsesMissingPaste, None, good_split, good_merge) \
        == "pasted_attention_missing"


def test_a_buggy_split_is_named_as_the_culprit():
    assert mistake_of(check_multi_head_attention, SplitNoTranspose, ch02_attention, split_no_transpose,
                      good_merge) == "split_merge_fails"


def test_earlier_functions_are_not_blamed_when_the_module_passes_or_is_its_own_culprit(capsys):
    # The module does not use the buggy paste: full marks, no blame.
    check_multi_head_attention(UsesPastedAttention, attention_masks_after_softmax, good_split, good_merge)
    assert "MultiHeadAttention: all" in capsys.readouterr().out
    # Correct earlier functions: the module's own mistake is named.
    assert mistake_of(check_multi_head_attention, MaskInverted, ch02_attention, good_split, good_merge) \
        == "mask_inverted"
    assert mistake_of(check_multi_head_attention, Stub, attention_masks_after_softmax) == "not_implemented"


class SandboxValueError(GoodMHA):
    def __init__(self, d_model, num_heads):
        if d_model % num_heads:
            raise SandboxError("ValueError", "d_model is not divisible by num_heads")
        super().__init__(d_model, num_heads)


class SandboxTypeError(GoodMHA):
    def __init__(self, d_model, num_heads):
        if d_model % num_heads:
            raise SandboxError("TypeError", "unsupported operand")
        super().__init__(d_model, num_heads)


def test_value_error_from_the_sandbox_is_recognised(capsys):
    check_multi_head_attention(SandboxValueError)
    assert "MultiHeadAttention: all" in capsys.readouterr().out
    assert mistake_of(check_multi_head_attention, SandboxTypeError) == "wrong_exception"


def test_own_attention_function_by_plain_name_is_allowed(capsys):
    def scaled_dot_product_attention(q, k, v, mask=None):
        return my_attention(q, k, v, mask)

    class CallsOwnAttention(GoodMHA):
        def attend(self, q, k, v, mask):
            return scaled_dot_product_attention(q, k, v, mask)

    check_multi_head_attention(CallsOwnAttention)
    assert "MultiHeadAttention: all" in capsys.readouterr().out


def test_forbidden_name_found_when_class_source_is_unavailable(monkeypatch):
    """In a notebook kernel a class has no source file; the methods' source is still scanned."""
    real = scan.inspect.getsource
    monkeypatch.setattr(scan.inspect, "getsource",
                        lambda obj: (_ for _ in ()).throw(OSError("no file")) if isinstance(obj, type) else real(obj))
    assert mistake_of(check_multi_head_attention, UsesTorchSDPA) == "forbidden:scaled_dot_product_attention"


# --------------------------------------------------------------------------------------------
# Properties of the checks' own plain-torch helpers
# --------------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 4), st.integers(1, 5))


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_split_merge_round_trip_and_agreement(shape):
    b, length, h, d_k = shape
    x = torch.randn(b, length, h * d_k)
    s = mha.split(x, h)
    assert torch.equal(s, good_split(x, h))
    assert torch.equal(mha.merge(s), x)
    assert torch.equal(good_merge(good_split(x, h)), x)


@settings(max_examples=30, deadline=None)
@given(st.tuples(st.integers(1, 3), st.integers(2, 6), st.integers(2, 4), st.integers(1, 5)))
def test_no_transpose_mistake_is_distinguishable(shape):
    """With several heads and positions a reshape without transpose always moves some entries."""
    b, length, h, d_k = shape
    x = torch.randn(b, length, h * d_k, dtype=torch.float64)
    assert not torch.allclose(mha.split(x, h, "no_transpose"), mha.split(x, h))
    y = torch.randn(b, h, length, d_k, dtype=torch.float64)
    assert not torch.allclose(mha.merge(y, "no_transpose"), mha.merge(y))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.sampled_from([1, 2, 4]),
       st.integers(0, 2 ** 16), st.sampled_from([0, 2, 3, 4]))
def test_loop_matches_vectorised_and_pytorch(b, l_q, l_k, h, seed, mask_dim):
    """The loop over single heads, the vectorised helper and nn.MultiheadAttention agree, masks of
    every rank included."""
    d_model = 4 * h
    p = mha.random_params(d_model, seed=seed, device="cpu", dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, l_q, d_model, generator=g, dtype=torch.float64)
    k = torch.randn(b, l_k, d_model, generator=g, dtype=torch.float64)
    v = torch.randn(b, l_k, d_model, generator=g, dtype=torch.float64)
    mask = None if mask_dim == 0 else torch.rand(
        {2: (l_q, l_k), 3: (b, l_q, l_k), 4: (b, h, l_q, l_k)}[mask_dim], generator=g) > 0.3
    out1, w1 = mha.mha_loop(p, q, k, v, h, mask)
    out2, w2 = mha.mha_variant(p, q, k, v, h, mask)
    assert torch.allclose(out1, out2) and torch.allclose(w1, w2)
    assert not torch.isnan(out1).any()
    out3, w3 = mha.torch_mha(p, q, k, v, h, mask)    # NaN where a query may attend to nothing
    seen = torch.isfinite(w3).all(-1).all(1)
    assert torch.allclose(out3[seen], out1[seen]) and torch.allclose(w3.nan_to_num(), w1)
