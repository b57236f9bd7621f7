"""Unit tests for the check library's shared helpers (autograder.checks.core)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from autograder.checks import core
from autograder.checks.core import (CheckFailure, call, compare_module_with_reference,
                                    compare_with_reference, describe, expect_close, expect_raises,
                                    expect_tensor, forbid_names, is_close, max_abs_diff, randn,
                                    source_of, tolerance)


def failure(fn, *args, **kwargs) -> str:
    with pytest.raises(CheckFailure) as info:
        fn(*args, **kwargs)
    return str(info.value)


class SandboxError(RuntimeError):
    """What an exception of the student's looks like in the grader: its type travels by name."""

    def __init__(self, student_type, message="from the sandbox"):
        super().__init__(message)
        self.student_type = student_type


# --------------------------------------------------------------------------------------------
# call / describe / passed
# --------------------------------------------------------------------------------------------

def test_call_returns_the_result_and_names_exceptions():
    assert call(lambda a, b=0: a + b, 1, b=2) == 3

    def broken(x):
        raise KeyError("nope")
    message = failure(call, broken, 1)
    assert message.startswith("broken(...) raised KeyError")
    assert "raised TypeError: unsupported" in failure(
        call, lambda: (_ for _ in ()).throw(SandboxError("TypeError", "unsupported")), what="f()")


def test_call_explains_not_implemented_locally_and_from_the_sandbox():
    def stub():
        raise NotImplementedError()

    def remote_stub():
        raise SandboxError("NotImplementedError")

    for fn in (stub, remote_stub):
        message = failure(call, fn, what="my_fn(x)")
        assert "my_fn(x) raised NotImplementedError" in message
        assert "replace `raise NotImplementedError()`" in message


def test_call_lets_check_failures_through_unchanged():
    def inner():
        core.fail("the original message")
    assert failure(call, inner) == "the original message"


def test_describe():
    assert describe(torch.zeros(2, 3)) == "a tensor of shape (2, 3), dtype torch.float32, on cpu"
    assert describe(nn.Parameter(torch.zeros(1))) == "a Parameter (a Tensor subclass)"
    assert describe((1, 2)) == "a tuple of 2 items"
    assert describe([1]) == "a value of type builtins.list"
    assert describe(np.zeros(2)) == "a value of type numpy.ndarray"

    class Proxy:
        def __check_describe__(self):
            return "a proxy of something"
    assert describe(Proxy()) == "a proxy of something"


def test_passed_prints_a_tick(capsys):
    core.passed("thing", 3)
    assert capsys.readouterr().out == "\u2713 thing: all 3 checks passed.\n"


# --------------------------------------------------------------------------------------------
# expect_tensor
# --------------------------------------------------------------------------------------------

class MyTensor(torch.Tensor):
    pass


def test_expect_tensor_accepts_and_returns_a_plain_tensor():
    x = torch.zeros(2, 3, dtype=torch.float64)
    assert expect_tensor(x, "x", shape=(2, 3), dtype=torch.float64, device="cpu") is x
    assert expect_tensor(x, "x", shape=torch.Size([2, 3])) is x


@pytest.mark.parametrize("value, words", [
    (nn.Parameter(torch.zeros(2)), ["a Parameter (a Tensor subclass)"]),
    (torch.zeros(2).as_subclass(MyTensor), ["a MyTensor (a Tensor subclass)"]),
    (np.zeros(2), ["numpy.ndarray"]),
    ([0.0, 1.0], ["builtins.list"]),
    (None, ["NoneType"]),
    (3.0, ["builtins.float"]),
    ((torch.zeros(2), torch.zeros(2)), ["a tuple of 2 items"]),
])
def test_expect_tensor_rejects_non_tensors_and_subclasses_naming_the_type(value, words):
    message = failure(expect_tensor, value, "the result")
    assert message.startswith("the result should be a torch.Tensor, but it is ")
    for word in words:
        assert word in message, message


def test_expect_tensor_shape_dtype_device_messages():
    x = torch.zeros(2, 3)
    assert "has shape (2, 3), expected (3, 2)" in failure(expect_tensor, x, "y", shape=(3, 2))
    message = failure(expect_tensor, x, "y", dtype=torch.float64)
    assert "dtype torch.float32, expected torch.float64" in message and "dtype=x.dtype" in message
    message = failure(expect_tensor, x, "y", device="meta")
    assert "is on cpu, but the inputs were on meta" in message and "device=x.device" in message


# --------------------------------------------------------------------------------------------
# expect_close, tolerances, max_abs_diff
# --------------------------------------------------------------------------------------------

def test_expect_close_accepts_values_within_tolerance():
    x = randn(4, 5, seed=0)
    expect_close(x.clone(), x, "x")
    expect_close(x * (1 + 1e-5), x, "x")            # inside float32's rtol of 1e-4
    inf = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0])
    expect_close(inf.clone(), inf, "same infinities and NaNs")


def test_expect_close_names_the_matching_mistake():
    x = randn(3, 4, seed=1)
    right, wrong_a, wrong_b = x.exp(), x.exp() * 2, x.exp() + 1
    mistakes = {"you doubled it.": wrong_a, "you added one.": wrong_b, "unused": None}
    assert failure(expect_close, wrong_b.clone(), right, "y", mistakes=mistakes) == \
        "y is wrong: you added one."
    assert failure(expect_close, wrong_a.clone(), right, "y", mistakes=mistakes) == \
        "y is wrong: you doubled it."
    # Nothing matches: the generic message with the size of the difference and the tolerance.
    message = failure(expect_close, right + 5, right, "y", mistakes=mistakes)
    assert message.startswith("y differs from the expected result by up to 5")
    assert "rtol=0.0001, atol=1e-05" in message


def test_expect_close_checks_type_and_shape_first():
    x = torch.zeros(2, 3)
    assert "has shape (3, 2), expected (2, 3)" in failure(expect_close, x.T, x, "y")
    assert "should be a torch.Tensor" in failure(expect_close, x.numpy(), x, "y")


def test_expect_close_nan_message():
    want = torch.ones(3)
    got = torch.tensor([1.0, float("nan"), 1.0])
    message = failure(expect_close, got, want, "softmax(x)")
    assert message.startswith("softmax(x) contains NaN where the expected result has none")
    assert "subtract the maximum first" in message
    # NaN where NaN is expected is fine.
    expect_close(got.clone(), got, "y")


def test_nan_message_comes_before_named_mistakes():
    want = torch.ones(3)
    got = torch.tensor([1.0, float("nan"), 1.0])
    message = failure(expect_close, got, want, "y", mistakes={"it is NaN.": got.clone()})
    assert "contains NaN" in message


def test_tolerance_per_dtype():
    r64, a64 = tolerance(torch.float64)
    r32, a32 = tolerance(torch.float32)
    r16, a16 = tolerance(torch.float16)
    assert r64 < r32 < r16 and a64 < a32 < a16
    assert tolerance(torch.bfloat16)[0] >= r16
    assert tolerance(torch.int64) == (r32, a32)     # anything else: float32's


def test_float64_is_checked_more_tightly_than_float32():
    base = randn(10, seed=2, dtype=torch.float64)
    off = base * (1 + 1e-6)
    expect_close(off.float(), base.float(), "float32 result")
    message = failure(expect_close, off, base, "float64 result")
    assert "rtol=1e-07, atol=1e-09" in message
    # dtype= chooses the tolerance whatever the tensors' dtype; tol= overrides it.
    expect_close(off, base, "float64 values judged as float32", dtype=torch.float32)
    assert "rtol=1e-07" in failure(expect_close, off.float(), base.float(), "y", dtype=torch.float64)
    expect_close(off, base, "y", tol=(1e-5, 0.0))


def test_named_mistakes_use_the_dtype_tolerance():
    x = randn(5, seed=3, dtype=torch.float64)
    wrong = x * 2
    got = wrong * (1 + 1e-6)      # within float32's tolerance of the mistake, not float64's
    assert "is wrong: doubled" in failure(expect_close, got, x, "y", mistakes={"doubled": wrong},
                                          dtype=torch.float32)
    assert "differs" in failure(expect_close, got, x, "y", mistakes={"doubled": wrong})


def test_is_close_and_max_abs_diff():
    x = torch.tensor([1.0, float("inf"), float("-inf"), float("nan")])
    assert max_abs_diff(x, x.clone()) == 0.0
    assert max_abs_diff(torch.tensor([1.0, 2.0]), torch.tensor([1.5, -1.0])) == 3.0
    assert max_abs_diff(torch.tensor([float("inf")]), torch.tensor([float("-inf")])) == math.inf
    assert max_abs_diff(torch.zeros(0), torch.zeros(0)) == 0.0
    assert is_close(x.clone(), x)
    assert not is_close(x.numpy(), x)
    assert not is_close(torch.zeros(2, 1), torch.zeros(2))
    assert not is_close(nn.Parameter(torch.zeros(2)), torch.zeros(2))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 16), st.sampled_from([torch.float32, torch.float64]),
       st.floats(0.0, 0.5))
def test_relative_errors_below_rtol_are_accepted(seed, dtype, fraction):
    rtol, _ = tolerance(dtype)
    x = randn(6, seed=seed, dtype=dtype)
    assert is_close(x * (1 + fraction * rtol), x)
    assert not is_close(x + 10 * (1 + x.abs().max()), x)


def test_randn_is_reproducible_across_dtypes():
    a = randn(3, 4, seed=5)
    assert torch.equal(a, randn(3, 4, seed=5)) and not torch.equal(a, randn(3, 4, seed=6))
    b = randn(3, 4, seed=5, dtype=torch.float64, requires_grad=True)
    assert b.dtype == torch.float64 and b.requires_grad and b.is_leaf
    assert torch.equal(b.detach().float(), a)
    assert torch.allclose(randn(3, seed=5, scale=10.0), 10 * randn(3, seed=5))


# --------------------------------------------------------------------------------------------
# grads
# --------------------------------------------------------------------------------------------

def test_grads_reports_missing_gradients_and_fills_unused_with_zeros():
    x = torch.ones(3, requires_grad=True)
    y = torch.ones(2, requires_grad=True)
    gx, gy = core.grads(x * 2, [x, y], torch.ones(3), "the output")
    assert torch.equal(gx, torch.full((3,), 2.0)) and torch.equal(gy, torch.zeros(2))
    assert "Gradients do not flow through the output" in failure(
        core.grads, (x * 2).detach(), [x], torch.ones(3), "the output")


# --------------------------------------------------------------------------------------------
# source_of / forbid_names
# --------------------------------------------------------------------------------------------

def uses_attribute(x):
    return torch.softmax(x, -1)


def uses_method(x):
    return x.softmax(-1)


def uses_getattr(x):
    return getattr(F, "softmax")(x, -1)


def uses_import_from(x):
    from torch.nn.functional import softmax
    return softmax(x, -1)


def uses_import(x):
    import torch.nn.functional
    return x


def softmax(x, dim=-1):       # the student's own function, by this name
    e = torch.exp(x - x.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def calls_own_function(x):
    return softmax(x, dim=-1) * 2


def imports_the_reference(x):
    from autograder.reference import reference
    return reference("ch01_attention").softmax(x)


def imports_the_reference_module(x):
    import autograder.reference
    return x


def imports_the_reference_by_string(x):
    import importlib
    return importlib.import_module("autograder.reference")


def imports_the_reference_from_the_package(x):
    from autograder import reference
    return reference.reference("ch01_attention").softmax(x)


@pytest.mark.parametrize("fn, name, line", [
    (uses_attribute, "softmax", 2),
    (uses_method, "softmax", 2),
    (uses_getattr, "softmax", 2),
    (uses_import_from, "softmax", 2),
    (imports_the_reference, "autograder.reference", 2),
    (imports_the_reference_module, "autograder.reference", 2),
    (imports_the_reference_by_string, "autograder.reference", 3),
])
def test_forbid_names_catches_attributes_imports_and_strings(fn, name, line):
    import inspect, textwrap
    message = failure(forbid_names, fn, ["softmax"], "softmax", "Use torch.exp.")
    text = textwrap.dedent(inspect.getsource(fn)).splitlines()[line - 1].strip()
    assert message == (f"softmax must be written without `{name}` (your code uses it here: `{text}`). "
                       "Use torch.exp.")


def test_forbid_names_allows_a_plain_call_of_your_own_function():
    forbid_names(calls_own_function, ["softmax"], "attention", "")
    forbid_names(softmax, ["softmax"], "softmax", "")            # its own def is not a use
    forbid_names(uses_import, ["softmax", "functional"], "x", "")  # dotted import, other name


def test_forbid_names_skips_what_has_no_source():
    forbid_names(torch.exp, ["exp"], "x", "")                     # a builtin: nothing to scan
    forbid_names(eval("lambda x: x.softmax(-1)"), ["softmax"], "x", "")


def test_forbid_names_catches_the_reference_imported_from_the_package():
    message = failure(forbid_names, imports_the_reference_from_the_package, [], "softmax", "")
    assert "reference" in message


class ClassWithForbiddenMethod(nn.Module):
    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x)


def test_source_of_a_class_in_a_file():
    source = source_of(ClassWithForbiddenMethod)
    assert source.startswith("class ClassWithForbiddenMethod(nn.Module):")
    message = failure(forbid_names, ClassWithForbiddenMethod, ["scaled_dot_product_attention"],
                      "MHA", "")
    assert "without `scaled_dot_product_attention` (your code uses it here: `return F.scaled_dot_product_attention" in message


def _notebook_forward(self, x):
    return F.scaled_dot_product_attention(x, x, x)


def _notebook_helper(x):
    return x.softmax(-1)


def _notebook_factory(cls):
    return cls()


def _notebook_property(self):
    return torch.softmax(self.w, -1)


def _notebook_class(**members):
    """A class the way a notebook defines it: inspect cannot find its definition in any file,
    but its methods are functions with source (here, defined in this test module)."""
    cls = type("NotebookOnlyAttention", (nn.Module,), dict(members))
    with pytest.raises((OSError, TypeError)):
        __import__("inspect").getsource(cls)
    return cls


def test_source_of_a_class_without_a_file_reads_its_methods():
    cls = _notebook_class(forward=_notebook_forward, helper=staticmethod(_notebook_helper),
                          make=classmethod(_notebook_factory), size=3)
    source = source_of(cls)
    assert "def _notebook_forward" in source and "def _notebook_helper" in source
    assert "def _notebook_factory" in source
    assert "class Module" not in source           # torch's own classes are not scanned
    assert "without `scaled_dot_product_attention`" in failure(
        forbid_names, cls, ["scaled_dot_product_attention"], "MHA", "")
    assert "without `softmax`" in failure(forbid_names, cls, ["softmax"], "MHA", "")


def test_source_of_a_subclass_without_a_file_reads_its_bases_methods():
    base = _notebook_class(forward=_notebook_forward)
    child = type("NotebookChild", (base,), {"size": 1})
    assert "without `scaled_dot_product_attention`" in failure(
        forbid_names, child, ["scaled_dot_product_attention"], "MHA", "")


def test_source_of_a_class_without_a_file_reads_properties():
    cls = _notebook_class(weights=property(_notebook_property))
    assert "without `softmax`" in failure(forbid_names, cls, ["softmax"], "MHA", "")


def test_source_of_prefers_the_trusted_source_of_a_proxy():
    class Proxy:
        @staticmethod
        def __trusted_source__(obj):
            return "def f(x):\n    return x.softmax(-1)\n"
    assert source_of(Proxy()) == "def f(x):\n    return x.softmax(-1)\n"
    assert "uses it here: `return x.softmax(-1)`" in failure(forbid_names, Proxy(), ["softmax"], "f", "")


def test_source_of_returns_none_without_source():
    assert source_of(torch.exp) is None
    assert source_of(3) is None


# --------------------------------------------------------------------------------------------
# expect_raises
# --------------------------------------------------------------------------------------------

class MyValueError(ValueError):
    pass


def raiser(exc):
    def fn(*args, **kwargs):
        raise exc
    return fn


def test_expect_raises_accepts_the_exception_and_its_subclasses():
    expect_raises(ValueError, raiser(ValueError("bad")), what="f()")
    expect_raises(ValueError, raiser(MyValueError("bad")), what="f()")
    expect_raises(Exception, raiser(KeyError("bad")), what="f()")


def test_expect_raises_passes_arguments():
    seen = []

    def fn(a, b=None):
        seen.append((a, b))
        raise ValueError()
    expect_raises(ValueError, fn, 1, what="f()", b=2)
    assert seen == [(1, 2)]


def test_expect_raises_accepts_the_students_type_from_the_sandbox():
    expect_raises(ValueError, raiser(SandboxError("ValueError")), what="f()")


def test_expect_raises_fails_otherwise():
    message = failure(expect_raises, ValueError, raiser(TypeError("oops")), what="MHA(5, 2)",
                      hint="Check divisibility.")
    assert message == "MHA(5, 2) should raise ValueError, but it raised TypeError: oops. Check divisibility."
    message = failure(expect_raises, ValueError, raiser(SandboxError("TypeError", "oops")),
                      what="MHA(5, 2)")
    assert "should raise ValueError, but it raised TypeError: oops" in message
    message = failure(expect_raises, ValueError, lambda: None, what="MHA(5, 2)", hint="Hint.")
    assert message == "MHA(5, 2) should raise ValueError, but it raised nothing. Hint."


def test_expect_raises_lets_check_failures_through():
    assert failure(expect_raises, ValueError, raiser(CheckFailure("inner")), what="f()") == "inner"


@pytest.mark.parametrize("student_type", ["Exception", "BaseException"])
def test_expect_raises_rejects_a_base_class_from_the_sandbox(student_type):
    with pytest.raises(CheckFailure):
        expect_raises(ValueError, raiser(SandboxError(student_type)), what="f()")
    # The same mistake outside the sandbox is rejected:
    with pytest.raises(CheckFailure):
        expect_raises(ValueError, raiser(Exception("x")), what="f()")


def test_expect_raises_accepts_a_subclass_from_the_sandbox():
    expect_raises(ValueError, raiser(SandboxError("UnicodeDecodeError")), what="f()")


# --------------------------------------------------------------------------------------------
# compare_with_reference
# --------------------------------------------------------------------------------------------

def ref_softmax(x, dim=-1):
    return torch.softmax(x, dim)


def lse_softmax(x, dim=-1):
    return torch.exp(x - torch.logsumexp(x, dim, keepdim=True))


class WrongBackward(torch.autograd.Function):
    """The right softmax forward; backward forgets the -p * sum(g * p) term."""

    @staticmethod
    def forward(ctx, x):
        p = torch.exp(x - torch.logsumexp(x, -1, keepdim=True))
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return g * p


def wrong_gradient_softmax(x, dim=-1):
    return WrongBackward.apply(x)


SOFTMAX_CASES = [
    (lambda dtype, device: (randn(3, 5, seed=1, dtype=dtype, device=device),), {}),
    (lambda dtype, device: (randn(2, 4, seed=2, dtype=dtype, device=device),), {"dim": -1}),
]


def test_compare_with_reference_accepts_a_correct_alternative():
    n = compare_with_reference(lse_softmax, ref_softmax, SOFTMAX_CASES, what="softmax")
    # 2 cases x 2 dtypes x devices x (1 output + 1 gradient)
    assert n == 2 * 2 * len(core.devices()) * 2


def test_compare_with_reference_catches_a_wrong_gradient():
    # The forward alone is right:
    assert compare_with_reference(wrong_gradient_softmax, ref_softmax, SOFTMAX_CASES,
                                  what="softmax", check_grads=False) == 2 * 2 * len(core.devices())
    message = failure(compare_with_reference, wrong_gradient_softmax, ref_softmax, SOFTMAX_CASES,
                      what="softmax")
    assert message.startswith("the gradient of softmax (hidden case 1, torch.float32, cpu) with "
                              "respect to input 0 differs from the expected result")


def test_compare_with_reference_catches_wrong_values_dtype_and_detach():
    assert "softmax (hidden case 1, torch.float32, cpu) differs" in failure(
        compare_with_reference, lambda x, dim=-1: lse_softmax(x, dim) * 1.01, ref_softmax,
        SOFTMAX_CASES, what="softmax")
    assert "expected torch.float64" in failure(
        compare_with_reference, lambda x, dim=-1: lse_softmax(x.float(), dim), ref_softmax,
        SOFTMAX_CASES, what="softmax")
    assert "Gradients do not flow" in failure(
        compare_with_reference, lambda x, dim=-1: lse_softmax(x.detach(), dim), ref_softmax,
        SOFTMAX_CASES, what="softmax")
    assert "softmax (hidden case 1, torch.float32, cpu) raised NotImplementedError" in failure(
        compare_with_reference, raiser(NotImplementedError()), ref_softmax, SOFTMAX_CASES,
        what="softmax")


def _ref_attention(q, k, v, scale):
    w = torch.softmax(q @ k.transpose(-2, -1) * scale, -1)
    return w @ v, w


def _alt_attention(q, k, v, scale):
    w = lse_softmax(torch.einsum("...qd,...kd->...qk", q * scale, k))
    return torch.einsum("...qk,...kd->...qd", w, v), w


ATTENTION_CASES = [
    (lambda dtype, device: (randn(2, 3, 4, seed=1, dtype=dtype, device=device),
                            randn(2, 5, 4, seed=2, dtype=dtype, device=device),
                            randn(2, 5, 6, seed=3, dtype=dtype, device=device), 0.5), {}),
]


def test_compare_with_reference_several_outputs_and_a_non_tensor_argument():
    n = compare_with_reference(_alt_attention, _ref_attention, ATTENTION_CASES, what="attention",
                               n_outputs=2)
    assert n == 2 * len(core.devices()) * (2 + 2 * 3)
    message = failure(compare_with_reference, lambda *a: _alt_attention(*a)[0], _ref_attention,
                      ATTENTION_CASES, what="attention", n_outputs=2)
    assert "should return a tuple of 2 tensors, but it returned a tensor of shape (2, 3, 6)" in message
    message = failure(compare_with_reference, lambda q, k, v, s: _alt_attention(q, k, v, s * 2),
                      _ref_attention, ATTENTION_CASES, what="attention", n_outputs=2)
    assert message.startswith("output 0 of attention (hidden case 1")


# --------------------------------------------------------------------------------------------
# compare_module_with_reference
# --------------------------------------------------------------------------------------------

class MaskedAttention(nn.Module):
    def __init__(self, d_model, d_head):
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_head, bias=False)
        self.k_proj = nn.Linear(d_model, d_head, bias=False)
        self.v_proj = nn.Linear(d_model, d_head)

    def forward(self, x, mask):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        w = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
        return w @ v, w


class MaskedAttentionAlt(MaskedAttention):
    def forward(self, x, mask):
        q = F.linear(x, self.q_proj.weight) * self.q_proj.out_features ** -0.5
        k, v = self.k_proj(x), self.v_proj(x)
        s = torch.where(mask, torch.einsum("...qd,...kd->...qk", q, k), float("-inf"))
        w = lse_softmax(s)
        return torch.einsum("...qk,...kd->...qd", w, v), w


class MaskedAttentionIgnoresMask(MaskedAttention):
    def forward(self, x, mask):
        return super().forward(x, torch.ones_like(mask))


class MaskedAttentionWrongNames(nn.Module):
    def __init__(self, d_model, d_head):
        super().__init__()
        self.wq = nn.Linear(d_model, d_head, bias=False)

    def forward(self, x, mask):
        return x, x


def _masked_inputs(dtype, device, seed):
    x = randn(2, 5, 6, seed=seed, dtype=dtype, device=device)
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool, device=device))
    return x, mask


def test_compare_module_with_a_bool_input():
    n = compare_module_with_reference(MaskedAttentionAlt, MaskedAttention, (6, 4), _masked_inputs,
                                      what="MaskedAttention", n_outputs=2)
    # seeds x dtypes x devices x (2 outputs + gradients of x and of 4 parameters)
    assert n == 2 * 2 * len(core.devices()) * (2 + 1 + 4)


def test_compare_module_catches_mistakes():
    message = failure(compare_module_with_reference, MaskedAttentionIgnoresMask, MaskedAttention,
                      (6, 4), _masked_inputs, what="MaskedAttention", n_outputs=2)
    assert message.startswith("output 0 of MaskedAttention (hidden seed 0, torch.float32, cpu)")
    message = failure(compare_module_with_reference, MaskedAttentionWrongNames, MaskedAttention,
                      (6, 4), _masked_inputs, what="MaskedAttention", n_outputs=2)
    assert "Could not load the reference weights into your MaskedAttention" in message
    assert "Keep the parameter names" in message


class ScaledLinear(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, double):
        return self.lin(x) * (2.0 if double else 1.0)


def test_compare_module_with_a_python_bool_argument():
    n = compare_module_with_reference(
        ScaledLinear, ScaledLinear, (3,),
        lambda dtype, device, seed: (randn(2, 3, seed=seed, dtype=dtype, device=device), True),
        what="ScaledLinear")
    assert n > 0
