"""Chapter 8 corpus: attention at scale. Honest submissions written differently from the reference
(the online update through torch.logsumexp, tiled attention with every query against blocks of
keys or with a log-sum-exp state, a KV cache preallocated as one tensor per layer, a prompt fed
token by token) must get full marks; the classic mistakes get exactly the points of the exercises
they break (a tiled attention that forms the L x L matrix loses its exercise whatever it returns);
hostile code (a tiled attention that forms the matrix and tries to hide it from the memory meter,
one that hangs on long inputs, a generate that edits the model it is given) loses only its own
exercise.

Every submission pastes a chapter-3 multi-head attention with split_heads, merge_heads and its
chapter-2 attention (from chapter 3's corpus) into ``mha_from_ch03``: the reference's
``reference(...)`` does not exist in the student's sandbox, and the KV cache calls them.
"""
from __future__ import annotations

from .ch03 import MHA_PLAIN, PASTE_MASKED_FILL, SPLIT_VIEW_PERMUTE, swap
from .common import Case, answers, fast, reference_answers, tiers

EXERCISES = ("online_softmax_tests", "tiled_attention_tests", "generate_tests")
FULL = dict(zip(EXERCISES, (2.0, 4.0, 4.0)))
ZERO = {k: 0.0 for k in FULL}


def without(*zeroed: str) -> dict:
    """Full marks except the named test cells (online_softmax, tiled_attention, generate), which get 0."""
    return {k: 0.0 if k[:-len("_tests")] in zeroed else v for k, v in FULL.items()}


PASTE = PASTE_MASKED_FILL + "\n" + SPLIT_VIEW_PERMUTE + "\n" + MHA_PLAIN
REFERENCE = reference_answers("ch08_efficient")
GIVEN = REFERENCE["generate_answer"].split("def generate(")[0]       # Block and TinyLM, as released

# ---- exercise 1 ---------------------------------------------------------------------------------

ONLINE_LSE = '''
def online_softmax_update(m, l, block):
    """Through log-sum-exp: log l + m of the old part, logsumexp of the block."""
    m_new = torch.stack([m, block.max(dim=-1).values]).max(dim=0).values
    total = torch.logsumexp(torch.stack([m + torch.log(l), torch.logsumexp(block, dim=-1)]), dim=0)
    return m_new, torch.nan_to_num(torch.exp(total - m_new), nan=0.0)
'''

ONLINE_BLOCK_MAX = '''
def online_softmax_update(m, l, block):
    m_block = block.amax(-1)
    shift = torch.where(torch.isinf(m_block), torch.zeros_like(m_block), m_block)
    return m_block, l * torch.exp(m - shift) + torch.exp(block - shift[..., None]).sum(-1)
'''

# ---- exercise 2 ---------------------------------------------------------------------------------

TILED_KEYS_ONLY = '''
def tiled_attention(q, k, v, block_size, mask=None, causal=False):
    """Every query at once, the keys and values in blocks: O(L * block) memory."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    if mask is not None:
        mask = mask.expand(*mask.shape[:-2], n_q, n_k)
    queries = torch.arange(n_q, device=q.device)[:, None]
    m = torch.full(q.shape[:-1], -math.inf, dtype=q.dtype, device=q.device)
    total = torch.zeros_like(m)
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    for start in range(0, n_k, block_size):
        stop = min(start + block_size, n_k)
        scores = q @ k[..., start:stop, :].mT / math.sqrt(q.shape[-1])
        keep = torch.ones_like(scores, dtype=torch.bool)
        if mask is not None:
            keep = keep & mask[..., start:stop]
        if causal:
            keep = keep & (torch.arange(start, stop, device=q.device)[None, :] <= queries)
        scores = scores.masked_fill(~keep, -math.inf)
        new_m = torch.maximum(m, scores.amax(-1))
        base = torch.nan_to_num(new_m, neginf=0.0)
        e = torch.exp(scores - base[..., None])
        scale = torch.exp(m - base)
        total = total * scale + e.sum(-1)
        out = out * scale[..., None] + e @ v[..., start:stop, :]
        m = new_m
    return out / total.masked_fill(total == 0, 1.0)[..., None]
'''

TILED_ACC_NOT_RESCALED = swap(TILED_KEYS_ONLY, "out = out * scale[..., None] + e @ v[..., start:stop, :]",
                              "out = out + e @ v[..., start:stop, :]")
TILED_OFFSET_MISSING = swap(
    TILED_KEYS_ONLY, "keep = keep & (torch.arange(start, stop, device=q.device)[None, :] <= queries)",
    "keep = keep & (torch.arange(0, stop - start, device=q.device)[None, :] <= queries % block_size)")

# Right numbers from the full matrix, then a loop over blocks of rows of the weights.
TILED_NAIVE = '''
def tiled_attention(q, k, v, block_size, mask=None, causal=False):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask
    if causal:
        allowed = allowed & torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, -math.inf)
    top = scores.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    w = torch.exp(scores - top)
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-30)
    return torch.cat([w[..., i:i + block_size, :] @ v for i in range(0, q.shape[-2], block_size)], dim=-2)
'''

# ---- exercise 3 ---------------------------------------------------------------------------------

GENERATE_PREALLOCATED = GIVEN + '''
def generate(model, prompt, n_tokens, use_cache=True):
    """The cache as one preallocated tensor per layer and a fill pointer; the prompt token by token."""
    if not use_cache:
        out = prompt
        for _ in range(n_tokens):
            out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return out
    b, p = prompt.shape
    d = model.embed.weight.shape[1]
    size = p + n_tokens
    keys = [torch.zeros(b, blk.n_heads, size, d // blk.n_heads) for blk in model.blocks]
    values = [torch.zeros(b, blk.n_heads, size, d // blk.n_heads) for blk in model.blocks]
    real = torch.zeros(b, size, dtype=torch.bool)
    positions = model.positions(prompt)
    out = prompt

    def step(token, position, t):
        real[:, t] = token[:, 0] != model.pad_id
        x = model.embed(token) + model.pos(position)
        for i, blk in enumerate(model.blocks):
            h = blk.norm1(x)
            q = split_heads(blk.attn.q_proj(h), blk.n_heads)
            keys[i][:, :, t:t + 1] = split_heads(blk.attn.k_proj(h), blk.n_heads)
            values[i][:, :, t:t + 1] = split_heads(blk.attn.v_proj(h), blk.n_heads)
            seen = real[:, None, None, :t + 1]
            att, _ = scaled_dot_product_attention(q, keys[i][:, :, :t + 1], values[i][:, :, :t + 1], seen)
            x = x + blk.attn.out_proj(merge_heads(att))
            x = x + blk.ff(blk.norm2(x))
        return model.readout(model.norm(x[:, -1]))

    for t in range(p):
        logits = step(prompt[:, t:t + 1], positions[:, t:t + 1], t)
    counts = (prompt != model.pad_id).sum(-1, keepdim=True)
    for s in range(n_tokens):
        token = logits.argmax(-1, keepdim=True)
        out = torch.cat([out, token], dim=1)
        if s + 1 < n_tokens:
            logits = step(token, counts + s, p + s)
    return out
'''

GENERATE_NO_PADDING_MASK = swap(GENERATE_PREALLOCATED, "real[:, t] = token[:, 0] != model.pad_id",
                                "real[:, t] = True")
GENERATE_APPENDED_TWICE = swap(
    REFERENCE["generate_answer"], "k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)",
    "k, v = torch.cat([cache[0], k, k], dim=2), torch.cat([cache[1], v, v], dim=2)")
GENERATE_APPENDED_TWICE = swap(GENERATE_APPENDED_TWICE, "        real = torch.cat([real, torch.ones_like(new, dtype=torch.bool)], dim=1)",
                               "        real = torch.cat([real, torch.ones_like(new, dtype=torch.bool).repeat(1, 2)], dim=1)")

# ---- hostile ------------------------------------------------------------------------------------

# Forms the L x L matrix and tries to blind the meter: patches the measuring function, resets the
# high-water mark itself after the big allocations.
TILED_LIES_ABOUT_MEMORY = TILED_NAIVE.replace("def tiled_attention(", "def _plain(") + '''

def tiled_attention(q, k, v, block_size, mask=None, causal=False):
    import autograder.checks.memory as meter
    meter.measure = lambda fn, *a, **kw: (fn(*a, **kw), 0)
    out = _plain(q, k, v, block_size, mask, causal)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return out
'''

# Right and tiled, but never returns on long inputs (the memory check's); it sleeps, as ch04's.
TILED_HANGS = swap(TILED_KEYS_ONLY, "    n_q, n_k = q.shape[-2], k.shape[-2]\n", '''    n_q, n_k = q.shape[-2], k.shape[-2]
    while n_k > 1000:
        import time
        time.sleep(0.05)
''')

# Right tokens, then it zeroes the read-out of the model it was given.
GENERATE_EDITS_MODEL = swap(GENERATE_PREALLOCATED, "    if not use_cache:\n", '''    if not use_cache:
        with torch.no_grad():
            model.readout.weight.mul_(0.5)
''')

OK = dict(mha_from_ch03=PASTE, online_softmax_answer=REFERENCE["online_softmax_answer"],
          tiled_attention_answer=REFERENCE["tiled_attention_answer"], generate_answer=REFERENCE["generate_answer"])


def ok(**overrides):
    return answers(**{**OK, **overrides})


def reference_with_paste(nb):
    return answers(**{**REFERENCE, "mha_from_ch03": PASTE})(nb)


CASES = [
    # ---------------------------------------------------------------- honest: full marks
    Case("reference_full_narrative", FULL, reference_with_paste,
         note="the source notebook's own answers, the narrative kept (measurements, figures, the speed-up)"),
    Case("honest_logsumexp_keys_only_preallocated", FULL,
         fast(ok(online_softmax_answer=ONLINE_LSE, tiled_attention_answer=TILED_KEYS_ONLY,
                 generate_answer=GENERATE_PREALLOCATED))),

    # ---------------------------------------------------------------- nothing done
    Case("untouched_release", ZERO, lambda nb: nb),

    # ---------------------------------------------------------------- mistakes
    Case("online_block_max", without("online_softmax"), fast(ok(online_softmax_answer=ONLINE_BLOCK_MAX))),
    Case("tiled_accumulator_not_rescaled", without("tiled_attention"),
         fast(ok(tiled_attention_answer=TILED_ACC_NOT_RESCALED))),
    Case("tiled_causal_offset_missing", without("tiled_attention"), fast(ok(tiled_attention_answer=TILED_OFFSET_MISSING))),
    Case("tiled_forms_full_matrix", without("tiled_attention"), fast(ok(tiled_attention_answer=TILED_NAIVE))),
    Case("generate_cache_appended_twice", without("generate"), fast(ok(generate_answer=GENERATE_APPENDED_TWICE))),
    Case("generate_no_padding_mask", without("generate"), fast(ok(generate_answer=GENERATE_NO_PADDING_MASK))),

    # ---------------------------------------------------------------- hostile
    Case("hostile_tiled_lies_about_memory", without("tiled_attention"),
         fast(ok(tiled_attention_answer=TILED_LIES_ABOUT_MEMORY))),
    Case("hostile_tiled_hangs_on_long_inputs", without("tiled_attention"), fast(ok(tiled_attention_answer=TILED_HANGS))),
    Case("hostile_generate_edits_the_model", without("generate"), fast(ok(generate_answer=GENERATE_EDITS_MODEL))),
]

# Not graded yet, kept for the lead: the same lie with the meter's words hidden from the source scan.
# Through the sandbox it gets full marks today: the grader reads VmHWM after the call, and the
# student's own write of "5" to clear_refs after forming the matrix resets it (the sandbox would
# have to deny that write, or sample the resident set during the call).
KNOWN_HOLES = [
    Case("hostile_tiled_resets_peak_obfuscated", without("tiled_attention"), fast(ok(tiled_attention_answer=
         TILED_NAIVE.replace("def tiled_attention(", "def _plain(") + """

def tiled_attention(q, k, v, block_size, mask=None, causal=False):
    out = _plain(q, k, v, block_size, mask, causal)
    with open("/proc/self/" + "clear" + "_refs", "w") as f:
        f.write("5")
    return out
"""))),
]

tiers(CASES, hostile={"hostile_tiled_lies_about_memory", "hostile_tiled_hangs_on_long_inputs",
                      "hostile_generate_edits_the_model"},
      full={"reference_full_narrative", "untouched_release", "tiled_forms_full_matrix"})
