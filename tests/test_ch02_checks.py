"""Chapter 2's checks pass correct code written differently from the reference and name the
mistakes they are meant to catch (each as a small mutant)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from autograder.checks import ch02
from autograder.checks.ch02 import check_causal_mask, check_masked_attention, check_padding_mask

from conftest import fails_with  # noqa: E402

FAST = settings(max_examples=25, deadline=None)


# --------------------------------------------------------------------------------------------
# Correct implementations, written differently from the reference
# --------------------------------------------------------------------------------------------

def causal_mask(n, device=None):
    i = torch.arange(n, device=device)
    return i[:, None] >= i[None, :]


def padding_mask(lengths, max_len):
    rows = [torch.arange(max_len, device=lengths.device) < n for n in lengths]
    return torch.stack(rows).unsqueeze(1)


def attention(q, k, v, mask=None):
    """A softmax written out with a guard for rows that see nothing (no masked_fill, no any())."""
    s = torch.einsum("...qd,...kd->...qk", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        s = torch.where(mask, s, float("-inf"))
    top = s.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(s - top)
    z = e.sum(-1, keepdim=True)
    w = e / torch.where(z > 0, z, torch.ones_like(z))
    return w @ v, w


def test_correct_implementations_pass(capsys):
    check_causal_mask(causal_mask)
    check_padding_mask(padding_mask)
    check_masked_attention(attention)
    out = capsys.readouterr().out
    assert "causal_mask" in out and "padding_mask" in out and "with a mask" in out


def test_the_reference_passes(capsys):
    from autograder.reference import ReferenceUnavailable, reference
    try:
        ref = reference("ch02_masking")
    except ReferenceUnavailable:
        pytest.skip("no solutions/ here")
    check_causal_mask(ref.causal_mask)
    check_padding_mask(ref.padding_mask)
    check_masked_attention(ref.scaled_dot_product_attention)


def test_not_implemented_is_reported():
    def todo(*args, **kwargs):
        raise NotImplementedError()
    for check in (check_causal_mask, check_padding_mask, check_masked_attention):
        fails_with(check, todo, "NotImplementedError")


# --------------------------------------------------------------------------------------------
# causal_mask mutants
# --------------------------------------------------------------------------------------------

def _ones(n, device):
    return torch.ones(n, n, dtype=torch.bool, device=device)


@pytest.mark.parametrize("mutant, words", [
    (lambda n, device=None: torch.triu(_ones(n, device), diagonal=1), ["inverted"]),
    (lambda n, device=None: torch.triu(_ones(n, device)), ["upper triangle"]),
    (lambda n, device=None: torch.tril(_ones(n, device), diagonal=-1), ["diagonal is excluded"]),
    (lambda n, device=None: _ones(n, device), ["blocks nothing"]),
    (lambda n, device=None: torch.tril(torch.ones(n, n, device=device)), ["dtype", "torch.bool"]),
    (lambda n, device=None: torch.tril(_ones(n, device))[None], ["shape"]),
])
def test_causal_mask_mutants(mutant, words):
    fails_with(check_causal_mask, mutant, *words)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to see a mask on the wrong device")
def test_causal_mask_ignoring_its_device_fails():
    fails_with(check_causal_mask, lambda n, device=None: torch.tril(_ones(n, None)), "requested device")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to see a mask on the wrong device")
def test_padding_mask_ignoring_the_device_of_lengths_fails():
    fails_with(check_padding_mask, lambda lengths, max_len: padding_mask(lengths.cpu(), max_len), "cpu")


# --------------------------------------------------------------------------------------------
# padding_mask mutants
# --------------------------------------------------------------------------------------------

def _positions(lengths, max_len):
    return torch.arange(max_len, device=lengths.device), lengths[:, None]


@pytest.mark.parametrize("mutant, words", [
    (lambda lengths, max_len: ~padding_mask(lengths, max_len), ["inverted"]),
    (lambda lengths, max_len: padding_mask(lengths, max_len)[:, 0], ["(B, 1, max_len)", "broadcast"]),
    (lambda lengths, max_len: padding_mask(lengths, max_len).transpose(1, 2), ["block queries"]),
    (lambda lengths, max_len: (lambda p, n: (p <= n)[:, None])(*_positions(lengths, max_len)), ["off by one"]),
    (lambda lengths, max_len: (lambda p, n: (p < n - 1)[:, None])(*_positions(lengths, max_len)), ["off by one"]),
    (lambda lengths, max_len: (lambda p, n: (p >= max_len - n)[:, None])(*_positions(lengths, max_len)),
     ["padding is at the start"]),
    (lambda lengths, max_len: padding_mask(lengths, max_len).float(), ["dtype", "torch.bool"]),
    (lambda lengths, max_len: padding_mask(lengths, max_len).long(), ["dtype", "torch.bool"]),
])
def test_padding_mask_mutants(mutant, words):
    fails_with(check_padding_mask, mutant, *words)


# --------------------------------------------------------------------------------------------
# scaled_dot_product_attention mutants
# --------------------------------------------------------------------------------------------

def _logits(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


def safe(q, k, v, mask):
    """The correct result (used to build mutants that differ in one respect only)."""
    return attention(q, k, v, mask)


def inverted(q, k, v, mask=None):
    return safe(q, k, v, None if mask is None else ~mask)


def ignores_mask(q, k, v, mask=None):
    return safe(q, k, v, None)


def zeroed_after_softmax(q, k, v, mask=None):
    w = torch.softmax(_logits(q, k), -1)
    if mask is not None:
        w = w * mask
    return w @ v, w


def renormalised_nan(q, k, v, mask=None):
    w = torch.softmax(_logits(q, k), -1)
    if mask is not None:
        w = w * mask
        w = w / w.sum(-1, keepdim=True)
    return w @ v, w


def renormalised_eps(q, k, v, mask=None):
    w = torch.softmax(_logits(q, k), -1)
    if mask is not None:
        w = w * mask
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    return w @ v, w


def large_negative_fill(q, k, v, mask=None):
    s = _logits(q, k)
    if mask is not None:
        s = s.masked_fill(~mask, -1e9)
    w = torch.softmax(s, -1)
    return w @ v, w


def large_negative_added(q, k, v, mask=None):
    s = _logits(q, k)
    if mask is not None:
        s = s + (~mask) * -1e9
    w = torch.softmax(s, -1)
    return w @ v, w


def naive_minus_inf(q, k, v, mask=None):
    s = _logits(q, k)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    w = torch.softmax(s, -1)
    return w @ v, w


def nan_to_num_afterwards(q, k, v, mask=None):
    s = _logits(q, k)
    if mask is not None:
        s = s + torch.where(mask, 0.0, float("-inf"))
    w = torch.nan_to_num(torch.softmax(s, -1))
    return w @ v, w


def uses_pytorch(q, k, v, mask=None):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out, torch.softmax(_logits(q, k), -1)


def output_only(q, k, v, mask=None):
    return safe(q, k, v, mask)[0]


def no_scaling(q, k, v, mask=None):
    return safe(q * math.sqrt(q.shape[-1]), k, v, mask)


def detached(q, k, v, mask=None):
    out, w = safe(q.detach(), k.detach(), v.detach(), mask)
    return out, w


def wrong_dtype(q, k, v, mask=None):
    out, w = safe(q, k, v, mask)
    return out.float(), w.float()




@pytest.mark.parametrize("mutant, words", [
    (inverted, ["inverted"]),
    (ignores_mask, ["no effect"]),
    (zeroed_after_softmax, ["AFTER the softmax", "sum to 1"]),
    (renormalised_nan, ["0 * -inf or softmax of an all -inf row"]),
    (renormalised_eps, ["huge logit", "BEFORE the softmax"]),
    (large_negative_fill, ["no key", "all-zero weights", "large negative number"]),
    (large_negative_added, ["no key", "large"]),
    (naive_minus_inf, ["Make sure you aren't computing 0 * -inf or softmax of an all -inf row"]),
    (nan_to_num_afterwards, ["gradient", "NaN", "nan_to_num"]),
    (uses_pytorch, ["without `scaled_dot_product_attention`"]),
    (output_only, ["tuple (output, weights)"]),
    (no_scaling, ["no scaling"]),
    (detached, ["Gradients do not flow"]),
    (wrong_dtype, ["dtype"]),
])
def test_masked_attention_mutants(mutant, words):
    fails_with(check_masked_attention, mutant, *words)


def test_masked_attention_mask_on_wrong_axis_fails():
    def transposed(q, k, v, mask=None):
        if mask is not None:
            mask = mask.transpose(-2, -1)
        return safe(q, k, v, mask)
    fails_with(check_masked_attention, transposed, "transposed")


def test_the_checks_expected_values_agree_with_pytorch():
    """ch02's expected values (SDPA + masked softmax) agree with an independent computation."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 4, 4, generator=g) < 0.5
    mask[0, 0, 1] = False
    out, w = ch02._expected(q, k, v, mask)
    want_out, want_w = attention(q, k, v, mask)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(w, want_w)


# --------------------------------------------------------------------------------------------
# Properties (hypothesis)
# --------------------------------------------------------------------------------------------

@FAST
@given(length=st.integers(2, 9), t=st.integers(0, 7), seed=st.integers(0, 2**16))
def test_no_peeking_property_of_a_correct_implementation(length, t, seed):
    """With a causal mask, changing q/k/v after position t never changes anything up to t."""
    t = t % (length - 1)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, length, 4, generator=g, dtype=torch.float64) for _ in range(3))
    causal = causal_mask(length)
    out, w = attention(q, k, v, causal)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, t + 1:] = 5 * torch.randn(2, length - t - 1, 4, generator=g, dtype=torch.float64)
    out2, w2 = attention(q2, k2, v2, causal)
    torch.testing.assert_close(out2[:, :t + 1], out[:, :t + 1], rtol=0, atol=1e-12)
    torch.testing.assert_close(w2[:, :t + 1], w[:, :t + 1], rtol=0, atol=1e-12)


@FAST
@given(lengths=st.lists(st.integers(0, 8), min_size=1, max_size=5), extra=st.integers(0, 3))
def test_padding_masks_for_random_lengths(lengths, extra):
    max_len = max(lengths) + extra
    m = padding_mask(torch.tensor(lengths), max_len)
    assert m.dtype == torch.bool and m.shape == (len(lengths), 1, max_len)
    for b, n in enumerate(lengths):
        assert m[b, 0].tolist() == [True] * n + [False] * (max_len - n)
    # Padded keys get exactly zero weight; sequences with a real token have rows summing to 1.
    g = torch.Generator().manual_seed(sum(lengths) + extra)
    q, k, v = (torch.randn(len(lengths), 3, max_len, 4, generator=g) for _ in range(3))
    out, w = ch02._expected(q, k, v, m[:, None])
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert (w.masked_select(~m[:, None].expand(w.shape)) == 0).all()
    sums = w.sum(-1)
    has_token = torch.tensor(lengths)[:, None, None] > 0
    torch.testing.assert_close(sums, has_token.float().expand(sums.shape))


@FAST
@given(seed=st.integers(0, 2**16), lq=st.integers(1, 5), lk=st.integers(1, 5))
def test_random_masks_with_empty_rows_match_pytorch(seed, lq, lk):
    """The correct implementation equals PyTorch's fused attention on random masks, rows that see
    nothing included (zero), and so do the checks' expected values."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, lq, 4, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, lk, 4, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(2, lq, lk, generator=g) < 0.5
    out, w = attention(q, k, v, mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, sdpa.nan_to_num(0.0))
    torch.testing.assert_close(ch02._expected(q, k, v, mask)[0], out)
    assert (w[~mask.any(-1)] == 0).all()
