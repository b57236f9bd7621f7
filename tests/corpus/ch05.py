"""Chapter 5 corpus: the encoder. Honest submissions written differently from the reference
(torch.var_mean and rsqrt, an nn.Sequential feed-forward network, functional dropout, a residual
helper method, deep-copied layers, an nn.Sequential stack, an attention that attends by itself)
must get full marks; the classic mistakes get exactly the points their working exercises deserve
(a layer or a stack built on a failing exercise fails too, and its message names the culprit);
hostile modules (a stack that changes itself between calls, parameters that lie about what runs,
a feed-forward network that never returns) lose only what they break.

Every submission pastes a chapter-3 multi-head attention of its own into the ungraded cell
``mha_from_ch03`` (the reference's ``reference("ch03_multihead")`` does not exist in the student's
sandbox), built from chapter 3's corpus.
"""
from __future__ import annotations

from .ch03 import MHA_EINSUM, MHA_PLAIN, PASTE_MASK_AFTER_SOFTMAX, PASTE_MASKED_FILL, SPLIT_VIEW_PERMUTE, swap
from .common import Case, answers, fast, reference_answers, tiers

EXERCISES = ("layer_norm_tests", "feed_forward_tests", "encoder_layer_tests", "encoder_tests")
FULL = dict(zip(EXERCISES, (3.0, 2.0, 4.0, 3.0)))
ZERO = {k: 0.0 for k in FULL}


def without(*zeroed: str) -> dict:
    """Full marks except the named test cells (layer_norm, feed_forward, encoder_layer, encoder)."""
    return {k: 0.0 if k[:-len("_tests")] in zeroed else v for k, v in FULL.items()}


# ---- the chapter-3 paste ------------------------------------------------------------------------

PASTE = PASTE_MASKED_FILL + "\n" + SPLIT_VIEW_PERMUTE + "\n" + MHA_PLAIN
PASTE_BUGGY = PASTE_MASK_AFTER_SOFTMAX + "\n" + SPLIT_VIEW_PERMUTE + "\n" + MHA_PLAIN

# ---- exercise 1, written differently ------------------------------------------------------------

LN_VAR_MEAN = '''
class LayerNorm(nn.Module):
    def __init__(self, d_model, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x):
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
'''

LN_VAR_UNBIASED_FALSE = '''
class LayerNorm(nn.Module):
    """gamma and beta under the exercise's names; eps as a buffer."""
    def __init__(self, d_model, eps=1e-5):
        super().__init__()
        self.register_parameter("weight", nn.Parameter(torch.ones(d_model)))
        self.register_parameter("bias", nn.Parameter(torch.zeros(d_model)))
        self.register_buffer("eps", torch.tensor(float(eps)))

    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        scale = (x.var(-1, keepdim=True, unbiased=False) + self.eps).sqrt()
        return torch.addcmul(self.bias, centred / scale, self.weight)
'''

LN_EPS_OUTSIDE = swap(LN_VAR_UNBIASED_FALSE, "scale = (x.var(-1, keepdim=True, unbiased=False) + self.eps).sqrt()",
                      "scale = x.var(-1, keepdim=True, unbiased=False).sqrt() + self.eps")
LN_UNBIASED = swap(LN_VAR_MEAN, "correction=0", "correction=1")
LN_OVER_POSITIONS = swap(LN_VAR_MEAN, "torch.var_mean(x, dim=-1,", "torch.var_mean(x, dim=-2,")
LN_TORCH = swap(LN_VAR_MEAN, '''        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias''',
                '''        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)''')

# ---- exercise 2 ---------------------------------------------------------------------------------

FF_SEQUENTIAL = '''
class FeedForward(nn.Module):
    def __init__(self, d_model, d_ff, dropout=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))

    def forward(self, x):
        return self.net(x)
'''

FF_FUNCTIONAL = '''
class FeedForward(nn.Module):
    def __init__(self, d_model, d_ff, dropout=0.1):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.p = dropout

    def forward(self, x):
        hidden = F.dropout(self.w_1(x).clamp(min=0), p=self.p, training=self.training)
        return self.w_2(hidden)
'''

FF_NO_RELU = swap(FF_SEQUENTIAL, "nn.ReLU(), ", "")
FF_DROPOUT_IN_EVAL = swap(FF_FUNCTIONAL, "p=self.p, training=self.training", "p=self.p")

# An endless (sleeping) loop once the batch is large (the check's dropout-average probe uses 2048 rows).
FF_LOOPS_FOREVER = swap(FF_SEQUENTIAL, "        return self.net(x)", '''        while x.shape[0] > 1000:
            import time
            time.sleep(0.05)
        return self.net(x)''')

# ---- exercise 3 ---------------------------------------------------------------------------------

LAYER_HELPER = '''
class EncoderLayer(nn.Module):
    """One residual helper for both sub-layers and both placements."""
    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.pre = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.norm1, self.norm2 = LayerNorm(d_model), LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def _residual(self, x, sublayer, norm):
        if self.pre:
            return x + self.drop(sublayer(norm(x)))
        return norm(x + self.drop(sublayer(x)))

    def forward(self, x, mask=None):
        x = self._residual(x, lambda t: self.self_attn(t, t, t, mask=mask)[0], self.norm1)
        return self._residual(x, self.ff, self.norm2)
'''

LAYER_BRANCHES = '''
class EncoderLayer(nn.Module):
    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.norm1 = LayerNorm(d_model)
        self.norm2 = LayerNorm(d_model)
        self.attn_drop = nn.Dropout(dropout)
        self.ff_drop = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        if not self.norm_first:
            attended, _ = self.self_attn(x, x, x, mask)
            y = self.norm1(x + self.attn_drop(attended))
            return self.norm2(y + self.ff_drop(self.ff(y)))
        n = self.norm1(x)
        attended, _ = self.self_attn(n, n, n, mask)
        y = x + self.attn_drop(attended)
        return y + self.ff_drop(self.ff(self.norm2(y)))
'''

LAYER_NORM_BEFORE_SUM = swap(LAYER_BRANCHES, '''            y = self.norm1(x + self.attn_drop(attended))
            return self.norm2(y + self.ff_drop(self.ff(y)))''', '''            y = x + self.norm1(self.attn_drop(attended))
            return y + self.norm2(self.ff_drop(self.ff(y)))''')
LAYER_RESIDUAL_FROM_NORMALISED = swap(LAYER_BRANCHES, "        y = x + self.attn_drop(attended)",
                                      "        y = n + self.attn_drop(attended)")
LAYER_MASK_IGNORED = swap(LAYER_BRANCHES, "attended, _ = self.self_attn(x, x, x, mask)",
                          "attended, _ = self.self_attn(x, x, x)")
LAYER_TORCH_NORM = swap(LAYER_BRANCHES, '''        self.norm1 = LayerNorm(d_model)
        self.norm2 = LayerNorm(d_model)''', '''        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)''')

# ---- exercise 4 ---------------------------------------------------------------------------------

ENCODER_DEEPCOPY = '''
import copy


class Encoder(nn.Module):
    """The annotated implementation's clones: deep copies of one layer (separate parameters)."""
    def __init__(self, num_layers, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        layer = EncoderLayer(d_model, num_heads, d_ff, dropout, norm_first=norm_first)
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        if norm_first:
            self.norm = LayerNorm(d_model)
        self.has_norm = norm_first

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask=mask)
        return self.norm(x) if self.has_norm else x
'''

ENCODER_SEQUENTIAL = '''
class Encoder(nn.Module):
    def __init__(self, num_layers, d_model, num_heads, d_ff, dropout=0.1, norm_first=False):
        super().__init__()
        self.layers = nn.Sequential(*[EncoderLayer(d_model, num_heads, d_ff, dropout, norm_first)
                                      for _ in range(num_layers)])
        self.norm = LayerNorm(d_model) if norm_first else nn.Identity()

    def forward(self, x, mask=None):
        out = x
        for i in range(len(self.layers)):
            out = self.layers[i](out, mask)
        return self.norm(out)
'''

ENCODER_SHARED = swap(ENCODER_DEEPCOPY, "nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])",
                      "nn.ModuleList([layer] * num_layers)")
ENCODER_MASK_FIRST_ONLY = swap(ENCODER_SEQUENTIAL, "            out = self.layers[i](out, mask)",
                               "            out = self.layers[i](out, mask if i == 0 else None)")
ENCODER_NO_FINAL_NORM = swap(ENCODER_SEQUENTIAL, "LayerNorm(d_model) if norm_first else nn.Identity()",
                             "nn.Identity()")

# ---- hostile ------------------------------------------------------------------------------------

# Right on its first call; every call halves the last layer's output gain, so the next call computes
# another function.
ENCODER_CHANGES_ITSELF = swap(ENCODER_DEEPCOPY, '''        for layer in self.layers:
            x = layer(x, mask=mask)''', '''        for layer in self.layers:
            x = layer(x, mask=mask)
        with torch.no_grad():
            self.layers[-1].norm2.weight.mul_(0.5)''')

# Registers num_layers separate layers (the parameters look right) and runs the first one every time.
ENCODER_PARAMETERS_LIE = swap(ENCODER_DEEPCOPY, '''        for layer in self.layers:
            x = layer(x, mask=mask)''', '''        for _ in self.layers:
            x = self.layers[0](x, mask=mask)''')

OK = dict(mha_from_ch03=PASTE, layer_norm_answer=LN_VAR_MEAN, feed_forward_answer=FF_SEQUENTIAL,
          encoder_layer_answer=LAYER_HELPER, encoder_answer=ENCODER_DEEPCOPY)


def ok(**overrides):
    return answers(**{**OK, **overrides})


def reference_with_paste(nb):
    return answers(**{**reference_answers("ch05_encoder"), "mha_from_ch03": PASTE})(nb)


NOT_PASTED = "# Paste your MultiHeadAttention from chapter 3 here, with everything it calls.\n# YOUR CODE HERE\n" \
             "raise NotImplementedError()\n"

CASES = [
    # ---------------------------------------------------------------- honest: full marks
    Case("reference_full_narrative", FULL, reference_with_paste,
         note="the source notebook's own answers, the narrative kept (figures, demos, the training cell)"),
    Case("honest_var_mean_sequential_helper_deepcopy", FULL, fast(ok())),
    Case("honest_unbiased_false_functional_branches_sequential_stack", FULL, fast(ok(
        layer_norm_answer=LN_VAR_UNBIASED_FALSE, feed_forward_answer=FF_FUNCTIONAL,
        encoder_layer_answer=LAYER_BRANCHES, encoder_answer=ENCODER_SEQUENTIAL))),
    Case("honest_own_attention_paste", FULL, fast(ok(mha_from_ch03=MHA_EINSUM))),

    # ---------------------------------------------------------------- nothing done / the paste
    Case("untouched_release", ZERO, lambda nb: nb),
    Case("mha_not_pasted", without("encoder_layer", "encoder"), fast(ok(mha_from_ch03=NOT_PASTED))),
    Case("pasted_attention_masks_after_softmax", without("encoder_layer", "encoder"),
         fast(ok(mha_from_ch03=PASTE_BUGGY))),

    # ---------------------------------------------------------------- exercise 1 (the layers use it)
    # ε outside the root moves the layers' outputs by about 5e-6 relative: inside float32's tolerance,
    # far outside float64's, so the layer and the stack fail too (their messages blame LayerNorm).
    Case("ln_eps_outside_sqrt", without("layer_norm", "encoder_layer", "encoder"),
         fast(ok(layer_norm_answer=LN_EPS_OUTSIDE))),
    Case("ln_unbiased_variance", without("layer_norm", "encoder_layer", "encoder"),
         fast(ok(layer_norm_answer=LN_UNBIASED))),
    Case("ln_over_positions", without("layer_norm", "encoder_layer", "encoder"),
         fast(ok(layer_norm_answer=LN_OVER_POSITIONS))),
    Case("ln_uses_f_layer_norm", without("layer_norm", "encoder_layer", "encoder"),
         fast(ok(layer_norm_answer=LN_TORCH))),

    # ---------------------------------------------------------------- exercise 2
    Case("ff_no_relu", without("feed_forward", "encoder_layer", "encoder"), fast(ok(feed_forward_answer=FF_NO_RELU))),
    Case("ff_dropout_in_eval", without("feed_forward", "encoder_layer", "encoder"),
         fast(ok(feed_forward_answer=FF_DROPOUT_IN_EVAL))),

    # ---------------------------------------------------------------- exercise 3
    Case("layer_norm_before_residual_sum", without("encoder_layer", "encoder"),
         fast(ok(encoder_layer_answer=LAYER_NORM_BEFORE_SUM))),
    Case("layer_residual_from_normalised", without("encoder_layer", "encoder"),
         fast(ok(encoder_layer_answer=LAYER_RESIDUAL_FROM_NORMALISED))),
    Case("layer_mask_ignored", without("encoder_layer", "encoder"), fast(ok(encoder_layer_answer=LAYER_MASK_IGNORED))),
    Case("layer_uses_nn_layer_norm", without("encoder_layer", "encoder"),
         fast(ok(encoder_layer_answer=LAYER_TORCH_NORM))),

    # ---------------------------------------------------------------- exercise 4
    Case("encoder_one_layer_repeated", without("encoder"), fast(ok(encoder_answer=ENCODER_SHARED))),
    Case("encoder_mask_first_layer_only", without("encoder"), fast(ok(encoder_answer=ENCODER_MASK_FIRST_ONLY))),
    Case("encoder_no_final_norm", without("encoder"), fast(ok(encoder_answer=ENCODER_NO_FINAL_NORM))),

    # ---------------------------------------------------------------- hostile
    Case("hostile_encoder_changes_itself_between_calls", without("encoder"),
         fast(ok(encoder_answer=ENCODER_CHANGES_ITSELF))),
    Case("hostile_encoder_parameters_lie", without("encoder"), fast(ok(encoder_answer=ENCODER_PARAMETERS_LIE))),
    Case("hostile_ff_never_returns", without("feed_forward"), fast(ok(feed_forward_answer=FF_LOOPS_FOREVER))),
]

# A huge buffer is chapter 4's attack (tests/corpus/ch04.py); a module changing itself, this one's.
tiers(CASES, hostile={"hostile_encoder_changes_itself_between_calls", "hostile_encoder_parameters_lie",
                      "hostile_ff_never_returns"},
      full={"reference_full_narrative", "untouched_release"})
