"""Multi-head attention in plain torch, from explicit weights: the right answer and its mistakes.

Chapter 3's checks compare students' modules with these, and so will every later chapter whose
layers contain multi-head attention. ``p`` is always a dict of the eight parameters named as in
:data:`MHA_PARAMS` (the layout the exercises ask for: four ``nn.Linear(d_model, d_model)``).
"""
from __future__ import annotations

import math

import torch

from .core import randn
from .masks import masked_softmax

__all__ = ["MHA_PARAMS", "split", "merge", "random_params", "packed", "mha_loop", "mha_variant", "torch_mha"]

MHA_PARAMS = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
              "v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias")


def split(x: torch.Tensor, h: int, kind: str = "right") -> torch.Tensor:
    """(B, L, d_model) -> (B, h, L, d_k); ``kind`` "no_transpose"/"interleaved" are mistakes."""
    b, length, d = x.shape
    if kind == "right":
        return x.reshape(b, length, h, d // h).transpose(1, 2)
    if kind == "no_transpose":
        return x.reshape(b, h, length, d // h)
    if kind == "interleaved":
        return x.reshape(b, length, d // h, h).permute(0, 3, 1, 2)
    raise ValueError(kind)


def merge(y: torch.Tensor, kind: str = "right") -> torch.Tensor:
    """(B, H, L, d_k) -> (B, L, H * d_k); ``kind`` "no_transpose"/"interleaved" are mistakes."""
    b, h, length, d_k = y.shape
    if kind == "right":
        return y.transpose(1, 2).reshape(b, length, h * d_k)
    if kind == "no_transpose":
        return y.reshape(b, length, h * d_k)
    if kind == "interleaved":
        return y.permute(0, 2, 3, 1).reshape(b, length, h * d_k)
    raise ValueError(kind)


def _project(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def random_params(d_model: int, seed: int, device, dtype=torch.float32) -> dict:
    """Reproducible weights of the usual scale (1/√d_model) and small biases."""
    scale = 1.0 / math.sqrt(d_model)
    return {name: randn(*((d_model, d_model) if name.endswith("weight") else (d_model,)),
                        seed=seed + i, device=device, dtype=dtype,
                        scale=scale if name.endswith("weight") else 0.1)
            for i, name in enumerate(MHA_PARAMS)}


def packed(p: dict, prefix: str = "", to: str = "") -> dict:
    """The eight tensors named as in :data:`MHA_PARAMS` (under ``prefix``) in the layout of
    ``nn.MultiheadAttention`` (under ``to``): ``in_proj_weight`` stacks W_q, W_k, W_v as rows
    [0:d], [d:2d], [2d:3d]. Built with ``torch.cat``, so gradients reach the separate tensors
    (use it with ``torch.func.functional_call``)."""
    def cat(kind):
        return torch.cat([p[f"{prefix}{name}_proj.{kind}"] for name in "qkv"])
    return {f"{to}in_proj_weight": cat("weight"), f"{to}in_proj_bias": cat("bias"),
            f"{to}out_proj.weight": p[f"{prefix}out_proj.weight"], f"{to}out_proj.bias": p[f"{prefix}out_proj.bias"]}


def mha_loop(p: dict, query, key, value, num_heads: int, mask=None):
    """Multi-head attention as a loop over single heads, with explicit slices of the weights.
    Returns ``(output, weights)`` with weights shaped (B, H, L_q, L_k)."""
    d_model = p["q_proj.weight"].shape[0]
    d_k = d_model // num_heads
    if mask is not None and mask.dim() == 4:
        mask = mask.expand(mask.shape[0], num_heads, *mask.shape[2:])
    outs, weights = [], []
    for i in range(num_heads):
        rows = slice(i * d_k, (i + 1) * d_k)
        q = query @ p["q_proj.weight"][rows].T + p["q_proj.bias"][rows]
        k = key @ p["k_proj.weight"][rows].T + p["k_proj.bias"][rows]
        v = value @ p["v_proj.weight"][rows].T + p["v_proj.bias"][rows]
        m = mask[:, i] if mask is not None and mask.dim() == 4 else mask
        w = masked_softmax(q @ k.transpose(-2, -1) / math.sqrt(d_k), m)
        outs.append(w @ v)
        weights.append(w)
    concat = torch.cat(outs, dim=-1)
    return _project(p, "out_proj", concat), torch.stack(weights, dim=1)


def mha_variant(p: dict, query, key, value, num_heads: int, mask=None, *, split_kind="right",
                merge_kind="right", scale="d_k", out_proj=True, mask_mode="right", value_from="value"):
    """Vectorised multi-head attention with one deliberate mistake (or none): what a student's
    module would return if it made that mistake. Returns None where the mistake cannot run."""
    d_model = p["q_proj.weight"].shape[0]
    d_k = d_model // num_heads
    try:
        q = split(_project(p, "q_proj", query), num_heads, split_kind)
        k = split(_project(p, "k_proj", key), num_heads, split_kind)
        v = split(_project(p, "v_proj", key if value_from == "key" else value), num_heads, split_kind)
        logits = q @ k.transpose(-2, -1)
        logits = logits / {"d_k": math.sqrt(d_k), "d_model": math.sqrt(d_model), "none": 1.0}[scale]
        if mask is not None and mask_mode != "ignored":
            m = ~mask if mask_mode == "inverted" else mask
            if m.dim() == 3 and mask_mode != "no_head_dim":
                m = m.unsqueeze(1)
            if m.dim() == 3 and (m.shape[0] not in (1, num_heads)):
                return None
            m = torch.broadcast_to(m, logits.shape)
        else:
            m = None
        w = masked_softmax(logits, m)
        merged = merge(w @ v, merge_kind)
        out = _project(p, "out_proj", merged) if out_proj else merged
    except RuntimeError:
        return None
    return out, w


def torch_mha(p: dict, query, key, value, num_heads: int, mask=None, average=False):
    """torch.nn.MultiheadAttention with the same weights (and ~mask: it blocks where True)."""
    d_model = query.shape[-1]
    ref = torch.nn.MultiheadAttention(d_model, num_heads, batch_first=True).to(query.device, query.dtype)
    ref.eval()
    ref.load_state_dict(packed(p))
    attn_mask = None
    if mask is not None:
        b, l_q, l_k = query.shape[0], query.shape[1], key.shape[1]
        if mask.dim() == 2:
            attn_mask = ~mask
        else:
            m = mask.unsqueeze(1) if mask.dim() == 3 else mask
            attn_mask = ~m.expand(b, num_heads, l_q, l_k).reshape(b * num_heads, l_q, l_k)
    with torch.no_grad():
        return ref(query, key, value, attn_mask=attn_mask, need_weights=True,
                   average_attn_weights=average)
