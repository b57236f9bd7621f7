"""Chapter 8's reference tiled attention at L = 8192: peak memory and time against PyTorch's fused
kernel and the plain attention.

One head, d = 64, float32, CPU, forward only, inputs (1, 1, L, d); one call of each, in one run,
after one warm-up call of each on L = 512, each on inputs of a size not used before in the
process (L + 0, 1, 2: the peak memory of a first call at that size, ``autograder.checks.memory.measure``: the resident-set high-water mark during the call minus
what the process held before). The three outputs are compared (largest difference against
``F.scaled_dot_product_attention``). Reported: MiB and seconds per version, and the tiled
version's peak as a multiple of the fused kernel's (target: within 2x) and of the plain one's.
The last line holds the figures (JSON).

    python bench/ch08_tiled_attention.py [--length 8192] [--block 256] [--causal]
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from autograder.checks.memory import measure
from autograder.reference import reference


def plain(q, k, v, causal):
    """The L x L way: logits, softmax, weights times values."""
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[-2]
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tiled = reference("ch08_efficient").tiled_attention
    versions = {
        "tiled": lambda q, k, v: tiled(q, k, v, args.block, causal=args.causal),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal),
        "plain": lambda q, k, v: plain(q, k, v, args.causal),
    }
    figures, outputs = {"length": args.length, "d": 64, "block": args.block, "causal": args.causal}, {}
    with torch.no_grad():
        for fn in versions.values():             # a first call sets up what later calls reuse (kernels, pools)
            fn(*(torch.randn(1, 1, 512, 64) for _ in range(3)))
        for i, (name, fn) in enumerate(versions.items()):
            q, k, v = (torch.randn(1, 1, args.length + i, 64, generator=torch.Generator().manual_seed(j))
                       for j in range(3))
            start = time.perf_counter()
            out, grown = measure(fn, q, k, v)
            seconds = time.perf_counter() - start
            outputs[name] = out[..., :args.length - 2, :]
            figures[f"{name}_mib"] = None if grown is None else round(grown / 2**20, 1)
            figures[f"{name}_s"] = round(seconds, 3)
            print(f"{name:6s}: peak memory growth {figures[f'{name}_mib']} MiB, {seconds:.2f} s")
    # Different L per version (fresh sizes): compare on a common length recomputed for accuracy.
    n = 1024
    q, k, v = (torch.randn(1, 1, n, 64, generator=torch.Generator().manual_seed(10 + j)) for j in range(3))
    with torch.no_grad():
        figures["max_abs_diff_tiled_vs_sdpa_at_1024"] = float(
            (versions["tiled"](q, k, v) - versions["sdpa"](q, k, v)).abs().max())
    if figures["tiled_mib"] is not None:
        figures["tiled_over_sdpa"] = round(figures["tiled_mib"] / max(figures["sdpa_mib"], 0.1), 2)
        figures["plain_over_tiled"] = round(figures["plain_mib"] / max(figures["tiled_mib"], 0.1), 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
