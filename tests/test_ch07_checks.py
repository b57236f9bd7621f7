"""The chapter-7 checks pass correct code written differently and name each common mistake
(asserted by its mistake id); the reference agrees with PyTorch (nn.Transformer with copied weights,
F.cross_entropy with label smoothing), and the trusted helpers the checks use agree with each other."""
from __future__ import annotations

import heapq
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from autograder.checks import ch07, toy_language
from autograder.checks.ch07 import (check_decoding, check_label_smoothing, check_rate, check_train_step,
                                    check_trained_model, check_transformer)
from autograder.reference import reference
from checking import FAST, mistake_of
from corpus import ch07 as corpus

pytestmark = pytest.mark.filterwarnings("error")     # a warning in a check would zero a student's cell

R4, R6, R7 = reference("ch04_positions"), reference("ch06_decoder"), reference("ch07_translation")
PAD, START, END = toy_language.PAD, toy_language.START, toy_language.END
shift_right, target_mask = R6.shift_right, R6.target_mask


# --------------------------------------------------------------------------------------------
# Exercise 1: Transformer
# --------------------------------------------------------------------------------------------

class Model(nn.Module):
    """A correct Transformer; mutants override one small method."""
    DecoderClass = R6.Decoder
    bias = True

    def __init__(self, vocab_size, num_layers=2, d_model=64, num_heads=4, d_ff=256, dropout=0.1, max_len=64,
                 norm_first=False):
        super().__init__()
        self.d_model = d_model
        self.embed = R4.Embeddings(vocab_size, d_model)
        self.pos = R4.PositionalEncoding(d_model, max_len, dropout)
        self.encoder = R6.Encoder(num_layers, d_model, num_heads, d_ff, dropout, norm_first)
        self.decoder = type(self).DecoderClass(num_layers, d_model, num_heads, d_ff, dropout, norm_first)
        self.generator = nn.Linear(d_model, vocab_size, bias=type(self).bias)
        self.initialise()

    def initialise(self):
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith("embed."):
                nn.init.xavier_uniform_(p)
        nn.init.normal_(self.embed.embedding.weight, std=self.d_model ** -0.5)
        if self.generator.bias is not None:
            nn.init.zeros_(self.generator.bias)
        self.generator.weight = self.embed.embedding.weight

    def source(self, src):
        return self.pos(self.embed(src))

    def target(self, tgt_in):
        return self.pos(self.embed(tgt_in))

    def encode(self, src, src_mask):
        return self.encoder(self.source(src), src_mask)

    def decode(self, memory, src_mask, tgt_in, tgt_mask):
        return self.generator(self.decoder(self.target(tgt_in), memory, tgt_mask, src_mask))

    def forward(self, src, tgt_in, src_mask=None, tgt_mask=None):
        return self.decode(self.encode(src, src_mask), src_mask, tgt_in, tgt_mask)


def honest(source: str, name: str):
    """An honest answer of the corpus (tests/corpus/ch07.py), run on the reference's pastes."""
    ns = {"torch": torch, "nn": nn, "F": F, "math": math, "PAD": PAD, "START": START, "END": END,
          "Embeddings": R4.Embeddings, "PositionalEncoding": R4.PositionalEncoding, "Encoder": R6.Encoder,
          "Decoder": R6.Decoder, "shift_right": shift_right, "target_mask": target_mask, "rate": R7.rate}
    exec(compile(source, f"<corpus {name}>", "exec"), ns)  # noqa: S102 - the corpus's own code
    return ns[name]


ModelTiedFirst = honest(corpus.MODEL_TIED_FIRST, "Transformer")


def test_correct_transformers_pass(capsys):
    check_transformer(Model)
    check_transformer(ModelTiedFirst)
    check_transformer(R7.Transformer)
    assert capsys.readouterr().out.count("Transformer: all") == 3


def model_mutant(**methods):
    return type("Mutant", (Model,), methods)


class DecoderIgnoresTgtMask(R6.Decoder):
    def forward(self, x, memory, tgt_mask=None, memory_mask=None):
        return super().forward(x, memory, None, memory_mask)


def _no_tie(s):
    for name, p in s.named_parameters():
        if p.dim() > 1 and not name.startswith("embed."):
            nn.init.xavier_uniform_(p)
    nn.init.normal_(s.embed.embedding.weight, std=s.d_model ** -0.5)


def _default_embedding(s):
    for name, p in s.named_parameters():
        if p.dim() > 1 and not name.startswith("embed."):
            nn.init.xavier_uniform_(p)
    s.generator.weight = s.embed.embedding.weight


def _no_xavier(s):
    nn.init.normal_(s.embed.embedding.weight, std=s.d_model ** -0.5)
    s.generator.weight = s.embed.embedding.weight


class ModelNoDModel(Model):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.d_model

    def initialise(self):
        self.d_model = self.embed.embedding.weight.shape[1]
        super().initialise()


class ModelNoBias(Model):
    bias = False


class ModelOnBuggyDecoder(Model):
    DecoderClass = DecoderIgnoresTgtMask


@pytest.mark.parametrize("cls, mistake", [
    (model_mutant(initialise=_no_tie), "generator_not_tied"),
    (model_mutant(initialise=_default_embedding), "embedding_init_unscaled"),
    (model_mutant(initialise=_no_xavier), "init_not_xavier"),
    (ModelNoBias, "generator_without_bias"),
    (ModelNoDModel, "d_model_attribute_missing"),
    (model_mutant(source=lambda s, src: s.embed(src), target=lambda s, t: s.embed(t)), "positional_encoding_missing"),
    (model_mutant(target=lambda s, t: s.embed(t)), "target_positions_missing"),
    (model_mutant(source=lambda s, src: s.pos(s.embed.embedding(src)), target=lambda s, t: s.pos(s.embed.embedding(t))),
     "embeddings_unscaled"),
    (model_mutant(decode=lambda s, m, sm, t, tm: s.generator(s.decoder(s.target(t), m, tm, None))),
     "source_mask_not_passed_to_decoder"),
    (model_mutant(decode=lambda s, m, sm, t, tm: s.generator(s.decoder(s.target(t), m, None, sm))),
     "target_mask_not_passed"),
    (model_mutant(forward=lambda s, src, t, sm=None, tm=None: s.decode(s.source(src), sm, t, tm)),
     "decoder_reads_embeddings"),
    (model_mutant(forward=lambda s, src, t, sm=None, tm=None: torch.softmax(Model.forward(s, src, t, sm, tm), -1)),
     "returns_probabilities"),
    (model_mutant(forward=lambda s, src, t, sm=None, tm=None: torch.log_softmax(Model.forward(s, src, t, sm, tm),
                                                                                -1)), "returns_probabilities"),
    (ModelOnBuggyDecoder, "target_mask_not_passed"),
])
def test_transformer_mutants(cls, mistake):
    assert mistake_of(check_transformer, cls) == mistake


def test_a_buggy_paste_is_blamed():
    assert mistake_of(check_transformer, ModelOnBuggyDecoder, Decoder=DecoderIgnoresTgtMask) == "pasted_module_fails"
    # pastes that pass their own checks are not blamed
    assert mistake_of(check_transformer, model_mutant(target=lambda s, t: s.embed(t)), Decoder=R6.Decoder,
                      Encoder=R6.Encoder) == "target_positions_missing"


def test_torch_nn_transformer_is_forbidden():
    class WithTorch(Model):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.helper = nn.Transformer(8, 2, 1, 1, 16, batch_first=True)

    assert mistake_of(check_transformer, WithTorch).startswith("forbidden:")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_first", [False, True])
def test_reference_equals_nn_transformer_with_copied_weights(dtype, norm_first):
    """The reference model against nn.Transformer (+ embeddings and generator) holding its weights:
    logits and the gradients of every parameter."""
    torch.manual_seed(3)
    model = R7.Transformer(17, 2, 16, 4, 24, 0.0, 32, norm_first).to(dtype).eval()
    names = ch07.model_names(model, 2, norm_first, "the reference")
    params = dict(model.named_parameters())
    leaves = {k: params[v].detach().clone().requires_grad_() for k, v in names.items()}
    src, tgt_in, src_mask, tgt_mask = ch07._batch("cpu", 4, vocab=17)
    got = model(src, tgt_in, src_mask, tgt_mask)
    want = ch07.torch_transformer(leaves, 4, norm_first, src, tgt_in, src_mask, tgt_mask)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got, want, **tol)
    upstream = torch.randn(got.shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    g1 = torch.autograd.grad(got, [params[names[k]] for k in names], upstream)
    g2 = torch.autograd.grad(want, [leaves[k] for k in names], upstream)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **tol)


def test_the_kept_nn_transformer_carries_no_weights_from_one_call_to_the_next():
    """``torch_transformer`` keeps one nn.Transformer per size and thread: each call still gives the
    logits of the weights it is handed, and another thread gets a module of its own."""
    import threading

    src, tgt_in, src_mask, tgt_mask = ch07._batch("cpu", 4, vocab=17)
    for seed in (4, 5):
        torch.manual_seed(seed)
        model = R7.Transformer(17, 2, 16, 4, 24, 0.0, 32, False).eval()
        params = dict(model.named_parameters())
        c = {k: params[v].detach() for k, v in ch07.model_names(model, 2, False, "the reference").items()}
        torch.testing.assert_close(ch07.torch_transformer(c, 4, False, src, tgt_in, src_mask, tgt_mask),
                                   model(src, tgt_in, src_mask, tgt_mask), rtol=1e-5, atol=1e-5)
    here = ch07._torch_shell(16, 4, 24, 2, False, torch.float32, "cpu")
    there = []
    thread = threading.Thread(target=lambda: there.append(ch07._torch_shell(16, 4, 24, 2, False, torch.float32, "cpu")))
    thread.start()
    thread.join()
    assert here is ch07._torch_shell(16, 4, 24, 2, False, torch.float32, "cpu") and there[0] is not here


# --------------------------------------------------------------------------------------------
# Exercise 2: LabelSmoothingLoss
# --------------------------------------------------------------------------------------------

class LS(nn.Module):
    """A correct loss from an explicit smoothed target distribution."""

    def __init__(self, smoothing, pad_id):
        super().__init__()
        self.s, self.pad = smoothing, pad_id

    def parts(self, logits, target):
        log_p = torch.log_softmax(logits, -1)
        q = F.one_hot(target, logits.shape[-1]).to(log_p.dtype) * (1 - self.s) + self.s / logits.shape[-1]
        return log_p, q, target != self.pad

    def forward(self, logits, target):
        log_p, q, real = self.parts(logits, target)
        per = -(q * log_p).sum(-1)
        return per[real].mean()


LSLogsumexp = honest(corpus.LOSS_LOGSUMEXP, "LabelSmoothingLoss")


def test_correct_losses_pass(capsys):
    for cls in (LS, LSLogsumexp, R7.LabelSmoothingLoss):
        check_label_smoothing(cls)
    assert capsys.readouterr().out.count("LabelSmoothingLoss: all") == 3


def ls_mutant(forward):
    return type("Mutant", (LS,), {"forward": forward})


def _per(s, logits, target, q=None):
    log_p, q0, real = s.parts(logits, target)
    return -((q0 if q is None else q) * log_p).sum(-1), real


def _kl(s, logits, target):
    log_p, q, real = s.parts(logits, target)
    return F.kl_div(log_p, q, reduction="none").sum(-1)[real].mean()


def _other(s, logits, target):
    log_p, _, real = s.parts(logits, target)
    v = logits.shape[-1]
    one = F.one_hot(target, v).to(log_p.dtype)
    q = one * (1 - s.s) + (1 - one) * s.s / (v - 1)
    return -(q * log_p).sum(-1)[real].mean()


def _annotated(s, logits, target):
    log_p, _, real = s.parts(logits, target)
    v = logits.shape[-1]
    one = F.one_hot(target, v).to(log_p.dtype)
    q = one * (1 - s.s) + (1 - one) * s.s / (v - 2)
    q[..., s.pad] = 0
    return -(q * log_p).sum(-1)[real].mean()


def _log_of_softmax(s, logits, target):
    log_p = torch.log(torch.softmax(logits, -1))
    q = F.one_hot(target, logits.shape[-1]).to(log_p.dtype) * (1 - s.s) + s.s / logits.shape[-1]
    real = target != s.pad
    return -(q * log_p).sum(-1)[real].mean()


def _pad_smoothing(s, logits, target):
    log_p, _, real = s.parts(logits, target)
    nll = -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return ((1 - s.s) * nll[real].sum() + (s.s * -log_p.mean(-1)).sum()) / real.sum()


class LSForbidden(LS):
    def forward(self, logits, target):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), label_smoothing=self.s,
                               ignore_index=self.pad)


@pytest.mark.parametrize("cls, mistake", [
    (ls_mutant(lambda s, x, t: _per(s, x, t, F.one_hot(t, x.shape[-1]).to(x.dtype))[0][t != s.pad].mean()),
     "smoothing_ignored"),
    (ls_mutant(lambda s, x, t: _per(s, x, t)[0].mean()), "padding_not_ignored"),
    (ls_mutant(_pad_smoothing), "smoothing_mass_on_pad"),
    (ls_mutant(lambda s, x, t: _per(s, x, t)[0][t != s.pad].sum() / t.numel()), "mean_over_all_positions"),
    (ls_mutant(lambda s, x, t: _per(s, x, t)[0][t != s.pad].sum()), "sum_not_mean"),
    (ls_mutant(_kl), "kl_divergence_not_cross_entropy"),
    (ls_mutant(_other), "smoothing_over_other_classes"),
    (ls_mutant(_annotated), "pad_class_excluded"),
    (ls_mutant(_log_of_softmax), "log_of_zero"),
    (LSForbidden, "forbidden:cross_entropy"),
])
def test_loss_mutants(cls, mistake):
    assert mistake_of(check_label_smoothing, cls) == mistake


@FAST
@given(st.integers(2, 9), st.floats(0.0, 0.9), st.integers(0, 8), st.sampled_from([1.0, 30.0, 1000.0]),
       st.integers(0, 10_000))
def test_reference_loss_is_cross_entropy_with_smoothing(vocab, eps, pad, scale, seed):
    """The reference loss = F.cross_entropy(label_smoothing, ignore_index) at any scale, all-pad rows
    included: finite values and gradients."""
    pad = pad % vocab
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 4, vocab, generator=g, dtype=torch.float64) * scale).requires_grad_()
    target = torch.randint(0, vocab, (3, 4), generator=g)
    target[1] = pad                                   # an all-padding row
    target[0, 0] = (pad + 1) % vocab                  # at least one real token
    got = R7.LabelSmoothingLoss(eps, pad)(logits, target)
    want = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), label_smoothing=eps, ignore_index=pad)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    (g1,), (g2,) = torch.autograd.grad(got, [logits]), torch.autograd.grad(want, [logits])
    assert torch.isfinite(g1).all()
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Exercise 3: rate
# --------------------------------------------------------------------------------------------

def rate_pow(step, d_model, warmup, factor=1.0):
    return factor * math.pow(d_model, -0.5) * min(math.pow(step, -0.5), step * math.pow(warmup, -1.5))


def rate_tensor(step, d_model, warmup, factor=1.0):
    s = torch.tensor(float(step), dtype=torch.float64)
    return factor * d_model ** -0.5 * torch.minimum(s.rsqrt(), s * warmup ** -1.5)


def rate_branches(step, d_model, warmup, factor=1.0):
    if step < warmup:
        return factor * step / (warmup ** 1.5 * d_model ** 0.5)
    return factor / math.sqrt(d_model * step)


def test_correct_rates_pass(capsys):
    for fn in (rate_pow, rate_tensor, rate_branches, R7.rate):
        check_rate(fn)
    assert capsys.readouterr().out.count("rate: all") == 4


@pytest.mark.parametrize("fn, mistake", [
    (lambda s, d, w, f=1.0: f * d ** -0.5 * s ** -0.5, "warmup_missing"),
    (lambda s, d, w, f=1.0: f * d ** -0.5 * max(s ** -0.5, s * w ** -1.5), "min_and_max_swapped"),
    (lambda s, d, w, f=1.0: f * min(s ** -0.5, s * w ** -1.5), "d_model_factor_missing"),
    (lambda s, d, w, f=1.0: f * d ** -0.5 * min(s ** -0.5, s * w ** -0.5), "warmup_exponent_wrong"),
    (lambda s, d, w, f=1.0: d ** -0.5 * min(s ** -0.5, s * w ** -1.5), "factor_ignored"),
    (lambda s, d, w, f=1.0: rate_pow(s + 1, d, w, f), "step_off_by_one"),
    (lambda s, d, w, f=1.0: str(rate_pow(s, d, w, f)), "result_not_a_number"),
])
def test_rate_mutants(fn, mistake):
    assert mistake_of(check_rate, fn) == mistake


# --------------------------------------------------------------------------------------------
# Exercise 4: train_step
# --------------------------------------------------------------------------------------------

def steps_of(step_fn, rate=None):
    """train_steps as the notebook gives it, around ``step_fn`` (and ``rate``)."""
    rate = rate or R7.rate

    def train_steps(model, batches, criterion, warmup, factor=1.0):
        optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: rate(i + 1, model.d_model, warmup, factor))
        return [step_fn(model, b, optimizer, scheduler, criterion) for b in batches]
    return train_steps


def step_right(model, batch, optimizer, scheduler, criterion, *, shift=True, loss_target="tgt", zero="before",
               sched=True, src_mask=True, causal=True):
    src, tgt = batch
    tgt_in = shift_right(tgt, START, PAD) if shift else tgt
    model.train()
    sm = (src != PAD)[:, None, :] if src_mask else None
    tm = target_mask(tgt_in, PAD) if causal else None
    logits = model(src, tgt_in, sm, tm)
    loss = criterion(logits, tgt if loss_target == "tgt" else tgt_in)
    if zero == "before":
        optimizer.zero_grad()
    loss.backward()
    if zero == "after":
        optimizer.zero_grad()
    optimizer.step()
    if sched:
        scheduler.step()
    return loss.item()


step_set_to_none = honest(corpus.STEP_SET_TO_NONE, "train_step")


def test_correct_train_steps_pass(capsys):
    check_train_step(steps_of(step_right), Model, LS, R7.rate)
    check_train_step(steps_of(step_set_to_none), ModelTiedFirst, LSLogsumexp)
    check_train_step(R7.train_steps, R7.Transformer, R7.LabelSmoothingLoss, R7.rate)
    assert capsys.readouterr().out.count("train_step: all") == 3


def variant(**kw):
    return steps_of(lambda *a: step_right(*a, **kw))


@pytest.mark.parametrize("fn, mistake", [
    (variant(shift=False), "no_shift_right"),
    (variant(loss_target="tgt_in"), "loss_against_decoder_input"),
    (variant(zero="never"), "gradients_accumulate"),
    (variant(zero="after"), "gradients_cleared_before_step"),
    (variant(sched=False), "scheduler_not_stepped"),
    (variant(src_mask=False), "source_mask_not_used"),
    (variant(causal=False), "causal_mask_not_used"),
])
def test_train_step_mutants(fn, mistake):
    assert mistake_of(check_train_step, fn, Model, LS, R7.rate) == mistake


def test_train_step_blames_earlier_exercises():
    assert mistake_of(check_train_step, steps_of(step_right), Model, ls_mutant(_other), R7.rate) == "loss_fails"
    wrong_rate = lambda s, d, w, f=1.0: f * d ** -0.5 * s ** -0.5  # noqa: E731
    assert mistake_of(check_train_step, steps_of(step_right, wrong_rate), Model, LS, wrong_rate) == "rate_fails"
    broken = model_mutant(target=lambda s, t: s.embed(t))
    assert mistake_of(check_train_step, steps_of(step_right), broken, LS, R7.rate) == "model_fails"


# --------------------------------------------------------------------------------------------
# Exercise 5: greedy_decode and beam_search
# --------------------------------------------------------------------------------------------

def greedy_right(model, src, max_len, *, after_end=False, src_mask=True, causal=True, start=START):
    mask = (src != PAD)[:, None, :] if src_mask else None
    memory = model.encode(src, mask)
    written = torch.full((src.shape[0], 1), start, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        tm = target_mask(written, PAD) if causal else None
        if start == PAD:
            tm = torch.ones(written.shape[1], written.shape[1], dtype=torch.bool).tril()
        token = model.decode(memory, mask, written, tm)[:, -1].argmax(-1)
        if not after_end:
            token = token.masked_fill(done, PAD)
        written = torch.cat([written, token[:, None]], 1)
        done = done | (token == END)
    return written[:, 1:]


def beam_heap(model, src, max_len, beam_size, alpha=0.6, *, penalty=True, stop=True, first=False, sort=True):
    """Beam search with heapq.nlargest and tuples; the keywords make its mistakes."""
    mask = (src != PAD)[:, None, :]
    memory = model.encode(src, mask)
    live, finished = [(0.0, [START])], []
    for _ in range(max_len):
        if not live:
            break
        prefixes = torch.tensor([h for _, h in live])
        log_p = torch.log_softmax(model.decode(memory.expand(len(live), -1, -1), mask, prefixes,
                                               target_mask(prefixes, PAD))[:, -1], -1).tolist()
        cands = [(s + lp, h + [tok]) for (s, h), row in zip(live, log_p) for tok, lp in enumerate(row)
                 if stop or True]
        if not stop:
            cands = [(s, h) for s, h in cands]
        chosen = heapq.nlargest(beam_size, cands, key=lambda c: c[0]) if sort else cands[:beam_size]
        done_now = [c for c in chosen if c[1][-1] == END] if stop else []
        finished += done_now
        if first and finished:
            s, h = finished[0]
            return torch.tensor(h[1:]), s / ((5 + len(h) - 1) / 6) ** alpha
        live = [c for c in chosen if c not in done_now]
    finished += live

    def score(c):
        return c[0] / ((5 + len(c[1]) - 1) / 6) ** alpha if penalty else c[0]
    s, h = max(finished, key=score)
    return torch.tensor(h[1:]), s / ((5 + len(h) - 1) / 6) ** alpha


def test_correct_decoders_pass(capsys):
    check_decoding(greedy_right, beam_heap, Model)
    check_decoding(honest(corpus.DECODE_HEAP, "greedy_decode"), honest(corpus.DECODE_HEAP, "beam_search"),
                   ModelTiedFirst)
    check_decoding(R7.greedy_decode, R7.beam_search, R7.Transformer)
    assert capsys.readouterr().out.count("greedy_decode and beam_search: all") == 3


@pytest.mark.parametrize("greedy, beam, mistake", [
    (lambda m, s, n: greedy_right(m, s, n, after_end=True), beam_heap, "greedy_continues_after_end"),
    (lambda m, s, n: greedy_right(m, s, n, src_mask=False), beam_heap, "greedy_ignores_source_padding"),
    (lambda m, s, n: greedy_right(m, s, n, causal=False), beam_heap, "greedy_without_causal_mask"),
    (lambda m, s, n: greedy_right(m, s, n, start=PAD), beam_heap, "greedy_without_start_token"),
    (greedy_right, lambda *a: beam_heap(*a, penalty=False), "length_penalty_ignored"),
    (greedy_right, lambda *a: beam_heap(*a, sort=False), "beam_not_sorted"),
    (greedy_right, lambda *a: beam_heap(*a, stop=False), "eos_not_stopping"),
    (greedy_right, lambda *a: beam_heap(*a, first=True), "first_finished_returned"),
])
def test_decoding_mutants(greedy, beam, mistake):
    assert mistake_of(check_decoding, greedy, beam, Model) == mistake


def test_beam_of_width_one_must_be_greedy():
    def beam_without_causal(model, src, max_len, beam_size, alpha=0.6):
        """Right except for the causal mask, which it leaves out at width 1."""
        if beam_size > 1:
            return beam_heap(model, src, max_len, beam_size, alpha)
        tokens = greedy_right(model, src, max_len, causal=False)[0].tolist()
        tokens = tokens[:tokens.index(END) + 1] if END in tokens else tokens
        return torch.tensor(tokens), 0.0
    assert mistake_of(check_decoding, greedy_right, beam_without_causal, Model) == "beam_one_not_greedy"


def test_reference_beam_search_is_exhaustive_when_wide_and_greedy_when_narrow():
    """On a tiny vocabulary: a beam wide enough to prune nothing finds the best of all hypotheses
    (enumerated by the checks' exhaustive search); width 1 writes the greedy tokens."""
    for seed in (1, 2, 3):
        model, _, c, _ = ch07._decoder_model(R7.Transformer, "cpu", seed)
        src = ch07._sources("cpu", seed, (4,))
        every = ch07._all_hypotheses(c, src, 3)
        best, best_score = max(((h, s / ch07._lp(len(h), 0.6)) for h, s in every), key=lambda x: x[1])
        tokens, score = R7.beam_search(model, src, 3, 1000, 0.6)
        assert tokens.tolist() == best and math.isclose(float(score), best_score, rel_tol=1e-9)
        greedy = R7.greedy_decode(model, src, 3)[0].tolist()
        assert R7.beam_search(model, src, 3, 1, 0.6)[0].tolist() == greedy[:greedy.index(END) + 1] \
            if END in greedy else greedy


# --------------------------------------------------------------------------------------------
# Exercise 6: the trained model
# --------------------------------------------------------------------------------------------

def test_an_untrained_model_gets_no_points():
    torch.manual_seed(0)
    sizes = ch07.TRAINED
    untrained = R7.Transformer(len(toy_language.vocabulary()), sizes["num_layers"], sizes["d_model"],
                               sizes["num_heads"], sizes["d_ff"], 0.0, 64).eval()
    assert mistake_of(check_trained_model, untrained) == "model_not_trained_enough"
    with pytest.raises(Exception, match="at least"):
        ch07.grade_trained_with_reference(untrained, R7, seed=5, n=50)


def test_a_model_whose_own_methods_look_the_answers_up_gets_no_points():
    """Graded by its weights alone: an untrained model whose forward, translate and greedy decoding
    return the right sentences (looked up in the data module) still gets 0. (Through the sandbox,
    test_seam grades an object an earlier cell trained by the same state_dict path.)"""
    torch.manual_seed(0)
    student = {**vars(R7), "toy_language": toy_language, "torch": torch}
    exec(corpus.LOOKUP_CHEAT, student)      # the corpus's cell, run as the student's kernel would
    cheat = student["model"]
    cheat.forward = cheat.greedy = cheat.translate
    assert mistake_of(check_trained_model, cheat) == "model_not_trained_enough"


def test_a_model_of_other_sizes_or_none_is_named():
    wrong = R7.Transformer(len(toy_language.vocabulary()), 1, 16, 4, 64, 0.0, 64)
    assert mistake_of(check_trained_model, wrong) == "wrong_parameter_shape"
    assert mistake_of(check_trained_model, None) == "not_implemented"
    assert mistake_of(check_trained_model, 3) == "model_not_a_module"


def test_held_out_sentences_are_new_and_hold_held_out_pairs():
    data = toy_language.splits()
    seen = {s for s, _ in data["train"] + data["val"] + data["test"]}
    fresh = ch07.held_out(100, seed=2024)
    assert len({s for s, _ in fresh}) == 100 and not seen & {s for s, _ in fresh} - {s for s, _ in data["test"]}
    train = {s for s, _ in data["train"]}
    assert not train & {s for s, _ in fresh}
    for source, _ in fresh:
        words = source.split()
        pairs = {(n, a) for n in toy_language.NOUNS for a in toy_language.ADJECTIVES
                 if f"{n} {a}" in source or f"{n}j {a}j" in source}
        assert pairs & toy_language.HELD_OUT, words
