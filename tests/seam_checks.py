"""A small Transformer-shaped student module and the checks a whole-model chapter needs, used
by tests/test_seam.py both in-process (the student's kernel) and through the real sandbox.

The checks touch every part of the seam chapters 4-7 rely on: submodules called in place,
``encode``/``decode`` methods, a positional-encoding buffer (persistent and not), plain
attributes, ``.double()``/``.eval()``, dropout in train mode with gradients, a module returned by
a factory, and a model trained in an earlier cell.
"""
from __future__ import annotations

import torch
from torch import nn

from autograder.checks.core import CheckFailure, expect_close, fail  # noqa: F401 - CheckFailure for tests

STUDENT = '''
import math
import torch
from torch import nn


class PositionalEncoding(nn.Module):
    def __init__(self, d_model, max_len=32, persistent=False):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        freq = 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos / freq)
        pe[:, 1::2] = torch.cos(pos / freq)
        self.register_buffer("pe", pe, persistent=persistent)
        self.d_model = d_model

    def forward(self, x):
        return x + self.pe[: x.shape[-2]]


class Layer(nn.Module):
    def __init__(self, d_model, dropout):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, 2, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, d_model))
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, memory=None):
        kv = x if memory is None else memory
        x = self.norm1(x + self.drop(self.attn(x, kv, kv, need_weights=False)[0]))
        return self.norm2(x + self.drop(self.ff(x)))


class Tiny(nn.Module):
    def __init__(self, vocab=11, d_model=16, num_layers=2, dropout=0.1):
        super().__init__()
        self.d_model = d_model
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = PositionalEncoding(d_model)
        self.pos_saved = PositionalEncoding(d_model, persistent=True)
        self.encoder = nn.ModuleList([Layer(d_model, dropout) for _ in range(num_layers)])
        self.decoder = nn.ModuleList([Layer(d_model, dropout) for _ in range(num_layers)])
        self.generator = nn.Linear(d_model, vocab)
        self.generator.weight = self.embed.weight          # tied, as chapter 7 does

    def encode(self, src):
        x = self.pos(self.embed(src) * math.sqrt(self.d_model))
        for layer in self.encoder:
            x = layer(x)
        return x

    def decode(self, tgt, memory):
        x = self.pos_saved(self.embed(tgt) * math.sqrt(self.d_model))
        for layer in self.decoder:
            x = layer(x, memory)
        return x

    def forward(self, src, tgt):
        return self.generator(self.decode(tgt, self.encode(src)))


def make_model(**kwargs):
    return Tiny(**kwargs)
'''

TRAINING = '''
torch.manual_seed(0)
model = make_model(dropout=0.0)
optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
for step in range(60):                            # learn to map each token to the next one
    src = torch.randint(1, 11, (16, 6))
    logits = model(src, src)
    loss = nn.functional.cross_entropy(logits.reshape(-1, 11), (src % 10 + 1).reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()
'''

# The same module as STUDENT, trusted: the checks load the student's weights into it.
_ns: dict = {}
exec(STUDENT, _ns)  # noqa: S102 - the test's own copy of the honest student code
Reference, ReferenceLayer = _ns["Tiny"], _ns["Layer"]


def _tokens(seed: int, n: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(1, 11, (n, length), generator=torch.Generator().manual_seed(seed))


def check_submodule_in_place(Tiny):
    m = Tiny().eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    ref = ReferenceLayer(16, 0.1).eval()
    ref.load_state_dict(m.encoder[1].state_dict())
    expect_close(m.encoder[1](x), ref(x), "model.encoder[1](x)")
    lin = m.decoder[0].ff[2]                       # a leaf two containers down
    expect_close(lin(x[..., :32] if x.shape[-1] == 32 else torch.cat([x, x], -1)),
                 torch.cat([x, x], -1) @ lin.weight.T + lin.bias, "model.decoder[0].ff[2](x)")


def check_methods(Tiny):
    m = Tiny().eval()
    ref = Reference().eval()
    ref.load_state_dict(m.state_dict())
    src, tgt = _tokens(2), _tokens(3)
    memory = m.encode(src)
    expect_close(memory, ref.encode(src), "model.encode(src)")
    expect_close(m.decode(tgt, memory), ref.decode(tgt, ref.encode(src)), "model.decode(tgt, memory)")
    expect_close(m(src, tgt), ref(src, tgt), "model(src, tgt)")


def check_buffers_and_attributes(Tiny):
    m = Tiny()
    if m.d_model != 16 or m.pos.d_model != 16:
        fail(f"d_model should be 16, got {m.d_model!r}")
    pos = torch.arange(32.0)[:, None]
    expect_close(m.pos.pe[:, 0], torch.sin(pos[:, 0]), "pe[:, 0]")
    expect_close(m.pos.pe[:, 1], torch.cos(pos[:, 0]), "pe[:, 1]")
    expect_close(m.pos.pe[:, 2], torch.sin(pos[:, 0] / 10000 ** (2 / 16)), "pe[:, 2]")
    keys = set(m.state_dict())
    if "pos.pe" in keys or "pos_saved.pe" not in keys:
        fail(f"the persistent buffer should be saved and the other not: {sorted(k for k in keys if 'pe' in k)}")
    if m.generator.weight is not m.embed.weight:
        fail("the generator and the embedding should share their weight")


def check_double_and_device(Tiny):
    m = Tiny().double().eval()
    if m.pos.pe.dtype != torch.float64:
        fail("pe did not follow .double()")
    out = m.encode(_tokens(4))
    if out.dtype != torch.float64:
        fail(f"encode gave {out.dtype} after .double()")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m.to(device)
    if m.encode(_tokens(4).to(device)).device.type != device:
        fail("the module did not move")


def check_dropout_gradients(Tiny):
    """Train mode: the same seed gives the same masks, another seed others, and the gradient
    is the derivative of the function the forward computed (finite differences, float64)."""
    m = Tiny(dropout=0.3).double().train()
    tgt = _tokens(5)
    memory = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    w = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    v = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))

    def run(seed, mem):
        torch.manual_seed(seed)
        return m.decode(tgt, mem)

    out = run(11, memory)
    (g,) = torch.autograd.grad((out * w).sum(), [memory])
    if torch.equal(run(11, memory).detach(), run(12, memory).detach()):
        fail("dropout drew the same masks for different seeds (is it on in train mode?)")
    expect_close(run(11, memory), out.detach(), "the same call with the same seed")
    eps = 1e-6
    with torch.no_grad():
        fd = ((run(11, memory + eps * v) - run(11, memory - eps * v)) * w).sum() / (2 * eps)
    expect_close((g * v).sum(), fd, "gradient along a direction vs finite differences", tol=(1e-5, 1e-7))
    params = dict(m.named_parameters())
    (gw,) = torch.autograd.grad((run(11, memory) * w).sum(), [params["decoder.1.ff.0.weight"]])
    if gw.abs().sum() == 0:
        fail("no gradient reached a parameter")


def check_factory(make_model):
    m = make_model(num_layers=3)
    if not isinstance(m, nn.Module):
        fail(f"make_model returned {type(m).__name__}, not a module")
    if len(m.encoder) != 3 or sum(p.numel() for p in m.parameters()) != \
            sum(p.numel() for p in Reference(num_layers=3).parameters()):
        fail("make_model(num_layers=3) has the wrong shape")


def check_trained(model):
    """The weights as the student left them, run by trusted code: a model that behaves
    differently when called (retraining itself on the test inputs, say) gains nothing."""
    trusted = Reference(dropout=0.0).eval()
    trusted.load_state_dict(model.state_dict())
    src = _tokens(9, n=8, length=6)
    with torch.no_grad():
        acc = (trusted(src, src).argmax(-1) == src % 10 + 1).double().mean().item()
    if acc < 0.9:
        fail(f"the trained model maps only {acc:.0%} of tokens right")
    print(f"the trained model maps {acc:.0%} of tokens right")


def run_all(Tiny, make_model, model):
    """What a test cell would do: every check, the verdicts by name ("ok" or the message)."""
    from autograder.checks.core import CheckFailure
    verdicts = {}
    checks = [(check_submodule_in_place, Tiny), (check_methods, Tiny), (check_buffers_and_attributes, Tiny),
              (check_double_and_device, Tiny), (check_dropout_gradients, Tiny), (check_factory, make_model),
              (check_trained, model)]
    for check, arg in checks:
        try:
            check(arg)
            verdicts[check.__name__] = "ok"
        except CheckFailure as exc:
            verdicts[check.__name__] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a student error, reported like the checks do
            verdicts[check.__name__] = f"raised {getattr(exc, 'student_type', type(exc).__name__)}"
    return verdicts

