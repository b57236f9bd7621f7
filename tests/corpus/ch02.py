"""Chapter 2 corpus: masks and masked attention. Honest submissions written differently from the
reference must get full marks; the classic masking mistakes and a few shortcuts must get exactly
the points their working exercises deserve."""
from __future__ import annotations

import copy

from .common import Case, answers, fast, insert, then, tiers

FULL = {"causal_mask_tests": 1.0, "padding_mask_tests": 1.0, "masked_attention_tests": 4.0}
ZERO = {k: 0.0 for k in FULL}


def score(causal=0.0, padding=0.0, attention=0.0):
    return {"causal_mask_tests": causal, "padding_mask_tests": padding, "masked_attention_tests": attention}


# ---- causal masks written differently from the reference -------------------------------------

CAUSAL_ARANGE = '''
def causal_mask(n, device=None):
    i = torch.arange(n, device=device)
    return i[:, None] >= i[None, :]          # key j allowed for query i when j <= i
'''

CAUSAL_NOT_TRIU = '''
def causal_mask(n, device=None):
    future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)
    return ~future
'''

CAUSAL_FLOAT_TRIL_BOOL = '''
def causal_mask(n, device=None):
    return torch.ones(n, n, device=device).tril().bool()
'''

CAUSAL_LOOP = '''
def causal_mask(n, device=None):
    rows = [[j <= i for j in range(n)] for i in range(n)]
    return torch.tensor(rows, dtype=torch.bool, device=device).reshape(n, n)
'''

# ---- padding masks ------------------------------------------------------------------------------

PADDING_VIEW = '''
def padding_mask(lengths, max_len):
    positions = torch.arange(max_len, device=lengths.device).view(1, 1, max_len)
    return positions < lengths.view(-1, 1, 1)
'''

PADDING_LOOP = '''
def padding_mask(lengths, max_len):
    mask = torch.zeros(len(lengths), 1, max_len, dtype=torch.bool, device=lengths.device)
    for b, n in enumerate(lengths.tolist()):
        mask[b, 0, :n] = True
    return mask
'''

PADDING_EXPAND_UNSQUEEZE = '''
def padding_mask(lengths, max_len):
    b = lengths.shape[0]
    positions = torch.arange(max_len, device=lengths.device).expand(b, max_len)
    return positions.lt(lengths.unsqueeze(1).long()).unsqueeze(1)
'''

# ---- masked attention ---------------------------------------------------------------------------

ATTENTION_WHERE = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is None:
        w = torch.softmax(logits, dim=-1)
        return w @ v, w
    mask = mask.expand(logits.shape)
    any_key = mask.any(-1, keepdim=True)
    neg_inf = torch.full_like(logits, float("-inf"))
    logits = torch.where(mask, logits, neg_inf)
    logits = torch.where(any_key, logits, torch.zeros_like(logits))     # no all -inf row
    w = torch.softmax(logits, dim=-1)
    w = torch.where(any_key, w, torch.zeros_like(w))
    return w @ v, w
'''

ATTENTION_EINSUM = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = torch.einsum("...id,...jd->...ij", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits.masked_fill(mask.logical_not(), float("-inf"))
        empty = torch.isneginf(logits).all(-1, keepdim=True)          # rows with no allowed key
        logits = logits.masked_fill(empty, 0.0)
    w = logits.softmax(-1)
    if mask is not None:
        w = w.masked_fill(empty, 0.0)
    return torch.einsum("...ij,...jd->...id", w, v), w
'''

# -inf, softmax, then nan_to_num: the NaN of a fully masked row is replaced afterwards. The
# backward pass stays finite because masked_fill's backward zeroes every blocked position.
ATTENTION_NAN_TO_NUM = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q.matmul(k.transpose(-1, -2)) / q.size(-1) ** 0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    w = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return w.matmul(v), w
'''

# torch.where with -inf, then the NaN of a fully masked row replaced by torch.where(isnan): like
# masked_fill, torch.where sends no gradient to the positions it filled, so the gradients stay finite.
ATTENTION_WHERE_ISNAN = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = torch.where(mask, logits, float("-inf"))
    w = torch.softmax(logits, dim=-1)
    w = torch.where(torch.isnan(w), torch.zeros_like(w), w)
    return w @ v, w
'''

# Its own softmax: max over the allowed keys only, exp, zero the blocked keys, divide by the sum
# (clamped so that an empty row divides 0 by something positive).
ATTENTION_MANUAL_SOFTMAX = '''
def masked_softmax(x, mask):
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    mask = mask.expand(x.shape)
    m = x.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(torch.where(mask, x - m, torch.full_like(x, float("-inf"))))
    return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def scaled_dot_product_attention(q, k, v, mask=None):
    d_k = q.shape[-1]
    w = masked_softmax(q @ k.transpose(-2, -1) / math.sqrt(d_k), mask)
    return w @ v, w
'''

# One query at a time (Python loop), an additive -inf bias, empty rows handled per query.
ATTENTION_LOOP = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is None:
        mask = torch.ones((), dtype=torch.bool, device=q.device)
    mask = mask.expand(logits.shape)
    rows = []
    for i in range(logits.shape[-2]):
        s, m = logits[..., i, :], mask[..., i, :]
        bias = torch.zeros_like(s).masked_fill(~m, float("-inf"))
        has_key = m.any(-1, keepdim=True)
        s = torch.where(has_key, s + bias, torch.zeros_like(s))
        rows.append(torch.softmax(s, -1) * has_key)
    w = torch.stack(rows, dim=-2)
    return w @ v, w
'''

# A large finite negative number instead of -inf, with the empty rows zeroed: exp(-1e9 - max)
# is exactly 0 in float32 and float64, so this is a correct answer too.
ATTENTION_LARGE_NEGATIVE_ZEROED = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is None:
        w = torch.softmax(logits, -1)
    else:
        w = torch.softmax(logits.masked_fill(~mask, -1e9), -1)
        w = w * mask.any(-1, keepdim=True)
    return w @ v, w
'''

OK = dict(causal_mask_answer=CAUSAL_ARANGE, padding_mask_answer=PADDING_VIEW,
          masked_attention_answer=ATTENTION_WHERE)


def ok(**overrides):
    return answers(**{**OK, **overrides})



# ---- mistakes -----------------------------------------------------------------------------------

ATTENTION_ZERO_AFTER_SOFTMAX = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    if mask is not None:
        w = w * mask                 # blocked keys zeroed AFTER the softmax
    return w @ v, w
'''

ATTENTION_ZERO_AFTER_RENORMALISE = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    if mask is not None:
        w = w * mask
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)     # rows sum to 1 again
    return w @ v, w
'''

ATTENTION_INVERTED = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))      # nn.MultiheadAttention's convention
        empty = ~(~mask).any(-1, keepdim=True)
        logits = logits.masked_fill(empty, 0.0)
        w = torch.softmax(logits, -1).masked_fill(empty, 0.0)
    else:
        w = torch.softmax(logits, -1)
    return w @ v, w
'''

CAUSAL_INVERTED = '''
def causal_mask(n, device=None):
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)    # True = blocked
'''

ATTENTION_MINUS_1E9 = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, -1e9)     # empty rows become uniform
    w = torch.softmax(logits, -1)
    return w @ v, w
'''

ATTENTION_NAN_ROWS = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))    # a fully masked row is NaN
    w = torch.softmax(logits, -1)
    return w @ v, w
'''

ATTENTION_UNSCALED = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1)                         # no 1/sqrt(d_k)
    if mask is not None:
        visible = mask.any(-1, keepdim=True)
        logits = logits.masked_fill(~mask, float("-inf")).masked_fill(~visible, 0.0)
        w = torch.softmax(logits, -1).masked_fill(~visible, 0.0)
    else:
        w = torch.softmax(logits, -1)
    return w @ v, w
'''

ATTENTION_TORCH_SDPA = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is None:
        w = torch.softmax(logits, -1)
        return F.scaled_dot_product_attention(q, k, v), w
    visible = mask.expand(logits.shape).any(-1, keepdim=True)
    w = torch.softmax(logits.masked_fill(~mask, float("-inf")).masked_fill(~visible, 0.0), -1)
    w = w.masked_fill(~visible, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(visible, mask, True))
    return out.masked_fill(~visible, 0.0), w
'''

ATTENTION_SDPA_IMPORTED_AS = '''
from torch.nn.functional import scaled_dot_product_attention as fused

def scaled_dot_product_attention(q, k, v, mask=None):
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
    return fused(q, k, v, attn_mask=mask), w
'''

# An additive -inf mask, NaN replaced after the softmax: the forward pass is right, but the NaN
# gradient of a fully masked row flows through the addition into q and k.
ATTENTION_ADDITIVE_NAN_TO_NUM = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits + torch.zeros_like(logits).masked_fill(~mask, float("-inf"))
    w = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return w @ v, w
'''

ATTENTION_FILL_ZERO = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits * mask                   # blocked logits become 0, not -inf
    w = torch.softmax(logits, -1)
    return w @ v, w
'''

CAUSAL_SHIFTED = '''
def causal_mask(n, device=None):
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(diagonal=1)
'''

CAUSAL_IGNORES_DEVICE = '''
def causal_mask(n, device=None):
    return torch.tril(torch.ones(n, n, dtype=torch.bool))       # always on the CPU
'''

CAUSAL_DEVICE_READ_NOT_USED = '''
def causal_mask(n, device=None):
    device = device or "cpu"
    return torch.tril(torch.ones(n, n, dtype=torch.bool))       # always on the CPU
'''

CAUSAL_INT = '''
def causal_mask(n, device=None):
    return torch.ones(n, n, dtype=torch.long, device=device).tril()      # 0/1 integers
'''

PADDING_FLOAT = '''
def padding_mask(lengths, max_len):
    positions = torch.arange(max_len, device=lengths.device)
    return (positions < lengths[:, None]).float()[:, None, :]            # 0./1. floats
'''

PADDING_NO_QUERY_AXIS = '''
def padding_mask(lengths, max_len):
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]      # (B, L)
'''

PADDING_OFF_BY_ONE = '''
def padding_mask(lengths, max_len):
    return (torch.arange(max_len, device=lengths.device) <= lengths[:, None])[:, None, :]
'''

CAUSAL_NO_DIAGONAL = '''
def causal_mask(n, device=None):
    i = torch.arange(n, device=device)
    return i[None, :] < i[:, None]
'''

ATTENTION_NO_MASK_ARG = '''
def scaled_dot_product_attention(q, k, v, mask):                      # mask is required
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    visible = mask.any(-1, keepdim=True)
    logits = logits.masked_fill(~mask, float("-inf")).masked_fill(~visible, 0.0)
    w = torch.softmax(logits, -1).masked_fill(~visible, 0.0)
    return w @ v, w
'''

# F.scaled_dot_product_attention hidden in a helper that the answer calls by a plain name.
SDPA_HELPER = """
def _attend(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
"""

ATTENTION_CALLS_HELPER = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is None:
        return _attend(q, k, v, None), torch.softmax(logits, -1)
    m = mask.expand(logits.shape)
    sees = m.any(-1, keepdim=True)
    w = torch.softmax(logits.masked_fill(~m, float("-inf")).masked_fill(~sees, 0.0), -1).masked_fill(~sees, 0.0)
    return _attend(q, k, v, torch.where(sees, m, True)).masked_fill(~sees, 0.0), w
'''


def edit_demo(old: str, new: str):
    """Edit the (ungraded) demo code cell that contains ``old``."""
    def edit(nb):
        nb = copy.deepcopy(nb)
        for cell in nb.cells:
            if cell.cell_type == "code" and old in cell.source:
                cell.source = cell.source.replace(old, new)
                return nb
        raise KeyError(old)
    return edit


CASES = [
    # ---------------------------------------------------------------- honest: full marks
    Case("honest_full_narrative", FULL, answers(
        causal_mask_answer=CAUSAL_NOT_TRIU, padding_mask_answer=PADDING_LOOP,
        masked_attention_answer=ATTENTION_EINSUM)),
    Case("honest_arange_where", FULL, fast(ok())),
    Case("honest_float_tril_nan_to_num", FULL, fast(ok(
        causal_mask_answer=CAUSAL_FLOAT_TRIL_BOOL, padding_mask_answer=PADDING_EXPAND_UNSQUEEZE,
        masked_attention_answer=ATTENTION_NAN_TO_NUM))),
    Case("honest_loops", FULL, fast(ok(
        causal_mask_answer=CAUSAL_LOOP, padding_mask_answer=PADDING_LOOP,
        masked_attention_answer=ATTENTION_LOOP))),
    Case("honest_manual_masked_softmax", FULL, fast(ok(masked_attention_answer=ATTENTION_MANUAL_SOFTMAX))),
    Case("honest_large_negative_empty_rows_zeroed", FULL, fast(ok(
        causal_mask_answer=CAUSAL_NOT_TRIU, masked_attention_answer=ATTENTION_LARGE_NEGATIVE_ZEROED))),
    Case("honest_where_then_isnan", FULL, fast(ok(causal_mask_answer=CAUSAL_FLOAT_TRIL_BOOL,
                                                  masked_attention_answer=ATTENTION_WHERE_ISNAN))),

    # ---------------------------------------------------------------- nothing done
    Case("untouched_release", ZERO, lambda nb: nb),

    # ---------------------------------------------------------------- the classic mistakes
    Case("mask_applied_after_softmax", score(1, 1, 0), fast(ok(masked_attention_answer=ATTENTION_ZERO_AFTER_SOFTMAX))),
    Case("mask_after_softmax_renormalised", score(1, 1, 0),
         fast(ok(masked_attention_answer=ATTENTION_ZERO_AFTER_RENORMALISE))),
    Case("inverted_masks", score(0, 1, 0), fast(ok(causal_mask_answer=CAUSAL_INVERTED,
                                                    masked_attention_answer=ATTENTION_INVERTED))),
    Case("fill_minus_1e9", score(1, 1, 0), fast(ok(masked_attention_answer=ATTENTION_MINUS_1E9))),
    Case("nan_in_fully_masked_rows", score(1, 1, 0), fast(ok(masked_attention_answer=ATTENTION_NAN_ROWS))),
    Case("no_scaling", score(1, 1, 0), fast(ok(masked_attention_answer=ATTENTION_UNSCALED))),
    Case("mask_argument_required", score(1, 1, 0), fast(ok(masked_attention_answer=ATTENTION_NO_MASK_ARG))),
    Case("masks_of_wrong_dtype", score(0, 0, 4), fast(ok(causal_mask_answer=CAUSAL_INT,
                                                          padding_mask_answer=PADDING_FLOAT))),
    Case("padding_without_query_axis_causal_without_diagonal", score(0, 0, 4), fast(ok(
        causal_mask_answer=CAUSAL_NO_DIAGONAL, padding_mask_answer=PADDING_NO_QUERY_AXIS))),
    Case("padding_off_by_one", score(1, 0, 4), fast(ok(padding_mask_answer=PADDING_OFF_BY_ONE))),
    Case("additive_minus_inf_then_nan_to_num", score(1, 1, 0),
         fast(ok(masked_attention_answer=ATTENTION_ADDITIVE_NAN_TO_NUM))),
    Case("blocked_logits_filled_with_zero", score(1, 1, 0), fast(ok(masked_attention_answer=ATTENTION_FILL_ZERO))),
    Case("causal_shifted_by_one", score(0, 1, 4), fast(ok(causal_mask_answer=CAUSAL_SHIFTED))),
    # Both fail on a CPU-only grader too (the device parameter unused; a mask asked for on the
    # meta device that comes back on the CPU), not only where CUDA is present.
    Case("causal_ignores_device", score(0, 1, 4), fast(ok(causal_mask_answer=CAUSAL_IGNORES_DEVICE))),
    Case("causal_device_read_but_not_used", score(0, 1, 4),
         fast(ok(causal_mask_answer=CAUSAL_DEVICE_READ_NOT_USED))),

    # ---------------------------------------------------------------- forbidden shortcuts
    Case("torch_sdpa_in_masked_attention", score(1, 1, 0), fast(ok(masked_attention_answer=ATTENTION_TORCH_SDPA))),
    Case("torch_sdpa_imported_under_another_name", score(1, 1, 0),
         fast(ok(masked_attention_answer=ATTENTION_SDPA_IMPORTED_AS))),
    Case("torch_sdpa_in_helper_cell", score(1, 1, 0), fast(
        ok(masked_attention_answer=ATTENTION_CALLS_HELPER), insert(SDPA_HELPER, after="padding_mask_tests"))),
]

# Regressions: submissions an earlier grader scored wrongly (each note says how). The
# forbidden-shortcut scan now reads the code the tested objects actually use (grade.used_code),
# and exceptions cross the sandbox with their class hierarchy.
REGRESSIONS = [
    Case("honest_edits_demo_cell", FULL, then(ok(), edit_demo(
        "def train(attend, steps=300, seed=0):", "def train(attend, steps=100, seed=0):")),
         note="used to get 0 for masked attention: an edited demo cell joins every exercise's scanned "
              "source, and this one (pytorch_unmasked/pytorch_causal) uses F.scaled_dot_product_attention"),
    Case("honest_adds_comparison_cell", FULL, fast(ok(), insert('''
q, k, v = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
m = causal_mask(5)
mine, _ = scaled_dot_product_attention(q, k, v, m)
print((mine - F.scaled_dot_product_attention(q, k, v, attn_mask=m)).abs().max())
''', after="masked_attention_tests")),
         note="used to get 0 for masked attention: the student's own comparison with PyTorch, in a cell "
              "of its own, counts as using the shortcut"),
    Case("torch_sdpa_helper_in_causal_mask_cell", score(1, 1, 0), fast(ok(
        causal_mask_answer=CAUSAL_ARANGE + "\n" + SDPA_HELPER, masked_attention_answer=ATTENTION_CALLS_HELPER)),
         note="used to get full marks: another exercise's answer cell is not scanned for the shortcut"),
]

CASES += REGRESSIONS

tiers(CASES, full={"honest_full_narrative", "untouched_release", "torch_sdpa_in_helper_cell"})
