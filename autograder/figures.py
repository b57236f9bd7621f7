"""Plotting helpers shared by the chapter notebooks (heatmaps of attention weights and masks).

Kept here so every chapter draws attention the same way: rows are queries, columns are keys.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import torch


def _as_array(t):
    return t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else t


def attention_heatmap(weights, keys: Sequence[str] | None = None, queries: Sequence[str] | None = None,
                      ax=None, title: str | None = None, annotate: bool = True, cmap: str = "viridis",
                      vmin: float = 0.0, vmax: float | None = 1.0):
    """Draw a (L_q, L_k) weight matrix; each row is one query's distribution over the keys."""
    w = _as_array(weights)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.6 * w.shape[1] + 2, 0.5 * w.shape[0] + 1.5))
    im = ax.imshow(w, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(w.shape[1]), keys if keys is not None else range(w.shape[1]),
                  rotation=45 if keys is not None else 0, ha="right" if keys is not None else "center")
    ax.set_yticks(range(w.shape[0]), queries if queries is not None else range(w.shape[0]))
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if annotate and w.shape[0] * w.shape[1] <= 144:
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if w[i, j] < 0.5 * (vmax or w.max()) else "black")
    if title:
        ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax


def mask_heatmap(mask, ax=None, title: str | None = None, keys=None, queries=None):
    """Draw a boolean mask: True (may attend) light, False (blocked) dark."""
    m = _as_array(mask).astype(float)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * m.shape[1] + 1.5, 0.45 * m.shape[0] + 1.2))
    ax.imshow(m, cmap="Greys_r", vmin=0, vmax=1)
    ax.set_xticks(range(m.shape[1]), keys if keys is not None else range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]), queries if queries is not None else range(m.shape[0]))
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)
    return ax


def heads_grid(weights, tokens: Sequence[str] | None = None, titles: Sequence[str] | None = None,
               ncols: int = 4):
    """Side-by-side heatmaps of per-head weights shaped (H, L_q, L_k)."""
    w = _as_array(weights)
    h = w.shape[0]
    nrows = (h + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.0 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= h:
            ax.axis("off")
            continue
        ax.imshow(w[i], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(titles[i] if titles else f"head {i}")
        ticks = range(w.shape[-1])
        ax.set_xticks(ticks, tokens if tokens is not None else ticks, rotation=90, fontsize=7)
        ax.set_yticks(range(w.shape[-2]), tokens if tokens is not None else range(w.shape[-2]), fontsize=7)
    fig.tight_layout()
    return fig
