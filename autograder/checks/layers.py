"""Helpers for the checks of layers and stacks built from earlier exercises (chapters 5-7).

A student's layer names its feed-forward parameters as it likes (``ff.linear1``, ``ff.net.0``),
so weights are matched by *role*: a ``names_of(module, what)`` function maps canonical names
(``self_attn.q_proj.weight``, ``ff.w1``, ``layers.0.norm1.bias``) to the module's own names.
"""
from __future__ import annotations

import torch

from .core import call, devices, expect_close, expect_tensor, fail
from .gradients import expect_grads_close

__all__ = ["stack_names", "compare_by_role"]


def stack_names(module, n: int, norm_first: bool, what: str, layer_names, mistakes: dict) -> dict:
    """canonical ``layers.{i}.<canonical>`` / ``norm.*`` -> the student's parameter name of a stack
    of ``n`` layers (``layer_names(params, what, prefix)`` names one layer). Checks on the way:
    registered layers, their number, separate parameters, a final ``norm`` exactly when
    ``norm_first``. ``mistakes``: Mistakes under the keys not_registered, wrong_number (fields n,
    got), shared (fields n, detail), final_norm_missing, final_norm_in_post_norm."""
    __tracebackhide__ = True
    params = dict(module.named_parameters())
    if not any(name.startswith("layers.") for name in params):
        fail(mistakes["not_registered"])
    try:
        layers = list(module.layers)
    except Exception:  # noqa: BLE001 - a student's attribute
        layers = None
    if layers is not None and len(layers) != n:
        fail(mistakes["wrong_number"], n=n, got=len(layers))
    if layers is not None:
        seen: dict[int, str] = {}
        for i, layer in enumerate(layers):
            for name, t in layer.named_parameters():
                if t.data_ptr() in seen:
                    fail(mistakes["shared"], n=n, detail=f"layers[{i}].{name} is the same tensor as {seen[t.data_ptr()]}")
                seen[t.data_ptr()] = f"layers[{i}].{name}"
    indices = {name.split(".")[1] for name in params if name.startswith("layers.")}
    if indices != {str(i) for i in range(n)}:
        if indices == {"0"}:
            fail(mistakes["shared"], n=n, detail="only layers.0 has parameters")
        fail(mistakes["wrong_number"], n=n, got=len(indices))
    names = {}
    for i in range(n):
        names.update({f"layers.{i}.{k}": v for k, v in
                      layer_names(params, f"{what}.layers[{i}]", f"layers.{i}.").items()})
    rest = sorted(set(params) - set(names.values()))
    has_norm = {"norm.weight", "norm.bias"} <= set(rest)
    if norm_first and not has_norm:
        fail(mistakes["final_norm_missing"])
    if not norm_first and has_norm:
        fail(mistakes["final_norm_in_post_norm"])
    if set(rest) != ({"norm.weight", "norm.bias"} if norm_first else set()):
        fail(f"{what} has parameters besides its layers and the final norm: {rest}.", mistake="wrong_parameters")
    if norm_first:
        names.update({"norm.weight": "norm.weight", "norm.bias": "norm.bias"})
    return names


def _leaf(t):
    return t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def compare_by_role(names_of, student_cls, reference_cls, init_args: tuple, inputs, *, what: str,
                    random_value, load, init_kwargs: dict | None = None, seeds=(0, 1),
                    grad_dtypes=(torch.float64,)) -> int:
    """Hidden tests: build the student's and the reference module, give both the same random
    weights by role (``names_of(module, what)``: canonical -> own name; ``random_value(name, shape,
    seed, device, dtype)``; ``load(module, values, what)``), and compare in eval mode, on every
    device, the outputs in float32 and float64 and their gradients (the floating inputs and every
    parameter) in ``grad_dtypes`` (float64 by default: float32 gradients through a deep stack
    differ by rounding alone).
    ``inputs(dtype, device, seed)`` -> the forward args."""
    __tracebackhide__ = True
    init_kwargs = init_kwargs or {}
    label0 = f"{what}{init_args}"
    count = 0
    for seed in seeds:
        for dtype in (torch.float32, torch.float64):
            for device in devices():
                label = f"{what} (hidden seed {seed}, {dtype}, {device})"
                stu = call(student_cls, *init_args, what=label0, **init_kwargs)
                if not isinstance(stu, torch.nn.Module):
                    fail(f"{label0} should create a torch.nn.Module.", mistake="not_a_module")
                ref = reference_cls(*init_args, **init_kwargs)
                s_names, r_names = names_of(stu, label0), names_of(ref, "the reference")
                stu, ref = stu.to(device=device, dtype=dtype).eval(), ref.to(device=device, dtype=dtype).eval()
                shapes = {k: tuple(dict(ref.named_parameters())[v].shape) for k, v in r_names.items()}
                canon = {k: random_value(k, shapes[k], seed * 1000 + i, device, dtype)
                         for i, k in enumerate(sorted(shapes))}
                load(stu, {s_names[k]: t for k, t in canon.items()}, label0)
                ref.load_state_dict({**ref.state_dict(), **{r_names[k]: t for k, t in canon.items()}})
                args = inputs(dtype, device, seed)
                s_args, r_args = tuple(_leaf(a) for a in args), tuple(_leaf(a) for a in args)
                got = call(stu, *s_args, what=label)
                want = ref(*r_args)
                expect_tensor(got, label, shape=want.shape, dtype=dtype, device=device)
                expect_close(got, want, label, dtype=dtype)
                s_params, r_params = dict(stu.named_parameters()), dict(ref.named_parameters())
                wrt_s = {**{f"input {i}": a for i, a in enumerate(s_args) if isinstance(a, torch.Tensor)
                            and a.requires_grad}, **{k: s_params[v] for k, v in s_names.items()}}
                wrt_r = {**{f"input {i}": a for i, a in enumerate(r_args) if isinstance(a, torch.Tensor)
                            and a.requires_grad}, **{k: r_params[v] for k, v in r_names.items()}}
                count += 1
                if dtype in grad_dtypes:
                    count += expect_grads_close(got, want, wrt_s, wrt_r, f"the output of {label}", seed=seed + 5,
                                                dtype=dtype)
    return count
