"""Building blocks shared by every chapter's checks.

The same check code runs in two places:

* in the student's own kernel, on the student's real functions (visible tests while they work);
* in the grader's trusted process, on *proxies* that call into the sandboxed student process
  (see ``autograder.sandbox.proxy``). Proxies behave like the student's objects for everything
  used here: calling, autograd, ``named_parameters``/``load_state_dict``/``.to`` on modules.

So checks must only (a) call student code through :func:`call`, (b) inspect results with the
``expect_*`` helpers, and (c) report with :func:`fail`. Every failure carries a message (what the
student reads) and a mistake id (what tests and statistics use): a :class:`Mistake` the check
recognised, or one of the :data:`GENERIC` ids. Nothing here knows the reference solution.

Check functions set ``__tracebackhide__ = True``: IPython then shows a student the cell and the
message, not a dozen frames of the checker.
"""
from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

import torch

__all__ = [
    "CheckFailure", "Mistake", "GENERIC", "fail", "call", "describe", "raised", "expect_raises",
    "tolerance", "devices", "randn", "randn_qkv", "max_abs_diff", "is_close", "expect_tensor", "expect_close",
    "expect_outputs", "expect_module", "on_devices", "passed",
]

#: Ids of failures that recognise no specific mistake; each chapter's named mistakes are the
#: :class:`Mistake` constants of its check module (see ``autograder.checks.catalogue``).
GENERIC = {
    "check_failed": "a failure raised without an id (outside the check library)",
    "raised": "the student's code raised an exception",
    "not_implemented": "the student's code still raises NotImplementedError",
    "not_a_tensor": "a result is not a plain torch.Tensor",
    "wrong_shape": "a result has the wrong shape",
    "wrong_dtype": "a result has the wrong dtype",
    "wrong_device": "a result is on the wrong device",
    "not_a_tuple": "a function returns something other than the expected tuple",
    "nan": "NaN where the expected result has none",
    "values_differ": "values differ from the expected ones, and no known mistake explains how",
    "no_gradient": "gradients do not flow through a result",
    "backward_failed": "backpropagating through a result raised an exception",
    "no_exception": "the student's code should raise an exception and raised none",
    "wrong_exception": "the student's code raised an exception of the wrong type",
    "not_a_module": "a class does not create a torch.nn.Module",
    "wrong_parameters": "a module's parameters have the wrong names",
    "wrong_parameter_shape": "a module's parameter has the wrong shape",
    "weights_not_loaded": "given weights could not be loaded into a module",
    "forbidden:<name>": "the code uses a forbidden shortcut (see autograder.checks.forbidden)",
}


class CheckFailure(AssertionError):
    """A check failed. ``str()`` is the message for the student; ``mistake`` is its stable id."""

    def __init__(self, message: str = "", mistake: str = "check_failed"):
        super().__init__(message)
        self.mistake = mistake


@dataclass(frozen=True)
class Mistake:
    """A mistake a check recognises: a stable ``id`` and the ``message`` students read, a template
    whose ``{fields}`` the check fills in. Define them as module constants: the catalogue reads them."""
    id: str
    message: str

    def format(self, **fields) -> Mistake:
        return Mistake(self.id, self.message.format(**fields)) if fields else self


def fail(message: str | Mistake, mistake: str = "check_failed", **fields) -> NoReturn:
    """Raise a CheckFailure: ``fail(SOME_MISTAKE, field=...)`` or ``fail("text", mistake="id")``."""
    if isinstance(message, Mistake):
        message, mistake = message.format(**fields).message, message.id
    # The checks found a mistake in the code they test; the message below says which one.
    raise CheckFailure(message, mistake)


# --------------------------------------------------------------------------------------------
# Describing values and calling student code
# --------------------------------------------------------------------------------------------

def describe(x: Any) -> str:
    """A short description of a value for messages (type, shape, dtype, device)."""
    if type(x) is torch.Tensor:
        return f"a tensor of shape {tuple(x.shape)}, dtype {x.dtype}, on {x.device}"
    if isinstance(x, torch.Tensor):
        return f"a {type(x).__name__} (a Tensor subclass)"
    if isinstance(x, tuple):
        return f"a tuple of {len(x)} items"
    # Proxies of non-tensor results carry their own description (see sandbox.proxy).
    text = getattr(type(x), "__check_describe__", None)
    if callable(text):
        return text(x)
    return f"a value of type {type(x).__module__}.{type(x).__qualname__}"


def _not_implemented(what: str) -> NoReturn:
    __tracebackhide__ = True
    fail(f"{what} raised NotImplementedError: replace `raise NotImplementedError()` with your "
         "implementation and run that cell again.", mistake="not_implemented")


def call(fn: Callable, *args, what: str | None = None, **kwargs):
    """Call student code; turn any exception into a CheckFailure that says where it came from."""
    __tracebackhide__ = True
    what = what or f"{getattr(fn, '__name__', 'your code')}(...)"
    try:
        return fn(*args, **kwargs)
    except CheckFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - any student error becomes a readable failure
        # Errors coming back from the grader's sandbox carry the student's own exception type.
        kind = getattr(exc, "student_type", type(exc).__name__)
        if kind == "NotImplementedError":
            _not_implemented(what)
        fail(f"{what} raised {kind}: {exc}", mistake="raised")


def raised(exc: BaseException, exc_type: type) -> bool:
    """Is ``exc`` an instance of ``exc_type``, also when it is a sandbox error standing for the
    student's exception? Those are judged by the class names of the student's exception (its
    MRO), or, for a builtin type, by the builtin class itself."""
    if getattr(exc, "student_type", None) is None:
        return isinstance(exc, exc_type)
    mro = getattr(exc, "student_mro", None)
    if mro:
        return exc_type.__name__ in mro
    cls = getattr(builtins, str(getattr(exc, "student_type", "")), None)
    return isinstance(cls, type) and issubclass(cls, exc_type)


def expect_raises(exc_type: type[BaseException], fn: Callable, *args, what: str, hint: str = "",
                  **kwargs) -> None:
    """Fail unless calling ``fn`` raises ``exc_type`` (or a subclass). Errors from the grader's
    sandbox arrive as another type carrying ``student_type``; they are matched by name."""
    __tracebackhide__ = True
    try:
        fn(*args, **kwargs)
    except CheckFailure:
        raise
    except Exception as exc:  # noqa: BLE001
        if raised(exc, exc_type):
            return
        kind = getattr(exc, "student_type", None) or type(exc).__name__
        if kind == "NotImplementedError":
            _not_implemented(what)
        fail(f"{what} should raise {exc_type.__name__}, but it raised {kind}: {exc}. {hint}",
             mistake="wrong_exception")
    fail(f"{what} should raise {exc_type.__name__}, but it raised nothing. {hint}", mistake="no_exception")


# --------------------------------------------------------------------------------------------
# Tolerances, devices, inputs
# --------------------------------------------------------------------------------------------

#: (rtol, atol) per dtype. float32 is loose enough for CPU vs CUDA and summation-order
#: differences (seen: 3e-7 naive attention, 3.3e-6 fused kernels); float64 is tight.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (3e-2, 1e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def devices() -> list[str]:
    """Devices to check on: the CPU always, CUDA when this machine has it."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def randn(*shape: int, seed: int, dtype=torch.float32, device="cpu", scale: float = 1.0,
          requires_grad: bool = False) -> torch.Tensor:
    """Reproducible normal inputs; the same seed gives the same values on every device."""
    g = torch.Generator().manual_seed(seed)
    # shape () too: the upstream gradient of a 0-d loss
    x = (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    return x.requires_grad_(requires_grad)


def randn_qkv(shape_q: Sequence[int], shape_k: Sequence[int], d_v: int, *, seed: int, device="cpu",
              dtype=torch.float32, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention inputs from seeds ``seed``, ``seed + 1``, ``seed + 2``: q ``shape_q``, k ``shape_k``,
    and v with the keys' leading shape and width ``d_v``."""
    return (randn(*shape_q, seed=seed, device=device, dtype=dtype, requires_grad=requires_grad),
            randn(*shape_k, seed=seed + 1, device=device, dtype=dtype, requires_grad=requires_grad),
            randn(*shape_k[:-1], d_v, seed=seed + 2, device=device, dtype=dtype, requires_grad=requires_grad))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = (a - b).abs().masked_fill(both_inf, 0.0)
    d = torch.where(torch.isnan(a) & torch.isnan(b), torch.zeros_like(d), d)
    return float(d.max()) if d.numel() else 0.0


def is_close(actual: Any, expected: torch.Tensor, dtype: torch.dtype | None = None,
             tol: tuple[float, float] | None = None) -> bool:
    if type(actual) is not torch.Tensor or actual.shape != expected.shape:
        return False
    rtol, atol = tol or tolerance(dtype or expected.dtype)
    return bool(torch.allclose(actual.detach().double().cpu(), expected.detach().double().cpu(),
                               rtol=rtol, atol=atol, equal_nan=True))


# --------------------------------------------------------------------------------------------
# Expectations on results
# --------------------------------------------------------------------------------------------

def expect_tensor(x: Any, what: str, *, shape: Sequence[int] | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Fail unless ``x`` is a plain ``torch.Tensor`` with the given shape, dtype and device."""
    __tracebackhide__ = True
    if type(x) is not torch.Tensor:
        fail(f"{what} should be a torch.Tensor, but it is {describe(x)}.", mistake="not_a_tensor")
    if shape is not None and tuple(x.shape) != tuple(shape):
        fail(f"{what} has shape {tuple(x.shape)}, expected {tuple(shape)}.", mistake="wrong_shape")
    if dtype is not None and x.dtype != dtype:
        fail(f"{what} has dtype {x.dtype}, expected {dtype} (the inputs' dtype): avoid creating "
             "tensors with a fixed dtype, or pass dtype=x.dtype.", mistake="wrong_dtype")
    if device is not None and x.device.type != torch.device(device).type:
        fail(f"{what} is on {x.device}, but the inputs were on {device}: create new tensors with "
             "device=x.device instead of a fixed device, and never call .cuda()/.cpu() inside.",
             mistake="wrong_device")
    return x


def expect_close(actual: Any, expected: torch.Tensor, what: str, *,
                 mistakes: Mapping[Mistake, torch.Tensor | None] | None = None,
                 dtype: torch.dtype | None = None, tol: tuple[float, float] | None = None) -> None:
    """Fail unless ``actual`` matches ``expected`` within the dtype's tolerance (or ``tol``,
    (rtol, atol), where the inputs' magnitude limits the attainable precision).

    ``mistakes`` maps each :class:`Mistake` to what it would produce (None: not applicable here);
    when the student's result matches one, that mistake is the failure.
    """
    __tracebackhide__ = True
    expect_tensor(actual, what, shape=expected.shape)
    if is_close(actual, expected, dtype, tol):
        return
    if torch.isnan(actual).any() and not torch.isnan(expected).any():
        fail(f"{what} contains NaN where the expected result has none. Look for exp() of large "
             "numbers (subtract the maximum first), 0 * inf, or -inf - (-inf).", mistake="nan")
    for mistake, wrong in (mistakes or {}).items():
        if wrong is not None and is_close(actual, wrong, dtype):
            fail(f"{what} is wrong: {mistake.message}", mistake=mistake.id)
    rtol, atol = tol or tolerance(dtype or expected.dtype)
    fail(f"{what} differs from the expected result by up to {max_abs_diff(actual, expected):.3g} "
         f"(tolerance: rtol={rtol:g}, atol={atol:g}).", mistake="values_differ")


def expect_outputs(result: Any, what: str, names: Sequence[str] = ("output", "weights")) -> tuple:
    """Fail unless ``result`` is a tuple with one item per name, e.g. ``(output, weights)``."""
    __tracebackhide__ = True
    if not isinstance(result, tuple) or len(result) != len(names):
        fail(f"{what} should return a tuple of {len(names)} tensors ({', '.join(names)}), but it "
             f"returned {describe(result)}.", mistake="not_a_tuple")
    return result


def expect_module(module: Any, what: str, shapes: Mapping[str, tuple], *, layout: str,
                  shape_hint: str) -> None:
    """Fail unless ``module`` is an ``nn.Module`` whose parameters are exactly ``shapes``
    (name -> shape). ``layout`` describes the expected submodules; ``shape_hint`` explains shapes."""
    __tracebackhide__ = True
    if not isinstance(module, torch.nn.Module):
        fail(f"{what} should create a torch.nn.Module (subclass nn.Module and call "
             "super().__init__() first).", mistake="not_a_module")
    params = dict(module.named_parameters())
    if set(params) != set(shapes):
        fail(f"{what}'s parameters should be exactly {list(shapes)} ({layout}), but they are "
             f"{sorted(params)}.", mistake="wrong_parameters")
    for name, want in shapes.items():
        if tuple(params[name].shape) != tuple(want):
            fail(f"{name} has shape {tuple(params[name].shape)}, expected {tuple(want)} ({shape_hint}).",
                 mistake="wrong_parameter_shape")


# --------------------------------------------------------------------------------------------
# Running a chapter's checks
# --------------------------------------------------------------------------------------------

def on_devices(checks: Iterable[Callable[..., int]], *objects) -> int:
    """Run each ``check(*objects, device)`` on every device, in order; the number of checks made.
    A chapter's public check is a list of small ``_check_<property>`` functions run this way."""
    __tracebackhide__ = True
    checks = list(checks)
    n = 0
    for device in devices():
        for check in checks:
            n += check(*objects, device)
    return n


_PASSED_SYMBOL = "\u2713"


def passed(name: str, count: int) -> None:
    print(f"{_PASSED_SYMBOL} {name}: all {count} checks passed.")


def __getattr__(name: str):
    """Hidden test cells, also those already stored in courses' gradebooks, import the
    comparisons with the reference from here; they live in :mod:`autograder.checks.hidden`."""
    if name in ("compare_with_reference", "compare_module_with_reference"):
        from . import hidden
        return getattr(hidden, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
