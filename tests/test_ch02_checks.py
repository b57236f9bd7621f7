"""Chapter 2's checks pass correct code written differently from the reference and name the
mistakes they are meant to catch (each as a small mutant, asserted by its mistake id); the shared
mask helpers (autograder.checks.masks) agree with PyTorch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from autograder.checks import masks
from autograder.checks.ch02 import check_causal_mask, check_masked_attention, check_padding_mask, masked_attention_failure
from checking import FAST, mistake_of


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
        assert mistake_of(check, todo) == "not_implemented"


# --------------------------------------------------------------------------------------------
# causal_mask mutants
# --------------------------------------------------------------------------------------------

def _ones(n, device):
    return torch.ones(n, n, dtype=torch.bool, device=device)


@pytest.mark.parametrize("mutant, mistake", [
    (lambda n, device=None: torch.triu(_ones(n, device), diagonal=1), "causal_inverted"),
    (lambda n, device=None: torch.triu(_ones(n, device)), "causal_upper_triangle"),
    (lambda n, device=None: torch.tril(_ones(n, device), diagonal=-1), "causal_without_diagonal"),
    (lambda n, device=None: _ones(n, device), "causal_blocks_nothing"),
    (lambda n, device=None: torch.tril(_ones(n, device), diagonal=1), "causal_shifted_by_one"),
    (lambda n, device=None: (lambda i: i[None, :] <= i[:, None] + 1)(torch.arange(n, device=device)),
     "causal_shifted_by_one"),
    (lambda n, device=None: torch.tril(torch.ones(n, n, device=device)), "mask_not_bool"),
    (lambda n, device=None: torch.tril(_ones(n, device))[None], "wrong_shape"),
    (lambda n, device=None: torch.eye(n, dtype=torch.bool, device=device), "values_differ"),
])
def test_causal_mask_mutants(mutant, mistake):
    assert mistake_of(check_causal_mask, mutant) == mistake


needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs CUDA to see a mask on the wrong device")]


def causal_ignoring_device(n, device=None):
    return torch.tril(torch.ones(n, n, dtype=torch.bool))          # device never used


def causal_device_read_but_not_used(n, device=None):
    device = device or "cpu"
    return torch.ones(n, n, dtype=torch.bool).tril()                # created on the default device


@pytest.mark.parametrize("mutant", [causal_ignoring_device, causal_device_read_but_not_used])
def test_a_causal_mask_ignoring_its_device_fails_on_the_cpu_too(mutant):
    """Caught on any machine (the meta device, and a device parameter the body never reads), not
    only on a GPU grader."""
    assert mistake_of(check_causal_mask, mutant) == "causal_ignores_device"


def causal_tril_to(n, device=None):
    return torch.tril(torch.ones(n, n)).bool().to(device)


def causal_tensor_of_lists(n, device=None):
    return torch.tensor([[j <= i for j in range(n)] for i in range(n)], dtype=torch.bool, device=device)


def causal_not_triu(n, device=None):
    return ~torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def causal_filled_in_a_loop(n, device=None):
    m = torch.zeros(n, n, dtype=torch.bool, device=device)
    for i in range(n):
        m[i, :i + 1] = True
    return m


def causal_of_kwargs(n, **kwargs):
    return torch.ones(n, n, dtype=torch.bool, **kwargs).tril()


@pytest.mark.parametrize("honest", [causal_mask, causal_tril_to, causal_tensor_of_lists, causal_not_triu,
                                    causal_filled_in_a_loop, causal_of_kwargs])
def test_honest_causal_masks_work_on_the_meta_device_and_pass(honest):
    assert honest(3, device="meta").device.type == "meta"
    check_causal_mask(honest)


@pytest.mark.parametrize("check, mutant", [
    pytest.param(check_causal_mask, lambda n, device=None: torch.tril(_ones(n, None)), marks=needs_cuda),
    pytest.param(check_padding_mask, lambda lengths, max_len: padding_mask(lengths.cpu(), max_len), marks=needs_cuda),
])
def test_a_mask_ignoring_the_requested_device_fails(check, mutant):
    assert mistake_of(check, mutant) == "wrong_device"


# --------------------------------------------------------------------------------------------
# padding_mask mutants
# --------------------------------------------------------------------------------------------

def _positions(lengths, max_len):
    return torch.arange(max_len, device=lengths.device), lengths[:, None]


@pytest.mark.parametrize("mutant, mistake", [
    (lambda lengths, max_len: ~padding_mask(lengths, max_len), "padding_inverted"),
    (lambda lengths, max_len: padding_mask(lengths, max_len)[:, 0], "padding_without_query_axis"),
    (lambda lengths, max_len: padding_mask(lengths, max_len).transpose(1, 2), "padding_blocks_queries"),
    (lambda lengths, max_len: (lambda p, n: (p <= n)[:, None])(*_positions(lengths, max_len)),
     "padding_one_too_many"),
    (lambda lengths, max_len: (lambda p, n: (p < n - 1)[:, None])(*_positions(lengths, max_len)),
     "padding_one_too_few"),
    (lambda lengths, max_len: (lambda p, n: (p >= max_len - n)[:, None])(*_positions(lengths, max_len)),
     "padding_at_start"),
    (lambda lengths, max_len: padding_mask(lengths, max_len).float(), "mask_not_bool"),
    (lambda lengths, max_len: padding_mask(lengths, max_len).long(), "mask_not_bool"),
])
def test_padding_mask_mutants(mutant, mistake):
    assert mistake_of(check_padding_mask, mutant) == mistake


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


def filled_with_zero(q, k, v, mask=None):
    s = _logits(q, k)
    if mask is not None:
        s = s.masked_fill(~mask, 0.0)
    w = torch.softmax(s, -1)
    return w @ v, w


def multiplied_by_mask(q, k, v, mask=None):
    s = _logits(q, k)
    if mask is not None:
        s = s * mask
    w = torch.softmax(s, -1)
    return w @ v, w


def masked_fill_then_nan_to_num(q, k, v, mask=None):
    """Honest: masked_fill's backward sends no gradient to the filled positions, so the NaN of a
    fully masked row, replaced after the softmax, never reaches q and k."""
    s = _logits(q, k)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)
    return w @ v, w


def where_then_where(q, k, v, mask=None):
    s = _logits(q, k)
    if mask is not None:
        s = torch.where(mask, s, float("-inf"))
    w = torch.softmax(s, -1)
    w = torch.where(torch.isnan(w), torch.zeros_like(w), w)
    return w @ v, w


@pytest.mark.parametrize("honest", [masked_fill_then_nan_to_num, where_then_where])
def test_replacing_the_nan_after_a_filled_mask_is_correct(honest):
    check_masked_attention(honest)
    q, k, v = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, _ = honest(q, k, v, masks.padding([0, 2], 3))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_an_additive_minus_inf_mask_leaks_nan_into_the_gradients():
    """What the chapter and the nan_in_gradient message say: the difference is fill vs add."""
    s = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[True, False, True], [False, False, False]])
    torch.softmax(s + torch.where(m, 0.0, float("-inf")), -1).nan_to_num(0.0).sum().backward()
    assert torch.isnan(s.grad[1]).all() and torch.isfinite(s.grad[0]).all()


def test_later_chapters_can_ask_whether_the_chapter_2_function_is_the_culprit(capsys):
    assert masked_attention_failure(attention) is None
    assert masked_attention_failure(filled_with_zero).mistake == "mask_filled_with_zero"
    assert masked_attention_failure(uses_pytorch).mistake == "forbidden:scaled_dot_product_attention"
    assert capsys.readouterr().out == ""


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


def transposed(q, k, v, mask=None):
    return safe(q, k, v, None if mask is None else mask.transpose(-2, -1))


def peeks(q, k, v, mask=None):
    """Right on every fixed input, but the last key leaks into every query's output."""
    out, w = safe(q, k, v, mask)
    if mask is None or q.dim() != 3 or q.shape[-2] != 7:
        return out, w
    return out + 1e-3 * v[..., -1:, :].sum(-1, keepdim=True), w


@pytest.mark.parametrize("mutant, mistake", [
    (inverted, "mask_inverted"),
    (filled_with_zero, "mask_filled_with_zero"),
    (multiplied_by_mask, "mask_filled_with_zero"),
    (ignores_mask, "mask_ignored"),
    (zeroed_after_softmax, "mask_after_softmax"),
    (renormalised_nan, "nan_in_empty_rows"),
    (renormalised_eps, "huge_blocked_logit_took_the_mass"),
    (large_negative_fill, "empty_row_weights_not_zero"),
    (large_negative_added, "empty_row_weights_not_zero"),
    (naive_minus_inf, "nan_in_empty_rows"),
    (nan_to_num_afterwards, "nan_in_gradient"),
    (uses_pytorch, "forbidden:scaled_dot_product_attention"),
    (output_only, "not_a_tuple"),
    (no_scaling, "no_scaling"),
    (detached, "no_gradient"),
    (wrong_dtype, "wrong_dtype"),
    (transposed, "mask_transposed"),
    (peeks, "peeks_at_the_future"),
])
def test_masked_attention_mutants(mutant, mistake):
    assert mistake_of(check_masked_attention, mutant) == mistake


def test_the_checks_expected_values_agree_with_pytorch():
    """The expected values (SDPA + masked softmax) agree with an independent computation."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 4, 4, generator=g) < 0.5
    mask[0, 0, 1] = False
    out, w = masks.attention(q, k, v, mask)
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
    out, w = masks.attention(q, k, v, m[:, None])
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
    torch.testing.assert_close(masks.attention(q, k, v, mask)[0], out)
    assert (w[~mask.any(-1)] == 0).all()


@FAST
@given(lengths=st.lists(st.integers(0, 8), min_size=1, max_size=5), extra=st.integers(0, 3))
def test_mask_builders_agree_with_the_correct_implementations(lengths, extra):
    n = max(lengths) + extra
    assert torch.equal(masks.causal(n), causal_mask(n))
    assert torch.equal(masks.padding(lengths, n), padding_mask(torch.tensor(lengths), n))
    assert torch.equal(masks.padding(torch.tensor(lengths, dtype=torch.int32), n), masks.padding(lengths, n))


def test_masked_softmax_zeroes_rows_that_see_nothing_and_keeps_gradients_finite():
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = masks.causal(4)[:3].clone()
    mask[1] = False
    w = masks.masked_softmax(logits, mask)
    assert (w[:, 1] == 0).all() and torch.allclose(w[:, [0, 2]].sum(-1), torch.ones(2, 2, dtype=torch.float64))
    w.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(masks.masked_softmax(logits, None), torch.softmax(logits, -1))
    assert torch.isnan(masks.masked_softmax(logits, mask, zero_empty_rows=False)[:, 1]).all()
