"""Chapter 6 corpus: the decoder. Honest submissions written differently from the reference (a
list of sub-layers with one residual helper, keyword calls, deep-copied or nn.Sequential stacks,
torch.roll or a loop for the shift, a tril mask that also blanks padding queries) must get full
marks; the classic mistakes get exactly the points their working exercises deserve (a stack built
on a failing layer fails too, and its message names the culprit); a missing or buggy paste costs
the layer and the stack; hostile modules (a stack whose parameters lie about what runs, a shift
that never returns) lose only what they break.

Every submission pastes a chapter-3 multi-head attention (from chapter 3's corpus) into
``mha_from_ch03`` and chapter-5 modules (from chapter 5's corpus) into ``encoder_from_ch05``: the
reference's ``reference(...)`` does not exist in the student's sandbox.
"""
from __future__ import annotations

from .ch05 import ENCODER_DEEPCOPY, FF_SEQUENTIAL, LAYER_HELPER, LN_UNBIASED, LN_VAR_MEAN
from .ch05 import PASTE as MHA_PASTE
from .ch05 import swap
from .common import Case, answers, fast, reference_answers, tiers

EXERCISES = ("decoder_layer_tests", "decoder_tests", "decoder_inputs_tests")
FULL = dict(zip(EXERCISES, (5.0, 3.0, 2.0)))
ZERO = {k: 0.0 for k in FULL}


def without(*zeroed: str) -> dict:
    """Full marks except the named test cells (decoder_layer, decoder, decoder_inputs), which get 0."""
    return {k: 0.0 if k[:-len("_tests")] in zeroed else v for k, v in FULL.items()}


# ---- the pastes ---------------------------------------------------------------------------------

ENCODER_PASTE = "\n".join([LN_VAR_MEAN, FF_SEQUENTIAL, LAYER_HELPER, ENCODER_DEEPCOPY])
ENCODER_PASTE_BUGGY = "\n".join([LN_UNBIASED, FF_SEQUENTIAL, LAYER_HELPER, ENCODER_DEEPCOPY])
NOT_PASTED = "# Paste your LayerNorm, FeedForward, EncoderLayer and Encoder from chapter 5 here.\n# YOUR CODE HERE\n" \
             "raise NotImplementedError()\n"

# ---- exercise 1, written differently ------------------------------------------------------------

LAYER_SUBLAYERS = '''
class DecoderLayer(nn.Module):
    """The three sub-layers as a list of (function, norm) pairs, one residual rule for all."""
    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.pre = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads)
        self.cross_attn = MultiHeadAttention(d_model, num_heads)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.norm1, self.norm2, self.norm3 = LayerNorm(d_model), LayerNorm(d_model), LayerNorm(d_model)
        self.drops = nn.ModuleList([nn.Dropout(dropout) for _ in range(3)])

    def forward(self, x, memory, tgt_mask=None, memory_mask=None):
        steps = [(lambda h: self.self_attn(h, h, h, mask=tgt_mask)[0], self.norm1),
                 (lambda h: self.cross_attn(query=h, key=memory, value=memory, mask=memory_mask)[0], self.norm2),
                 (self.ff, self.norm3)]
        for (sublayer, norm), drop in zip(steps, self.drops):
            x = x + drop(sublayer(norm(x))) if self.pre else norm(x + drop(sublayer(x)))
        return x
'''

LAYER_BRANCHES = '''
class DecoderLayer(nn.Module):
    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads)
        self.cross_attn = MultiHeadAttention(d_model, num_heads)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.norm1 = LayerNorm(d_model)
        self.norm2 = LayerNorm(d_model)
        self.norm3 = LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, memory, tgt_mask=None, memory_mask=None):
        if self.norm_first:
            n = self.norm1(x)
            x = x + self.drop(self.self_attn(n, n, n, tgt_mask)[0])
            n = self.norm2(x)
            x = x + self.drop(self.cross_attn(n, memory, memory, memory_mask)[0])
            return x + self.drop(self.ff(self.norm3(x)))
        attended, _ = self.self_attn(x, x, x, tgt_mask)
        y = self.norm1(x + self.drop(attended))
        looked_up, _ = self.cross_attn(y, memory, memory, memory_mask)
        z = self.norm2(y + self.drop(looked_up))
        return self.norm3(z + self.drop(self.ff(z)))
'''

LAYER_KV_FROM_DECODER = swap(LAYER_BRANCHES, "looked_up, _ = self.cross_attn(y, memory, memory, memory_mask)",
                             "looked_up, _ = self.cross_attn(y, y, y, memory_mask)")
LAYER_CAUSAL_IN_CROSS = swap(LAYER_BRANCHES, "looked_up, _ = self.cross_attn(y, memory, memory, memory_mask)",
                             "looked_up, _ = self.cross_attn(y, memory, memory, tgt_mask)")
LAYER_NO_MEMORY_MASK = swap(LAYER_BRANCHES, "looked_up, _ = self.cross_attn(y, memory, memory, memory_mask)",
                            "looked_up, _ = self.cross_attn(y, memory, memory)")
LAYER_NO_CROSS_RESIDUAL = swap(LAYER_BRANCHES, "z = self.norm2(y + self.drop(looked_up))",
                               "z = self.norm2(self.drop(looked_up))")
LAYER_NO_CAUSAL = swap(LAYER_BRANCHES, "attended, _ = self.self_attn(x, x, x, tgt_mask)",
                       "attended, _ = self.self_attn(x, x, x)")

# ---- exercise 2 ---------------------------------------------------------------------------------

DECODER_DEEPCOPY = '''
import copy


class Decoder(nn.Module):
    """Deep copies of one layer (separate parameters), keyword calls."""
    def __init__(self, num_layers, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        layer = DecoderLayer(d_model, num_heads, d_ff, dropout, norm_first=norm_first)
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        if norm_first:
            self.norm = LayerNorm(d_model)
        self.has_norm = norm_first

    def forward(self, x, memory, tgt_mask=None, memory_mask=None):
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask)
        return self.norm(x) if self.has_norm else x
'''

DECODER_SEQUENTIAL = '''
class Decoder(nn.Module):
    def __init__(self, num_layers, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.layers = nn.Sequential(*[DecoderLayer(d_model, num_heads, d_ff, dropout, norm_first)
                                      for _ in range(num_layers)])
        self.norm = LayerNorm(d_model) if norm_first else nn.Identity()

    def forward(self, x, memory, tgt_mask=None, memory_mask=None):
        out = x
        for i in range(len(self.layers)):
            out = self.layers[i](out, memory, tgt_mask, memory_mask)
        return self.norm(out)
'''

DECODER_TGT_MASK_FIRST_ONLY = swap(DECODER_SEQUENTIAL, "out = self.layers[i](out, memory, tgt_mask, memory_mask)",
                                   "out = self.layers[i](out, memory, tgt_mask if i == 0 else None, memory_mask)")

# ---- exercise 3 ---------------------------------------------------------------------------------

INPUTS_ROLL = '''
def shift_right(tgt, start_id, pad_id):
    out = torch.roll(tgt, 1, dims=1)
    out[:, 0] = start_id
    out[tgt == pad_id] = pad_id
    return out


def target_mask(tgt_in, pad_id):
    """tril, and the padding queries' rows blanked as well (they are ignored anyway)."""
    n = tgt_in.shape[1]
    real = tgt_in != pad_id
    lower = torch.ones(n, n, dtype=torch.bool, device=tgt_in.device).tril()
    return lower & real[:, None, :] & real[:, :, None]
'''

INPUTS_DROPS_FIRST = swap(INPUTS_ROLL, "    out = torch.roll(tgt, 1, dims=1)\n    out[:, 0] = start_id",
                          "    out = tgt.clone()\n    out[:, 0] = start_id")

# ---- hostile ------------------------------------------------------------------------------------

# Registers num_layers separate layers (the parameters look right) and runs the first one every time.
DECODER_PARAMETERS_LIE = swap(DECODER_DEEPCOPY, '''        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask)''', '''        for _ in self.layers:
            x = self.layers[0](x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask)''')

# An endless (sleeping) loop for any start token but the training cell's (11): the check's second case hangs.
INPUTS_LOOP_FOREVER = swap(INPUTS_ROLL, "    out = torch.roll(tgt, 1, dims=1)", '''    while start_id != 11:
        import time
        time.sleep(0.05)
    out = torch.roll(tgt, 1, dims=1)''')

OK = dict(mha_from_ch03=MHA_PASTE, encoder_from_ch05=ENCODER_PASTE, decoder_layer_answer=LAYER_SUBLAYERS,
          decoder_answer=DECODER_DEEPCOPY, decoder_inputs_answer=INPUTS_ROLL)


def ok(**overrides):
    return answers(**{**OK, **overrides})


def reference_with_pastes(nb):
    return answers(**{**reference_answers("ch06_decoder"), "mha_from_ch03": MHA_PASTE,
                      "encoder_from_ch05": ENCODER_PASTE})(nb)


CASES = [
    # ---------------------------------------------------------------- honest: full marks
    Case("reference_full_narrative", FULL, reference_with_pastes,
         note="the source notebook's own answers, the narrative kept (figures, demos, the training cell)"),
    Case("honest_sublayer_list_deepcopy_roll", FULL, fast(ok())),
    Case("honest_branches_sequential_stack", FULL, fast(ok(decoder_layer_answer=LAYER_BRANCHES,
                                                           decoder_answer=DECODER_SEQUENTIAL))),

    # ---------------------------------------------------------------- nothing done / the pastes
    Case("untouched_release", ZERO, lambda nb: nb),
    Case("chapter5_not_pasted", without("decoder_layer", "decoder"), fast(ok(encoder_from_ch05=NOT_PASTED))),
    Case("pasted_layer_norm_unbiased", without("decoder_layer", "decoder"),
         fast(ok(encoder_from_ch05=ENCODER_PASTE_BUGGY))),

    # ---------------------------------------------------------------- exercise 1 (the stack uses it)
    Case("layer_cross_attention_reads_decoder", without("decoder_layer", "decoder"),
         fast(ok(decoder_layer_answer=LAYER_KV_FROM_DECODER))),
    Case("layer_causal_mask_in_cross_attention", without("decoder_layer", "decoder"),
         fast(ok(decoder_layer_answer=LAYER_CAUSAL_IN_CROSS))),
    Case("layer_memory_mask_not_passed", without("decoder_layer", "decoder"),
         fast(ok(decoder_layer_answer=LAYER_NO_MEMORY_MASK))),
    Case("layer_no_residual_around_cross_attention", without("decoder_layer", "decoder"),
         fast(ok(decoder_layer_answer=LAYER_NO_CROSS_RESIDUAL))),
    Case("layer_causal_mask_missing", without("decoder_layer", "decoder"),
         fast(ok(decoder_layer_answer=LAYER_NO_CAUSAL))),

    # ---------------------------------------------------------------- exercise 2
    Case("decoder_tgt_mask_first_layer_only", without("decoder"),
         fast(ok(decoder_answer=DECODER_TGT_MASK_FIRST_ONLY))),

    # ---------------------------------------------------------------- exercise 3
    Case("shift_drops_wrong_end", without("decoder_inputs"), fast(ok(decoder_inputs_answer=INPUTS_DROPS_FIRST))),

    # ---------------------------------------------------------------- hostile
    Case("hostile_decoder_parameters_lie", without("decoder"), fast(ok(decoder_answer=DECODER_PARAMETERS_LIE))),
    Case("hostile_shift_never_returns", without("decoder_inputs"),
         fast(ok(decoder_inputs_answer=INPUTS_LOOP_FOREVER))),
]

# A module changing itself between calls is chapter 5's attack, a huge buffer chapter 4's; the
# weights this chapter's checks map by role, and its own inputs, are attacked here.
tiers(CASES, hostile={"hostile_decoder_parameters_lie", "hostile_shift_never_returns"},
      full={"reference_full_narrative", "untouched_release"})
