"""Unit tests for the check library's shared helpers: core, gradients, hidden, scan, catalogue."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from autograder.checks import core
from autograder.checks.core import (GENERIC, CheckFailure, Mistake, call, compare_module_with_reference,
                                    compare_with_reference, describe, expect_close, expect_outputs,
                                    expect_raises, expect_tensor, fail, is_close, max_abs_diff, on_devices,
                                    randn, tolerance)
from autograder.checks.gradients import expect_grads_close, grads
from autograder.checks.scan import forbid_names, source_of, used_code
from checking import SandboxError, failure, mistake_of


def message(fn, *args, **kwargs) -> str:
    return str(failure(fn, *args, **kwargs))


# --------------------------------------------------------------------------------------------
# Failures carry a message and a mistake id
# --------------------------------------------------------------------------------------------

DOUBLED = Mistake("doubled", "you doubled it.")
PLUS_ONE = Mistake("plus_one", "you added one.")
OFF_BY = Mistake("off_by", "off by {amount}.")


def test_fail_with_a_message_and_an_id_or_a_mistake():
    error = failure(fail, "plain text", mistake="wrong_shape")
    assert (str(error), error.mistake) == ("plain text", "wrong_shape")
    error = failure(fail, OFF_BY, amount=3)
    assert (str(error), error.mistake) == ("off by 3.", "off_by")
    assert failure(fail, "no id").mistake == "check_failed"
    assert CheckFailure("raised elsewhere").mistake == "check_failed"      # e.g. by the sandbox's proxies


def test_mistake_format_keeps_the_id():
    assert OFF_BY.format(amount=1) == Mistake("off_by", "off by 1.")
    assert DOUBLED.format() == DOUBLED


def test_generic_ids_are_documented():
    assert {"values_differ", "wrong_shape", "raised", "not_implemented", "nan", "forbidden:<name>"} <= set(GENERIC)
    assert all(meaning for meaning in GENERIC.values())


# --------------------------------------------------------------------------------------------
# call / describe / passed / on_devices
# --------------------------------------------------------------------------------------------

def test_call_returns_the_result_and_names_exceptions():
    assert call(lambda a, b=0: a + b, 1, b=2) == 3

    def broken(x):
        raise KeyError("nope")
    error = failure(call, broken, 1)
    assert error.mistake == "raised" and str(error).startswith("broken(...) raised KeyError")
    error = failure(call, lambda: (_ for _ in ()).throw(SandboxError("TypeError", "unsupported")), what="f()")
    assert error.mistake == "raised" and "raised TypeError: unsupported" in str(error)


def test_call_explains_not_implemented_locally_and_from_the_sandbox():
    def stub():
        raise NotImplementedError()

    def remote_stub():
        raise SandboxError("NotImplementedError")

    for fn in (stub, remote_stub):
        error = failure(call, fn, what="my_fn(x)")
        assert error.mistake == "not_implemented"
        assert "my_fn(x) raised NotImplementedError" in str(error)
        assert "replace `raise NotImplementedError()`" in str(error)


def test_call_lets_check_failures_through_unchanged():
    def inner():
        fail("the original message", mistake="inner")
    error = failure(call, inner)
    assert (str(error), error.mistake) == ("the original message", "inner")


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


def test_on_devices_runs_every_check_on_every_device_in_order():
    seen = []

    def first(fn, device):
        seen.append(("first", device))
        return 2

    def second(fn, device):
        seen.append(("second", device))
        return 1
    assert on_devices([first, second], None) == 3 * len(core.devices())
    assert seen == [(name, d) for d in core.devices() for name in ("first", "second")]


# --------------------------------------------------------------------------------------------
# expect_tensor / expect_outputs
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
    error = failure(expect_tensor, value, "the result")
    assert error.mistake == "not_a_tensor"
    assert str(error).startswith("the result should be a torch.Tensor, but it is ")
    for word in words:
        assert word in str(error), str(error)


def test_expect_tensor_shape_dtype_device():
    x = torch.zeros(2, 3)
    assert mistake_of(expect_tensor, x, "y", shape=(3, 2)) == "wrong_shape"
    assert "has shape (2, 3), expected (3, 2)" in message(expect_tensor, x, "y", shape=(3, 2))
    assert mistake_of(expect_tensor, x, "y", dtype=torch.float64) == "wrong_dtype"
    assert "dtype=x.dtype" in message(expect_tensor, x, "y", dtype=torch.float64)
    assert mistake_of(expect_tensor, x, "y", device="meta") == "wrong_device"
    assert "device=x.device" in message(expect_tensor, x, "y", device="meta")


def test_expect_outputs():
    pair = (torch.zeros(1), torch.zeros(2))
    assert expect_outputs(pair, "f") is pair
    assert expect_outputs(pair[:1], "f", ["output"]) == pair[:1]
    for wrong in (pair[0], list(pair), pair + pair):
        assert mistake_of(expect_outputs, wrong, "f") == "not_a_tuple"
    assert message(expect_outputs, pair[0], "f") == (
        "f should return a tuple of 2 tensors (output, weights), but it returned a tensor of shape (1,), "
        "dtype torch.float32, on cpu.")


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
    mistakes = {DOUBLED: wrong_a, PLUS_ONE: wrong_b, OFF_BY: None}
    error = failure(expect_close, wrong_b.clone(), right, "y", mistakes=mistakes)
    assert (str(error), error.mistake) == ("y is wrong: you added one.", "plus_one")
    assert mistake_of(expect_close, wrong_a.clone(), right, "y", mistakes=mistakes) == "doubled"
    # Nothing matches: the generic message with the size of the difference and the tolerance.
    error = failure(expect_close, right + 5, right, "y", mistakes=mistakes)
    assert error.mistake == "values_differ"
    assert str(error).startswith("y differs from the expected result by up to 5")
    assert "rtol=0.0001, atol=1e-05" in str(error)


def test_expect_close_checks_type_and_shape_first():
    x = torch.zeros(2, 3)
    assert mistake_of(expect_close, x.T, x, "y") == "wrong_shape"
    assert mistake_of(expect_close, x.numpy(), x, "y") == "not_a_tensor"


def test_expect_close_nan_message():
    want = torch.ones(3)
    got = torch.tensor([1.0, float("nan"), 1.0])
    error = failure(expect_close, got, want, "softmax(x)")
    assert error.mistake == "nan"
    assert str(error).startswith("softmax(x) contains NaN where the expected result has none")
    expect_close(got.clone(), got, "y")             # NaN where NaN is expected is fine


def test_nan_comes_before_named_mistakes():
    got = torch.tensor([1.0, float("nan"), 1.0])
    assert mistake_of(expect_close, got, torch.ones(3), "y", mistakes={DOUBLED: got.clone()}) == "nan"


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
    assert "rtol=1e-07, atol=1e-09" in message(expect_close, off, base, "float64 result")
    # dtype= chooses the tolerance whatever the tensors' dtype; tol= overrides it.
    expect_close(off, base, "float64 values judged as float32", dtype=torch.float32)
    assert "rtol=1e-07" in message(expect_close, off.float(), base.float(), "y", dtype=torch.float64)
    expect_close(off, base, "y", tol=(1e-5, 0.0))


def test_named_mistakes_use_the_dtype_tolerance():
    x = randn(5, seed=3, dtype=torch.float64)
    wrong = x * 2
    got = wrong * (1 + 1e-6)      # within float32's tolerance of the mistake, not float64's
    assert mistake_of(expect_close, got, x, "y", mistakes={DOUBLED: wrong}, dtype=torch.float32) == "doubled"
    assert mistake_of(expect_close, got, x, "y", mistakes={DOUBLED: wrong}) == "values_differ"


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
# grads / expect_grads_close
# --------------------------------------------------------------------------------------------

def test_grads_reports_missing_gradients_and_fills_unused_with_zeros():
    x = torch.ones(3, requires_grad=True)
    y = torch.ones(2, requires_grad=True)
    gx, gy = grads(x * 2, [x, y], torch.ones(3), "the output")
    assert torch.equal(gx, torch.full((3,), 2.0)) and torch.equal(gy, torch.zeros(2))
    error = failure(grads, (x * 2).detach(), [x], torch.ones(3), "the output")
    assert error.mistake == "no_gradient" and "Gradients do not flow through the output" in str(error)


class RaisingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("no backward")


def test_grads_reports_a_failing_backward():
    x = torch.ones(3, requires_grad=True)
    assert mistake_of(grads, RaisingBackward.apply(x), [x], torch.ones(3), "y") == "backward_failed"


def _pair(dtype=torch.float64):
    x = randn(3, 4, seed=7, dtype=dtype, requires_grad=True)
    return x, x.detach().clone().requires_grad_()


def test_expect_grads_close_accepts_equal_gradients_written_differently():
    x, ref = _pair()
    n = expect_grads_close(lse_softmax(x), torch.softmax(ref, -1), [x], [ref], "softmax(x)")
    assert n == 1
    assert expect_grads_close(lse_softmax(x), torch.softmax(ref, -1), {"x": x}, {"x": ref}, "softmax(x)",
                              upstream=torch.ones(3, 4, dtype=torch.float64)) == 1


def test_expect_grads_close_names_inputs_and_mistakes():
    x, ref = _pair()
    error = failure(expect_grads_close, wrong_gradient_softmax(x), torch.softmax(ref, -1), {"x": x},
                    {"x": ref}, "softmax(x)")
    assert error.mistake == "values_differ"
    assert str(error).startswith("the gradient of softmax(x) with respect to x differs")
    # A mistake is given as the output it would produce; its gradient names it.
    forgot = Mistake("forgot_the_sum_term", "the backward forgets the -p * sum(g * p) term.")
    error = failure(expect_grads_close, wrong_gradient_softmax(x), torch.softmax(ref, -1), [x], [ref], "softmax(x)",
                    mistakes={forgot: wrong_gradient_softmax(ref)})
    assert error.mistake == "forgot_the_sum_term"
    assert str(error) == "the gradient of softmax(x) with respect to input 0 is wrong: " + forgot.message


def test_expect_grads_close_names_the_cause_of_nan_gradients():
    x, ref = _pair()
    nan_grad = Mistake("nan_grad", "{name} of {what} is not finite.")
    out = torch.where(torch.zeros_like(x, dtype=torch.bool), torch.sqrt(-x.abs() - 1), x * 2)  # NaN backward
    error = failure(expect_grads_close, out, ref * 2, {"x": x}, {"x": ref}, "f(x)", nonfinite=nan_grad)
    assert (error.mistake, str(error)) == ("nan_grad", "x of f(x) is not finite.")
    assert mistake_of(expect_grads_close, out, ref * 2, {"x": x}, {"x": ref}, "f(x)") == "nan"


def test_expect_grads_close_compares_parameters_by_name():
    """Chapter 5's pattern: copy the weights, then compare parameter gradients."""
    torch.manual_seed(0)
    ref, stu = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    stu.load_state_dict(ref.state_dict())
    x = randn(2, 4, seed=1, dtype=torch.float64)
    n = expect_grads_close(stu(x), ref(x), dict(stu.named_parameters()), dict(ref.named_parameters()), "lin(x)")
    assert n == 2
    wrong = nn.Linear(4, 3, bias=False).double()
    assert mistake_of(expect_grads_close, wrong(x), ref(x), dict(wrong.named_parameters()),
                      dict(ref.named_parameters()), "lin(x)") == "wrong_parameters"


# --------------------------------------------------------------------------------------------
# forbid_names / source_of / used_code (autograder.checks.scan)
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
    error = failure(forbid_names, fn, ["softmax"], "softmax", "Use torch.exp.")
    assert error.mistake == f"forbidden:{name}"
    text = textwrap.dedent(inspect.getsource(fn)).splitlines()[line - 1].strip()
    assert str(error) == (f"softmax must be written without `{name}` (your code uses it here: `{text}`). "
                          "Use torch.exp.")


def test_forbid_names_allows_a_plain_call_of_your_own_function():
    forbid_names(calls_own_function, ["softmax"], "attention", "")
    forbid_names(softmax, ["softmax"], "softmax", "")            # its own def is not a use
    forbid_names(uses_import, ["softmax", "functional"], "x", "")  # dotted import, other name


def test_forbid_names_skips_what_has_no_source():
    forbid_names(torch.exp, ["exp"], "x", "")                     # a builtin: nothing to scan
    forbid_names(eval("lambda x: x.softmax(-1)"), ["softmax"], "x", "")


def test_forbid_names_catches_the_reference_imported_from_the_package():
    assert mistake_of(forbid_names, imports_the_reference_from_the_package, [], "softmax", "").startswith(
        "forbidden:autograder")


class _Unparsable:
    """A proxy whose trusted source does not parse: the names are read from the text."""

    @staticmethod
    def __trusted_source__(obj):
        return "def f(x):\n    return x.softmax(-1) +\n"


def test_forbid_names_reads_the_text_when_the_code_does_not_parse():
    error = failure(forbid_names, _Unparsable(), ["softmax"], "f", "")
    assert error.mistake == "forbidden:softmax" and "`return x.softmax(-1) +`" in str(error)


class ClassWithForbiddenMethod(nn.Module):
    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x)


def test_source_of_a_class_in_a_file():
    source = source_of(ClassWithForbiddenMethod)
    assert source.startswith("class ClassWithForbiddenMethod(nn.Module):")
    error = failure(forbid_names, ClassWithForbiddenMethod, ["scaled_dot_product_attention"], "MHA", "")
    assert "(your code uses it here: `return F.scaled_dot_product_attention" in str(error)


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
    assert mistake_of(forbid_names, cls, ["scaled_dot_product_attention"], "MHA", "") == \
        "forbidden:scaled_dot_product_attention"
    assert mistake_of(forbid_names, cls, ["softmax"], "MHA", "") == "forbidden:softmax"


def test_source_of_a_subclass_without_a_file_reads_its_bases_methods():
    base = _notebook_class(forward=_notebook_forward)
    child = type("NotebookChild", (base,), {"size": 1})
    assert mistake_of(forbid_names, child, ["scaled_dot_product_attention"], "MHA", "") == \
        "forbidden:scaled_dot_product_attention"


def test_source_of_a_class_without_a_file_reads_properties():
    cls = _notebook_class(weights=property(_notebook_property))
    assert mistake_of(forbid_names, cls, ["softmax"], "MHA", "") == "forbidden:softmax"


def test_source_of_prefers_the_trusted_source_of_a_proxy():
    class Proxy:
        @staticmethod
        def __trusted_source__(obj):
            return "def f(x):\n    return x.softmax(-1)\n"
    assert source_of(Proxy()) == "def f(x):\n    return x.softmax(-1)\n"
    assert "uses it here: `return x.softmax(-1)`" in message(forbid_names, Proxy(), ["softmax"], "f", "")


def test_source_of_returns_none_without_source():
    assert source_of(torch.exp) is None
    assert source_of(3) is None


CELLS = [
    "import torch\nfrom torch import nn",
    "def helper(x):\n    return x.softmax(-1)",
    "def helper(x):\n    return torch.exp(x)",          # redefined: the last definition counts
    "def softmax(x):\n    return helper(x)\nunrelated = 1",
    "def broken(:\n",                                       # does not parse: skipped
    "%timeit softmax(1)\nclass Model(nn.Module):\n    pass",
]


def test_used_code_follows_names_to_their_last_definitions():
    code = used_code(CELLS, ["softmax"])
    assert "return helper(x)" in code and "torch.exp" in code and "import torch" in code
    assert "x.softmax" not in code and "unrelated" not in code
    assert code.index("def helper") < code.index("def softmax")       # in cell order
    assert "class Model" in used_code(CELLS, ["Model"]) and "from torch import nn" in used_code(CELLS, ["Model"])


def test_used_code_is_none_when_a_root_is_not_defined():
    assert used_code(CELLS, ["softmax", "missing"]) is None
    assert used_code(CELLS, ["broken"]) is None


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
    error = failure(expect_raises, ValueError, raiser(TypeError("oops")), what="MHA(5, 2)",
                    hint="Check divisibility.")
    assert error.mistake == "wrong_exception"
    assert str(error) == "MHA(5, 2) should raise ValueError, but it raised TypeError: oops. Check divisibility."
    error = failure(expect_raises, ValueError, raiser(SandboxError("TypeError", "oops")), what="MHA(5, 2)")
    assert error.mistake == "wrong_exception" and "but it raised TypeError: oops" in str(error)
    error = failure(expect_raises, ValueError, lambda: None, what="MHA(5, 2)", hint="Hint.")
    assert error.mistake == "no_exception"
    assert str(error) == "MHA(5, 2) should raise ValueError, but it raised nothing. Hint."


def test_expect_raises_explains_a_stub():
    for stub in (raiser(NotImplementedError()), raiser(SandboxError("NotImplementedError"))):
        assert mistake_of(expect_raises, ValueError, stub, what="MHA(5, 2)") == "not_implemented"


def test_expect_raises_lets_check_failures_through():
    assert message(expect_raises, ValueError, raiser(CheckFailure("inner")), what="f()") == "inner"


@pytest.mark.parametrize("student_type", ["Exception", "BaseException"])
def test_expect_raises_rejects_a_base_class_from_the_sandbox(student_type):
    assert mistake_of(expect_raises, ValueError, raiser(SandboxError(student_type)), what="f()") == "wrong_exception"
    # The same mistake outside the sandbox is rejected:
    assert mistake_of(expect_raises, ValueError, raiser(Exception("x")), what="f()") == "wrong_exception"


def test_expect_raises_accepts_a_subclass_from_the_sandbox():
    expect_raises(ValueError, raiser(SandboxError("UnicodeDecodeError")), what="f()")


# --------------------------------------------------------------------------------------------
# compare_with_reference (autograder.checks.hidden, imported from core by hidden tests)
# --------------------------------------------------------------------------------------------

def test_hidden_tests_import_the_comparisons_from_core():
    from autograder.checks import hidden
    assert core.compare_with_reference is hidden.compare_with_reference
    with pytest.raises(AttributeError):
        core.no_such_name  # noqa: B018


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
    error = failure(compare_with_reference, wrong_gradient_softmax, ref_softmax, SOFTMAX_CASES, what="softmax")
    assert error.mistake == "values_differ"
    assert str(error).startswith("the gradient of softmax (hidden case 1, torch.float32, cpu) with "
                                 "respect to input 0 differs from the expected result")


@pytest.mark.parametrize("student, mistake", [
    (lambda x, dim=-1: lse_softmax(x, dim) * 1.01, "values_differ"),
    (lambda x, dim=-1: lse_softmax(x.float(), dim), "wrong_dtype"),
    (lambda x, dim=-1: lse_softmax(x.detach(), dim), "no_gradient"),
    (raiser(NotImplementedError()), "not_implemented"),
])
def test_compare_with_reference_catches_wrong_values_dtype_and_detach(student, mistake):
    assert mistake_of(compare_with_reference, student, ref_softmax, SOFTMAX_CASES, what="softmax") == mistake


def test_compare_with_reference_labels_the_hidden_case():
    assert "softmax (hidden case 1, torch.float32, cpu) differs" in message(
        compare_with_reference, lambda x, dim=-1: lse_softmax(x, dim) * 1.01, ref_softmax, SOFTMAX_CASES,
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
    error = failure(compare_with_reference, lambda *a: _alt_attention(*a)[0], _ref_attention,
                    ATTENTION_CASES, what="attention", n_outputs=2)
    assert error.mistake == "not_a_tuple" and "but it returned a tensor of shape (2, 3, 6)" in str(error)
    message_ = message(compare_with_reference, lambda q, k, v, s: _alt_attention(q, k, v, s * 2),
                       _ref_attention, ATTENTION_CASES, what="attention", n_outputs=2)
    assert message_.startswith("output 0 of attention (hidden case 1")


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


class MaskedAttentionWrongWeightGradient(MaskedAttention):
    """Right values; the weights' gradient is wrong (a review defect: only output 0 was checked)."""

    def forward(self, x, mask):
        out, w = super().forward(x, mask)
        return out, w.detach() + (w - w.detach()) * 2


def _masked_inputs(dtype, device, seed):
    x = randn(2, 5, 6, seed=seed, dtype=dtype, device=device)
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool, device=device))
    return x, mask


def test_compare_module_with_a_bool_input():
    n = compare_module_with_reference(MaskedAttentionAlt, MaskedAttention, (6, 4), _masked_inputs,
                                      what="MaskedAttention", n_outputs=2)
    # seeds x dtypes x devices x (2 outputs + 2 x gradients of x and of 4 parameters)
    assert n == 2 * 2 * len(core.devices()) * (2 + 2 * (1 + 4))


def test_compare_module_catches_mistakes():
    error = failure(compare_module_with_reference, MaskedAttentionIgnoresMask, MaskedAttention,
                    (6, 4), _masked_inputs, what="MaskedAttention", n_outputs=2)
    assert error.mistake == "values_differ"
    assert str(error).startswith("output 0 of MaskedAttention (hidden seed 0, torch.float32, cpu)")
    assert mistake_of(compare_module_with_reference, MaskedAttentionWrongNames, MaskedAttention,
                      (6, 4), _masked_inputs, what="MaskedAttention", n_outputs=2) == "weights_not_loaded"


def test_compare_module_checks_the_gradients_of_every_output():
    error = failure(compare_module_with_reference, MaskedAttentionWrongWeightGradient, MaskedAttention,
                    (6, 4), _masked_inputs, what="MaskedAttention", n_outputs=2)
    assert error.mistake == "values_differ"
    assert str(error).startswith("the gradient of output 1 of MaskedAttention (hidden seed 0")


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
    assert n == 2 * 2 * len(core.devices()) * (1 + 3)


def test_gradients_of_a_scalar_loss_compare():
    """A loss is 0-d: its random upstream gradient has shape () (it once raised inside randn)."""
    from autograder.checks.gradients import expect_grads_close
    x = torch.randn(3, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    assert expect_grads_close((x ** 2).sum(), (y ** 2).sum(), [x], [y], "a loss") == 1
    with pytest.raises(CheckFailure):
        expect_grads_close((x ** 3).sum(), (y ** 2).sum(), [x], [y], "a loss")
