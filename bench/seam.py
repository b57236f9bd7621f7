"""Cost of checking a whole model through the sandbox against checking it in-process.

A 6-layer encoder-decoder (d_model 128, 4 heads, feed-forward 512) lives in the sandbox; the
grader calls ``encode``/``decode``/``forward`` with gradients through the proxy, as a chapter-7
check would, N times, and the same calls run in-process. Reported: milliseconds per call both
ways and their ratio, for growing N, and the bytes each call sends into the sandbox (after the
module was built once) against the bytes of its parameters, which the old seam sent with every
call. The last line holds the figures.

    python bench/seam.py
"""
from __future__ import annotations

import time

import torch

from autograder.sandbox import process
from autograder.sandbox.process import Limits, Sandbox
from autograder.sandbox.proxy import Session, make_proxy

STUDENT = '''
import torch
from torch import nn

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.Transformer(d_model=128, nhead=4, num_encoder_layers=6, num_decoder_layers=6,
                                dim_feedforward=512, dropout=0.1, batch_first=True)
    def encode(self, src):
        return self.t.encoder(src)
    def decode(self, tgt, memory):
        return self.t.decoder(tgt, memory)
    def forward(self, src, tgt):
        return self.decode(tgt, self.encode(src))
'''


def one_check(model, src, tgt) -> None:
    """What a check does per call: a train-mode forward and a backward to inputs and weights."""
    out = model(src, tgt)
    params = [p for _, p in list(model.named_parameters())[:4]]
    torch.autograd.grad((out * out).mean(), [src, *params])


def timed(model, calls: int) -> float:
    src = torch.randn(8, 16, 128, requires_grad=True)
    tgt = torch.randn(8, 16, 128)
    one_check(model, src, tgt)                  # warm-up (first call, lazy init)
    start = time.perf_counter()
    for _ in range(calls):
        one_check(model, src, tgt)
    return (time.perf_counter() - start) / calls * 1000


def main() -> None:
    torch.set_num_threads(1)                    # the sandbox runs single-threaded too
    ns: dict = {}
    exec(STUDENT, ns)  # noqa: S102 - the benchmark's own module
    local = ns["Model"]().train()
    sent = []
    real = process.Sandbox.request

    def spy(self, msg, timeout=None):
        if msg.get("op") in ("call", "vjp"):
            sent.append(sum(t.numel() * t.element_size() for t in msg.get("tensors", [])))
        return real(self, msg, timeout)

    process.Sandbox.request = spy
    rows = []
    with Sandbox(Limits(cell_seconds=120)) as sb:
        sb.run_cell(STUDENT)
        remote = make_proxy(Session(sb), "Model", "")()
        remote.train()
        param_bytes = sum(p.numel() * p.element_size() for p in remote.parameters())
        for calls in (1, 10, 40):
            sent.clear()
            ms_local, ms_remote = timed(local, calls), timed(remote, calls)
            rows.append((calls, ms_local, ms_remote, max(sent) if sent else 0))
            print(f"{calls:3d} checks: in-process {ms_local:7.1f} ms, sandbox {ms_remote:7.1f} ms "
                  f"(x{ms_remote / ms_local:.2f}); largest request {max(sent) / 1024:.0f} KiB, "
                  f"parameters {param_bytes / 2**20:.1f} MiB")
    ratios = ", ".join(f"N={c}: x{r / l:.2f}" for c, l, r, _ in rows)
    print(f"seam: 6+6 layers d_model 128, {param_bytes / 2**20:.1f} MiB of parameters; sandbox/in-process per check "
          f"{ratios}; each call sends {rows[-1][3] / 1024:.0f} KiB (parameters sent once, not {param_bytes / 2**20:.1f} MiB per call)")


if __name__ == "__main__":
    main()
