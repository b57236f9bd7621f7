"""Building blocks shared by every chapter's checks.

The same check code runs in two places:

* in the student's own kernel, on the student's real functions (visible tests while they work);
* in the grader's trusted process, on *proxies* that call into the sandboxed student process
  (see ``autograder.sandbox.proxy``). Proxies behave like the student's objects for everything
  used here: calling, autograd, ``named_parameters``/``load_state_dict``/``.to`` on modules.

So checks must only (a) call student code through :func:`call`, (b) inspect results with
:func:`expect_tensor` / :func:`expect_close`, and (c) report with :class:`CheckFailure`, whose
message names the likely mistake. Nothing here knows the reference solution.
"""
from __future__ import annotations

import ast
import builtins
import inspect
import re
import textwrap
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..notebook import safe_parse

__all__ = [
    "CheckFailure", "fail", "call", "expect_tensor", "expect_module", "expect_close", "max_abs_diff", "is_close",
    "tolerance", "devices", "randn", "grads", "passed", "describe", "source_of",
    "forbid_names", "expect_raises", "raised", "compare_with_reference", "compare_module_with_reference",
]


class CheckFailure(AssertionError):
    """A check failed. The message says what is wrong and, where it can, the likely cause."""


def fail(message: str) -> None:
    raise CheckFailure(message)


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


def call(fn: Callable, *args, what: str | None = None, **kwargs):
    """Call student code; turn any exception into a CheckFailure that says where it came from."""
    what = what or f"{getattr(fn, '__name__', 'your code')}(...)"
    try:
        return fn(*args, **kwargs)
    except CheckFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - any student error becomes a readable failure
        # Errors coming back from the grader's sandbox carry the student's own exception type.
        kind = getattr(exc, "student_type", type(exc).__name__)
        if kind == "NotImplementedError":
            fail(f"{what} raised NotImplementedError: replace `raise NotImplementedError()` with "
                 "your implementation and run that cell again.")
        fail(f"{what} raised {kind}: {exc}")


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
    try:
        fn(*args, **kwargs)
    except CheckFailure:
        raise
    except Exception as exc:  # noqa: BLE001
        kind = getattr(exc, "student_type", None)
        if raised(exc, exc_type):
            return
        fail(f"{what} should raise {exc_type.__name__}, but it raised {kind or type(exc).__name__}: {exc}. {hint}")
    fail(f"{what} should raise {exc_type.__name__}, but it raised nothing. {hint}")


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
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    return x.requires_grad_(requires_grad)


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


def expect_tensor(x: Any, what: str, *, shape: Sequence[int] | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Fail unless ``x`` is a plain ``torch.Tensor`` with the given shape, dtype and device."""
    if type(x) is not torch.Tensor:
        fail(f"{what} should be a torch.Tensor, but it is {describe(x)}.")
    if shape is not None and tuple(x.shape) != tuple(shape):
        fail(f"{what} has shape {tuple(x.shape)}, expected {tuple(shape)}.")
    if dtype is not None and x.dtype != dtype:
        fail(f"{what} has dtype {x.dtype}, expected {dtype} (the inputs' dtype): avoid creating "
             "tensors with a fixed dtype, or pass dtype=x.dtype.")
    if device is not None and x.device.type != torch.device(device).type:
        fail(f"{what} is on {x.device}, but the inputs were on {device}: create new tensors with "
             "device=x.device instead of a fixed device, and never call .cuda()/.cpu() inside.")
    return x


def expect_close(actual: Any, expected: torch.Tensor, what: str, *,
                 mistakes: Mapping[str, torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, tol: tuple[float, float] | None = None) -> None:
    """Fail unless ``actual`` matches ``expected`` within the dtype's tolerance (or ``tol``,
    (rtol, atol), where the inputs' magnitude limits the attainable precision).

    ``mistakes`` maps a message naming a common mistake to what that mistake would produce; when
    the student's result matches one of them, that message is the failure.
    """
    expect_tensor(actual, what, shape=expected.shape)
    if is_close(actual, expected, dtype, tol):
        return
    if torch.isnan(actual).any() and not torch.isnan(expected).any():
        fail(f"{what} contains NaN where the expected result has none. Look for exp() of large "
             "numbers (subtract the maximum first), 0 * inf, or -inf - (-inf).")
    for message, wrong in (mistakes or {}).items():
        if wrong is not None and is_close(actual, wrong, dtype):
            fail(f"{what} is wrong: {message}")
    rtol, atol = tol or tolerance(dtype or expected.dtype)
    fail(f"{what} differs from the expected result by up to {max_abs_diff(actual, expected):.3g} "
         f"(tolerance: rtol={rtol:g}, atol={atol:g}).")


def expect_module(module: Any, what: str, shapes: Mapping[str, tuple], *, layout: str,
                  shape_hint: str) -> None:
    """Fail unless ``module`` is an ``nn.Module`` whose parameters are exactly ``shapes``
    (name -> shape). ``layout`` describes the expected submodules; ``shape_hint`` explains shapes."""
    if not isinstance(module, torch.nn.Module):
        fail(f"{what} should create a torch.nn.Module (subclass nn.Module and call "
             "super().__init__() first).")
    params = dict(module.named_parameters())
    if set(params) != set(shapes):
        fail(f"{what}'s parameters should be exactly {list(shapes)} ({layout}), but they are "
             f"{sorted(params)}.")
    for name, want in shapes.items():
        if tuple(params[name].shape) != tuple(want):
            fail(f"{name} has shape {tuple(params[name].shape)}, expected {tuple(want)} ({shape_hint}).")


def grads(output: Any, inputs: Sequence[torch.Tensor], grad_output: torch.Tensor, what: str):
    """Gradients of ``(output * grad_output).sum()`` with respect to ``inputs``."""
    expect_tensor(output, what)
    if not output.requires_grad:
        fail(f"Gradients do not flow through {what}: the result does not require grad. Avoid "
             ".detach(), .item(), .numpy(), torch.tensor(...) on intermediate results, and in-place "
             "writes into leaf tensors.")
    try:
        # retain_graph: several outputs of one call (e.g. attention output and weights) share a
        # graph, and compare_with_reference backpropagates through each of them in turn.
        got = torch.autograd.grad(output, list(inputs), grad_output, allow_unused=True,
                                  retain_graph=True)
    except Exception as exc:  # noqa: BLE001
        fail(f"Backpropagating through {what} failed: {type(exc).__name__}: {exc}")
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs)]


_PASSED_SYMBOL = "\u2713"


def passed(name: str, count: int) -> None:
    print(f"{_PASSED_SYMBOL} {name}: all {count} checks passed.")


# --------------------------------------------------------------------------------------------
# Forbidden shortcuts
# --------------------------------------------------------------------------------------------

def source_of(obj: Any) -> str | None:
    """The source to scan for forbidden shortcuts.

    Grader proxies carry the trusted copy of the relevant student cells (``__trusted_source__``);
    in the student's kernel we read the function's or class's own source.
    """
    trusted = getattr(type(obj), "__trusted_source__", None)
    if trusted is not None:
        return trusted(obj)
    try:
        return textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        pass
    if isinstance(obj, type):   # classes typed into a notebook have no file: read their methods
        parts = []
        for klass in obj.__mro__:
            if klass is object or klass.__module__.split(".")[0] in ("torch", "builtins"):
                continue
            for member in vars(klass).values():
                member = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                try:
                    parts.append(textwrap.dedent(inspect.getsource(member)))
                except (OSError, TypeError):
                    continue
        return "\n".join(parts) or None
    return None


def _used_names(source: str) -> list[tuple[str, int]]:
    """(name, line) for every attribute access, imported name and string constant."""
    tree = safe_parse(source)
    if tree is None:
        return _used_names_in_text(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.append((node.attr, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.lineno))
            found.extend((a.name, node.lineno) for a in node.names)
            found.extend((f"{node.module}.{a.name}", node.lineno) for a in node.names if node.module)
        elif isinstance(node, ast.Import):
            found.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.value, node.lineno))
    return found


_TEXT_USES = re.compile(r"""\.\s*([A-Za-z_]\w*)|\bimport\s+([\w.]+)|\bfrom\s+([\w.]+)|["']([\w.]+)["']""")


def _used_names_in_text(source: str) -> list[tuple[str, int]]:
    """The same, read from the text when the code does not parse (a syntax error, or code made
    too big or too deep to parse): padding a cell must not hide a shortcut from the scan."""
    found = []
    for number, line in enumerate(source.splitlines(), 1):
        for match in _TEXT_USES.finditer(line):
            found.extend((g, number) for g in match.groups() if g)
    return found


#: Importing the course's reference is never allowed (the grader cannot see it either).
ALWAYS_FORBIDDEN = ("autograder.reference",)


def forbid_names(obj: Any, names: Iterable[str], exercise: str, hint: str) -> None:
    """Fail if the source behind ``obj`` uses any of ``names`` as an attribute, import or string.

    ``names`` are bare attribute names (``"softmax"`` catches ``torch.softmax``, ``F.softmax``,
    ``x.softmax``, ``getattr(torch, "softmax")``); calling your own function of the same name is
    fine because that is a plain name, not an attribute.
    """
    source = source_of(obj)
    if not source:
        return
    banned = set(names)
    lines = source.splitlines()
    for name, line in _used_names(source):
        if name in banned or any(name == b or name.startswith(b + ".") for b in ALWAYS_FORBIDDEN):
            text = lines[line - 1].strip() if 0 < line <= len(lines) else ""
            fail(f"{exercise} must be written without `{name}` (your code uses it here: `{text}`). {hint}")


# --------------------------------------------------------------------------------------------
# Hidden tests: comparison with the reference solution
# --------------------------------------------------------------------------------------------

def _tree_map(fn, x):
    if isinstance(x, (tuple, list)):
        return type(x)(_tree_map(fn, v) for v in x)
    if isinstance(x, dict):
        return {k: _tree_map(fn, v) for k, v in x.items()}
    return fn(x)


def _leaves(x) -> list:
    if isinstance(x, (tuple, list)):
        return [leaf for v in x for leaf in _leaves(v)]
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in _leaves(v)]
    return [x]


def _outputs(result, n: int | None, what: str) -> list:
    if n is None:
        return [result]
    if not isinstance(result, tuple) or len(result) != n:
        fail(f"{what} should return a tuple of {n} tensors, but it returned {describe(result)}.")
    return list(result)


def compare_with_reference(student: Callable, reference: Callable, cases: Iterable[tuple],
                           *, what: str, n_outputs: int | None = None,
                           dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
                           check_grads: bool = True) -> int:
    """Compare ``student`` with ``reference`` on every (case, dtype, device).

    Each case is ``(make_args, kwargs)`` where ``make_args(dtype, device)`` returns a tuple of
    fresh input tensors. Outputs are compared, then gradients of every floating input for a
    random upstream gradient. Returns the number of comparisons made.
    """
    count = 0
    for case_index, (make_args, kwargs) in enumerate(cases):
        for dtype in dtypes:
            for device in devices():
                label = f"{what} (hidden case {case_index + 1}, {dtype}, {device})"
                ref_args = make_args(dtype, device)
                stu_args = _tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, ref_args)
                diff_ref = [t.requires_grad_() for t in _leaves(ref_args)
                            if isinstance(t, torch.Tensor) and t.is_floating_point()] if check_grads else []
                diff_stu = [t.requires_grad_() for t in _leaves(stu_args)
                            if isinstance(t, torch.Tensor) and t.is_floating_point()] if check_grads else []
                expected = _outputs(reference(*ref_args, **kwargs), n_outputs, "the reference")
                got = _outputs(call(student, *stu_args, what=label, **kwargs), n_outputs, label)
                for i, (g, e) in enumerate(zip(got, expected)):
                    name = label if n_outputs is None else f"output {i} of {label}"
                    expect_tensor(g, name, dtype=e.dtype, device=e.device)
                    expect_close(g, e, name, dtype=dtype)
                    count += 1
                if check_grads and diff_ref:
                    seed = 1000 + case_index
                    for i, (g, e) in enumerate(zip(got, expected)):
                        if not e.requires_grad:
                            continue
                        upstream = randn(*e.shape, seed=seed + i, dtype=e.dtype, device=e.device)
                        upstream = upstream.masked_fill(~torch.isfinite(e.detach()), 0.0)
                        want = torch.autograd.grad(e, diff_ref, upstream, allow_unused=True, retain_graph=True)
                        have = grads(g, diff_stu, upstream.clone(), name)
                        for j, (h, w) in enumerate(zip(have, want)):
                            w = torch.zeros_like(diff_ref[j]) if w is None else w
                            expect_close(h, w, f"the gradient of {name} with respect to input {j}", dtype=dtype)
                            count += 1
    return count


def compare_module_with_reference(student_cls: Callable, reference_cls: Callable, init_args: tuple,
                                  inputs: Callable, *, what: str, n_outputs: int | None = None,
                                  dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
                                  seeds: Sequence[int] = (0, 1)) -> int:
    """Load the reference module's weights into the student's module and compare outputs and
    gradients (inputs and parameters). ``inputs(dtype, device, seed)`` returns the forward args."""
    count = 0
    for seed in seeds:
        for dtype in dtypes:
            for device in devices():
                label = f"{what} (hidden seed {seed}, {dtype}, {device})"
                torch.manual_seed(seed)
                ref = reference_cls(*init_args).to(device=device, dtype=dtype).eval()
                stu = call(student_cls, *init_args, what=f"{what}{init_args}")
                try:
                    stu = stu.to(device=device, dtype=dtype).eval()
                    missing = stu.load_state_dict(ref.state_dict(), strict=True)
                except Exception as exc:  # noqa: BLE001
                    fail(f"Could not load the reference weights into your {what}: {exc}. Keep the "
                         "parameter names given in the exercise.")
                del missing
                args = inputs(dtype, device, seed)

                def fresh(a):   # floating inputs get gradients; masks, indices, flags do not
                    if not isinstance(a, torch.Tensor):
                        return a
                    a = a.detach().clone()
                    return a.requires_grad_() if a.is_floating_point() else a
                stu_args = tuple(fresh(a) for a in args)
                ref_args = tuple(fresh(a) for a in args)
                expected = _outputs(ref(*ref_args), n_outputs, "the reference")
                got = _outputs(call(stu, *stu_args, what=label), n_outputs, label)
                for i, (g, e) in enumerate(zip(got, expected)):
                    name = label if n_outputs is None else f"output {i} of {label}"
                    expect_tensor(g, name, dtype=dtype, device=device)
                    expect_close(g, e, name, dtype=dtype)
                    count += 1
                upstream = randn(*expected[0].shape, seed=seed + 7, dtype=dtype, device=device)
                ref_params = dict(ref.named_parameters())
                stu_params = dict(stu.named_parameters())
                names = sorted(ref_params)
                diff = [i for i, a in enumerate(ref_args) if isinstance(a, torch.Tensor) and a.requires_grad]
                want = torch.autograd.grad(expected[0], [*(ref_args[i] for i in diff),
                                                         *(ref_params[n] for n in names)], upstream)
                have = grads(got[0], [*(stu_args[i] for i in diff), *(stu_params[n] for n in names)],
                             upstream.clone(), label)
                labels = [f"input {i}" for i in diff] + names
                for h, w, n in zip(have, want, labels):
                    expect_close(h, w, f"the gradient of {label} with respect to {n}", dtype=dtype)
                    count += 1
    return count
