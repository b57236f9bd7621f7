"""The course's mask convention in one place: building masks, applying them, checking them.

A mask is a **boolean** tensor in which **True means "this query may attend to this key"**,
broadcastable against the attention logits ``(..., L_q, L_k)``: the convention of the boolean
``attn_mask`` of ``F.scaled_dot_product_attention`` (``nn.MultiheadAttention`` uses the opposite
one). A query that may attend to no key gets all-zero weights and a zero output. Chapter 2 asks
students to build these; every later chapter's checks use them.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .core import Mistake, expect_tensor, fail

__all__ = ["causal", "padding", "masked_softmax", "attention", "show", "expect_mask_tensor",
           "expect_mask", "MASK_NOT_BOOL"]

MASK_NOT_BOOL = Mistake(
    "mask_not_bool",
    "{what} has dtype {dtype}; a mask must be a boolean tensor (dtype torch.bool), True where a "
    "query may attend. A comparison such as `a <= b` gives booleans directly; torch.ones/torch.zeros "
    "take dtype=torch.bool.")


def causal(n: int, device=None) -> torch.Tensor:
    """(n, n): query i may attend to keys j <= i. (Written as a comparison of positions, not as
    the exercise's reference: students read this package, the leak check reads it too.)"""
    positions = torch.arange(n, device=device)
    return positions[None, :] <= positions[:, None]


def padding(lengths: Sequence[int] | torch.Tensor, max_len: int, device=None) -> torch.Tensor:
    """(B, 1, max_len): True at the real tokens (positions < length), which come first."""
    lengths = torch.as_tensor(lengths, device=device)
    return (torch.arange(max_len, device=lengths.device) < lengths[:, None])[:, None, :]


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None = None, *, fill: float = float("-inf"),
                   zero_empty_rows: bool = True) -> torch.Tensor:
    """torch.softmax over the keys after ``masked_fill(~mask, fill)``; rows with no allowed key
    are zeros (the course's rule). ``fill``/``zero_empty_rows`` exist to produce mistakes."""
    if mask is None:
        return torch.softmax(logits, -1)
    mask = mask.to(logits.device).expand(logits.shape)
    w = torch.softmax(logits.masked_fill(~mask, fill), dim=-1)
    return w.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0) if zero_empty_rows else w


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """Expected ``(output, weights)``, differentiable: ``F.scaled_dot_product_attention`` with a
    boolean ``attn_mask`` for the output and :func:`masked_softmax` for the weights. Rows with no
    allowed key are zero in both, spelled out so that no kernel's choice for such rows matters."""
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v), torch.softmax(logits, -1)
    m = mask.expand(logits.shape)
    visible = m.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(visible, m, True))
    return out.masked_fill(~visible, 0.0), masked_softmax(logits, m)


def show(mask: torch.Tensor) -> str:
    """A small boolean mask as rows of 0/1 (for messages)."""
    m = mask.detach().cpu()
    if m.numel() > 64:
        return f"a mask of shape {tuple(m.shape)}"
    return str(m.to(torch.int64).tolist())


def expect_mask_tensor(m, what: str, shape: tuple, device: str) -> torch.Tensor:
    """Type, shape, dtype bool, device, with mask-specific messages."""
    __tracebackhide__ = True
    expect_tensor(m, what, shape=shape)
    if m.dtype != torch.bool:
        fail(MASK_NOT_BOOL, what=what, dtype=m.dtype)
    if m.device.type != torch.device(device).type:
        fail(f"{what} is on {m.device}, but it should be on {device}: create the mask on the "
             "requested device (device=... in torch.ones / torch.arange) rather than on the default "
             "one, and never call .cpu()/.cuda() inside.", mistake="wrong_device")
    return m


def expect_mask(got: torch.Tensor, want: torch.Tensor, what: str,
                mistakes: Mapping[Mistake, torch.Tensor | None]) -> None:
    """Exact equality of boolean masks; a mismatch that equals a known mistake names it."""
    __tracebackhide__ = True
    if torch.equal(got.cpu(), want.cpu()):
        return
    for mistake, wrong in mistakes.items():
        if wrong is not None and wrong.shape == got.shape and torch.equal(got.cpu(), wrong.cpu()):
            fail(f"{what} is wrong: {mistake.message}", mistake=mistake.id)
    fail(f"{what} is wrong: expected {show(want)} (1 = may attend), got {show(got)}.", mistake="values_differ")
