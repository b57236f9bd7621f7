"""The chapter-4 checks pass correct code written differently (loops, torch.polar, precomputed
tables, the halves convention behind a permutation, persistent buffers, hand-made dropout) and
name each common mistake (asserted by its mistake id); the trusted float64 formulas have the
properties the chapter claims (rotation, distance-only dot products, relative RoPE scores)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from autograder.checks import ch04
from autograder.checks.ch04 import (check_apply_rope, check_embeddings, check_permutation_equivariance,
                                    check_positional_encoding, check_sinusoidal_encoding)
from autograder.reference import reference
from checking import FAST, SandboxError, mistake_of
from corpus import ch04 as corpus

# --------------------------------------------------------------------------------------------
# Exercise 1: sinusoidal_encoding, correct and written differently
# --------------------------------------------------------------------------------------------


def _defined(source: str, name: str, **scope):
    """``name`` as the corpus's honest submission defines it (one copy of each variant)."""
    ns = {"math": math, "torch": torch, "nn": nn, "F": F, **scope}
    exec(source, ns)  # noqa: S102 - the course's own corpus code
    return ns[name]


# A loop over positions with math.sin; the exp/log frequencies stacked and flattened; float64 then cast.
sin_loop = _defined(corpus.SIN_LOOP, "sinusoidal_encoding")
sin_exp_log = _defined(corpus.SIN_EXP_LOG, "sinusoidal_encoding")
sin_float64_then_cast = _defined(corpus.SIN_FLOAT64_THEN_CAST, "sinusoidal_encoding")


@pytest.mark.parametrize("fn", [sin_exp_log, sin_loop, sin_float64_then_cast])
def test_correct_sinusoidal_encodings_pass(fn, capsys):
    check_sinusoidal_encoding(fn)
    assert "sinusoidal_encoding: all" in capsys.readouterr().out


def sin_variant(**kwargs):
    """A mistaken table built by the checks' own variant formula, in the requested dtype/device."""
    def fn(max_len, d_model, dtype=torch.float32, device=None):
        if d_model % 2:
            raise ValueError("odd")
        return ch04.sinusoid(max_len, d_model, device=device or "cpu", **kwargs).to(dtype)
    return fn


def sin_exponent_i(max_len, d_model, dtype=torch.float32, device=None):
    if d_model % 2:
        raise ValueError("odd")
    pos = torch.arange(max_len, dtype=dtype, device=device)[:, None]
    i = torch.arange(d_model // 2, dtype=dtype, device=device)
    angle = pos / 10000 ** (i / d_model)
    return torch.stack([angle.sin(), angle.cos()], -1).flatten(1)


def sin_half_d(max_len, d_model, dtype=torch.float32, device=None):
    """i taken from arange(0, d, 2), then doubled again."""
    if d_model % 2:
        raise ValueError("odd")
    pos = torch.arange(max_len, dtype=dtype, device=device)[:, None]
    i = torch.arange(0, d_model, 2, dtype=dtype, device=device)
    angle = pos / 10000 ** (2 * i / d_model)
    return torch.stack([angle.sin(), angle.cos()], -1).flatten(1)


def sin_cos_own_index(max_len, d_model, dtype=torch.float32, device=None):
    if d_model % 2:
        raise ValueError("odd")
    pos = torch.arange(max_len, dtype=dtype, device=device)[:, None]
    j = torch.arange(d_model, dtype=dtype, device=device)
    angle = pos / 10000 ** (j / d_model)
    return torch.where(j % 2 == 0, angle.sin(), angle.cos())


def sin_in_float32(max_len, d_model, dtype=torch.float32, device=None):
    return sin_exp_log(max_len, d_model, device=device).to(dtype)


def sin_ignores_device(max_len, d_model, dtype=torch.float32, device=None):
    return sin_exp_log(max_len, d_model, dtype=dtype)


def sin_ignores_dtype(max_len, d_model, dtype=torch.float32, device=None):
    return sin_exp_log(max_len, d_model, device=device)


def sin_no_value_error(max_len, d_model, dtype=torch.float32, device=None):
    return sin_exp_log(max_len, d_model + d_model % 2, dtype, device)[:, :d_model]


def sin_stub(max_len, d_model, dtype=torch.float32, device=None):
    raise NotImplementedError()


@pytest.mark.parametrize("fn, mistake", [
    (sin_variant(swapped=True), "sin_cos_swapped"),
    (sin_exponent_i, "exponent_i_instead_of_2i"),
    (sin_half_d, "d_model_and_half_confused"),
    (sin_cos_own_index, "cos_uses_its_own_index"),
    (sin_variant(start=1), "positions_from_1"),
    (sin_variant(base=1000.0), "base_1000"),
    (sin_variant(layout="halves"), "sin_cos_concatenated"),
    (sin_in_float32, "computed_in_float32"),
    (sin_ignores_device, "encoding_ignores_device"),
    (sin_ignores_dtype, "wrong_dtype"),
    (sin_no_value_error, "no_exception"),
    (sin_stub, "not_implemented"),
])
def test_sinusoidal_mutants(fn, mistake):
    assert mistake_of(check_sinusoidal_encoding, fn) == mistake


# --------------------------------------------------------------------------------------------
# Exercise 2: PositionalEncoding
# --------------------------------------------------------------------------------------------

class GoodPE(nn.Module):
    """A persistent (1, max_len, d) buffer, F.dropout with the training flag, a ValueError subclass."""

    def __init__(self, d_model, max_len=5000, dropout=0.1):
        super().__init__()
        self.p = dropout
        self.register_buffer("table", sin_exp_log(max_len, d_model)[None])

    def add(self, x):
        length = x.shape[-2]
        if length > self.table.shape[1]:
            raise IndexError  # never reached: see check_length
        return x + self.table[0, :length]

    def check_length(self, x):
        if x.shape[-2] > self.table.shape[1]:
            raise ValueError(f"sequence of {x.shape[-2]} positions, but max_len is {self.table.shape[1]}")

    def drop(self, s):
        return F.dropout(s, self.p, self.training)

    def forward(self, x):
        self.check_length(x)
        return self.drop(self.add(x))


class HandMadeDropoutPE(GoodPE):
    """Dropout with a mask from torch.rand_like (the global generator)."""

    def drop(self, s):
        if not self.training or self.p == 0:
            return s
        return s * (torch.rand_like(s) >= self.p) / (1 - self.p)


class NonPersistentPE(GoodPE):
    def __init__(self, d_model, max_len=5000, dropout=0.1):
        nn.Module.__init__(self)
        self.p = dropout
        self.register_buffer("table", sin_loop(max_len, d_model)[None], persistent=False)


def test_correct_positional_encodings_pass(capsys):
    for cls in (GoodPE, HandMadeDropoutPE, NonPersistentPE):
        check_positional_encoding(cls)
        assert "PositionalEncoding: all" in capsys.readouterr().out


class NotAdded(GoodPE):
    def add(self, x):
        return x


class AlongBatch(GoodPE):
    """The sequence-first tutorial's table (max_len, 1, d) used on batch-first inputs."""

    def add(self, x):
        return x + self.table[0, :, None][:x.size(0)]


class ScaledInside(GoodPE):
    def add(self, x):
        return super().add(x * math.sqrt(x.shape[-1]))


class SwappedTable(GoodPE):
    def __init__(self, d_model, max_len=5000, dropout=0.1):
        nn.Module.__init__(self)
        self.p = dropout
        self.register_buffer("table", sin_variant(swapped=True)(max_len, d_model)[None])


class TableAsParameter(GoodPE):
    def __init__(self, d_model, max_len=5000, dropout=0.1):
        nn.Module.__init__(self)
        self.p = dropout
        self.table = nn.Parameter(sin_exp_log(max_len, d_model)[None], requires_grad=False)


class BuiltInForwardOnCPU(nn.Module):
    """The buffer created on the CPU inside forward: right on the CPU, a device mismatch on a GPU."""

    def __init__(self, d_model, max_len=5000, dropout=0.1):
        super().__init__()
        self.d_model, self.max_len, self.drop = d_model, max_len, nn.Dropout(dropout)

    def forward(self, x):
        if x.shape[-2] > self.max_len:
            raise ValueError("too long")
        return self.drop(x + sin_exp_log(x.shape[-2], self.d_model).to(x.dtype))


class PlainAttributeTable(BuiltInForwardOnCPU):
    """self.pe = tensor: not a buffer, so .to() leaves it on the CPU."""

    def __init__(self, d_model, max_len=5000, dropout=0.1):
        super().__init__(d_model, max_len, dropout)
        self.pe = sin_exp_log(max_len, d_model)

    def forward(self, x):
        if x.shape[-2] > self.max_len:
            raise ValueError("too long")
        return self.drop(x + self.pe[:x.shape[-2]].to(x.dtype))


class BuiltInForwardOnDevice(BuiltInForwardOnCPU):
    """Device-correct, but no buffer: the table is rebuilt at every call."""

    def forward(self, x):
        if x.shape[-2] > self.max_len:
            raise ValueError("too long")
        return self.drop(x + sin_exp_log(x.shape[-2], self.d_model, dtype=x.dtype, device=x.device))


class NoLengthCheck(GoodPE):
    def check_length(self, x):
        pass


class AssertLength(GoodPE):
    def check_length(self, x):
        assert x.shape[-2] <= self.table.shape[1]


_instances = itertools.count(1)


class StateDependsOnInstance(GoodPE):
    """A persistent buffer whose shape differs from one instance to the next."""

    def __init__(self, d_model, max_len=5000, dropout=0.1):
        super().__init__(d_model, max_len, dropout)
        self.register_buffer("calls", torch.zeros(next(_instances)))


class DropoutBeforeSum(GoodPE):
    def forward(self, x):
        self.check_length(x)
        return self.drop(x) + self.table[0, :x.shape[-2]]


class DropoutOnEncoding(GoodPE):
    def forward(self, x):
        self.check_length(x)
        return x + self.drop(self.table[0, :x.shape[-2]])


class NotRescaled(GoodPE):
    def drop(self, s):
        return s * (torch.rand_like(s) >= self.p) if self.training else s


class KeepProbability(GoodPE):
    def drop(self, s):
        return F.dropout(s, 1 - self.p, self.training) if self.training and self.p > 0 else s


class NoDropout(GoodPE):
    def drop(self, s):
        return s


class DropoutAlways(GoodPE):
    def drop(self, s):
        return F.dropout(s, self.p, training=True)


class FixedMasks(GoodPE):
    def drop(self, s):
        if not self.training:
            return s
        keep = torch.rand(s.shape, generator=torch.Generator().manual_seed(0)).to(s.device) >= self.p
        return s * keep / (1 - self.p)


class OwnGenerator(GoodPE):
    def __init__(self, d_model, max_len=5000, dropout=0.1):
        super().__init__(d_model, max_len, dropout)
        self.g = torch.Generator().manual_seed(0)

    def drop(self, s):
        if not self.training:
            return s
        return s * (torch.rand(s.shape, generator=self.g).to(s.device) >= self.p) / (1 - self.p)


class PEStub(nn.Module):
    def __init__(self, d_model, max_len=5000, dropout=0.1):
        super().__init__()
        raise NotImplementedError()


@pytest.mark.parametrize("cls, mistake", [
    (NotAdded, "encoding_not_added"),
    (AlongBatch, "added_along_batch_axis"),
    (ScaledInside, "scaled_inside_positional_encoding"),
    (SwappedTable, "sin_cos_swapped"),
    (TableAsParameter, "pe_is_a_parameter"),
    (BuiltInForwardOnCPU, "pe_created_on_cpu_in_forward"),
    (PlainAttributeTable, "pe_created_on_cpu_in_forward"),
    (BuiltInForwardOnDevice, "pe_not_a_buffer"),
    (NoLengthCheck, "too_long_not_checked"),
    (AssertLength, "too_long_not_checked"),
    (StateDependsOnInstance, "state_dict_does_not_round_trip"),
    (DropoutBeforeSum, "dropout_before_sum"),
    (DropoutOnEncoding, "dropout_on_encoding_only"),
    (NotRescaled, "dropout_not_rescaled"),
    (KeepProbability, "dropout_wrong_rate"),
    (NoDropout, "dropout_missing"),
    (DropoutAlways, "dropout_in_eval_mode"),
    (FixedMasks, "dropout_not_random"),
    (OwnGenerator, "dropout_ignores_seed"),
    (PEStub, "not_implemented"),
])
def test_positional_encoding_mutants(cls, mistake):
    assert mistake_of(check_positional_encoding, cls) == mistake


class SandboxValueErrorPE(GoodPE):
    def check_length(self, x):
        if x.shape[-2] > self.table.shape[1]:
            raise SandboxError("ValueError", "too long")


def test_too_long_error_from_the_sandbox_is_recognised(capsys):
    check_positional_encoding(SandboxValueErrorPE)
    assert "PositionalEncoding: all" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Exercise 3: Embeddings
# --------------------------------------------------------------------------------------------

class GoodEmbeddings(nn.Module):
    """One-hot times the matrix, scaled by d_model ** 0.5."""

    def __init__(self, vocab_size, d_model):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.scale = d_model ** 0.5

    def lookup(self, tokens):
        w = self.embedding.weight
        return F.one_hot(tokens, w.shape[0]).to(w.dtype) @ w

    def forward(self, tokens):
        return self.lookup(tokens) * self.scale


class FunctionalEmbeddings(GoodEmbeddings):
    def forward(self, tokens):
        return F.embedding(tokens, self.embedding.weight * math.sqrt(self.embedding.embedding_dim))


def test_correct_embeddings_pass(capsys):
    for cls in (GoodEmbeddings, FunctionalEmbeddings):
        check_embeddings(cls)
        assert "Embeddings: all" in capsys.readouterr().out


class Unscaled(GoodEmbeddings):
    def forward(self, tokens):
        return self.lookup(tokens)


class Divided(GoodEmbeddings):
    def forward(self, tokens):
        return self.lookup(tokens) / self.scale


class ByDModel(GoodEmbeddings):
    def forward(self, tokens):
        return self.lookup(tokens) * self.scale ** 2


class ByVocab(GoodEmbeddings):
    def forward(self, tokens):
        return self.lookup(tokens) * math.sqrt(self.embedding.num_embeddings)


class WrongName(nn.Module):
    def __init__(self, vocab_size, d_model):
        super().__init__()
        self.lut = nn.Embedding(vocab_size, d_model)

    def forward(self, tokens):
        return self.lut(tokens) * math.sqrt(self.lut.embedding_dim)


class Detached(GoodEmbeddings):
    def forward(self, tokens):
        return super().forward(tokens).detach()


@pytest.mark.parametrize("cls, mistake", [
    (Unscaled, "embeddings_not_scaled"),
    (Divided, "embeddings_divided_by_sqrt_d_model"),
    (ByDModel, "embeddings_scaled_by_d_model"),
    (ByVocab, "embeddings_scaled_by_sqrt_vocab_size"),
    (WrongName, "wrong_parameters"),
    (Detached, "no_gradient"),
])
def test_embeddings_mutants(cls, mistake):
    assert mistake_of(check_embeddings, cls) == mistake


# --------------------------------------------------------------------------------------------
# Exercise 4: apply_rope
# --------------------------------------------------------------------------------------------

def _check_even(x):
    if x.shape[-1] % 2:
        raise ValueError(f"d_head = {x.shape[-1]} is odd")


# torch.polar; cos/sin tables cached per size; a loop of rotation matrices; halves behind a permutation.
rope_polar = _defined(corpus.ROPE_POLAR, "apply_rope")
rope_tables = _defined(corpus.ROPE_TABLES, "apply_rope")
rope_loop = _defined(corpus.ROPE_LOOP, "apply_rope")
rope_halves_permuted = _defined(corpus.ROPE_HALVES_PERMUTED, "apply_rope")
rope_halves = _defined(corpus.ROPE_HALVES, "apply_rope")          # the other convention: a mistake here


@pytest.mark.parametrize("fn", [rope_polar, rope_tables, rope_loop, rope_halves_permuted])
def test_correct_ropes_pass(fn, capsys):
    check_apply_rope(fn)
    assert "apply_rope: all" in capsys.readouterr().out


def rope_mixed_tables(x, positions, base=10000.0):
    """cos/sin repeated per pair (interleaved), but rotate_half of the halves convention."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=x.dtype, device=x.device) / d)
    angle = torch.outer(positions.to(x.dtype), theta)
    cos, sin = angle.cos().repeat_interleave(2, -1), angle.sin().repeat_interleave(2, -1)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def rope_mixed_rotation(x, positions, base=10000.0):
    """cos/sin concatenated (halves), but neighbours rotated."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=x.dtype, device=x.device) / d)
    angle = torch.outer(positions.to(x.dtype), theta)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    return x * cos + torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2) * sin


def rope_backwards(x, positions, base=10000.0):
    return rope_polar(x, -positions, base)


def rope_exponent_i(x, positions, base=10000.0):
    return rope_polar(x, positions, base ** 0.5)


def rope_arange(x, positions, base=10000.0):
    return rope_polar(x, torch.arange(x.shape[-2], device=x.device), base)


def rope_fixed_base(x, positions, base=10000.0):
    return rope_polar(x, positions)


def rope_added(x, positions, base=10000.0):
    _check_even(x)
    return x + sin_exp_log(int(positions.max()) + 1, x.shape[-1], x.dtype, x.device)[positions]


def rope_clamped(x, positions, base=10000.0):
    return rope_polar(x, positions.clamp(max=44), base)


def rope_float32(x, positions, base=10000.0):
    return rope_polar(x.float(), positions, base).to(x.dtype)


def rope_no_value_error(x, positions, base=10000.0):
    return rope_polar(F.pad(x, (0, x.shape[-1] % 2)), positions, base)[..., :x.shape[-1]]


@pytest.mark.parametrize("fn, mistake", [
    (rope_halves, "rope_halves_convention"),
    (rope_mixed_tables, "rope_conventions_mixed"),
    (rope_mixed_rotation, "rope_conventions_mixed"),
    (rope_backwards, "rope_rotates_backwards"),
    (rope_exponent_i, "rope_exponent_i_instead_of_2i"),
    (rope_arange, "rope_ignores_positions"),
    (rope_fixed_base, "rope_ignores_base"),
    (rope_added, "rope_added_not_rotated"),
    (rope_clamped, "rope_scores_not_relative"),
    (rope_float32, "rope_float32_angles"),
    (rope_no_value_error, "no_exception"),
])
def test_rope_mutants(fn, mistake):
    assert mistake_of(check_apply_rope, fn) == mistake


# --------------------------------------------------------------------------------------------
# Section 0: the pasted MultiHeadAttention
# --------------------------------------------------------------------------------------------

Ch03MHA = reference("ch03_multihead").MultiHeadAttention


def test_a_correct_chapter3_module_passes(capsys):
    check_permutation_equivariance(Ch03MHA)
    assert "treats its input as a set: all" in capsys.readouterr().out


class PositionBiasAtSix(Ch03MHA):
    """Adds a position-dependent bias, only for length-6 self-attention (chapter 3's checks use others)."""

    def forward(self, query, key, value, mask=None):
        out, w = super().forward(query, key, value, mask)
        if query.shape[1] == 6 and key.shape[1] == 6:
            out = out + torch.arange(6, dtype=out.dtype, device=out.device)[:, None] * 0.01
        return out, w


class FirstKeyFavouredAtSeven(Ch03MHA):
    """Treats the first key specially, only with 7 keys."""

    def forward(self, query, key, value, mask=None):
        out, w = super().forward(query, key, value, mask)
        return (out + 0.01 * value[:, :1], w) if key.shape[1] == 7 else (out, w)


class WrongForFiveKeys(Ch03MHA):
    """Wrong only for 4 queries and 5 keys, which chapter 3's checks do not try."""

    def forward(self, query, key, value, mask=None):
        out, w = super().forward(query, key, value, mask)
        return (out * 1.1, w) if (query.shape[1], key.shape[1]) == (4, 5) else (out, w)


class InvertedMask(Ch03MHA):
    def forward(self, query, key, value, mask=None):
        return super().forward(query, key, value, None if mask is None else ~mask)


class WrapsTorchMHA(nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        self.inner = nn.MultiheadAttention(d_model, num_heads, batch_first=True)

    def forward(self, query, key, value, mask=None):
        return self.inner(query, key, value, attn_mask=None if mask is None else ~mask, average_attn_weights=False)


@pytest.mark.parametrize("cls, mistake", [
    (PositionBiasAtSix, "not_permutation_equivariant"),
    (FirstKeyFavouredAtSeven, "keys_order_matters"),
    (InvertedMask, "pasted_mha_fails"),
    (WrongForFiveKeys, "pasted_mha_fails"),
    (WrapsTorchMHA, "forbidden:MultiheadAttention"),
    (None, "not_implemented"),
])
def test_pasted_mha_mutants(cls, mistake):
    assert mistake_of(check_permutation_equivariance, cls) == mistake


# --------------------------------------------------------------------------------------------
# Properties of the trusted formulas (what the chapter claims, on random positions)
# --------------------------------------------------------------------------------------------

evens = st.integers(1, 32).map(lambda n: 2 * n)


@FAST
@given(evens, st.integers(0, 500), st.integers(-200, 200))
def test_encoding_of_pos_plus_k_is_a_fixed_rotation(d, pos, k):
    """PE(pos + k) = R(k) PE(pos), R(k) block-diagonal with 2x2 blocks [[cos kω, sin kω], [-sin kω, cos kω]]."""
    pos = max(pos, -k)
    table = ch04.sinusoid(max(pos, pos + k) + 1, d)
    omega = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    c, s = torch.cos(k * omega), torch.sin(k * omega)
    pairs = table[pos].reshape(d // 2, 2)
    rotated = torch.stack([c * pairs[:, 0] + s * pairs[:, 1], -s * pairs[:, 0] + c * pairs[:, 1]], -1)
    assert torch.allclose(rotated.flatten(), table[pos + k], atol=1e-9)


@FAST
@given(evens, st.integers(0, 300), st.integers(0, 300), st.integers(0, 300))
def test_dot_products_depend_only_on_the_distance(d, p, q, shift):
    table = ch04.sinusoid(max(p, q) + shift + 1, d)
    assert math.isclose(float(table[p] @ table[q]), float(table[p + shift] @ table[q + shift]), abs_tol=1e-9)


@FAST
@given(evens, st.integers(1, 6), st.integers(-1000, 1000), st.integers(0, 2**16))
def test_rope_scores_depend_only_on_the_offset(d, length, shift, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(length, d, generator=g, dtype=torch.float64), torch.randn(length, d, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 1000, (length,), generator=g)
    scores = ch04.rope(q, pos) @ ch04.rope(k, pos).T
    shifted = ch04.rope(q, pos + shift) @ ch04.rope(k, pos + shift).T
    assert torch.allclose(scores, shifted, atol=1e-9)
    assert torch.allclose(ch04.rope(q, pos).norm(dim=-1), q.norm(dim=-1))


@FAST
@given(evens, st.integers(1, 6), st.integers(0, 2**16), st.sampled_from([10000.0, 500.0]))
def test_rope_equals_its_complex_form_and_the_permuted_halves_form(d, length, seed, base):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, d, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 5000, (length,), generator=g)
    want = ch04.rope(x, pos, base)
    assert torch.allclose(rope_polar(x, pos, base), want, atol=1e-9)
    assert torch.allclose(rope_halves_permuted(x, pos, base), want, atol=1e-9)
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    assert torch.allclose(ch04.rope(x[..., perm], pos, base, pairs="halves"), want[..., perm], atol=1e-9)


@FAST
@given(st.integers(2, 16).map(lambda n: 2 * n), st.integers(0, 2**16))
def test_mixed_conventions_are_distinguishable(d, seed):
    """With d >= 4 and a position other than 0 the mixed forms differ from the right one (and from
    each other), so naming them cannot hit correct code."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, d, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 1, 5])
    right = ch04.rope(x, pos)
    a, b = (ch04._rope_mixed(x, pos, 10000.0, which) for which in ("interleaved_tables", "halves_tables"))
    assert not torch.allclose(a, right) and not torch.allclose(b, right)


def test_table_variants_differ_from_the_table():
    """Every named table mistake differs from the right table at the sizes the checks use first."""
    right = ch04.sinusoid(12, 8)
    for mistake, wrong in ch04._table_mistakes(12, 8, "cpu", torch.float64).items():
        assert not torch.allclose(wrong, right, atol=1e-3), mistake.id


# --------------------------------------------------------------------------------------------
# The grader's path: dtype arguments and the sandbox seam
# --------------------------------------------------------------------------------------------

class SeamProxy:
    """Stands for the grader's proxy of a student function: it carries the trusted source and
    encodes its arguments as the sandbox seam does before calling."""

    def __init__(self, fn):
        self.fn, self.__name__ = fn, fn.__name__

    def __trusted_source__(self):
        return ""                                 # nothing to scan: these checks forbid nothing

    def __call__(self, *args, **kwargs):
        from autograder.sandbox import proxy
        proxy._encode(args, kwargs)             # raises TypeError for what cannot cross
        return self.fn(*args, **kwargs)


def test_dtype_checks_run_through_the_seam(capsys):
    """A torch.dtype argument crosses the sandbox seam, so the float64 checks run in the grader."""
    check_sinusoidal_encoding(SeamProxy(sin_exp_log))
    assert "sinusoidal_encoding: all" in capsys.readouterr().out
    assert mistake_of(check_sinusoidal_encoding, SeamProxy(sin_in_float32)) == "computed_in_float32"