"""Chapter 1's visible checks pass the reference and correct code written differently from it,
and name each classic mistake (each as a small mutant, asserted by its mistake id)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from autograder.checks.ch01 import (ExerciseNotDone, check_attention, check_self_attention, check_softmax,
                                    needs_exercise)
from checking import FAST, failure, mistake_of


@pytest.fixture(scope="module")
def ref():
    from autograder.reference import ReferenceUnavailable, reference
    try:
        return reference("ch01_attention")
    except ReferenceUnavailable:
        pytest.skip("no solutions/ here")


# --------------------------------------------------------------------------------------------
# Correct implementations, written differently from the reference
# --------------------------------------------------------------------------------------------

def softmax_lse(x, dim=-1):
    """exp(x - logsumexp(x)): no explicit maximum, no division."""
    return torch.exp(x - torch.logsumexp(x, dim=dim, keepdim=True))


def softmax_moved(x, dim=-1):
    """Move `dim` last, use .max(...).values (not amax), multiply by the reciprocal of the sum."""
    y = x.movedim(dim, -1)
    e = torch.exp(y - y.max(dim=-1, keepdim=True).values.detach())
    return (e * e.sum(-1, keepdim=True).reciprocal()).movedim(-1, dim)


def attention_einsum(q, k, v):
    """einsum, and q scaled instead of the logits."""
    q = q * q.shape[-1] ** -0.5
    w = softmax_lse(torch.einsum("...qd,...kd->...qk", q, k), dim=-1)
    return torch.einsum("...qk,...kd->...qd", w, v), w


def softmax_detached_max(x, dim=-1):
    """Detaching the maximum is valid: the shift does not change the result, so no gradient is lost."""
    e = torch.exp(x - x.amax(dim=dim, keepdim=True).detach())
    return e / e.sum(dim=dim, keepdim=True)


def attention_float32_constant(q, k, v):
    """√d_k as a float32 tensor (a common idiom), also for float64 inputs: a 1e-8 rounding, not a mistake."""
    w = softmax_lse(q @ k.transpose(-2, -1) / torch.sqrt(torch.tensor(q.shape[-1])), dim=-1)
    return w @ v, w


def attention_split_scale(q, k, v):
    """Both q and k scaled by d_k^(-1/4), k.mT, and a softmax over a moved dimension."""
    s = q.shape[-1] ** -0.25
    w = softmax_moved((q * s) @ (k * s).mT, dim=-1)
    return torch.matmul(w, v), w


class SelfAttentionEinsum(nn.Module):
    def __init__(self, d_model, d_head):
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_head, bias=False)
        self.k_proj = nn.Linear(d_model, d_head, bias=False)
        self.v_proj = nn.Linear(d_model, d_head, bias=False)

    def projections(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x):
        return attention_einsum(*self.projections(x))


class SelfAttentionFused(nn.Module):
    """One matmul with the three weights stacked, then chunked."""

    def __init__(self, d_model, d_head):
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_head, bias=False)
        self.k_proj = nn.Linear(d_model, d_head, bias=False)
        self.v_proj = nn.Linear(d_model, d_head, bias=False)

    def forward(self, x):
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        q, k, v = F.linear(x, w).chunk(3, dim=-1)
        return attention_split_scale(q, k, v)


def test_the_reference_passes(ref, capsys):
    check_softmax(ref.softmax)
    check_attention(ref.scaled_dot_product_attention)
    check_self_attention(ref.SelfAttention)
    out = capsys.readouterr().out
    assert "softmax: all" in out and "scaled_dot_product_attention: all" in out
    assert "SelfAttention: all" in out


@pytest.mark.parametrize("fn", [softmax_lse, softmax_moved, softmax_detached_max])
def test_correct_softmax_passes(fn, capsys):
    check_softmax(fn)
    assert "softmax: all" in capsys.readouterr().out


@pytest.mark.parametrize("fn", [attention_einsum, attention_split_scale, attention_float32_constant])
def test_correct_attention_passes(fn, capsys):
    check_attention(fn)
    assert "scaled_dot_product_attention: all" in capsys.readouterr().out


class SelfAttentionFloat32Constant(SelfAttentionEinsum):
    def forward(self, x):
        return attention_float32_constant(*self.projections(x))


@pytest.mark.parametrize("cls", [SelfAttentionEinsum, SelfAttentionFused, SelfAttentionFloat32Constant])
def test_correct_self_attention_passes(cls, capsys):
    check_self_attention(cls)
    assert "SelfAttention: all" in capsys.readouterr().out


def test_own_softmax_called_by_plain_name_is_allowed(capsys):
    def softmax(x, dim=-1):
        return softmax_lse(x, dim)

    def scaled_dot_product_attention(q, k, v):
        w = softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return w @ v, w

    check_attention(scaled_dot_product_attention)
    assert "scaled_dot_product_attention: all" in capsys.readouterr().out


def test_not_implemented_is_reported():
    def todo(*args, **kwargs):
        raise NotImplementedError()

    class Stub(nn.Module):
        def __init__(self, d_model, d_head):
            super().__init__()
            raise NotImplementedError()

    class StubForward(SelfAttentionEinsum):
        def forward(self, x):
            raise NotImplementedError()

    for check, stub in ((check_softmax, todo), (check_attention, todo), (check_self_attention, Stub),
                        (check_self_attention, StubForward)):
        assert mistake_of(check, stub) == "not_implemented"
    assert "SelfAttention.forward" in str(failure(check_self_attention, StubForward))


# --------------------------------------------------------------------------------------------
# softmax mutants
# --------------------------------------------------------------------------------------------

def _stable(x, dim):
    e = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def wrong_axis(x, dim=-1):
    other = 0 if dim % x.dim() != 0 else -1
    return _stable(x, other)


def over_all_elements(x, dim=-1):
    e = torch.exp(x - x.max())
    return e / e.sum()


def unnormalised(x, dim=-1):
    return torch.exp(x)


def no_max_subtraction(x, dim=-1):
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


def subtracts_mean(x, dim=-1):
    e = torch.exp(x - x.mean(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def subtracts_max_abs(x, dim=-1):
    """Shift-invariant and overflow-free on finite inputs, but -inf - inf everywhere with -inf."""
    e = torch.exp(x - x.abs().amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def subtracts_global_max(x, dim=-1):
    """One maximum for the whole tensor: fine while all rows have similar logits."""
    e = torch.exp(x - x.max())
    return e / e.sum(dim=dim, keepdim=True)


def shifted_not_normalised(x, dim=-1):
    return torch.exp(x - x.amax(dim=dim, keepdim=True))


def max_named_tuple(x, dim=-1):
    e = torch.exp(x - x.max(dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def max_named_tuple_via_torch_sub(x, dim=-1):
    e = torch.exp(torch.sub(x, torch.max(x, dim=dim, keepdim=True)))
    return e / e.sum(dim=dim, keepdim=True)


def epsilon_everywhere(x, dim=-1):
    e = torch.exp(x - x.amax(dim=dim, keepdim=True)) + 1e-12
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax_by_hand(x, dim=-1):
    m = x.amax(dim=dim, keepdim=True)
    return x - m - torch.log(torch.exp(x - m).sum(dim=dim, keepdim=True))


def returns_numpy(x, dim=-1):
    return _stable(x, dim).detach().cpu().numpy()


def returns_list(x, dim=-1):
    return _stable(x, dim).tolist()


def always_float32(x, dim=-1):
    return _stable(x.float(), dim)


def detached(x, dim=-1):
    return _stable(x.detach(), dim)


def via_item(x, dim=-1):
    """A Python float for the maximum is fine; torch.tensor(...) on the result is not."""
    return torch.tensor(_stable(x, dim).tolist(), dtype=x.dtype, device=x.device)


@pytest.mark.parametrize("mutant, mistake", [
    (wrong_axis, "softmax_wrong_axis"),
    (over_all_elements, "softmax_over_all_elements"),
    (unnormalised, "unnormalised"),
    (no_max_subtraction, "overflow"),
    (log_softmax_by_hand, "log_softmax"),
    (returns_numpy, "not_a_tensor"),
    (returns_list, "not_a_tensor"),
    (always_float32, "wrong_dtype"),
    (detached, "no_gradient"),
    (via_item, "no_gradient"),
    (subtracts_max_abs, "nan_with_minus_inf"),
    (epsilon_everywhere, "minus_inf_weight_not_zero"),
    (subtracts_global_max, "global_max_subtracted"),
    (shifted_not_normalised, "shifted_exp_not_normalised"),
    (max_named_tuple, "max_returns_values_and_indices"),
    (max_named_tuple_via_torch_sub, "max_returns_values_and_indices"),
])
def test_softmax_mutants(mutant, mistake):
    assert mistake_of(check_softmax, mutant) == mistake


def test_global_max_passes_ordinary_inputs_and_fails_rows_of_different_scales():
    """The mutant the hidden tests used to be the first to catch: it agrees with softmax on the
    ordinary inputs, and gives NaN only when one row's logits are far above another's."""
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(subtracts_global_max(x), torch.softmax(x, -1))
    assert "NaN" in str(failure(check_softmax, subtracts_global_max))


def test_max_named_tuple_message_keeps_the_error():
    text = str(failure(check_softmax, max_named_tuple))
    assert "return_types.max" in text and ".values" in text


def test_softmax_wrong_axis_names_both_axes():
    assert "sum to 1 along dim 0, not along dim -1" in str(failure(check_softmax, wrong_axis))


def test_softmax_subtracting_the_mean_is_told_to_subtract_the_maximum():
    """The mean is no bound on the logits: it overflows at ±1e4 (and gives NaN with -inf
    entries); either way the message names the fix."""
    assert mistake_of(check_softmax, subtracts_mean) == "overflow"
    assert torch.isnan(subtracts_mean(torch.tensor([[0.0, float("-inf"), 1.0]]))).any()


def torch_softmax(x, dim=-1):
    return torch.softmax(x, dim)


def functional_softmax(x, dim=-1):
    return F.softmax(x, dim=dim)


def method_softmax(x, dim=-1):
    return x.softmax(dim)


def getattr_softmax(x, dim=-1):
    return getattr(torch, "softmax")(x, dim)


def imported_softmax(x, dim=-1):
    from torch.nn.functional import softmax as sm
    return sm(x, dim=dim)


def exp_of_log_softmax(x, dim=-1):
    return torch.log_softmax(x, dim).exp()


def module_softmax(x, dim=-1):
    return nn.Softmax(dim=dim)(x)


@pytest.mark.parametrize("mutant, name", [
    (torch_softmax, "softmax"),
    (functional_softmax, "softmax"),
    (method_softmax, "softmax"),
    (getattr_softmax, "softmax"),
    (imported_softmax, "softmax"),
    (exp_of_log_softmax, "log_softmax"),
    (module_softmax, "Softmax"),
])
def test_softmax_shortcuts_are_forbidden(mutant, name):
    error = failure(check_softmax, mutant)
    assert error.mistake == f"forbidden:{name}" and "torch.exp" in str(error)


# --------------------------------------------------------------------------------------------
# scaled_dot_product_attention mutants
# --------------------------------------------------------------------------------------------

def _logits(q, k):
    return q @ k.transpose(-2, -1)


def _pair(w, v):
    return w @ v, w


def no_scaling(q, k, v):
    return _pair(softmax_lse(_logits(q, k)), v)


def scaled_by_d_k(q, k, v):
    return _pair(softmax_lse(_logits(q, k) / q.shape[-1]), v)


def scaled_after_softmax(q, k, v):
    return _pair(softmax_lse(_logits(q, k)) / math.sqrt(q.shape[-1]), v)


def softmax_over_queries(q, k, v):
    return _pair(softmax_lse(_logits(q, k) / math.sqrt(q.shape[-1]), dim=-2), v)


def multiplied_by_sqrt(q, k, v):
    return _pair(softmax_lse(_logits(q, k) * math.sqrt(q.shape[-1])), v)


def output_scaled(q, k, v):
    out, w = attention_einsum(q, k, v)
    return out * math.sqrt(q.shape[-1]), w


def output_only(q, k, v):
    return attention_einsum(q, k, v)[0]


def returns_a_list(q, k, v):
    return list(attention_einsum(q, k, v))


def attention_detached(q, k, v):
    return attention_einsum(q.detach(), k.detach(), v.detach())


def uses_pytorch_attention(q, k, v):
    w = softmax_lse(_logits(q, k) / math.sqrt(q.shape[-1]))
    return F.scaled_dot_product_attention(q, k, v), w


def output_uses_k(q, k, v):
    w = softmax_lse(_logits(q, k) / math.sqrt(q.shape[-1]))
    return w @ k, w


def attention_always_float32(q, k, v):
    out, w = attention_einsum(q.float(), k.float(), v.float())
    return out, w


def k_dot_T(q, k, v):
    with warnings.catch_warnings():      # PyTorch warns that .T on a batch is deprecated
        warnings.simplefilter("ignore")
        w = softmax_lse(q @ k.T / math.sqrt(q.shape[-1]))
    return w @ v, w


def k_dot_t(q, k, v):
    w = softmax_lse(torch.matmul(q, k.t()) / math.sqrt(q.shape[-1]))
    return w @ v, w


def weights_then_output(q, k, v):
    out, w = attention_einsum(q, k, v)
    return w, out


@pytest.mark.parametrize("mutant, mistake", [
    (no_scaling, "no_scaling"),
    (k_dot_T, "k_transposed_all_dims"),
    (k_dot_t, "k_transposed_all_dims"),
    (weights_then_output, "outputs_swapped"),
    (scaled_by_d_k, "scaled_by_d_k"),
    (scaled_after_softmax, "scaled_after_softmax"),
    (softmax_over_queries, "softmax_over_queries"),
    (multiplied_by_sqrt, "multiplied_by_sqrt_d_k"),
    (output_scaled, "output_scaled"),
    (output_only, "not_a_tuple"),
    (returns_a_list, "not_a_tuple"),
    (attention_detached, "no_gradient"),
    (uses_pytorch_attention, "forbidden:scaled_dot_product_attention"),
    (output_uses_k, "output_width_of_keys"),
    (attention_always_float32, "wrong_dtype"),
])
def test_attention_mutants(mutant, mistake):
    assert mistake_of(check_attention, mutant) == mistake


def test_k_dot_T_works_without_a_batch_dimension():
    """So the check must name it from the batched case, where it raises."""
    q, k, v = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6, 3)
    torch.testing.assert_close(k_dot_T(q, k, v)[0], attention_einsum(q, k, v)[0])
    assert "swap only its last two dimensions" in str(failure(check_attention, k_dot_T))


def test_float32_constant_differs_from_float64_by_a_rounding_error_only():
    """What the float64 checks allow for: √8 in float32 is off by 1.7e-8 (relative), √16 is exact."""
    assert torch.sqrt(torch.tensor(16)).item() == 4.0
    assert 0 < abs(torch.sqrt(torch.tensor(8)).item() - math.sqrt(8)) / math.sqrt(8) < 1e-7


def test_attention_output_times_k_is_named_when_the_widths_agree():
    """With d_v = d_k the shapes cannot tell weights @ k from weights @ v; the values do."""
    def output_uses_k_same_width(q, k, v):
        return output_uses_k(q, k, v) if v.shape[-1] == k.shape[-1] else attention_einsum(q, k, v)
    assert mistake_of(check_attention, output_uses_k_same_width) == "output_times_k"


# --------------------------------------------------------------------------------------------
# SelfAttention mutants
# --------------------------------------------------------------------------------------------

class WrongNames(nn.Module):
    def __init__(self, d_model, d_head):
        super().__init__()
        self.W_q = nn.Linear(d_model, d_head, bias=False)
        self.W_k = nn.Linear(d_model, d_head, bias=False)
        self.W_v = nn.Linear(d_model, d_head, bias=False)

    def forward(self, x):
        return attention_einsum(self.W_q(x), self.W_k(x), self.W_v(x))


class WithBias(SelfAttentionEinsum):
    def __init__(self, d_model, d_head):
        super().__init__(d_model, d_head)
        self.q_proj = nn.Linear(d_model, d_head)
        self.k_proj = nn.Linear(d_model, d_head)
        self.v_proj = nn.Linear(d_model, d_head)


class RawParameters(nn.Module):
    """Right names for the projections, but plain Parameters: 'q_proj' instead of 'q_proj.weight'."""

    def __init__(self, d_model, d_head):
        super().__init__()
        self.q_proj = nn.Parameter(torch.randn(d_head, d_model))
        self.k_proj = nn.Parameter(torch.randn(d_head, d_model))
        self.v_proj = nn.Parameter(torch.randn(d_head, d_model))

    def forward(self, x):
        return attention_einsum(x @ self.q_proj.T, x @ self.k_proj.T, x @ self.v_proj.T)


class InOutSwapped(SelfAttentionEinsum):
    def __init__(self, d_model, d_head):
        nn.Module.__init__(self)
        self.q_proj = nn.Linear(d_head, d_model, bias=False)
        self.k_proj = nn.Linear(d_head, d_model, bias=False)
        self.v_proj = nn.Linear(d_head, d_model, bias=False)


class KeysFromQProj(SelfAttentionEinsum):
    def projections(self, x):
        return self.q_proj(x), self.q_proj(x), self.v_proj(x)


class SwappedQK(SelfAttentionEinsum):
    def projections(self, x):
        return self.k_proj(x), self.q_proj(x), self.v_proj(x)


class ValuesNotProjected(SelfAttentionEinsum):
    def projections(self, x):
        return self.q_proj(x), self.k_proj(x), x[..., :self.v_proj.out_features]


class NotAModule:
    def __init__(self, d_model, d_head):
        self.q_proj = nn.Linear(d_model, d_head, bias=False)
        self.k_proj = nn.Linear(d_model, d_head, bias=False)
        self.v_proj = nn.Linear(d_model, d_head, bias=False)

    def __call__(self, x):
        return attention_einsum(self.q_proj(x), self.k_proj(x), self.v_proj(x))


class NoSuperInit(nn.Module):
    def __init__(self, d_model, d_head):
        self.q_proj = nn.Linear(d_model, d_head, bias=False)


class OutputOnly(SelfAttentionEinsum):
    def forward(self, x):
        return super().forward(x)[0]


class DetachedOutput(SelfAttentionEinsum):
    def forward(self, x):
        out, w = super().forward(x)
        return out.detach(), w.detach()


class Unscaled(SelfAttentionEinsum):
    def forward(self, x):
        q, k, v = self.projections(x)
        return no_scaling(q, k, v)


class LogitsAsWeights(SelfAttentionEinsum):
    def forward(self, x):
        q, k, v = self.projections(x)
        out, _ = attention_einsum(q, k, v)
        return out, q @ k.transpose(-2, -1)


class ScoresAsWeights(SelfAttentionEinsum):
    def forward(self, x):
        q, k, v = self.projections(x)
        out, _ = attention_einsum(q, k, v)
        return out, q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


class ScaledByDModel(SelfAttentionEinsum):
    """Attention written out in forward, divided by √d_model instead of √d_head."""

    def forward(self, x):
        q, k, v = self.projections(x)
        w = softmax_lse(q @ k.transpose(-2, -1) / math.sqrt(self.q_proj.in_features))
        return w @ v, w


class WeightsThenOutput(SelfAttentionEinsum):
    def forward(self, x):
        out, w = super().forward(x)
        return w, out


@pytest.mark.parametrize("cls, mistake", [
    (ScaledByDModel, "scaled_by_sqrt_d_model"),
    (WeightsThenOutput, "outputs_swapped"),
    (WrongNames, "wrong_parameters"),
    (WithBias, "wrong_parameters"),
    (RawParameters, "wrong_parameters"),
    (InOutSwapped, "wrong_parameter_shape"),
    (KeysFromQProj, "keys_from_q_proj"),
    (ValuesNotProjected, "values_not_projected"),
    (SwappedQK, "q_k_swapped"),
    (NotAModule, "not_a_module"),
    (NoSuperInit, "raised"),
    (OutputOnly, "not_a_tuple"),
    (DetachedOutput, "no_gradient"),
    (Unscaled, "no_scaling"),
    (LogitsAsWeights, "values_differ"),
    (ScoresAsWeights, "raw_scores_as_weights"),
])
def test_self_attention_mutants(cls, mistake):
    assert mistake_of(check_self_attention, cls) == mistake


def test_self_attention_parameter_messages_name_what_was_found():
    assert "W_q.weight" in str(failure(check_self_attention, WrongNames))
    assert "(out, in)" in str(failure(check_self_attention, InOutSwapped))


# --------------------------------------------------------------------------------------------
# Demo cells after an unfinished exercise
# --------------------------------------------------------------------------------------------

def test_a_demo_after_an_unfinished_exercise_says_which_one():
    def unfinished(*args):
        raise NotImplementedError()

    with pytest.raises(ExerciseNotDone, match="finish Exercise 2 .*Exercise 1"):
        with needs_exercise(2):
            unfinished()
    with pytest.raises(IndexError):          # other errors are the student's to see
        with needs_exercise(1):
            [][0]
    with needs_exercise(3):
        pass


# --------------------------------------------------------------------------------------------
# Properties (hypothesis)
# --------------------------------------------------------------------------------------------

@st.composite
def tensors_and_dims(draw):
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1.0, 10.0, 300.0]))
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale, dim


@FAST
@given(tensors_and_dims(), st.floats(-1e3, 1e3))
def test_reference_softmax_is_a_shift_invariant_distribution(ref, case, shift):
    x, dim = case
    p = ref.softmax(x, dim=dim)
    assert p.shape == x.shape and p.dtype == x.dtype
    assert (p >= 0).all() and torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(dim), torch.ones_like(p.sum(dim)), rtol=0, atol=1e-12)
    torch.testing.assert_close(ref.softmax(x + shift, dim=dim), p, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(p, torch.softmax(x, dim), rtol=1e-9, atol=1e-12)


@FAST
@given(tensors_and_dims())
def test_correct_softmaxes_agree_with_pytorch_and_zero_out_minus_inf(case):
    x, dim = case
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(x.numel())) < 0.3
    first = torch.zeros(x.shape[dim], dtype=torch.bool)
    first[0] = True   # keep one finite entry in every slice
    mask &= ~first.view(-1, *[1] * (x.dim() - 1 - dim % x.dim()))
    x = x.masked_fill(mask, float("-inf"))
    want = torch.softmax(x, dim)
    for fn in (softmax_lse, softmax_moved):
        got = fn(x, dim)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert (got[mask] == 0).all()


_SHIFTS = {
    "amax": lambda y: y.amax(-1, keepdim=True),
    "max values": lambda y: y.max(-1, keepdim=True).values,
    "detached max": lambda y: y.amax(-1, keepdim=True).detach(),
    "logsumexp": lambda y: torch.logsumexp(y, -1, keepdim=True),
}
_NORMALISERS = {
    "divide": lambda e: e / e.sum(-1, keepdim=True),
    "reciprocal": lambda e: e * e.sum(-1, keepdim=True).reciprocal(),
    "log-space": lambda e: torch.exp(torch.log(e) - torch.log(e.sum(-1, keepdim=True))),
}


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(sorted(_SHIFTS)), st.sampled_from(sorted(_NORMALISERS)), st.booleans())
def test_check_softmax_passes_any_valid_formulation(shift, normaliser, move_dim):
    shift_fn, norm_fn = _SHIFTS[shift], _NORMALISERS[normaliser]

    def softmax(x, dim=-1):
        y = x.movedim(dim, -1) if move_dim else x.transpose(dim, -1)
        p = norm_fn(torch.exp(y - shift_fn(y)))
        return p.movedim(-1, dim) if move_dim else p.transpose(dim, -1)

    check_softmax(softmax)


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(["logits", "q", "k and q", "einsum"]), st.booleans())
def test_check_attention_passes_any_valid_formulation(where, transpose_first):
    def scaled_dot_product_attention(q, k, v):
        d = q.shape[-1]
        kt = k.transpose(-2, -1) if transpose_first else k.mT
        if where == "logits":
            s = (q @ kt) / math.sqrt(d)
        elif where == "q":
            s = (q / math.sqrt(d)) @ kt
        elif where == "k and q":
            s = (q * d ** -0.25) @ (kt * d ** -0.25)
        else:
            s = torch.einsum("...qd,...kd->...qk", q, k) * d ** -0.5
        w = softmax_lse(s, dim=-1)
        return w @ v, w

    check_attention(scaled_dot_product_attention)
