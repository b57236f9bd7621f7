"""Chapter 8's reference KV cache: greedy decoding of 512 tokens with and without it.

The chapter's ``TinyLM`` (given in the notebook) at the width of chapter 7's model: d_model 128,
4 heads, d_ff 512, 3 layers, a vocabulary of 1000, random weights (seed 0), eval mode, on the
reference's chapter-3 attention; the reference ``generate`` writes ``--tokens`` tokens after a
16-token prompt (batch of 1), with ``use_cache=False`` (the whole sequence through the model at
every step) and ``use_cache=True``. Reported: seconds of each (the better of ``--repeats`` runs),
the speed-up (target: at least 5x), and whether the tokens are identical. The last line holds the
figures (JSON).

    python bench/ch08_kv_cache.py [--tokens 512] [--layers 3] [--threads 1] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from autograder.reference import reference


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = reference("ch08_efficient")
    torch.manual_seed(0)
    model = ref.TinyLM(1000, d_model=128, num_heads=4, d_ff=512, num_layers=args.layers,
                       max_len=16 + args.tokens).eval()
    prompt = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    seconds, tokens = {}, {}
    with torch.no_grad():
        ref.generate(model, prompt, 4, use_cache=True)         # warm-up: first calls set up kernels
        ref.generate(model, prompt, 4, use_cache=False)
        for use_cache in (True, False):
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                tokens[use_cache] = ref.generate(model, prompt, args.tokens, use_cache=use_cache)
                best = min(best, time.perf_counter() - start)
            seconds[use_cache] = best
            print(f"use_cache={use_cache}: {best:.2f} s for {args.tokens} tokens")
    figures = {"tokens": args.tokens, "d_model": 128, "layers": args.layers, "threads": args.threads,
               "seconds_with_cache": round(seconds[True], 3), "seconds_without_cache": round(seconds[False], 3),
               "speedup": round(seconds[False] / seconds[True], 1),
               "identical_tokens": bool(torch.equal(tokens[True], tokens[False]))}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
