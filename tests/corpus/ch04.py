"""Chapter 4 corpus: positions. Honest submissions written differently from the reference (loops,
torch.polar, precomputed cos/sin tables, the halves convention behind a permutation, persistent
buffers, hand-made dropout) must get full marks; the classic mistakes get exactly the points their
working exercises deserve; hostile modules (one that changes itself between calls, a huge buffer,
attributes that lie, a RoPE that never returns) lose only their own exercise.

Every submission pastes a chapter-3 multi-head attention of its own into the ungraded cell
``mha_from_ch03`` (the reference's ``reference("ch03_multihead")`` does not exist in the student's
sandbox), built from chapter 3's corpus.
"""
from __future__ import annotations

from .ch03 import MHA_EINSUM, MHA_PLAIN, PASTE_MASK_AFTER_SOFTMAX, PASTE_MASKED_FILL, SPLIT_VIEW_PERMUTE, swap
from .common import Case, answers, fast, reference_answers, tiers

EXERCISES = ("permutation_tests", "sinusoidal_encoding_tests", "positional_encoding_tests", "embeddings_tests",
             "rope_tests")
FULL = dict(zip(EXERCISES, (1.0, 3.0, 3.0, 2.0, 4.0)))
ZERO = {k: 0.0 for k in FULL}


def without(*zeroed: str) -> dict:
    """Full marks except the named test cells (short names: permutation, sinusoidal, ...), which get 0."""
    names = {name.split("_")[0]: name for name in EXERCISES}
    return {k: 0.0 if k in {names[z] for z in zeroed} else v for k, v in FULL.items()}


# ---- the chapter-3 paste ------------------------------------------------------------------------

PASTE = PASTE_MASKED_FILL + "\n" + SPLIT_VIEW_PERMUTE + "\n" + MHA_PLAIN
PASTE_OWN_ATTENTION = MHA_EINSUM                      # a module that attends by itself: nothing else needed
PASTE_BUGGY = PASTE_MASK_AFTER_SOFTMAX + "\n" + SPLIT_VIEW_PERMUTE + "\n" + MHA_PLAIN
PASTE_KEPT_REFERENCE = """
# Paste your MultiHeadAttention from chapter 3 here.
from autograder.reference import reference
MultiHeadAttention = reference("ch03_multihead").MultiHeadAttention
"""

# ---- exercise 1, written differently ------------------------------------------------------------

SIN_LOOP = '''
def sinusoidal_encoding(max_len, d_model, dtype=torch.float32, device=None):
    if d_model % 2:
        raise ValueError(f"odd d_model: {d_model}")
    rows = []
    for pos in range(max_len):                    # a loop over positions, float64 Python numbers
        row = []
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            row += [math.sin(angle), math.cos(angle)]
        rows.append(row)
    return torch.tensor(rows, dtype=dtype, device=device).reshape(max_len, d_model)
'''

SIN_EXP_LOG = '''
def sinusoidal_encoding(max_len, d_model, dtype=torch.float32, device=None):
    if d_model % 2 != 0:
        raise ValueError("d_model must be even")
    pos = torch.arange(max_len, dtype=dtype, device=device).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=dtype, device=device) * (-math.log(10000.0) / d_model))
    return torch.stack([torch.sin(pos * freq), torch.cos(pos * freq)], dim=-1).flatten(1)
'''

SIN_FLOAT64_THEN_CAST = '''
def sinusoidal_encoding(max_len, d_model, dtype=torch.float32, device=None):
    if d_model % 2:
        raise ValueError("d_model must be even")
    pos = torch.arange(max_len, dtype=torch.float64, device=device)[:, None]
    div = torch.pow(10000.0, torch.arange(0, d_model, 2, dtype=torch.float64, device=device) / d_model)
    pe = torch.zeros(max_len, d_model, dtype=torch.float64, device=device)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos / div), torch.cos(pos / div)
    return pe.to(dtype)
'''

# ---- exercise 2, written differently ------------------------------------------------------------

PE_PERSISTENT_FUNCTIONAL = '''
class PositionalEncoding(nn.Module):
    """A persistent (1, max_len, d_model) buffer and F.dropout with the training flag."""
    def __init__(self, d_model, max_len=5000, dropout=0.1):
        super().__init__()
        self.p = dropout
        self.register_buffer("pe", sinusoidal_encoding(max_len, d_model).unsqueeze(0))

    def forward(self, x):
        if x.shape[-2] > self.pe.shape[1]:
            raise ValueError(f"{x.shape[-2]} positions, max_len is {self.pe.shape[1]}")
        return F.dropout(x + self.pe[0, :x.shape[-2]], self.p, self.training)
'''

PE_HAND_MADE_DROPOUT = '''
class LengthError(ValueError):
    pass


class PositionalEncoding(nn.Module):
    """Its own dropout (a mask from the global generator) and a ValueError subclass."""
    def __init__(self, d_model, max_len=5000, dropout=0.1):
        super().__init__()
        self.rate = dropout
        self.register_buffer("table", sinusoidal_encoding(max_len, d_model), persistent=False)

    def forward(self, x):
        n = x.size(-2)
        if n > len(self.table):
            raise LengthError("sequence longer than max_len")
        s = x + self.table[:n]
        if self.training and self.rate > 0:
            s = s * (torch.rand_like(s) >= self.rate) / (1 - self.rate)
        return s
'''

# ---- exercise 3 ---------------------------------------------------------------------------------------

EMB_ONE_HOT = '''
class Embeddings(nn.Module):
    def __init__(self, vocab_size, d_model):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.scale = d_model ** 0.5

    def forward(self, tokens):
        w = self.embedding.weight
        return (F.one_hot(tokens, w.shape[0]).to(w.dtype) @ w) * self.scale
'''

EMB_FUNCTIONAL = '''
class Embeddings(nn.Module):
    def __init__(self, vocab_size, d_model):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)

    def forward(self, tokens):
        return F.embedding(tokens, self.embedding.weight * math.sqrt(self.embedding.embedding_dim))
'''

# ---- exercise 4, written differently ------------------------------------------------------------

ROPE_POLAR = '''
def apply_rope(x, positions, base=10000.0):
    d = x.shape[-1]
    if d % 2:
        raise ValueError("d_head must be even")
    theta = base ** (-torch.arange(0, d, 2, dtype=x.dtype, device=x.device) / d)
    angle = torch.outer(positions.to(x.dtype), theta)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).flatten(-2)
'''

ROPE_TABLES = '''
_rope_cache = {}


def _cos_sin(length, d, base, dtype, device):
    """cos/sin tables for positions 0 ... length-1, computed once per size (as real models cache them)."""
    key = (length, d, base, dtype, str(device))
    if key not in _rope_cache:
        angle = torch.arange(length, dtype=dtype, device=device)[:, None] * \\
            base ** (-torch.arange(0, d, 2, dtype=dtype, device=device) / d)
        _rope_cache[key] = (angle.cos(), angle.sin())
    return _rope_cache[key]


def apply_rope(x, positions, base=10000.0):
    if x.shape[-1] % 2:
        raise ValueError("odd d_head")
    cos, sin = _cos_sin(int(positions.max()) + 1, x.shape[-1], base, x.dtype, x.device)
    cos, sin = cos[positions], sin[positions]
    out = torch.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
    return out
'''

ROPE_LOOP = '''
def apply_rope(x, positions, base=10000.0):
    d = x.shape[-1]
    if d % 2 == 1:
        raise ValueError("d_head must be even")
    rows = []
    for n, pos in enumerate(positions.tolist()):     # a loop over positions: one rotation matrix each
        rot = torch.zeros(d, d, dtype=x.dtype, device=x.device)
        for i in range(d // 2):
            a = pos * base ** (-2 * i / d)
            rot[2 * i, 2 * i], rot[2 * i, 2 * i + 1] = math.cos(a), -math.sin(a)
            rot[2 * i + 1, 2 * i], rot[2 * i + 1, 2 * i + 1] = math.sin(a), math.cos(a)
        rows.append(x[..., n, :] @ rot.T)
    return torch.stack(rows, dim=-2)
'''

ROPE_HALVES_PERMUTED = '''
def rotate_halves(x, positions, base):
    """The "rotate half" convention: feature i paired with feature i + d/2."""
    d = x.shape[-1]
    angle = torch.outer(positions.to(x.dtype), base ** (-torch.arange(0, d, 2, dtype=x.dtype, device=x.device) / d))
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1) * sin


def apply_rope(x, positions, base=10000.0):
    d = x.shape[-1]
    if d % 2:
        raise ValueError("d_head must be even")
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)]).to(x.device)   # neighbours -> halves
    return rotate_halves(x[..., perm], positions, base)[..., torch.argsort(perm)]
'''

# ---- mistakes -------------------------------------------------------------------------------------------


SIN_SWAPPED = swap(SIN_EXP_LOG, "[torch.sin(pos * freq), torch.cos(pos * freq)]", "[torch.cos(pos * freq), torch.sin(pos * freq)]")
SIN_EXPONENT_I = swap(SIN_LOOP, "10000 ** (2 * i / d_model)", "10000 ** (i / d_model)")
SIN_FROM_1 = swap(SIN_LOOP, "for pos in range(max_len):", "for pos in range(1, max_len + 1):")
SIN_BASE_1000 = swap(SIN_LOOP, "10000 ** (2 * i / d_model)", "1000 ** (2 * i / d_model)")
SIN_IGNORES_DEVICE = swap(SIN_LOOP, "dtype=dtype, device=device)", "dtype=dtype)")

PE_ALONG_BATCH = '''
class PositionalEncoding(nn.Module):
    """The sequence-first tutorial's (max_len, 1, d_model) table, used on batch-first inputs."""
    def __init__(self, d_model, max_len=5000, dropout=0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", sinusoidal_encoding(max_len, d_model).unsqueeze(1))

    def forward(self, x):
        if x.size(-2) > self.pe.size(0):
            raise ValueError("too long")
        return self.dropout(x + self.pe[:x.size(0)])
'''

PE_BUILT_ON_CPU = '''
class PositionalEncoding(nn.Module):
    """The table built in forward, on the CPU."""
    def __init__(self, d_model, max_len=5000, dropout=0.1):
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        if x.size(-2) > self.max_len:
            raise ValueError("too long")
        return self.dropout(x + sinusoidal_encoding(x.size(-2), self.d_model).to(x.dtype))
'''

PE_NO_LENGTH_CHECK = swap(PE_PERSISTENT_FUNCTIONAL, '''        if x.shape[-2] > self.pe.shape[1]:
            raise ValueError(f"{x.shape[-2]} positions, max_len is {self.pe.shape[1]}")
''', "")
PE_DROPOUT_BEFORE_SUM = swap(PE_PERSISTENT_FUNCTIONAL, "F.dropout(x + self.pe[0, :x.shape[-2]], self.p, self.training)",
                             "F.dropout(x, self.p, self.training) + self.pe[0, :x.shape[-2]]")

EMB_UNSCALED = swap(EMB_FUNCTIONAL, "self.embedding.weight * math.sqrt(self.embedding.embedding_dim)",
                    "self.embedding.weight")

ROPE_HALVES = '''
def apply_rope(x, positions, base=10000.0):
    d = x.shape[-1]
    if d % 2:
        raise ValueError("d_head must be even")
    angle = torch.outer(positions.to(x.dtype), base ** (-torch.arange(0, d, 2, dtype=x.dtype, device=x.device) / d))
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1) * sin
'''
ROPE_MIXED = swap(ROPE_HALVES, "cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)",
                  "cos, sin = angle.cos().repeat_interleave(2, -1), angle.sin().repeat_interleave(2, -1)")
ROPE_BACKWARDS = swap(ROPE_POLAR, "torch.polar(torch.ones_like(angle), angle)", "torch.polar(torch.ones_like(angle), -angle)")

# ---- hostile --------------------------------------------------------------------------------------------

# Right on its first call, then it rescales its own table after every call.
PE_CHANGES_ITSELF = '''
class PositionalEncoding(nn.Module):
    def __init__(self, d_model, max_len=5000, dropout=0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", sinusoidal_encoding(max_len, d_model), persistent=False)

    def forward(self, x):
        if x.size(-2) > self.pe.size(0):
            raise ValueError("too long")
        out = self.dropout(x + self.pe[:x.size(-2)])
        with torch.no_grad():
            self.pe.mul_(0.5)                     # the next call sees another table
        return out
'''

# A second buffer of 260 MiB: the module cannot be described to the grader within its message limit.
PE_HUGE_BUFFER = swap(PE_PERSISTENT_FUNCTIONAL,
                      '        self.register_buffer("pe", sinusoidal_encoding(max_len, d_model).unsqueeze(0))\n',
                      '        self.register_buffer("pe", sinusoidal_encoding(max_len, d_model).unsqueeze(0))\n'
                      '        self.register_buffer("ballast", torch.zeros(65 * 2**20), persistent=False)\n')

# Claims a right table through every attribute and buffer lookup it controls; adds nothing.
PE_LIES = '''
class PositionalEncoding(nn.Module):
    def __init__(self, d_model, max_len=5000, dropout=0.1):
        super().__init__()
        self.__dict__["_fake"] = sinusoidal_encoding(max_len, d_model)

    def __getattr__(self, name):
        if name.startswith("_"):
            return super().__getattr__(name)
        return self.__dict__["_fake"]            # any attribute: "the table"

    def named_buffers(self, *args, **kwargs):
        yield "pe", self.__dict__["_fake"]

    def state_dict(self, *args, **kwargs):
        return {"pe": self.__dict__["_fake"]}

    def forward(self, x):
        if x.size(-2) > self.__dict__["_fake"].size(0):
            raise ValueError("too long")
        return x * 1.0
'''

# Never returns once a position beyond 30 is asked for (the test's arbitrary positions are). It
# sleeps rather than spins: the grader's clock ends it either way (chapter 1's loops spin).
ROPE_LOOPS_FOREVER = swap(ROPE_POLAR, '''    if d % 2:
        raise ValueError("d_head must be even")
''', '''    if d % 2:
        raise ValueError("d_head must be even")
    while int(positions.max()) > 30:
        import time
        time.sleep(0.05)
''')

OK = dict(mha_from_ch03=PASTE, sinusoidal_encoding_answer=SIN_EXP_LOG, positional_encoding_answer=PE_PERSISTENT_FUNCTIONAL,
          embeddings_answer=EMB_FUNCTIONAL, rope_answer=ROPE_POLAR)


def ok(**overrides):
    return answers(**{**OK, **overrides})


def reference_with_paste(nb):
    return answers(**{**reference_answers("ch04_positions"), "mha_from_ch03": PASTE})(nb)


CASES = [
    # ---------------------------------------------------------------- honest: full marks
    Case("reference_full_narrative", FULL, reference_with_paste,
         note="the source notebook's own answers, the narrative kept (figures, demos)"),
    Case("honest_loop_polar_one_hot", FULL, fast(ok(
        sinusoidal_encoding_answer=SIN_LOOP, positional_encoding_answer=PE_HAND_MADE_DROPOUT,
        embeddings_answer=EMB_ONE_HOT))),
    Case("honest_exp_log_persistent_tables", FULL, fast(ok(rope_answer=ROPE_TABLES))),
    Case("honest_float64_cast_loop_rope", FULL, fast(ok(
        sinusoidal_encoding_answer=SIN_FLOAT64_THEN_CAST, rope_answer=ROPE_LOOP))),
    Case("honest_halves_behind_a_permutation", FULL, fast(ok(
        mha_from_ch03=PASTE_OWN_ATTENTION, rope_answer=ROPE_HALVES_PERMUTED,
        positional_encoding_answer=PE_HAND_MADE_DROPOUT))),

    # ---------------------------------------------------------------- nothing done / the paste
    Case("untouched_release", ZERO, lambda nb: nb),
    Case("mha_not_pasted", without("permutation"), fast(ok(
        mha_from_ch03="# Paste your MultiHeadAttention from chapter 3 here.\n# YOUR CODE HERE\n"
                      "raise NotImplementedError()\n"))),
    Case("paste_keeps_reference", without("permutation"), fast(ok(mha_from_ch03=PASTE_KEPT_REFERENCE))),
    Case("pasted_attention_masks_after_softmax", without("permutation"), fast(ok(mha_from_ch03=PASTE_BUGGY))),

    # ---------------------------------------------------------------- exercise 1 (PositionalEncoding uses it)
    Case("sin_cos_swapped", without("sinusoidal", "positional"), fast(ok(sinusoidal_encoding_answer=SIN_SWAPPED))),
    Case("exponent_i", without("sinusoidal", "positional"), fast(ok(sinusoidal_encoding_answer=SIN_EXPONENT_I))),
    Case("positions_from_1", without("sinusoidal", "positional"), fast(ok(sinusoidal_encoding_answer=SIN_FROM_1))),
    Case("base_1000", without("sinusoidal", "positional"), fast(ok(sinusoidal_encoding_answer=SIN_BASE_1000))),
    # The table ignores `device`: right on the CPU, caught on the meta device; PositionalEncoding
    # builds its buffer on the CPU and moves it, so it is unaffected.
    Case("sinusoid_ignores_device", without("sinusoidal"), fast(ok(sinusoidal_encoding_answer=SIN_IGNORES_DEVICE))),

    # ---------------------------------------------------------------- exercise 2
    Case("added_along_batch_axis", without("positional"), fast(ok(positional_encoding_answer=PE_ALONG_BATCH))),
    Case("table_built_on_cpu_in_forward", without("positional"), fast(ok(positional_encoding_answer=PE_BUILT_ON_CPU))),
    Case("no_length_check", without("positional"), fast(ok(positional_encoding_answer=PE_NO_LENGTH_CHECK))),
    Case("dropout_before_sum", without("positional"), fast(ok(positional_encoding_answer=PE_DROPOUT_BEFORE_SUM))),

    # ---------------------------------------------------------------- exercises 3 and 4
    Case("embeddings_not_scaled", without("embeddings"), fast(ok(embeddings_answer=EMB_UNSCALED))),
    Case("rope_halves_convention", without("rope"), fast(ok(rope_answer=ROPE_HALVES))),
    Case("rope_conventions_mixed", without("rope"), fast(ok(rope_answer=ROPE_MIXED))),
    Case("rope_backwards", without("rope"), fast(ok(rope_answer=ROPE_BACKWARDS))),

    # ---------------------------------------------------------------- hostile
    Case("hostile_pe_changes_itself_between_calls", without("positional"), fast(ok(positional_encoding_answer=PE_CHANGES_ITSELF))),
    Case("hostile_pe_huge_buffer", without("positional"), fast(ok(positional_encoding_answer=PE_HUGE_BUFFER))),
    Case("hostile_pe_attributes_lie", without("positional"), fast(ok(positional_encoding_answer=PE_LIES))),
    Case("hostile_rope_never_returns", without("rope"), fast(ok(rope_answer=ROPE_LOOPS_FOREVER))),
]

tiers(CASES, hostile={"hostile_pe_changes_itself_between_calls", "hostile_pe_huge_buffer", "hostile_pe_attributes_lie",
                      "hostile_rope_never_returns"},
      full={"reference_full_narrative", "untouched_release"})
