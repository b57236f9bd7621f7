"""Chapter 3 corpus: splitting/merging heads and multi-head attention. Honest submissions written
differently from the reference must get full marks; the classic mistakes and the forbidden
shortcuts must get exactly the points their working exercises deserve.

Every submission pastes a masked attention of its own into the ungraded cell
``attention_from_ch02``: the reference's ``reference("ch02_masking")`` does not exist in the
student's sandbox (no solutions/ there).
"""
from __future__ import annotations

from .common import Case, answers, fast, insert, tiers

FULL = {"split_merge_tests": 2.0, "mha_tests": 4.0}
ZERO = {k: 0.0 for k in FULL}


def score(split_merge=0.0, mha=0.0):
    return {"split_merge_tests": split_merge, "mha_tests": mha}


# ---- chapter 2's masked attention, pasted (several honest versions) ---------------------------

PASTE_MASKED_FILL = '''
# my chapter-2 attention
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        sees = mask.any(dim=-1, keepdim=True)
        logits = logits.masked_fill(~mask, float("-inf")).masked_fill(~sees, 0.0)
        w = torch.softmax(logits, dim=-1).masked_fill(~sees, 0.0)
    else:
        w = torch.softmax(logits, dim=-1)
    return w @ v, w
'''

PASTE_WITH_SOFTMAX_HELPER = '''
def softmax(x, dim=-1):                      # chapter 1
    e = torch.exp(x - x.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def scaled_dot_product_attention(q, k, v, mask=None):
    logits = torch.einsum("...qd,...kd->...qk", q, k) / math.sqrt(q.shape[-1])
    if mask is None:
        w = softmax(logits)
    else:
        mask = mask.expand(logits.shape)
        any_key = mask.any(-1, keepdim=True)
        logits = torch.where(mask & any_key, logits, torch.where(any_key, float("-inf"), 0.0))
        w = torch.where(any_key, softmax(logits), 0.0)
    return torch.einsum("...qk,...kd->...qd", w, v), w
'''

PASTE_NAN_TO_NUM = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q.matmul(k.transpose(-1, -2)) / q.size(-1) ** 0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    w = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return w.matmul(v), w
'''

PASTE_KEPT_REFERENCE = '''
# Paste your scaled_dot_product_attention(q, k, v, mask=None) from chapter 2 here.
from autograder.reference import reference
scaled_dot_product_attention = reference("ch02_masking").scaled_dot_product_attention
'''

# ---- split / merge written differently from the reference --------------------------------------

SPLIT_VIEW_PERMUTE = '''
def split_heads(x, num_heads):
    b, l, d = x.shape
    return x.view(b, l, num_heads, d // num_heads).permute(0, 2, 1, 3)


def merge_heads(x):
    b, h, l, d_k = x.shape
    return x.permute(0, 2, 1, 3).contiguous().view(b, l, h * d_k)
'''

SPLIT_UNFLATTEN = '''
def split_heads(x, num_heads):
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x):
    return x.transpose(1, 2).flatten(start_dim=2)
'''

SPLIT_CHUNK_STACK = '''
def split_heads(x, num_heads):
    return torch.stack(x.chunk(num_heads, dim=-1), dim=1)       # head i = i-th chunk of features


def merge_heads(x):
    return torch.cat(x.unbind(dim=1), dim=-1)
'''

SPLIT_MOVEDIM = '''
def split_heads(x, num_heads):
    batch, length, _ = x.shape
    return x.reshape(batch, length, num_heads, -1).movedim(2, 1)


def merge_heads(x):
    batch, _, length, _ = x.shape
    return x.movedim(1, 2).reshape(batch, length, -1)
'''

# ---- multi-head attention -------------------------------------------------------------------------

MHA_PLAIN = '''
class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"{d_model} is not divisible by {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, query, key, value, mask=None):
        h = self.num_heads
        q, k, v = (split_heads(proj(x), h) for proj, x in
                   ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        if mask is not None and mask.ndim == 3:
            mask = mask[:, None]
        out, w = scaled_dot_product_attention(q, k, v, mask=mask)
        return self.out_proj(merge_heads(out)), w
'''

# Parameters created in a loop with setattr, the width check written differently.
MHA_SETATTR = '''
class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        d_k, rest = divmod(d_model, num_heads)
        if rest != 0:
            raise ValueError("d_model must be a multiple of num_heads")
        self.h, self.d_k = num_heads, d_k
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            self.add_module(name, nn.Linear(d_model, d_model, bias=True))

    def forward(self, query, key, value, mask=None):
        q = split_heads(self.q_proj(query), self.h)
        k = split_heads(self.k_proj(key), self.h)
        v = split_heads(self.v_proj(value), self.h)
        if mask is not None:
            while mask.dim() < 4:                  # (L_q, L_k) / (B, L_q, L_k) -> 4-d, head axis 1
                mask = mask.unsqueeze(-3)
        out, weights = scaled_dot_product_attention(q, k, v, mask)
        return self.out_proj(merge_heads(out)), weights
'''

# Heads via einsum on (B, L, H, d_k) views; its own masked softmax; no split/merge calls.
MHA_EINSUM = '''
class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError("num_heads must divide d_model")
        self.num_heads, self.d_k = num_heads, d_model // num_heads
        self.q_proj, self.k_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.v_proj, self.out_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)

    def forward(self, query, key, value, mask=None):
        B, Lq, D = query.shape
        Lk = key.shape[1]
        q = self.q_proj(query).view(B, Lq, self.num_heads, self.d_k)
        k = self.k_proj(key).view(B, Lk, self.num_heads, self.d_k)
        v = self.v_proj(value).view(B, Lk, self.num_heads, self.d_k)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d_k)
        if mask is not None:
            if mask.dim() == 3:
                mask = mask.unsqueeze(1)
            mask = mask.expand_as(logits)
            keep = mask.any(-1, keepdim=True)
            logits = logits.masked_fill(~mask, float("-inf")).masked_fill(~keep, 0.0)
            w = logits.softmax(-1).masked_fill(~keep, 0.0)
        else:
            w = logits.softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(B, Lq, D)
        return self.out_proj(out), w
'''

# A loop over heads, each calling the pasted single-head attention on a slice of the features.
MHA_LOOP = '''
class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        if d_model % num_heads:
            raise ValueError("d_model % num_heads != 0")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, query, key, value, mask=None):
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        d_k = q.shape[-1] // self.num_heads
        outs, weights = [], []
        for i in range(self.num_heads):
            cols = slice(i * d_k, (i + 1) * d_k)
            m = mask
            if mask is not None and mask.dim() == 4:
                m = mask[:, i] if mask.shape[1] > 1 else mask[:, 0]
            o, w = scaled_dot_product_attention(q[..., cols], k[..., cols], v[..., cols], m)
            outs.append(o)
            weights.append(w)
        return self.out_proj(torch.cat(outs, dim=-1)), torch.stack(weights, dim=1)
'''

# Projections built by a helper method (a generator expression), applied with F.linear in forward.
MHA_FUNCTIONAL_LINEAR = '''
class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        if num_heads <= 0 or d_model % num_heads != 0:
            raise ValueError(f"cannot split d_model={d_model} into {num_heads} equal heads")
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (self._linear(d_model) for _ in range(4))

    @staticmethod
    def _linear(d):
        return nn.Linear(d, d)

    def forward(self, query, key, value, mask=None):
        def project(layer, x):
            return F.linear(x, layer.weight, layer.bias)
        q = split_heads(project(self.q_proj, query), self.num_heads)
        k = split_heads(project(self.k_proj, key), self.num_heads)
        v = split_heads(project(self.v_proj, value), self.num_heads)
        if mask is not None and mask.dim() == 3:
            mask = mask.reshape(mask.shape[0], 1, *mask.shape[1:])
        out, w = scaled_dot_product_attention(q, k, v, mask)
        return project(self.out_proj, merge_heads(out)), w
'''

OK = dict(attention_from_ch02=PASTE_MASKED_FILL, split_merge_answer=SPLIT_VIEW_PERMUTE,
          mha_answer=MHA_PLAIN)


def ok(**overrides):
    return answers(**{**OK, **overrides})



# ---- mistakes -----------------------------------------------------------------------------------

def swap(src: str, old: str, new: str) -> str:
    """``src`` with ``old`` replaced (which must be there: a silent no-op would hide a typo)."""
    assert old in src, old
    return src.replace(old, new)


SPLIT_NO_TRANSPOSE = '''
def split_heads(x, num_heads):
    b, l, d = x.shape
    return x.reshape(b, num_heads, l, d // num_heads)          # no transpose: mixes positions


def merge_heads(x):
    b, h, l, d_k = x.shape
    return x.reshape(b, l, h * d_k)
'''

MHA_OWN_SPLIT = '''
class MultiHeadAttention(nn.Module):
    """Does not use split_heads/merge_heads: its own (right) reshapes."""
    def __init__(self, d_model, num_heads):
        super().__init__()
        if d_model % num_heads:
            raise ValueError("d_model must be divisible by num_heads")
        self.h = num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, query, key, value, mask=None):
        def heads(x):
            return x.reshape(x.shape[0], x.shape[1], self.h, -1).transpose(1, 2)
        out, w = scaled_dot_product_attention(heads(self.q_proj(query)), heads(self.k_proj(key)),
                                              heads(self.v_proj(value)),
                                              mask if mask is None or mask.dim() != 3 else mask[:, None])
        out = out.transpose(1, 2).reshape(query.shape)
        return self.out_proj(out), w
'''

MHA_TORCH_INSIDE = '''
class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        if d_model % num_heads:
            raise ValueError("d_model must be divisible by num_heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, query, key, value, mask=None):
        d = query.shape[-1]
        mha = nn.MultiheadAttention(d, self.num_heads, batch_first=True).to(query.device, query.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
            mha.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
        mha.out_proj = self.out_proj
        attn_mask = None
        if mask is not None:
            m = mask if mask.dim() != 3 else mask[:, None]
            if m.dim() == 4:
                m = m.expand(query.shape[0], self.num_heads, query.shape[1], key.shape[1])
                m = m.reshape(-1, query.shape[1], key.shape[1])
            attn_mask = ~m
        return mha(query, key, value, attn_mask=attn_mask, average_attn_weights=False)
'''

MHA_FUNCTIONAL_TORCH = '''
class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        if d_model % num_heads:
            raise ValueError("d_model must be divisible by num_heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, query, key, value, mask=None):
        q = split_heads(self.q_proj(query), self.num_heads)
        k = split_heads(self.k_proj(key), self.num_heads)
        v = split_heads(self.v_proj(value), self.num_heads)
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(1)
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(merge_heads(out)), w
'''

_VALUE_ERROR = ('        if d_model % num_heads:\n'
                '            raise ValueError(f"{d_model} is not divisible by {num_heads}")\n')
_CALL = "out, w = scaled_dot_product_attention(q, k, v, mask=mask)"
_RETURN = "return self.out_proj(merge_heads(out)), w"

MHA_AVERAGED_WEIGHTS = swap(MHA_PLAIN, _RETURN, "return self.out_proj(merge_heads(out)), w.mean(dim=1)")
MHA_NO_VALUE_ERROR = swap(MHA_PLAIN, _VALUE_ERROR, "")
MHA_ASSERT = swap(MHA_PLAIN, _VALUE_ERROR,
                  '        assert d_model % num_heads == 0, "d_model must be divisible by num_heads"\n')
MHA_INVERTED_MASK = swap(MHA_PLAIN, _CALL,
                         "out, w = scaled_dot_product_attention(q, k, v, mask=None if mask is None else ~mask)")
MHA_3D_MASK_NO_HEAD_AXIS = swap(MHA_PLAIN, "        if mask is not None and mask.ndim == 3:\n"
                                           "            mask = mask[:, None]\n", "")
MHA_IGNORES_MASK = swap(MHA_PLAIN, _CALL, "out, w = scaled_dot_product_attention(q, k, v)")
MHA_NO_OUT_PROJ = swap(MHA_PLAIN, _RETURN, "return merge_heads(out), w")
# One fused nn.Linear(d_model, 3 * d_model) for q, k and v: right results, wrong parameter names.
MHA_FUSED_QKV = swap(swap(
    MHA_PLAIN,
    "        self.q_proj = nn.Linear(d_model, d_model)\n        self.k_proj = nn.Linear(d_model, d_model)\n"
    "        self.v_proj = nn.Linear(d_model, d_model)\n",
    "        self.qkv = nn.Linear(d_model, 3 * d_model)\n"),
    "        q, k, v = (split_heads(proj(x), h) for proj, x in\n"
    "                   ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))\n",
    "        d = query.shape[-1]\n"
    "        W, b = self.qkv.weight, self.qkv.bias\n"
    "        q = split_heads(F.linear(query, W[:d], b[:d]), h)\n"
    "        k = split_heads(F.linear(key, W[d:2 * d], b[d:2 * d]), h)\n"
    "        v = split_heads(F.linear(value, W[2 * d:], b[2 * d:]), h)\n")

# The pasted attention is PyTorch's fused kernel, wrapped to follow the course's rules (zero rows
# for queries that may attend to nothing); MultiHeadAttention calls it by its plain name.
PASTE_TORCH_SDPA = '''
import torch.nn.functional as F

def scaled_dot_product_attention(q, k, v, mask=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v), torch.softmax(logits, -1)
    m = mask.expand(logits.shape)
    sees = m.any(-1, keepdim=True)
    w = torch.softmax(logits.masked_fill(~m, float("-inf")).masked_fill(~sees, 0.0), -1).masked_fill(~sees, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(sees, m, True))
    return out.masked_fill(~sees, 0.0), w
'''

PASTE_MASK_AFTER_SOFTMAX = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    if mask is not None:
        w = w * mask                       # chapter 2's classic mistake, pasted along
    return w @ v, w
'''

# A ValueError of the student's own (a subclass): it is a ValueError, and the student's kernel
# says so.
MHA_VALUE_ERROR_SUBCLASS = "class HeadWidthError(ValueError):\n    pass\n\n" + swap(
    MHA_PLAIN, _VALUE_ERROR,
    '        if d_model % num_heads:\n            raise HeadWidthError(f"{d_model} is not divisible by {num_heads}")\n')


CASES = [
    # ---------------------------------------------------------------- honest: full marks
    Case("honest_full_narrative", FULL, answers(
        attention_from_ch02=PASTE_WITH_SOFTMAX_HELPER, split_merge_answer=SPLIT_UNFLATTEN,
        mha_answer=MHA_SETATTR)),
    Case("honest_view_permute", FULL, fast(ok())),
    Case("honest_chunk_stack_einsum_heads", FULL, fast(ok(
        attention_from_ch02=PASTE_NAN_TO_NUM, split_merge_answer=SPLIT_CHUNK_STACK, mha_answer=MHA_EINSUM))),
    Case("honest_movedim_loop_over_heads", FULL, fast(ok(
        split_merge_answer=SPLIT_MOVEDIM, mha_answer=MHA_LOOP))),
    Case("honest_unflatten_functional_linear", FULL, fast(ok(
        attention_from_ch02=PASTE_WITH_SOFTMAX_HELPER, split_merge_answer=SPLIT_UNFLATTEN,
        mha_answer=MHA_FUNCTIONAL_LINEAR))),
    Case("honest_setattr_params", FULL, fast(ok(mha_answer=MHA_SETATTR))),

    # ---------------------------------------------------------------- nothing done / paste missing
    Case("untouched_release", ZERO, lambda nb: nb),
    Case("attention_not_pasted", score(2, 0), fast(ok(), answers(
        attention_from_ch02="# Paste your scaled_dot_product_attention(q, k, v, mask=None) from chapter 2 here.\n"
                            "# YOUR CODE HERE\nraise NotImplementedError()\n"))),
    Case("paste_cell_keeps_reference", score(2, 0), fast(ok(attention_from_ch02=PASTE_KEPT_REFERENCE))),

    # ---------------------------------------------------------------- the classic mistakes
    # Wrong split/merge: 0 for them, and 0 for a module that uses them (its heads mix positions).
    Case("reshape_without_transpose", ZERO, fast(ok(split_merge_answer=SPLIT_NO_TRANSPOSE))),
    # ... but a module with its own right reshapes is graded on its own merits.
    Case("reshape_without_transpose_own_mha_reshapes", score(0, 4), fast(ok(
        split_merge_answer=SPLIT_NO_TRANSPOSE, mha_answer=MHA_OWN_SPLIT))),
    Case("averaged_weights", score(2, 0), fast(ok(mha_answer=MHA_AVERAGED_WEIGHTS))),
    Case("no_value_error", score(2, 0), fast(ok(mha_answer=MHA_NO_VALUE_ERROR))),
    Case("assert_instead_of_value_error", score(2, 0), fast(ok(mha_answer=MHA_ASSERT))),
    Case("inverted_mask", score(2, 0), fast(ok(mha_answer=MHA_INVERTED_MASK))),
    Case("3d_mask_without_head_axis", score(2, 0), fast(ok(mha_answer=MHA_3D_MASK_NO_HEAD_AXIS))),
    Case("mask_ignored", score(2, 0), fast(ok(mha_answer=MHA_IGNORES_MASK))),
    Case("no_output_projection", score(2, 0), fast(ok(mha_answer=MHA_NO_OUT_PROJ))),
    Case("fused_qkv_parameter", score(2, 0), fast(ok(mha_answer=MHA_FUSED_QKV))),

    # ---------------------------------------------------------------- forbidden shortcuts
    Case("nn_multihead_attention_inside", score(2, 0), fast(ok(mha_answer=MHA_TORCH_INSIDE))),
    Case("torch_sdpa_inside_mha", score(2, 0), fast(ok(mha_answer=MHA_FUNCTIONAL_TORCH))),

    # ---------------------------------------------------------------- chapter 2 carried over
    # The module's output is wrong whoever is to blame: 0 for it, and the message now names the paste
    # (pasted_attention_fails) instead of a multi-head mistake.
    Case("pasted_attention_masks_after_softmax", score(2, 0), fast(ok(attention_from_ch02=PASTE_MASK_AFTER_SOFTMAX))),
    # A buggy paste that the module does not use (it attends by itself): graded on its own merits.
    Case("buggy_paste_unused_by_own_attention", FULL, fast(ok(
        attention_from_ch02=PASTE_MASK_AFTER_SOFTMAX, mha_answer=MHA_EINSUM))),
]

# Regressions: submissions an earlier grader scored wrongly (each note says how). The
# forbidden-shortcut scan now reads the code the tested objects actually use (grade.used_code),
# and exceptions cross the sandbox with their class hierarchy.
REGRESSIONS = [
    Case("honest_value_error_subclass", FULL, fast(ok(mha_answer=MHA_VALUE_ERROR_SUBCLASS)),
         note="used to get 0 for MHA: the exception crosses the sandbox as a type name only, and the check "
              "accepts exactly 'ValueError'; in the student's kernel the same test cell passes"),
    Case("honest_adds_nn_mha_comparison_cell", FULL, fast(ok(), insert('''
torch.manual_seed(0)
mine = MultiHeadAttention(8, 2)
theirs = nn.MultiheadAttention(8, 2, batch_first=True)
print(sum(p.numel() for p in mine.parameters()), sum(p.numel() for p in theirs.parameters()))
''', after="mha_tests")),
         note="used to get 0 for MHA: a cell of the student's own that uses nn.MultiheadAttention outside "
              "the module counts as the module using it"),
    Case("pasted_attention_is_torch_sdpa", score(2, 0), fast(ok(attention_from_ch02=PASTE_TORCH_SDPA)),
         note="used to get full marks: the paste cell is not scanned for MHA's forbidden names, so the "
              "module runs F.scaled_dot_product_attention through the pasted function"),
]

CASES += REGRESSIONS

tiers(CASES, full={"honest_full_narrative", "untouched_release", "pasted_attention_is_torch_sdpa"})
