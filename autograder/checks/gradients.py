"""Gradients, compared the way :func:`~autograder.checks.core.expect_close` compares values.

A check computes the expected gradients with autograd on an expression it trusts (PyTorch's own
ops, or a reference module holding the same weights), for the same upstream gradient as the
student's, and compares input by input; inputs can be a module's parameters, matched by name.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .core import Mistake, expect_close, expect_tensor, fail, randn

__all__ = ["grads", "expect_grads_close"]


def grads(output: Any, inputs: Sequence[torch.Tensor], grad_output: torch.Tensor, what: str):
    """Gradients of ``(output * grad_output).sum()`` with respect to ``inputs``."""
    __tracebackhide__ = True
    expect_tensor(output, what)
    if not output.requires_grad:
        fail(f"Gradients do not flow through {what}: the result does not require grad. Avoid "
             ".detach(), .item(), .numpy(), torch.tensor(...) on intermediate results, and in-place "
             "writes into leaf tensors.", mistake="no_gradient")
    try:
        # retain_graph: several outputs of one call (e.g. attention output and weights) share a
        # graph, and the checks backpropagate through each of them in turn.
        got = torch.autograd.grad(output, list(inputs), grad_output, allow_unused=True,
                                  retain_graph=True)
    except Exception as exc:  # noqa: BLE001 - the student's backward is student code
        fail(f"Backpropagating through {what} failed: {type(exc).__name__}: {exc}", mistake="backward_failed")
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs)]


def _named(inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(inputs) if isinstance(inputs, Mapping) else {f"input {j}": t for j, t in enumerate(inputs)}


def _reference_grads(output: torch.Tensor, inputs: list[torch.Tensor], upstream: torch.Tensor) -> list:
    got = torch.autograd.grad(output, inputs, upstream, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs)]


def expect_grads_close(student_out: Any, ref_out: torch.Tensor,
                       student_inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                       ref_inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], what: str, *,
                       upstream: torch.Tensor | None = None, seed: int = 0,
                       mistakes: Mapping[Mistake, torch.Tensor | None] | None = None,
                       nonfinite: Mistake | None = None, dtype: torch.dtype | None = None) -> int:
    """Fail unless the gradients of ``student_out`` match those of ``ref_out`` (computed with
    autograd from ``ref_inputs``) for the same upstream gradient: ``upstream``, or a random one
    from ``seed``, zero where the reference is not finite. Returns the number compared.

    Inputs are sequences (named "input 0", ...) or name -> tensor mappings matched by name, e.g.
    ``dict(module.named_parameters())`` of the student's module and of a reference module holding
    the same weights. ``mistakes`` maps a Mistake to the *output* it would produce from
    ``ref_inputs``; its gradients name it. ``nonfinite`` (fields ``{what}``, ``{name}``) names the
    cause when the student's gradients are NaN or inf where the expected ones are finite.
    """
    __tracebackhide__ = True
    want_in, have_in = _named(ref_inputs), _named(student_inputs)
    names = list(want_in)
    if set(have_in) != set(names):
        fail(f"{what}: expected gradients with respect to {names}, but the parameters are "
             f"{sorted(have_in)}.", mistake="wrong_parameters")
    if upstream is None:
        upstream = randn(*ref_out.shape, seed=seed, dtype=ref_out.dtype, device=ref_out.device)
        upstream = upstream.masked_fill(~torch.isfinite(ref_out.detach()), 0.0)
    ref_list = [want_in[n] for n in names]
    want = _reference_grads(ref_out, ref_list, upstream)
    wrong = {m: _reference_grads(out, ref_list, upstream) for m, out in (mistakes or {}).items() if out is not None}
    have = grads(student_out, [have_in[n] for n in names], upstream.clone(), what)
    for name, h, w in zip(names, have, want):
        if nonfinite is not None and not bool(torch.isfinite(h[torch.isfinite(w)]).all()):
            fail(nonfinite, what=what, name=name)
    for j, (name, h, w) in enumerate(zip(names, have, want)):
        expect_close(h, w, f"the gradient of {what} with respect to {name}", dtype=dtype,
                     mistakes={m: g[j] for m, g in wrong.items()})
    return len(names)


