"""Hidden tests: the student's code against the reference solution, on every case, dtype and device.

The reference comes from ``solutions/`` at grading time (``autograder.reference``); these
functions only compare. Hidden test cells import them from ``autograder.checks.core``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from .core import call, devices, expect_close, expect_outputs, expect_tensor, fail
from .gradients import expect_grads_close

__all__ = ["compare_with_reference", "compare_module_with_reference"]


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
    __tracebackhide__ = True
    if n is None:
        return [result]
    return list(expect_outputs(result, what, [f"output {i}" for i in range(n)]))


def _fresh(x):
    """A detached copy; floating tensors require grad (masks, indices and flags do not)."""
    if not isinstance(x, torch.Tensor):
        return x
    x = x.detach().clone()
    return x.requires_grad_() if x.is_floating_point() else x


def _expect_same_outputs(got: list, expected: list, label: str, n_outputs: int | None, dtype) -> list[str]:
    """Compare outputs one by one; their names, for the gradient messages."""
    __tracebackhide__ = True
    names = []
    for i, (g, e) in enumerate(zip(got, expected)):
        name = label if n_outputs is None else f"output {i} of {label}"
        expect_tensor(g, name, dtype=e.dtype, device=e.device)
        expect_close(g, e, name, dtype=dtype)
        names.append(name)
    return names


def compare_with_reference(student: Callable, reference: Callable, cases: Iterable[tuple],
                           *, what: str, n_outputs: int | None = None,
                           dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
                           check_grads: bool = True) -> int:
    """Compare ``student`` with ``reference`` on every (case, dtype, device).

    Each case is ``(make_args, kwargs)`` where ``make_args(dtype, device)`` returns a tuple of
    fresh input tensors. Outputs are compared, then gradients of every floating input for a
    random upstream gradient. Returns the number of comparisons made.
    """
    __tracebackhide__ = True
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
                names = _expect_same_outputs(got, expected, label, n_outputs, dtype)
                count += len(names)
                for i, (g, e, name) in enumerate(zip(got, expected, names)):
                    if diff_ref and e.requires_grad:
                        count += expect_grads_close(g, e, diff_stu, diff_ref, name, seed=1000 + case_index + i,
                                                    dtype=dtype)
    return count


def compare_module_with_reference(student_cls: Callable, reference_cls: Callable, init_args: tuple,
                                  inputs: Callable, *, what: str, n_outputs: int | None = None,
                                  dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
                                  seeds: Sequence[int] = (0, 1)) -> int:
    """Load the reference module's weights into the student's module and compare every output,
    and its gradients with respect to the floating inputs and every parameter.
    ``inputs(dtype, device, seed)`` returns the forward args."""
    __tracebackhide__ = True
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
                    stu.load_state_dict(ref.state_dict(), strict=True)
                except Exception as exc:  # noqa: BLE001 - the student's module is student code
                    fail(f"Could not load the reference weights into your {what}: {exc}. Keep the "
                         "parameter names given in the exercise.", mistake="weights_not_loaded")
                args = inputs(dtype, device, seed)
                stu_args, ref_args = tuple(_fresh(a) for a in args), tuple(_fresh(a) for a in args)
                expected = _outputs(ref(*ref_args), n_outputs, "the reference")
                got = _outputs(call(stu, *stu_args, what=label), n_outputs, label)
                names = _expect_same_outputs(got, expected, label, n_outputs, dtype)
                count += len(names)
                diff = [i for i, a in enumerate(ref_args) if isinstance(a, torch.Tensor) and a.requires_grad]
                wrt_ref = {**{f"input {i}": ref_args[i] for i in diff}, **dict(sorted(ref.named_parameters()))}
                wrt_stu = {**{f"input {i}": stu_args[i] for i in diff}, **dict(stu.named_parameters())}
                for i, (g, e, name) in enumerate(zip(got, expected, names)):
                    if e.requires_grad:   # every output, not only the first
                        count += expect_grads_close(g, e, wrt_stu, wrt_ref, name, seed=seed + 7 + i, dtype=dtype)
    return count
