"""The chapter-8 checks pass correct code written differently and name each common mistake
(asserted by its mistake id); tiled attention's memory is measured (a version that forms the L x L
matrix fails whatever it returns); the plain-torch decoding the KV-cache checks compare with agrees
with the model's own forward, and the cache check is not vacuous (a cache and recomputation differ
on a model without the causal mask)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from autograder.checks import ch08, memory
from autograder.checks.ch08 import check_generate, check_online_softmax, check_tiled_attention
from autograder.checks.masks import attention, causal
from autograder.course import source_notebook
from autograder.notebook import read_cells, source
from autograder.reference import reference
from checking import FAST, mistake_of
from test_ch05_checks import MHA, MHAInvertedMask

pytestmark = pytest.mark.filterwarnings("error")     # a warning in a check would zero a student's cell

REF = reference("ch08_efficient")
NEG = float("-inf")

# --------------------------------------------------------------------------------------------
# Exercise 1: online_softmax_update
# --------------------------------------------------------------------------------------------


def update_lse(m, l, block):
    """Honest: through log-sum-exp (torch.logsumexp), then back to (max, sum)."""
    m_new = torch.stack([m, block.max(dim=-1).values]).max(dim=0).values
    lse = torch.logsumexp(torch.stack([m + torch.log(l), torch.logsumexp(block, dim=-1)]), dim=0)
    return m_new, torch.nan_to_num(torch.exp(lse - m_new), nan=0.0)


def update_concat(m, l, block):
    """Honest: the old state as one more column of values, weighted by l."""
    values = torch.cat([m.unsqueeze(-1), block], dim=-1)
    m_new = values.amax(-1, keepdim=True)
    safe = m_new.masked_fill(m_new == NEG, 0.0)
    w = torch.exp(values - safe)
    return m_new.squeeze(-1), (w[..., 0] * l + w[..., 1:].sum(-1))


def update_block_max(m, l, block):
    bm = block.amax(-1)
    safe = torch.where(torch.isinf(bm), torch.zeros_like(bm), bm)
    return bm, l * torch.exp(m - safe) + torch.exp(block - safe[..., None]).sum(-1)


def update_not_rescaled(m, l, block):
    m_new = torch.maximum(m, block.amax(-1))
    safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    return m_new, l + torch.exp(block - safe[..., None]).sum(-1)


def update_inverted(m, l, block):
    m_new = torch.maximum(m, block.amax(-1))
    safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    return m_new, l * torch.exp(safe - m) + torch.exp(block - safe[..., None]).sum(-1)


def update_old_max(m, l, block):
    m_new = torch.maximum(m, block.amax(-1))
    safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    old = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return m_new, l * torch.exp(m - safe) + torch.exp(block - old[..., None]).sum(-1)


def update_unshifted(m, l, block):
    m_new = torch.maximum(m, block.amax(-1))
    return m_new, l * torch.exp(m) / torch.exp(m_new) + torch.exp(block).sum(-1) / torch.exp(m_new)


def update_nan(m, l, block):
    m_new = torch.maximum(m, block.amax(-1))
    return m_new, l * torch.exp(m - m_new) + torch.exp(block - m_new[..., None]).sum(-1)


@pytest.mark.parametrize("fn", [REF.online_softmax_update, update_lse, update_concat])
def test_online_softmax_honest_variants_pass(fn):
    check_online_softmax(fn)


@pytest.mark.parametrize("fn,mistake", [
    (update_block_max, "block_max_instead_of_running_max"), (update_not_rescaled, "running_sum_not_rescaled"),
    (update_inverted, "rescale_factor_inverted"), (update_old_max, "block_shifted_by_old_max"),
    (update_unshifted, "exp_not_shifted"), (update_nan, "nan_when_everything_masked")])
def test_online_softmax_mistakes_are_named(fn, mistake):
    assert mistake_of(check_online_softmax, fn) == mistake


@FAST
@given(rows=st.integers(1, 4), n=st.integers(1, 30), block=st.integers(1, 9), seed=st.integers(0, 10**6))
def test_folding_the_update_gives_logsumexp(rows, n, block, seed):
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 5
    m, l = torch.full((rows,), NEG, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
    for j in range(0, n, block):
        m, l = REF.online_softmax_update(m, l, x[:, j:j + block])
    assert torch.allclose(m + torch.log(l), torch.logsumexp(x, -1))


# --------------------------------------------------------------------------------------------
# Exercise 2: tiled_attention
# --------------------------------------------------------------------------------------------

def _block_mask(mask, causal_, rows, cols, n_q, n_k):
    allowed = None
    if mask is not None:
        allowed = mask.expand(*mask.shape[:-2], n_q, n_k)[..., rows, :][..., cols]
    if causal_:
        c = cols[None, :] <= rows[:, None]
        allowed = c if allowed is None else allowed & c
    return allowed


def tiled(q, k, v, block_size, mask=None, causal=False, *, kind="right", key_order=1):
    """Tiled attention with a flag per mistake; ``key_order=-1`` visits the key blocks backwards
    (honest); outputs written into a preallocated tensor (honest)."""
    n_q, n_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 if kind == "no_scaling" else d ** -0.5
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    q_stop = n_q - n_q % block_size if kind == "tail_dropped" else n_q
    k_stop = n_k - n_k % block_size if kind == "tail_dropped" else n_k
    for i in range(0, q_stop, block_size):
        rows = torch.arange(i, min(i + block_size, n_q))
        qb = q[..., rows, :]
        m = q.new_full(qb.shape[:-1], NEG)
        l = q.new_zeros(qb.shape[:-1])
        acc = q.new_zeros(*qb.shape[:-1], v.shape[-1])
        for j in list(range(0, k_stop, block_size))[::key_order]:
            cols = torch.arange(j, min(j + block_size, k_stop))
            if causal and kind == "offset_missing_skip" and j > i:
                continue
            s = (qb @ k[..., cols, :].transpose(-1, -2)) * scale
            if kind in ("offset_missing", "offset_missing_skip") and causal:
                allowed = _block_mask(mask, False, rows, cols, n_q, n_k)
                local = (cols - j)[None, :] <= (rows - i)[:, None]
                allowed = local if allowed is None else allowed & local
            else:
                allowed = _block_mask(mask, causal and kind != "causal_ignored", rows, cols, n_q, n_k)
            if allowed is not None:
                s = s.masked_fill(~allowed, NEG)
            if kind == "block_max":
                m_new = s.amax(-1)
            else:
                m_new = torch.maximum(m, s.amax(-1))
            safe = m_new if kind == "nan" else torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - safe[..., None])
            factor = torch.exp(m - safe)
            l = l + p.sum(-1) if kind == "sum_not_rescaled" else l * factor + p.sum(-1)
            acc = acc + p @ v[..., cols, :] if kind == "acc_not_rescaled" else acc * factor[..., None] + p @ v[..., cols, :]
            m = m_new
        out[..., rows, :] = acc / (l if kind == "nan" else l.clamp(min=1e-300) * (l > 0) + (l == 0))[..., None]
    return out


def tiled_lse(q, k, v, block_size, mask=None, causal=False):
    """Honest: the running state as a log-sum-exp (torch.logsumexp) and a normalised output."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    outs = []
    for i in range(0, n_q, block_size):
        rows = torch.arange(i, min(i + block_size, n_q))
        qb = q[..., i:i + block_size, :] / math.sqrt(q.shape[-1])
        lse = q.new_full(qb.shape[:-1], NEG)
        o = q.new_zeros(*qb.shape[:-1], v.shape[-1])
        for j in range(0, n_k, block_size):
            cols = torch.arange(j, min(j + block_size, n_k))
            s = qb @ k[..., j:j + block_size, :].transpose(-1, -2)
            allowed = _block_mask(mask, causal, rows, cols, n_q, n_k)
            if allowed is not None:
                s = s.masked_fill(~allowed, NEG)
            block_lse = torch.logsumexp(s, -1)
            new_lse = torch.logaddexp(lse, block_lse)
            safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
            o = o * torch.exp(lse - safe)[..., None] + torch.exp(s - safe[..., None]) @ v[..., j:j + block_size, :]
            lse = new_lse
        outs.append(o)
    return torch.cat(outs, -2)


def tiled_keys_only(q, k, v, block_size, mask=None, causal=False):
    """Honest: every query at once, the keys in blocks (O(L * block) memory)."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    rows = torch.arange(n_q)
    m = q.new_full(q.shape[:-1], NEG)
    l = q.new_zeros(q.shape[:-1])
    acc = q.new_zeros(*q.shape[:-1], v.shape[-1])
    for j in range(0, n_k, block_size):
        cols = torch.arange(j, min(j + block_size, n_k))
        s = q @ k[..., j:j + block_size, :].transpose(-1, -2) / math.sqrt(q.shape[-1])
        allowed = _block_mask(mask, causal, rows, cols, n_q, n_k)
        if allowed is not None:
            s = s.masked_fill(~allowed, NEG)
        m_new = torch.maximum(m, s.amax(-1))
        safe = m_new.nan_to_num(neginf=0.0)
        p = torch.exp(s - safe[..., None])
        f = torch.exp(m - safe)
        l, acc, m = l * f + p.sum(-1), acc * f[..., None] + p @ v[..., j:j + block_size, :], m_new
    return acc / torch.where(l == 0, torch.ones_like(l), l)[..., None]


def naive(q, k, v, block_size, mask=None, causal=False):
    """Right numbers, forms the L x L matrix, then 'tiles' the product with V."""
    full = None if mask is None else mask.expand(*mask.shape[:-2], q.shape[-2], k.shape[-2])
    if causal:
        c = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        full = c if full is None else full & c
    return attention_by_hand(q, k, v, full)


def attention_by_hand(q, k, v, mask):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, NEG)
    w = torch.exp(s - s.amax(-1, keepdim=True).nan_to_num(neginf=0.0))
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-30)
    return w @ v


def query_blocks_only(q, k, v, block_size, mask=None, causal=False):
    """Blocks of queries against every key: memory O(block * L_k)."""
    outs = []
    n_q, n_k = q.shape[-2], k.shape[-2]
    for i in range(0, n_q, block_size):
        rows = torch.arange(i, min(i + block_size, n_q))
        allowed = _block_mask(mask, causal, rows, torch.arange(n_k), n_q, n_k)
        outs.append(attention_by_hand(q[..., i:i + block_size, :], k, v, allowed))
    return torch.cat(outs, -2)


def uses_sdpa(q, k, v, block_size, mask=None, causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


HONEST_TILED = [REF.tiled_attention, tiled, lambda *a, **kw: tiled(*a, key_order=-1, **kw), tiled_lse,
                tiled_keys_only]


@pytest.mark.parametrize("fn", HONEST_TILED, ids=["reference", "flags", "keys_backwards", "logsumexp", "keys_only"])
def test_tiled_honest_variants_pass(fn, capsys):
    check_tiled_attention(fn)
    assert "L = 4096" in capsys.readouterr().out


def _kind(kind):
    def fn(q, k, v, block_size, mask=None, causal=False):
        return tiled(q, k, v, block_size, mask, causal, kind=kind)
    return fn


@pytest.mark.parametrize("fn,mistake", [
    (_kind("acc_not_rescaled"), "output_accumulator_not_rescaled"), (_kind("sum_not_rescaled"), "running_sum_not_rescaled"),
    (_kind("block_max"), "block_max_instead_of_running_max"), (_kind("offset_missing"), "causal_offset_missing"),
    (_kind("offset_missing_skip"), "causal_offset_missing"), (_kind("causal_ignored"), "causal_ignored"),
    (_kind("nan"), "nan_in_fully_masked_rows"), (_kind("tail_dropped"), "last_partial_block_dropped"),
    (_kind("no_scaling"), "no_scaling"), (naive, "forms_full_score_matrix"), (query_blocks_only, "keys_not_tiled"),
    (uses_sdpa, "forbidden:scaled_dot_product_attention")])
def test_tiled_mistakes_are_named(fn, mistake):
    assert mistake_of(check_tiled_attention, fn) == mistake


def test_tiled_mask_ignored_is_named():
    def ignores_mask(q, k, v, block_size, mask=None, causal=False):
        return REF.tiled_attention(q, k, v, block_size, None, causal)
    assert mistake_of(check_tiled_attention, ignores_mask) == "mask_ignored"


def test_memory_not_measured_is_not_a_failure(monkeypatch, capsys):
    monkeypatch.setattr(memory, "measure", lambda fn, *a, **kw: (fn(*a, **kw), None))
    check_tiled_attention(naive)                 # right numbers; memory unknown: not failed
    assert "not measured" in capsys.readouterr().out


@FAST
@given(n_q=st.integers(1, 12), n_k=st.integers(1, 12), block=st.integers(1, 13), causal_=st.booleans(),
       masked=st.booleans(), seed=st.integers(0, 10**6))
def test_reference_tiled_attention_equals_attention(n_q, n_k, block, causal_, masked, seed):
    g = torch.Generator().manual_seed(seed)
    n_k = n_q if causal_ else n_k
    q = torch.randn(2, n_q, 4, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, n_k, 4, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(2, n_q, n_k, generator=g) < 0.5 if masked else None
    full = mask
    if causal_:
        full = causal(n_q) if mask is None else mask & causal(n_q)
    got = REF.tiled_attention(q, k, v, block, mask, causal_)
    assert torch.allclose(got, attention(q, k, v, full)[0], atol=1e-10)
    assert torch.allclose(ch08.tiled_variant(q, k, v, block, mask, causal_), got, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Exercise 3: generate with a KV cache
# --------------------------------------------------------------------------------------------

def _given_classes(attention_cls):
    """The notebook's Block and TinyLM (the part of the answer cell before generate), built on
    ``attention_cls``."""
    cell = next(c for c in read_cells(source_notebook("ch08_efficient"))
                if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == "generate_answer")
    given_code = source(cell).split("def generate(")[0]
    ns = {"torch": torch, "nn": torch.nn, "MultiHeadAttention": attention_cls}
    exec(given_code, ns)  # noqa: S102 - the course's own code
    return ns["TinyLM"]


TinyLM = _given_classes(MHA)


def _heads(x, h):
    return x.unflatten(-1, (h, -1)).transpose(1, 2)


class Generator:
    """generate() with a flag per mistake. Honest options: the cache as one preallocated tensor per
    layer (``prealloc``) and the prompt fed one token at a time (``token_by_token``)."""

    def __init__(self, kind="right", prealloc=False, token_by_token=False):
        self.kind, self.prealloc, self.token_by_token = kind, prealloc, token_by_token

    def __call__(self, model, prompt, n_tokens, use_cache=True):
        if not use_cache or self.kind == "recompute":
            tokens = prompt
            for _ in range(n_tokens):
                tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
            return tokens
        return self.cached(model, prompt, n_tokens)

    def cached(self, model, prompt, n):
        b, width = prompt.shape
        real = prompt != model.pad_id
        lengths = real.sum(-1, keepdim=True)
        self.caches = [[None, None] for _ in model.blocks]
        self.filled = 0
        self.real = real
        if self.prealloc:
            total = width + 2 * n + 1
            d = model.embed.weight.shape[1]
            self.caches = [[prompt.new_zeros(()).float().new_zeros(b, blk.n_heads, total, d // blk.n_heads),
                            prompt.new_zeros(()).float().new_zeros(b, blk.n_heads, total, d // blk.n_heads)]
                           for blk in model.blocks]
        tokens = prompt
        positions = model.positions(prompt)
        if self.token_by_token:
            for t in range(width):
                logits = self.step(model, prompt[:, t:t + 1], positions[:, t:t + 1], real[:, :t + 1], False)
        else:
            keys = real if self.kind != "no_padding_mask" else torch.ones_like(real)
            logits = self.step(model, prompt, positions, keys, model.causal and self.kind != "prefill_not_causal")
        seen = real
        if self.kind == "last_prompt_twice":
            seen = torch.cat([seen, torch.ones_like(lengths, dtype=torch.bool)], 1)
            logits = self.step(model, prompt[:, -1:], positions[:, -1:], seen, False)
        for s in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
            if s == n - 1:
                break
            seen = torch.cat([seen] + [torch.ones_like(nxt, dtype=torch.bool)] * (2 if self.kind == "twice" else 1), 1)
            pos = {"positions_count_padding": torch.full_like(lengths, width + s),
                   "no_positions": torch.zeros_like(lengths)}.get(self.kind, lengths + s)
            keys = torch.ones_like(seen) if self.kind in ("no_padding_mask", "no_padding_mask_steps") else seen
            logits = self.step(model, nxt, pos, keys, False)
        return tokens

    def step(self, model, new, positions, keys_real, causal_prefill):
        x = model.embed(new) + model.pos(positions)
        t = new.shape[1]
        for blk, cache in zip(model.blocks, self.caches):
            h = blk.norm1(x)
            a = blk.attn
            q, k, v = (_heads(p(h), blk.n_heads) for p in (a.q_proj, a.k_proj, a.v_proj))
            if self.kind == "twice" and t == 1:
                k, v = torch.cat([k, k], 2), torch.cat([v, v], 2)
            if self.prealloc:
                start = self.filled
                cache[0][:, :, start:start + k.shape[2]] = k
                cache[1][:, :, start:start + k.shape[2]] = v
                k_all, v_all = cache[0][:, :, :start + k.shape[2]], cache[1][:, :, :start + k.shape[2]]
            else:
                k_all = k if cache[0] is None else torch.cat([cache[0], k], 2)
                v_all = v if cache[1] is None else torch.cat([cache[1], v], 2)
                cache[0], cache[1] = k_all, v_all
            total = k_all.shape[2]
            mask = keys_real[:, None, None, :]
            if causal_prefill:
                mask = mask & (torch.arange(total)[None, :] <= torch.arange(total - t, total)[:, None])
            out = attention(q, k_all, v_all, mask)[0]
            x = x + a.out_proj(out.transpose(1, 2).flatten(-2))
            x = x + blk.ff(blk.norm2(x))
        self.filled += k.shape[2]
        return model.readout(model.norm(x))


@pytest.mark.parametrize("generate", [REF.generate, Generator(), Generator(prealloc=True),
                                      Generator(token_by_token=True)],
                         ids=["reference", "list_cache", "preallocated_cache", "token_by_token_prefill"])
def test_generate_honest_variants_pass(generate):
    check_generate(generate, REF.TinyLM)
    check_generate(generate, TinyLM)            # the same given class on another (einsum) attention


@pytest.mark.parametrize("kind,mistake", [
    ("twice", "cache_appended_twice"), ("last_prompt_twice", "cache_appended_twice"),
    ("no_padding_mask", "cache_shared_across_batch_without_padding_mask"),
    ("no_padding_mask_steps", "cache_shared_across_batch_without_padding_mask"),
    ("recompute", "cache_not_used"), ("positions_count_padding", "cached_positions_wrong"),
    ("no_positions", "cached_positions_wrong"), ("prefill_not_causal", "prefill_not_causal")])
def test_generate_mistakes_are_named(kind, mistake):
    assert mistake_of(check_generate, Generator(kind), TinyLM) == mistake


def test_a_buggy_paste_is_blamed():
    buggy = _given_classes(MHAInvertedMask)
    assert mistake_of(check_generate, Generator(), buggy, MHAInvertedMask) == "pasted_attention_fails"


def test_the_checks_decoding_matches_the_models_forward_and_is_far_from_ties():
    """The plain-torch LM equals TinyLM's forward; on the checks' seeds and prompts, no greedy
    choice is within 1e-3 of a tie (float32 rounding cannot flip a token); the cached and the
    recomputed decoding agree for the causal model and differ without the mask."""
    for seed, lengths, width, n, is_causal in ((1000, [4, 4], 4, 6, True), (1010, [4, 4], 4, 8, True),
                                                (1010, [1], 1, 5, True), (1020, [5, 2, 4], 5, 7, True),
                                                (1030, [1, 1], 1, 8, False)):
        model = TinyLM(*ch08._LM, causal=is_causal).eval()
        p = ch08.random_lm_weights({k: tuple(t.shape) for k, t in model.named_parameters()}, seed)
        model.load_state_dict({**model.state_dict(), **p})
        prompt = ch08._prompt(lengths, width, seed + 1 + (seed == 1010 and width == 1), "cpu")
        tokens = ch08.decode_variant(p, prompt, n, ch08._LM[2], ch08._LM[0], is_causal, "recompute")
        with torch.no_grad():
            logits = model(tokens)
        assert torch.allclose(logits, ch08.lm_logits(p, tokens, ch08._LM[2], ch08._LM[0], is_causal), atol=1e-5)
        top2 = ch08.lm_logits(p, tokens, ch08._LM[2], ch08._LM[0], is_causal)[:, width - 1:-1].topk(2, -1).values
        assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-3
        cached = ch08.decode_variant(p, prompt, n, ch08._LM[2], ch08._LM[0], is_causal, "cache")
        assert torch.equal(cached, tokens) == is_causal


def test_code_that_touches_the_memory_meter_gets_no_points(monkeypatch):
    monkeypatch.setattr(memory, "measure", memory.measure)     # restored after the test, whatever happens
    def lies(q, k, v, block_size, mask=None, causal=False):
        import autograder.checks.memory as meter
        meter.measure = lambda fn, *a, **kw: (fn(*a, **kw), 0)
        return naive(q, k, v, block_size, mask, causal)
    assert mistake_of(check_tiled_attention, lies) == "tampers_with_memory_meter"
    assert memory.measure.__name__ == "measure"            # refused before it ran: nothing patched
