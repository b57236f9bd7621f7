"""Checks for chapter 7: the whole Transformer, label smoothing, the learning-rate schedule, one
training step, greedy and beam decoding, and the trained model.

Expected values come from PyTorch and plain tensor code, never from the course's solution:

* the model: token embeddings (``F.embedding`` times √d_model, the weight shared with the output
  layer), the sinusoidal table, then ``nn.Transformer`` (``batch_first``, ReLU, eval mode; its
  encoder and decoder stacks given as ``nn.TransformerEncoder``/``nn.TransformerDecoder`` so that
  a post-norm stack has no final norm, as in this course) run with the student's weights through
  ``torch.func.functional_call``, then ``F.linear`` with the shared weight (:func:`torch_transformer`);
* the loss: ``F.cross_entropy(..., label_smoothing=ε, ignore_index=pad)``;
* one training step: the same forward, ``torch.optim.Adam`` and ``LambdaLR`` on copies of the
  student's starting weights (:func:`_trusted_steps`);
* decoding: a greedy loop, an exhaustive search and a plain beam search over that forward;
* the trained model: its weights (read from ``model.state_dict()``) run by that forward with a
  trusted greedy loop on held-out sentences of :mod:`toy_language`; never its own answers.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from . import forbidden, toy_language
from .ch05 import _encoder_names, _quietly, _random_value
from .ch05 import _torch_layer_params as _encoder_layer_params
from .ch06 import _decoder_names
from .ch06 import _torch_layer_params as _decoder_layer_params
from .core import CheckFailure, Mistake, call, devices, expect_close, expect_tensor, fail, on_devices, passed, randn
from .gradients import expect_grads_close
from .scan import forbid_names

__all__ = ["check_transformer", "check_label_smoothing", "check_rate", "check_train_step", "check_decoding",
           "check_trained_model", "torch_transformer", "model_names", "canonical_weights", "trusted_greedy",
           "exact_match", "held_out", "TRAINED"]

PAD, START, END = toy_language.PAD, toy_language.START, toy_language.END
_F32 = torch.float32        # ch07 compares float64 results at float32's tolerance: the sinusoidal
#                             table is built in float32 (chapter 4), so float64 runs differ by its rounding

# --------------------------------------------------------------------------------------------
# The trusted model: nn.Transformer with the student's weights
# --------------------------------------------------------------------------------------------

LAYOUT = ("embed (your Embeddings: one nn.Embedding(vocab_size, d_model)), pos (your PositionalEncoding), encoder "
          "(your Encoder), decoder (your Decoder), generator (nn.Linear(d_model, vocab_size) whose weight is "
          "embed's)")
GENERATOR_NOT_TIED = Mistake("generator_not_tied", "generator.weight is a parameter of its own: the output layer "
                             "must share the embedding's weight (generator.weight = embed.embedding.weight, after "
                             "both exist), so that the model has one (vocab_size, d_model) matrix for reading and "
                             "writing words.")
NO_GENERATOR_BIAS = Mistake("generator_without_bias", "generator has no bias: make it nn.Linear(d_model, "
                            "vocab_size) (with its default bias, initialised to zero), its weight shared with the "
                            "embedding.")


def model_names(m, n_layers: int, norm_first: bool, what: str) -> dict:
    """canonical name -> the student's parameter name: ``embed`` (the shared (V, d) weight),
    ``generator.bias``, ``encoder.<ch05 canonical>``, ``decoder.<ch06 canonical>``. Checks the
    layout on the way: one embedding matrix, the generator tied to it, nothing else."""
    __tracebackhide__ = True
    try:
        every = list(m.named_parameters(remove_duplicate=False))
    except TypeError:
        every = list(m.named_parameters())
    params = dict(every)
    embeds = [n for n in params if n.startswith("embed.")]
    if len(embeds) != 1 or "generator.weight" not in params or not all(
            hasattr(m, s) for s in ("encoder", "decoder", "generator", "embed")):
        fail(f"{what}'s parameters should be those of {LAYOUT}, but they are {sorted(params)}.",
             mistake="wrong_parameters")
    weight = params[embeds[0]]
    if weight.dim() != 2:
        fail(f"{what}: {embeds[0]} should be the (vocab_size, d_model) embedding matrix.", mistake="wrong_parameters")
    gen = params["generator.weight"]
    if not (gen is weight or (gen.shape == weight.shape and gen.data_ptr() == weight.data_ptr())):
        fail(GENERATOR_NOT_TIED)
    if "generator.bias" not in params:
        fail(NO_GENERATOR_BIAS)
    names = {"embed": embeds[0], "generator.bias": "generator.bias"}
    for part, namer in (("encoder", _encoder_names), ("decoder", _decoder_names)):
        inner = namer(getattr(m, part), norm_first, f"{what}.{part}", n=n_layers)
        names.update({f"{part}.{k}": f"{part}.{v}" for k, v in inner.items()})
    rest = sorted(set(params) - set(names.values()) - {"generator.weight"})
    if rest:
        fail(f"{what} has parameters besides {LAYOUT}: {rest}.", mistake="wrong_parameters")
    return names


def canonical_weights(p: dict, names: dict) -> dict:
    """Student name -> tensor  to  canonical name -> tensor."""
    return {k: p[v] for k, v in names.items()}


def _table(length: int, d: int, dtype, device) -> torch.Tensor:
    """The sinusoidal table, computed in float32 as chapter 4's PositionalEncoding does by default."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    angle = position / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1).to(dtype=dtype, device=device)


def _stack_weights(c: dict, part: str, n: int, norm_first: bool, layer_params) -> dict:
    out = {}
    for i in range(n):
        prefix = f"{part}.layers.{i}."
        layer = {k[len(prefix):]: k for k in c if k.startswith(prefix)}
        out.update(layer_params(c, layer, to=prefix))
    if norm_first:
        out.update({f"{part}.norm.weight": c[f"{part}.norm.weight"], f"{part}.norm.bias": c[f"{part}.norm.bias"]})
    return out


def _float_mask(mask, b: int, heads: int, lt: int):
    """The course's target mask (True = may attend; (L, L) or (B, L, L)) as PyTorch's additive one."""
    m = mask if mask.dim() == 2 else mask.expand(b, lt, lt)[:, None].expand(b, heads, lt, lt).reshape(b * heads, lt, lt)
    return torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf"))


_shells = threading.local()


def _torch_shell(d: int, heads: int, d_ff: int, n: int, norm_first: bool, dtype, device) -> nn.Transformer:
    """An nn.Transformer of these sizes, built once per thread and kept: building one costs ~45 ms
    (it deep-copies its layers and initialises them), a greedy check calls ``torch_transformer`` once
    per step, and ``functional_call`` supplies every weight, so the shell's own are never used.
    Per thread because ``functional_call`` swaps the weights in and out of the module."""
    cache = _shells.__dict__.setdefault("cache", {})
    key = (d, heads, d_ff, n, norm_first, dtype, str(device))
    if key not in cache:
        def norm():
            return nn.LayerNorm(d) if norm_first else None

        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, d_ff, 0.0, batch_first=True,
                                                               norm_first=norm_first), n, norm=norm(),
                                    enable_nested_tensor=False)
        dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, heads, d_ff, 0.0, batch_first=True,
                                                               norm_first=norm_first), n, norm=norm())
        model = nn.Transformer(d, heads, custom_encoder=enc, custom_decoder=dec, dropout=0.0, batch_first=True)
        cache[key] = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return cache[key]


def torch_transformer(c: dict, heads: int, norm_first: bool, src, tgt_in, src_mask=None, tgt_mask=None,
                      kind: str = "right"):
    """Logits (B, L_t, V) of nn.Transformer holding the canonical weights ``c`` (gradients flow to
    them), embeddings and output layer around it. ``kind`` makes one deliberate mistake."""
    weight = c["embed"]
    d = weight.shape[1]
    n = len({k.split(".")[2] for k in c if k.startswith("encoder.layers.")})
    d_ff = c["encoder.layers.0.ff.w1"].shape[0]
    scale = 1.0 if kind == "embeddings_unscaled" else math.sqrt(d)
    table = _table(max(src.shape[1], tgt_in.shape[1]), d, weight.dtype, weight.device)
    if kind == "no_positions":
        table = table * 0
    x = F.embedding(src, weight) * scale + table[:src.shape[1]]
    y = F.embedding(tgt_in, weight) * scale + (0 if kind == "no_target_positions" else table[:tgt_in.shape[1]])

    model = _torch_shell(d, heads, d_ff, n, norm_first, weight.dtype, weight.device)
    weights = {**_stack_weights(c, "encoder", n, norm_first, _encoder_layer_params),
               **_stack_weights(c, "decoder", n, norm_first, _decoder_layer_params)}
    kwargs = {}
    if src_mask is not None:
        kwargs["src_key_padding_mask"] = ~src_mask.expand(src.shape[0], 1, src.shape[1])[:, 0]
        if kind != "memory_mask_missing":
            kwargs["memory_key_padding_mask"] = kwargs["src_key_padding_mask"]
    if tgt_mask is not None and kind != "tgt_mask_missing":
        kwargs["tgt_mask"] = _float_mask(tgt_mask, tgt_in.shape[0], heads, tgt_in.shape[1]).to(weight.dtype)
    with torch.enable_grad():
        if kind == "memory_from_embeddings":
            out = functional_call(model.decoder, {k[len("decoder."):]: v for k, v in weights.items()
                                                  if k.startswith("decoder.")},
                                  (y, x), {k: v for k, v in kwargs.items() if k in ("tgt_mask", "memory_key_padding_mask")},
                                  strict=True)
        else:
            out = functional_call(model, weights, (x, y), kwargs, strict=True)    # every weight is ours
    logits = F.linear(out, weight, c["generator.bias"])
    if kind == "returns_log_probabilities":
        return torch.log_softmax(logits, -1)
    if kind == "returns_probabilities":
        return torch.softmax(logits, -1)
    return logits


# --------------------------------------------------------------------------------------------
# Exercise 1: Transformer
# --------------------------------------------------------------------------------------------

NO_POSITIONS = Mistake("positional_encoding_missing", "the model adds no positional encoding: pass the scaled "
                       "embeddings of the source and of the decoder input through pos (your PositionalEncoding) "
                       "before the encoder and the decoder.")
NO_TARGET_POSITIONS = Mistake("target_positions_missing", "the decoder input gets no positional encoding: apply pos "
                              "to the embedded target too, not only to the source.")
EMBEDDINGS_UNSCALED = Mistake("embeddings_unscaled", "the token embeddings are not multiplied by √d_model: use your "
                              "Embeddings module (chapter 4), which scales the looked-up rows, for source and target.")
MEMORY_MASK_MISSING = Mistake("source_mask_not_passed_to_decoder", "the source padding mask does not reach the "
                              "decoder's cross-attention: pass src_mask to the decoder as its memory_mask (the "
                              "encoder gets it too).")
TGT_MASK_MISSING = Mistake("target_mask_not_passed", "tgt_mask does not reach the decoder: without it every target "
                           "position sees the whole target (the future included). Pass it to the decoder.")
MEMORY_FROM_EMBEDDINGS = Mistake("decoder_reads_embeddings", "the decoder's memory is the embedded source, not the "
                                 "encoder's output: decode from memory = encoder(pos(embed(src)), src_mask).")
RETURNS_PROBABILITIES = Mistake("returns_probabilities", "the model returns {what} instead of logits: return "
                                "generator's output as it is (the loss and the decoders apply log_softmax themselves).")
EMBEDDING_INIT = Mistake("embedding_init_unscaled", "the shared embedding starts with standard deviation {got:.3g}; "
                         "initialise it from N(0, 1/d_model) (std d_model^-0.5 = {want:.3g}) so that, multiplied by "
                         "√d_model, the embeddings have unit scale and the tied output layer starts with logits "
                         "of unit scale.")
NOT_XAVIER = Mistake("init_not_xavier", "{name} does not look Xavier-uniform initialised (values within "
                     "±{bound:.3g}, standard deviation {want:.3g}; it has max |w| = {got_max:.3g}, std "
                     "{got_std:.3g}): apply nn.init.xavier_uniform_ to every matrix except the shared embedding.")
NO_D_MODEL = Mistake("d_model_attribute_missing", "the model has no attribute d_model = {d}: store it "
                     "(self.d_model = d_model); the optimizer's schedule reads it.")
PASTE_FAILS = Mistake("pasted_module_fails", "{module} failed its checks ({failure}), but the culprit is probably "
                      "earlier: the {name} you pasted from chapter {chapter} fails that chapter's own checks: "
                      "{earlier} Fix the paste first (with everything it calls).")

NOT_A_NUMBER = Mistake("result_not_a_number", "{what} should return {expected}, but it returned {got}.")

_V, _LAYERS, _D, _H, _DFF = 13, 2, 12, 3, 20


def _build_model(Transformer, device, dtype, seed, *, vocab=_V, layers=_LAYERS, d=_D, heads=_H, d_ff=_DFF,
                 norm_first=False, dropout=0.0, scale=1.0):
    """The student's Transformer holding random weights (by role), eval mode; (module, names,
    canonical weights as leaves of the module)."""
    __tracebackhide__ = True
    what = f"Transformer({vocab}, {layers}, {d}, {heads}, {d_ff}, {dropout}, norm_first={norm_first})"
    m = call(Transformer, vocab, layers, d, heads, d_ff, dropout, 32, norm_first, what=what)
    if not isinstance(m, nn.Module):
        fail(f"{what} should create a torch.nn.Module.", mistake="not_a_module")
    names = model_names(m, layers, norm_first, what)
    m = m.to(device=device, dtype=dtype).eval()
    own = dict(m.named_parameters())
    values = {}
    for i, key in enumerate(sorted(names)):
        t = _random_value(key, tuple(own[names[key]].shape), seed * 1000 + i, device, dtype)
        values[names[key]] = t * scale if key in ("embed", "generator.bias") else t
    state = m.state_dict()
    state.update(values)
    try:
        m.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - the student's module
        fail(f"Could not load weights into your {what}: {exc}.", mistake="weights_not_loaded")
    own = dict(m.named_parameters())
    return m, names, {k: own[v] for k, v in names.items()}, what


def _masks(src_lengths, tgt_lengths, ls, lt, device):
    src_mask = (torch.arange(ls)[None, :] < torch.tensor(src_lengths)[:, None])[:, None, :].to(device)
    real = torch.arange(lt)[None, :] < torch.tensor(tgt_lengths)[:, None]
    tgt_mask = (torch.ones(lt, lt, dtype=torch.bool).tril() & real[:, None, :]).to(device)
    return src_mask, tgt_mask


def _batch(device, seed, vocab=_V, src_lengths=(6, 4, 2), tgt_lengths=(5, 5, 3)):
    """(src, tgt_in, src_mask, tgt_mask): ids 4.. padded with PAD; tgt_in starts with START."""
    g = torch.Generator().manual_seed(seed)
    ls, lt = max(src_lengths), max(tgt_lengths)
    src = torch.randint(4, vocab, (len(src_lengths), ls), generator=g)
    tgt = torch.randint(4, vocab, (len(tgt_lengths), lt), generator=g)
    tgt[:, 0] = START
    src_mask, tgt_mask = _masks(src_lengths, tgt_lengths, ls, lt, "cpu")
    src = src.masked_fill(~src_mask[:, 0], PAD)
    tgt = tgt.masked_fill(~(torch.arange(lt)[None, :] < torch.tensor(tgt_lengths)[:, None]), PAD)
    return src.to(device), tgt.to(device), src_mask.to(device), tgt_mask.to(device)


def _transformer_mistakes(c, heads, norm_first, args) -> dict:
    with torch.no_grad():
        out = {m: torch_transformer(c, heads, norm_first, *args, kind=k).detach() for m, k in (
            (NO_POSITIONS, "no_positions"), (NO_TARGET_POSITIONS, "no_target_positions"),
            (EMBEDDINGS_UNSCALED, "embeddings_unscaled"), (MEMORY_MASK_MISSING, "memory_mask_missing"),
            (TGT_MASK_MISSING, "tgt_mask_missing"), (MEMORY_FROM_EMBEDDINGS, "memory_from_embeddings"),
            (RETURNS_PROBABILITIES.format(what="probabilities (a softmax)"), "returns_probabilities"),
            (RETURNS_PROBABILITIES.format(what="log-probabilities (a log_softmax)"), "returns_log_probabilities"))}
    return out


def _check_structure(Transformer, device) -> int:
    """The layout: shared embedding and tied generator, both placements; the d_model attribute."""
    __tracebackhide__ = True
    for norm_first in (False, True):
        m, _, _, what = _build_model(Transformer, device, torch.float32, 0, norm_first=norm_first)
        d = getattr(m, "d_model", None)
        if not isinstance(d, int) or d != _D:
            fail(NO_D_MODEL, d=_D)
    return 2


def _check_initialisation(Transformer, device) -> int:
    """The shared embedding ~ N(0, 1/d_model); every other matrix Xavier-uniform."""
    __tracebackhide__ = True
    vocab, d = 400, 64
    torch.manual_seed(0)
    m = call(Transformer, vocab, 1, d, 4, 128, 0.0, 32, what=f"Transformer({vocab}, 1, {d}, 4, 128, 0.0)")
    names = model_names(m, 1, False, "Transformer(400, 1, 64, 4, 128)")
    params = dict(m.named_parameters())
    emb = params[names["embed"]].detach().double()
    std = float(emb.std())
    if abs(std - d ** -0.5) > 0.1 * d ** -0.5:
        fail(EMBEDDING_INIT, got=std, want=d ** -0.5)
    n = 1
    for key, name in sorted(names.items()):
        t = params[name].detach().double()
        if t.dim() != 2 or key == "embed":
            continue
        bound = math.sqrt(6 / (t.shape[0] + t.shape[1]))
        got_max, got_std = float(t.abs().max()), float(t.std())
        if got_max > bound * 1.0001 or abs(got_std - bound / math.sqrt(3)) > 0.2 * bound / math.sqrt(3):
            fail(NOT_XAVIER, name=name, bound=bound, want=bound / math.sqrt(3), got_max=got_max, got_std=got_std)
        n += 1
    return n


def _check_against_torch(Transformer, device) -> int:
    """Eval mode, post-norm and pre-norm, float32 and float64: logits = nn.Transformer's."""
    __tracebackhide__ = True
    n = 0
    for norm_first, dtype, seed in ((False, torch.float32, 10), (True, torch.float32, 11), (False, torch.float64, 12)):
        m, names, c, what = _build_model(Transformer, device, dtype, seed, norm_first=norm_first)
        src, tgt_in, src_mask, tgt_mask = _batch(device, seed)
        label = (f"{what} ({dtype}, {device}) on a batch of 3 padded sources and decoder inputs, src_mask "
                 f"{tuple(src_mask.shape)}, tgt_mask {tuple(tgt_mask.shape)}")
        got = call(m, src, tgt_in, src_mask, tgt_mask, what=label)
        args = (src, tgt_in, src_mask, tgt_mask)
        want = torch_transformer(c, _H, norm_first, *args).detach()
        expect_tensor(got, label, shape=want.shape, dtype=dtype, device=device)
        expect_close(got, want, f"{label} (compared with nn.Transformer holding your weights)", dtype=_F32,
                     mistakes=_transformer_mistakes(c, _H, norm_first, args))
        n += 1
    return n


def _check_encode_decode(Transformer, device) -> int:
    """encode(src, src_mask) is the encoder's output; decode(memory, src_mask, tgt_in, tgt_mask) the logits."""
    __tracebackhide__ = True
    m, names, c, what = _build_model(Transformer, device, torch.float32, 20)
    src, tgt_in, src_mask, tgt_mask = _batch(device, 20)
    want = torch_transformer(c, _H, False, src, tgt_in, src_mask, tgt_mask).detach()
    memory = expect_tensor(call(m.encode, src, src_mask, what=f"{what}.encode(src, src_mask)"),
                           f"{what}.encode(src, src_mask)", shape=(*src.shape, _D), device=device)
    got = call(m.decode, memory, src_mask, tgt_in, tgt_mask, what=f"{what}.decode(memory, src_mask, tgt_in, tgt_mask)")
    expect_close(got, want, f"{what}.decode(encode(src, src_mask), src_mask, tgt_in, tgt_mask)", dtype=_F32)
    return 2


def _check_grads(Transformer, device) -> int:
    """float64: gradients with respect to every parameter (the shared embedding included) = autograd's
    through nn.Transformer."""
    __tracebackhide__ = True
    m, names, c, what = _build_model(Transformer, device, torch.float64, 30, norm_first=True)
    src, tgt_in, src_mask, tgt_mask = _batch(device, 30)
    got = call(m, src, tgt_in, src_mask, tgt_mask, what=f"{what} (float64)")
    leaves = {k: v.detach().clone().requires_grad_() for k, v in c.items()}
    want = torch_transformer(leaves, _H, True, src, tgt_in, src_mask, tgt_mask)
    expect_tensor(got, what, shape=want.shape)
    return expect_grads_close(got, want, c, leaves, f"the logits of {what} (float64)", seed=31, dtype=_F32)


def _blame_pastes(failure: CheckFailure, module: str, pastes: dict) -> None:
    """The model failed: if a module it is built from fails its own chapter's checks, say so."""
    __tracebackhide__ = True
    if failure.mistake == "not_implemented":
        return
    from .ch04 import check_embeddings, check_positional_encoding
    from .ch05 import check_encoder
    from .ch06 import check_decoder, check_decoder_inputs
    checks = {"Embeddings": (check_embeddings, 4), "PositionalEncoding": (check_positional_encoding, 4),
              "Encoder": (check_encoder, 5), "Decoder": (check_decoder, 6)}
    for name, (check, chapter) in checks.items():
        if pastes.get(name) is not None:
            exc = _quietly(check, pastes[name])
            if exc is not None:
                fail(PASTE_FAILS, module=module, failure=str(failure).rstrip("."), name=name, chapter=chapter,
                     earlier=str(exc))
    if pastes.get("shift_right") is not None and pastes.get("target_mask") is not None:
        exc = _quietly(check_decoder_inputs, pastes["shift_right"], pastes["target_mask"])
        if exc is not None:
            fail(PASTE_FAILS, module=module, failure=str(failure).rstrip("."), name="shift_right/target_mask",
                 chapter=6, earlier=str(exc))


def check_transformer(Transformer, **pastes) -> None:
    """Visible tests for exercise 1. ``Transformer(vocab_size, num_layers, d_model, num_heads, d_ff,
    dropout, max_len, norm_first)``: submodules embed, pos, encoder, decoder, generator (tied to
    the embedding); ``forward(src, tgt_in, src_mask, tgt_mask)`` -> logits (B, L_t, V);
    ``encode(src, src_mask)`` -> (B, L_s, d_model); ``decode(memory, src_mask, tgt_in, tgt_mask)``
    -> logits. ``pastes``: the pasted Embeddings, PositionalEncoding, Encoder, Decoder, to blame."""
    __tracebackhide__ = True
    forbid_names(Transformer, forbidden.ATTENTION + forbidden.LAYER_NORM + forbidden.TRANSFORMER_LAYERS,
                 "Transformer", "Assemble your own Embeddings, PositionalEncoding, Encoder and Decoder.")
    try:
        count = on_devices([_check_structure, _check_initialisation, _check_against_torch, _check_encode_decode,
                            _check_grads], Transformer)
    except CheckFailure as exc:
        _blame_pastes(exc, "Transformer", pastes)
        raise
    passed("Transformer", count)


# --------------------------------------------------------------------------------------------
# Exercise 2: LabelSmoothingLoss
# --------------------------------------------------------------------------------------------

SMOOTHING_IGNORED = Mistake("smoothing_ignored", "the loss is the plain cross-entropy: the smoothing is missing. "
                            "Mix (1 - smoothing) times the negative log-likelihood of the target with smoothing "
                            "times the mean of -log p over all V classes.")
PADDING_COUNTED = Mistake("padding_not_ignored", "padding positions count in the loss: average only over the "
                          "positions whose target is not pad_id.")
SMOOTHING_ON_PAD = Mistake("smoothing_mass_on_pad", "the smoothing term is counted at padding positions (only the "
                           "negative log-likelihood was masked): mask the whole per-position loss, then average "
                           "over the real positions.")
MEAN_OVER_ALL = Mistake("mean_over_all_positions", "the sum over real positions is divided by the number of all "
                        "positions, padding included: divide by the number of real (non-padding) positions.")
SUM_NOT_MEAN = Mistake("sum_not_mean", "the loss is the sum over the real positions: return their mean.")
KL_NOT_CE = Mistake("kl_divergence_not_cross_entropy", "this is the KL divergence KL(q || p) (the cross-entropy "
                    "minus the entropy of the smoothed target q, as nn.KLDivLoss computes): return the "
                    "cross-entropy -Σ q log p, which F.cross_entropy(label_smoothing=...) computes. (Their gradients "
                    "agree; their values do not.)")
OTHER_CLASSES = Mistake("smoothing_over_other_classes", "the target class gets exactly 1 - smoothing and the "
                        "others smoothing / (V - 1): PyTorch's definition (used here) spreads smoothing / V over "
                        "all V classes, the target class included, which gets 1 - smoothing + smoothing / V.")
PAD_CLASS_EXCLUDED = Mistake("pad_class_excluded", "the smoothing mass skips the padding class (and the target "
                             "class), smoothing / (V - 2) each, as the Annotated Transformer does: this exercise "
                             "follows PyTorch's definition, smoothing / V on every class.")
LOG_OF_ZERO = Mistake("log_of_zero", "{what} is not finite (NaN or inf) where the expected loss is: a log of a "
                      "probability that underflowed to 0 (log(softmax(x)) at large logits), or 0 · log 0 in a "
                      "KL or entropy term. Use log_softmax, and never take the log of the target distribution.")


def _ls_inputs(device, dtype, seed, shape=(3, 5), vocab=7, pad=0, scale=1.0, pad_rows=(1,)):
    logits = randn(*shape, vocab, seed=seed, device=device, dtype=dtype, scale=scale)
    g = torch.Generator().manual_seed(seed + 1)
    target = torch.randint(0, vocab, shape, generator=g)
    target[..., -1] = pad
    for r in pad_rows:
        if len(shape) > 1 and r < shape[0]:
            target[r] = pad
    return logits, target.to(device)


def _ls_expected(logits, target, eps, pad):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), label_smoothing=eps,
                           ignore_index=pad)


def _ls_mistakes(logits, target, eps, pad) -> dict:
    v = logits.shape[-1]
    log_p = torch.log_softmax(logits.double(), -1)
    real = target != pad
    one_hot = F.one_hot(target, v).double()
    nll = -(log_p * one_hot).sum(-1)
    uniform = -log_p.mean(-1)
    right = (1 - eps) * nll + eps * uniform

    def mean(x):
        return x[real].sum() / real.sum()

    q_other = one_hot * (1 - eps) + (1 - one_hot) * eps / (v - 1)
    q_annot = (one_hot * (1 - eps) + (1 - one_hot) * eps / (v - 2))
    q_annot[..., pad] = 0
    q = one_hot * (1 - eps) + eps / v
    entropy = -(q * q.log()).sum(-1)
    return {SMOOTHING_IGNORED: mean(nll), PADDING_COUNTED: right.mean(),
            SMOOTHING_ON_PAD: (((1 - eps) * nll)[real].sum() + (eps * uniform).sum()) / real.sum(),
            MEAN_OVER_ALL: right[real].sum() / real.numel(), SUM_NOT_MEAN: right[real].sum(),
            KL_NOT_CE: mean(right - entropy), OTHER_CLASSES: mean(-(q_other * log_p).sum(-1)),
            PAD_CLASS_EXCLUDED: mean(-(q_annot * log_p).sum(-1))}


def _ls_run(LabelSmoothingLoss, eps, pad, logits, target, what):
    __tracebackhide__ = True
    criterion = call(LabelSmoothingLoss, eps, pad, what=f"LabelSmoothingLoss({eps}, {pad})")
    got = call(criterion, logits, target, what=what)
    if type(got) is torch.Tensor and got.dim() == 1 and got.numel() == 1:
        got = got.reshape(())
    return expect_tensor(got, what, shape=(), dtype=logits.dtype, device=logits.device)


def _check_ls_values(LabelSmoothingLoss, device) -> int:
    """Against F.cross_entropy(label_smoothing=ε, ignore_index=pad): (B, L, V) and (N, V), several ε and pads."""
    __tracebackhide__ = True
    n = 0
    for seed, eps, pad, shape, vocab in ((40, 0.1, 0, (3, 5), 7), (41, 0.3, 2, (4, 6), 9), (42, 0.0, 0, (2, 3), 5),
                                         (43, 0.2, 5, (8,), 6)):
        logits, target = _ls_inputs(device, torch.float32, seed, shape, vocab, pad)
        what = (f"LabelSmoothingLoss({eps}, pad_id={pad}) on logits of shape {tuple(logits.shape)} and targets "
                f"{target.tolist()} ({device})")
        got = _ls_run(LabelSmoothingLoss, eps, pad, logits, target, what)
        want = _ls_expected(logits, target, eps, pad)
        mistakes = {m: w.to(got.dtype) for m, w in _ls_mistakes(logits, target, eps, pad).items()} if eps else {}
        expect_close(got, want, what, mistakes=mistakes)
        n += 1
    return n


def _check_ls_large_logits(LabelSmoothingLoss, device) -> int:
    """Logits of scale 1000 and all-padding rows: finite, and still F.cross_entropy's value."""
    __tracebackhide__ = True
    logits, target = _ls_inputs(device, torch.float32, 50, (3, 6), 8, 0, scale=1000.0, pad_rows=(0, 2))
    what = f"LabelSmoothingLoss(0.1, pad_id=0) on logits of scale 1000 ({device}), rows 0 and 2 all padding"
    got = _ls_run(LabelSmoothingLoss, 0.1, 0, logits, target, what)
    want = _ls_expected(logits, target, 0.1, 0)
    if not bool(torch.isfinite(got)):
        fail(LOG_OF_ZERO, what=what)
    expect_close(got, want, what, tol=(1e-4, 1e-3))
    return 2


def _check_ls_grads(LabelSmoothingLoss, device) -> int:
    """float64: the gradient with respect to the logits = autograd's through F.cross_entropy (finite at scale 1000)."""
    __tracebackhide__ = True
    n = 0
    for seed, scale in ((60, 1.0), (61, 1000.0)):
        logits, target = _ls_inputs(device, torch.float64, seed, (3, 4), 6, 1, scale=scale)
        mine, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        what = f"LabelSmoothingLoss(0.2, pad_id=1) on logits of scale {scale:g} (float64, {device})"
        got = _ls_run(LabelSmoothingLoss, 0.2, 1, mine, target, what)
        want = _ls_expected(ref, target, 0.2, 1)
        n += expect_grads_close(got, want, [mine], [ref], what, upstream=torch.ones((), dtype=torch.float64,
                                                                                    device=device),
                                nonfinite=LOG_OF_ZERO)
    return n


def check_label_smoothing(LabelSmoothingLoss) -> None:
    """Visible tests for exercise 2. ``LabelSmoothingLoss(smoothing, pad_id)``, called on logits
    (..., V) and targets (...) -> a scalar: F.cross_entropy(label_smoothing=smoothing, ignore_index=pad_id)."""
    __tracebackhide__ = True
    forbid_names(LabelSmoothingLoss, ("cross_entropy", "CrossEntropyLoss", "nll_loss", "NLLLoss", "label_smoothing"),
                 "LabelSmoothingLoss", "Compute the smoothed cross-entropy from log_softmax yourself.")
    passed("LabelSmoothingLoss", on_devices([_check_ls_values, _check_ls_large_logits, _check_ls_grads],
                                            LabelSmoothingLoss))


# --------------------------------------------------------------------------------------------
# Exercise 3: rate
# --------------------------------------------------------------------------------------------

WARMUP_MISSING = Mistake("warmup_missing", "there is no warmup: the rate starts at its largest value, "
                         "d_model^-0.5 at step 1. It must grow linearly, d_model^-0.5 · step · warmup^-1.5, up "
                         "to step = warmup, then decay as step^-0.5: take the min of the two.")
NO_DECAY = Mistake("min_and_max_swapped", "the rate keeps growing after the warmup: it is the max of the two terms "
                   "where it must be their min, d_model^-0.5 · min(step^-0.5, step · warmup^-1.5).")
NO_D_SCALE = Mistake("d_model_factor_missing", "the factor d_model^-0.5 is missing (or wrong): rate = factor · "
                     "d_model^-0.5 · min(step^-0.5, step · warmup^-1.5).")
WARMUP_POWER = Mistake("warmup_exponent_wrong", "the warmup term uses the wrong power of warmup: it is step · "
                       "warmup^-1.5, which meets step^-0.5 exactly at step = warmup.")
FACTOR_IGNORED = Mistake("factor_ignored", "the factor argument is ignored: multiply the whole rate by it.")
OFF_BY_ONE = Mistake("step_off_by_one", "the rate is shifted by one step (you used step + 1 or step - 1): rate(step) "
                     "uses step as given, counted from 1.")


def _rate_expected(step, d, w, f):
    return f * d ** -0.5 * min(step ** -0.5, step * w ** -1.5)


def _rate_mistakes(step, d, w, f) -> dict:
    return {WARMUP_MISSING: f * d ** -0.5 * step ** -0.5, NO_DECAY: f * d ** -0.5 * max(step ** -0.5, step * w ** -1.5),
            NO_D_SCALE: f * min(step ** -0.5, step * w ** -1.5), WARMUP_POWER: f * d ** -0.5 * min(step ** -0.5,
                                                                                                    step * w ** -0.5),
            FACTOR_IGNORED: _rate_expected(step, d, w, 1.0), OFF_BY_ONE: _rate_expected(step + 1, d, w, f)}


def _rate_value(rate, step, d, w, f):
    __tracebackhide__ = True
    what = f"rate({step}, d_model={d}, warmup={w}, factor={f})"
    got = call(rate, step, d, w, f, what=what)
    if type(got) is torch.Tensor and got.numel() == 1:
        got = float(got)
    if not isinstance(got, (int, float)) or isinstance(got, bool):
        fail(NOT_A_NUMBER, what=what, expected="a Python number", got=type(got).__name__)
    return got


def _check_rate_values(rate, device) -> int:
    """Steps 1 ... 20000 (warmup included, both sides of it) for three settings, as Python numbers;
    a mistake is named when it explains every value of a setting."""
    __tracebackhide__ = True
    n = 0
    for d, w, f in ((512, 4000, 1.0), (64, 400, 2.0), (32, 10, 0.5)):
        steps = sorted({1, 2, 3, w // 2, w - 1, w, w + 1, 2 * w, 5 * w, 20000})
        got = {step: _rate_value(rate, step, d, w, f) for step in steps}
        bad = [s for s in steps if not math.isclose(got[s], _rate_expected(s, d, w, f), rel_tol=1e-9)]
        if not bad:
            n += len(steps)
            continue
        step = bad[0]
        want = _rate_expected(step, d, w, f)
        what = f"rate({step}, d_model={d}, warmup={w}, factor={f})"
        for mistake in _rate_mistakes(1, d, w, f):
            if all(math.isclose(got[s], _rate_mistakes(s, d, w, f)[mistake], rel_tol=1e-9) for s in steps):
                fail(f"{what} is {got[step]:.6g}, expected {want:.6g}: {mistake.message}", mistake=mistake.id)
        fail(f"{what} is {got[step]:.6g}, expected {want:.6g} = {f} · {d}^-0.5 · min({step}^-0.5, {step} · "
             f"{w}^-1.5).", mistake="values_differ")
    return n


def check_rate(rate) -> None:
    """Visible tests for exercise 3. ``rate(step, d_model, warmup, factor=1.0)`` -> factor · d_model^-0.5 ·
    min(step^-0.5, step · warmup^-1.5), for steps counted from 1."""
    __tracebackhide__ = True
    passed("rate", _check_rate_values(rate, "cpu"))


# --------------------------------------------------------------------------------------------
# Exercise 4: train_step (through the given train_steps)
# --------------------------------------------------------------------------------------------

NO_SHIFT = Mistake("no_shift_right", "the decoder's input is the target itself, not the target shifted right: "
                   "with teacher forcing, position t reads the target up to t - 1. Feed shift_right(tgt, START, "
                   "PAD) and compute the loss against tgt.")
LOSS_VS_INPUT = Mistake("loss_against_decoder_input", "the loss compares the predictions with the decoder input "
                        "(the shifted target): compare them with tgt, the tokens each position must predict.")
NO_ZERO_GRAD = Mistake("gradients_accumulate", "the gradients are never reset, so every step adds to the previous "
                       "steps' gradients: call optimizer.zero_grad() before loss.backward().")
ZERO_AFTER_BACKWARD = Mistake("gradients_cleared_before_step", "the gradients are reset between loss.backward() and "
                              "optimizer.step(), so the step sees zero gradients: zero them before the backward.")
SCHEDULER_NOT_STEPPED = Mistake("scheduler_not_stepped", "the learning rate never changes: call scheduler.step() "
                                "after optimizer.step(), once per training step.")
NO_SOURCE_MASK = Mistake("source_mask_not_used", "the source padding mask is missing: pass (src != PAD)[:, None, "
                         ":] as src_mask, so that no position attends to the source's padding.")
NO_TARGET_MASK = Mistake("causal_mask_not_used", "tgt_mask is missing, so every decoder position sees the target's "
                         "future (it only has to copy the next input token): pass target_mask(tgt_in, PAD).")
LOSS_FAILS = Mistake("loss_fails", "train_step's losses differ from the expected ones ({failure}), but the culprit is "
                     "probably earlier: your LabelSmoothingLoss fails exercise 2's checks: {earlier}")
RATE_FAILS = Mistake("rate_fails", "train_step's losses differ from the expected ones ({failure}), but the culprit is "
                     "probably earlier: your rate fails exercise 3's checks: {earlier}")
MODEL_FAILS = Mistake("model_fails", "{what} failed ({failure}), but the culprit is probably earlier: your "
                      "Transformer fails exercise 1's checks: {earlier}")


def _train_batches(device, seed, n=4):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        src_lengths, tgt_lengths = [6, 3, 5][:3], [5, 2, 4]
        src = torch.randint(4, _V, (3, 6), generator=g)
        tgt = torch.randint(4, _V, (3, 6), generator=g)
        for r, (a, b) in enumerate(zip(src_lengths, tgt_lengths)):
            src[r, a:] = PAD
            tgt[r, b] = END
            tgt[r, b + 1:] = PAD
        out.append((src.to(device), tgt.to(device)))
    return out


def _shift(tgt):
    return torch.cat([torch.full_like(tgt[:, :1], START), tgt[:, :-1]], 1).masked_fill(tgt == PAD, PAD)


def _target_mask(tgt_in):
    lt = tgt_in.shape[1]
    return torch.ones(lt, lt, dtype=torch.bool, device=tgt_in.device).tril() & (tgt_in != PAD)[:, None, :]


def _trusted_steps(c0: dict, batches, warmup, factor, d, kind="right") -> tuple[list[float], dict]:
    """The losses of len(batches) training steps from canonical weights ``c0`` and the weights after
    them: Adam(0.9, 0.98, 1e-9), LambdaLR(factor · d^-0.5 · min(...)), F.cross_entropy with
    smoothing 0.1, the two-head model of the check; ``kind``: one mistake."""
    c = {k: v.detach().clone().requires_grad_() for k, v in c0.items()}
    optimizer = torch.optim.Adam(list(c.values()), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: _rate_expected(i + 1, d, warmup, factor))
    if kind == "scheduler_not_stepped":
        schedule = None
        for group in optimizer.param_groups:
            group["lr"] = _rate_expected(1, d, warmup, factor)
    losses = []
    for src, tgt in batches:
        tgt_in = tgt if kind == "no_shift" else _shift(tgt)
        src_mask = None if kind == "no_source_mask" else (src != PAD)[:, None, :]
        tgt_mask = None if kind == "no_target_mask" else _target_mask(tgt_in)
        logits = torch_transformer(c, 2, False, src, tgt_in, src_mask, tgt_mask)
        loss = _ls_expected(logits, tgt_in if kind == "loss_vs_input" else tgt, 0.1, PAD)
        if kind != "no_zero_grad":
            optimizer.zero_grad()
        loss.backward()
        if kind == "zero_after_backward":
            optimizer.zero_grad()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        losses.append(loss.item())
    return losses, c


_STEP_MISTAKES = {NO_SHIFT: "no_shift", LOSS_VS_INPUT: "loss_vs_input", NO_ZERO_GRAD: "no_zero_grad",
                  ZERO_AFTER_BACKWARD: "zero_after_backward", SCHEDULER_NOT_STEPPED: "scheduler_not_stepped",
                  NO_SOURCE_MASK: "no_source_mask", NO_TARGET_MASK: "no_target_mask"}


def _check_steps(train_steps, Transformer, LabelSmoothingLoss, device) -> int:
    """Four steps from fixed weights on fixed batches, float64: the losses step for step, then the weights."""
    __tracebackhide__ = True
    m, names, c, what = _build_model(Transformer, device, torch.float64, 70, heads=2, d=8, d_ff=16)
    start = {k: v.detach().clone() for k, v in c.items()}
    batches = _train_batches(device, 71)
    criterion = call(LabelSmoothingLoss, 0.1, PAD, what="LabelSmoothingLoss(0.1, PAD)")
    label = f"train_steps(model, 4 batches, LabelSmoothingLoss(0.1, PAD), warmup=3) on {what}, float64, {device}"
    got = call(train_steps, m, batches, criterion, 3, 1.0, what=label)
    if not isinstance(got, (list, tuple)) or len(got) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in got):
        fail(NOT_A_NUMBER, what=label, expected="the 4 losses as Python numbers (train_step returns loss.item())",
             got=f"{got!r:.200}")
    want, after = _trusted_steps(start, batches, 3, 1.0, 8)
    if all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) for a, b in zip(got, want)):
        # The weights after the last step, seen through the model's output (they live where it runs).
        src, tgt = batches[0]
        args = (src, _shift(tgt), (src != PAD)[:, None, :], _target_mask(_shift(tgt)))
        out = call(m.eval(), *args, what=f"the model after {label}")
        expect_close(out, torch_transformer(after, 2, False, *args).detach(),
                     f"the model's logits after {label} (its weights after the 4 steps)", tol=(1e-5, 1e-7))
        return 5
    for mistake, kind in _STEP_MISTAKES.items():
        wrong, _ = _trusted_steps(start, batches, 3, 1.0, 8, kind)
        if all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) for a, b in zip(got, wrong)):
            fail(f"{label}: the losses are {_fmt(got)}, expected {_fmt(want)}: {mistake.message}", mistake=mistake.id)
    step = next(i for i, (a, b) in enumerate(zip(got, want)) if not math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7))
    fail(f"{label}: the losses are {_fmt(got)}, expected {_fmt(want)} (the first difference at step {step + 1}).",
         mistake="values_differ")


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.6f}" for v in values) + "]"


def check_train_step(train_steps, Transformer, LabelSmoothingLoss, rate=None) -> None:
    """Visible tests for exercise 4, through the given ``train_steps(model, batches, criterion,
    warmup, factor)`` (a fresh Adam and your schedule, then your ``train_step`` on each batch): the
    losses of four steps from fixed weights on fixed batches follow a trusted run step for step."""
    __tracebackhide__ = True
    try:
        count = on_devices([_check_steps], train_steps, Transformer, LabelSmoothingLoss)
    except CheckFailure as exc:
        if exc.mistake in ("values_differ", NOT_A_NUMBER.id):
            failure = str(exc).rstrip(".")
            earlier = _quietly(check_label_smoothing, LabelSmoothingLoss)
            if earlier is not None:
                fail(LOSS_FAILS, failure=failure, earlier=str(earlier))
            if rate is not None:
                earlier = _quietly(check_rate, rate)
                if earlier is not None:
                    fail(RATE_FAILS, failure=failure, earlier=str(earlier))
        _blame_model(exc, Transformer, "train_step")
        raise
    passed("train_step", count)


def _blame_model(exc: CheckFailure, Transformer, what: str) -> None:
    """Training or decoding failed: if the Transformer fails exercise 1's checks, say so."""
    __tracebackhide__ = True
    if exc.mistake != "not_implemented":
        earlier = _quietly(check_transformer, Transformer)
        if earlier is not None:
            fail(MODEL_FAILS, what=what, failure=str(exc).rstrip("."), earlier=str(earlier))


# --------------------------------------------------------------------------------------------
# Exercise 5: greedy_decode and beam_search
# --------------------------------------------------------------------------------------------

GREEDY_AFTER_END = Mistake("greedy_continues_after_end", "after a sentence's </s>, greedy decoding kept writing "
                           "tokens: once a sentence has written END, its later positions must be PAD.")
GREEDY_NO_SOURCE_MASK = Mistake("greedy_ignores_source_padding", "greedy decoding ignores the source padding: "
                                "build src_mask = (src != PAD)[:, None, :] and pass it to encode and decode, so that "
                                "a padded sentence decodes as it would alone.")
GREEDY_NO_CAUSAL = Mistake("greedy_without_causal_mask", "greedy decoding calls decode without the causal mask: the "
                           "decoder's earlier positions then read later ones, unlike in training. Pass "
                           "target_mask(written, PAD) at every step.")
GREEDY_NO_START = Mistake("greedy_without_start_token", "greedy decoding does not start from <s> (START): the "
                          "decoder's first input must be the start token, as in training after shift_right.")
LENGTH_PENALTY_IGNORED = Mistake("length_penalty_ignored", "the hypotheses are ranked by their total "
                                 "log-probability: divide it by the length penalty ((5 + length) / 6) ** alpha "
                                 "before choosing, or short hypotheses always win.")
BEAM_NOT_SORTED = Mistake("beam_not_sorted", "the beam does not keep the beam_size best extensions of all live "
                          "hypotheses together: rank every (hypothesis, next token) candidate by its total "
                          "log-probability and keep the best beam_size (not the best tokens of each hypothesis, "
                          "nor candidates in the order they were made).")
EOS_NOT_STOPPING = Mistake("eos_not_stopping", "a hypothesis was extended after it wrote </s>: a hypothesis that "
                           "writes END is finished; move it out of the beam.")
FIRST_FINISHED = Mistake("first_finished_returned", "beam search returned the first hypothesis to finish: keep "
                         "searching until no live hypothesis is left (or max_len), then return the finished one with "
                         "the best score.")
BEAM_NOT_GREEDY = Mistake("beam_one_not_greedy", "with beam_size=1 beam search must write what greedy decoding "
                          "writes, but it wrote {got} where greedy writes {want}.")

_DV = 7          # tiny vocabulary for decoding checks: PAD, START, END, UNK and three words


def _decoder_model(Transformer, device, seed):
    """The student's Transformer over 7 tokens (2 + 2 layers: a missing causal mask shows), random weights
    (float64). Random models tend to repeat a token; the seeds of the checks write varied tokens and END."""
    __tracebackhide__ = True
    m, names, c, what = _build_model(Transformer, device, torch.float64, seed, vocab=_DV, layers=2, d=8, heads=2,
                                     d_ff=16)
    with torch.no_grad():      # PAD is never written (a target mask treats it as padding): log P(PAD) ≈ -50
        c["generator.bias"][PAD] = -50.0
    return m, names, c, what


def _log_probs(c, src, prefixes):
    """log P(next token | prefix) for each prefix (K, t) of one source (1, L_s): (K, V)."""
    src_mask = (src != PAD)[:, None, :]
    tgt_mask = _target_mask(prefixes)
    with torch.no_grad():
        logits = torch_transformer(c, 2, False, src.expand(len(prefixes), -1), prefixes,
                                   src_mask.expand(len(prefixes), -1, -1), tgt_mask)
    return torch.log_softmax(logits[:, -1].double(), -1)


def trusted_greedy(c, heads, norm_first, src, max_len, kind="right"):
    """Greedy decoding with nn.Transformer holding ``c``: (B, max_len), PAD after END."""
    src_mask = (src != PAD)[:, None, :]
    written = torch.full((src.shape[0], 1), PAD if kind == "no_start" else START, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    with torch.no_grad():
        for _ in range(max_len):
            tgt_mask = None if kind == "no_causal" else _target_mask(written)
            if kind == "no_start":           # the first position holds PAD: keep it visible
                tgt_mask = torch.ones(written.shape[1], written.shape[1], dtype=torch.bool, device=src.device).tril()
            logits = torch_transformer(c, heads, norm_first, src, written,
                                       None if kind == "no_source_mask" else src_mask, tgt_mask)[:, -1]
            token = logits.argmax(-1)
            if kind != "after_end":
                token = token.masked_fill(done, PAD)
            written = torch.cat([written, token[:, None]], 1)
            done |= token == END
    return written[:, 1:]


def _lp(length, alpha):
    return ((5 + length) / 6) ** alpha


def _all_hypotheses(c, src, max_len, after_end=False):
    """Every finished hypothesis (ending with END) and every unfinished one of max_len tokens, with
    its total log-probability: [(tokens, logP)]."""
    out, frontier = [], [([START], 0.0)]
    for _ in range(max_len):
        if not frontier:
            break
        log_p = _log_probs(c, src, torch.tensor([h for h, _ in frontier], device=src.device))
        nxt = []
        for (h, s), row in zip(frontier, log_p.tolist()):
            for tok, lp in enumerate(row):
                cand = (h + [tok], s + lp)
                (out if tok == END and not after_end else nxt).append(cand)
        frontier = nxt
    return [(h[1:], s) for h, s in out + frontier]


def _trusted_beam(c, src, max_len, k, alpha, kind="right"):
    live, finished = [([START], 0.0)], []
    for _ in range(max_len):
        if not live:
            break
        log_p = _log_probs(c, src, torch.tensor([h for h, _ in live], device=src.device))
        cands = [(h + [tok], s + lp) for (h, s), row in zip(live, log_p.tolist()) for tok, lp in enumerate(row)]
        if kind == "not_sorted":
            chosen = cands[:k]
        else:
            chosen = sorted(cands, key=lambda x: -x[1])[:k]
        if kind == "no_stop":              # END ends nothing: every hypothesis stays live
            live = chosen
            continue
        finished += [x for x in chosen if x[0][-1] == END]
        if kind == "first_finished" and finished:
            return finished[0][0][1:]
        live = [x for x in chosen if x[0][-1] != END]
    pool = [(h[1:], s) for h, s in finished + live]
    if kind == "no_penalty":
        return max(pool, key=lambda x: x[1])[0]
    return max(pool, key=lambda x: x[1] / _lp(len(x[0]), alpha))[0]


def _tokens(got, what):
    __tracebackhide__ = True
    if not isinstance(got, tuple) or len(got) != 2:
        fail(f"{what} should return (tokens, score), but it returned {type(got).__name__}.", mistake="not_a_tuple")
    tokens, score = got
    tokens = expect_tensor(tokens, f"the tokens of {what}")
    if tokens.dim() != 1 or tokens.dtype != torch.long:
        fail(f"the tokens of {what} should be a 1-d int64 tensor, but they have shape {tuple(tokens.shape)} and "
             f"dtype {tokens.dtype}.", mistake="wrong_shape")
    if type(score) is torch.Tensor and score.numel() == 1:
        score = float(score)
    if not isinstance(score, (int, float)) or isinstance(score, bool):
        fail(NOT_A_NUMBER, what=f"the score of {what}", expected="a number", got=type(score).__name__)
    return tokens.tolist(), float(score)


def _sources(device, seed, lengths=(5, 3, 1)):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, _DV, (len(lengths), max(lengths)), generator=g)
    for r, n in enumerate(lengths):
        src[r, n:] = PAD
    return src.to(device)


def _check_greedy(greedy_decode, Transformer, device) -> int:
    """A padded batch of three sources: the trusted greedy loop's tokens, PAD after END."""
    __tracebackhide__ = True
    n = 0
    for seed in (85, 87, 98):
        m, _, c, what = _decoder_model(Transformer, device, seed)
        src = _sources(device, seed)
        label = f"greedy_decode(model, src, max_len=6) for src = {src.tolist()} ({what}, {device})"
        got = expect_tensor(call(greedy_decode, m, src, 6, what=label), label, device=device)
        want = trusted_greedy(c, 2, False, src, 6)
        if got.dim() != 2 or got.shape[0] != 3 or got.shape[1] > 6:
            fail(f"{label} has shape {tuple(got.shape)}, expected (3, 6) (or fewer columns if every sentence ended).",
                 mistake="wrong_shape")
        got = torch.cat([got, torch.full((3, 6 - got.shape[1]), PAD, dtype=got.dtype, device=device)], 1)
        if torch.equal(got, want):
            n += 1
            continue
        for mistake, kind in ((GREEDY_AFTER_END, "after_end"), (GREEDY_NO_SOURCE_MASK, "no_source_mask"),
                              (GREEDY_NO_CAUSAL, "no_causal"), (GREEDY_NO_START, "no_start")):
            if torch.equal(got, trusted_greedy(c, 2, False, src, 6, kind)):
                fail(f"{label} is {got.tolist()}, expected {want.tolist()}: {mistake.message}", mistake=mistake.id)
        fail(f"{label} is {got.tolist()}, expected {want.tolist()} (the most likely token at each step).",
             mistake="values_differ")
    return n


def _check_beam(beam_search, Transformer, device) -> int:
    """Width 1 = greedy; a wide beam = exhaustive search; width 2 and 3 = a trusted beam; the score."""
    __tracebackhide__ = True
    n = 0
    for seed in (112, 95, 139, 98):
        m, _, c, what = _decoder_model(Transformer, device, seed)
        src = _sources(device, seed, (4,))
        greedy = trusted_greedy(c, 2, False, src, 3)[0].tolist()
        greedy = greedy[:greedy.index(END) + 1] if END in greedy else greedy
        label = f"beam_search(model, src, max_len=3, beam_size=1) for src = {src.tolist()} ({device})"
        got, _ = _tokens(call(beam_search, m, src, 3, 1, 0.6, what=label), label)
        if got != greedy:
            _name_beam_mistake(c, src, got, greedy, label, 1, 0.6, max_len=3,
                               otherwise=BEAM_NOT_GREEDY.format(got=got, want=greedy))
        everything = _all_hypotheses(c, src, 3)
        for alpha in (0.6, 2.0):
            best, best_score = max(((h, s / _lp(len(h), alpha)) for h, s in everything), key=lambda x: x[1])
            label = (f"beam_search(model, src, max_len=3, beam_size=400, alpha={alpha}) for src = {src.tolist()} "
                     f"({device}): a beam this wide prunes nothing, so it must find the best of all "
                     f"{len(everything)} hypotheses")
            got, score = _tokens(call(beam_search, m, src, 3, 400, alpha, what=label), label)
            if got != best:
                _name_beam_mistake(c, src, got, best, label, 400, alpha)
            if not math.isclose(score, best_score, rel_tol=1e-6, abs_tol=1e-9):
                fail(f"{label}: the score is {score:.6g}, expected {best_score:.6g} = log P / ((5 + {len(best)}) / 6) "
                     f"** {alpha}.", mistake="values_differ")
        for k in (2, 3):
            want = _trusted_beam(c, src, 4, k, 0.6)
            label = f"beam_search(model, src, max_len=4, beam_size={k}, alpha=0.6) for src = {src.tolist()} ({device})"
            got, _ = _tokens(call(beam_search, m, src, 4, k, 0.6, what=label), label)
            if got != want:
                _name_beam_mistake(c, src, got, want, label, k, 0.6, max_len=4)
        n += 5
    return n


def _name_beam_mistake(c, src, got, want, label, k, alpha, max_len=3, otherwise=None):
    __tracebackhide__ = True
    if END in got[:-1]:
        fail(f"{label} wrote {got}, expected {want}: {EOS_NOT_STOPPING.message}", mistake=EOS_NOT_STOPPING.id)
    for mistake, kind in ((LENGTH_PENALTY_IGNORED, "no_penalty"), (FIRST_FINISHED, "first_finished"),
                          (BEAM_NOT_SORTED, "not_sorted"), (EOS_NOT_STOPPING, "no_stop")):
        if _trusted_beam(c, src, max_len, k, alpha, kind) == got:
            fail(f"{label} wrote {got}, expected {want}: {mistake.message}", mistake=mistake.id)
    if otherwise is not None:
        fail(otherwise)
    fail(f"{label} wrote {got}, expected {want}.", mistake="values_differ")


def check_decoding(greedy_decode, beam_search, Transformer) -> None:
    """Visible tests for exercise 5. ``greedy_decode(model, src, max_len)`` -> (B, max_len) int64;
    ``beam_search(model, src, max_len, beam_size, alpha=0.6)`` -> (tokens, score) for one sentence.
    Run on your Transformer holding random weights; the expected tokens come from nn.Transformer
    holding the same weights."""
    __tracebackhide__ = True
    try:
        count = on_devices([_check_greedy], greedy_decode, Transformer) + \
            on_devices([_check_beam], beam_search, Transformer)
    except CheckFailure as exc:
        _blame_model(exc, Transformer, "decoding")
        raise
    passed("greedy_decode and beam_search", count)


# --------------------------------------------------------------------------------------------
# Exercise 6: the trained model
# --------------------------------------------------------------------------------------------

#: The trained model's sizes (fixed by the exercise, so that its weights load anywhere) and the
#: exact match it must reach on held-out test sentences it never saw.
TRAINED = {"num_layers": 1, "d_model": 32, "num_heads": 4, "d_ff": 64, "norm_first": False}
THRESHOLD = 0.6
NOT_TRAINED = Mistake("model_not_trained_enough", "the trained model translates {right} of {n} held-out test "
                      "sentences exactly ({share:.0%}); at least {need:.0%} is expected. Run the training cell to "
                      "the end with your train_step (and check exercises 1-4 first), then this cell.")
MODEL_NOT_A_MODULE = Mistake("model_not_a_module", "`model` is not a torch.nn.Module: the training cell leaves the "
                             "trained Transformer in `model`; do not reassign the name after it.")


def held_out(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` test sentence pairs with held-out (noun, adjective) pairs, none of the notebook's
    (the notebook's splits use seed 0 and 1; graders use others)."""
    data = toy_language.splits(n_train=20000, n_val=500, n_test=0)
    seen = {s for s, _ in data["train"] + data["val"]}
    return toy_language.held_out_pairs(n, seed, exclude=seen)


def exact_match(predicted: list[str], pairs) -> int:
    return sum(p == t for p, (_, t) in zip(predicted, pairs))


def _expect_model(model) -> None:
    __tracebackhide__ = True
    if model is None or type(model).__name__ == "_Missing":
        fail("`model` is not defined: run the training cell (it needs exercises 1-5), which leaves the trained "
             "Transformer in `model`, then this cell.", mistake="not_implemented")
    if not isinstance(model, nn.Module):
        fail(MODEL_NOT_A_MODULE)


def _check_trained(model, device) -> int:
    __tracebackhide__ = True
    _expect_model(model)
    what = "the trained model"
    c = _trained_weights(model, what, device)
    vocab = toy_language.Vocab(toy_language.vocabulary())
    if c["embed"].shape[0] != len(vocab) or c["embed"].shape[1] != TRAINED["d_model"]:
        fail(f"{what} should have a ({len(vocab)}, {TRAINED['d_model']}) embedding (the shared vocabulary, the "
             f"exercise's d_model), not {tuple(c['embed'].shape)}.", mistake="wrong_parameter_shape")
    pairs = held_out(200, seed=2024)
    src = toy_language.pad([vocab.encode(s) for s, _ in pairs]).to(device)
    out = trusted_greedy(c, TRAINED["num_heads"], TRAINED["norm_first"], src, 14)
    right = exact_match([vocab.decode(o) for o in out], pairs)
    if right < THRESHOLD * len(pairs):
        fail(NOT_TRAINED, right=right, n=len(pairs), share=right / len(pairs), need=THRESHOLD)
    print(f"the trained model translates {right} of {len(pairs)} held-out sentences exactly (nn.Transformer with "
          f"its weights, greedy decoding)")
    return 2


def check_trained_model(model) -> None:
    """Visible tests for exercise 6: ``model``'s weights, run by nn.Transformer with greedy decoding,
    translate at least 60 % of 200 held-out sentences exactly."""
    __tracebackhide__ = True
    passed("the trained model", _check_trained(model, "cpu"))


def _trained_weights(model, what: str, device) -> dict:
    """The canonical weights of a trained model of the exercise's sizes, read from ``state_dict()``
    (the weights as the test found them; a tied generator shares the embedding's entry)."""
    __tracebackhide__ = True
    names = model_names(model, TRAINED["num_layers"], TRAINED["norm_first"], what)
    state = model.state_dict()
    missing = [v for v in names.values() if v not in state]
    if missing:
        fail(f"{what}'s state_dict() lacks {missing}.", mistake="wrong_parameters")
    return {k: state[v].detach().to(device=device, dtype=torch.float32).clone() for k, v in names.items()}


# --------------------------------------------------------------------------------------------
# Hidden tests: the student's code against the reference, weights matched by role
# --------------------------------------------------------------------------------------------

def _twins(Transformer, RefTransformer, sizes: dict, seed: int, device, dtype):
    """The student's and the reference's Transformer of ``sizes`` holding the same random weights."""
    __tracebackhide__ = True
    m, names, c, what = _build_model(Transformer, device, dtype, seed, vocab=sizes["vocab"], layers=sizes["layers"],
                                     d=sizes["d"], heads=sizes["heads"], d_ff=sizes["d_ff"],
                                     norm_first=sizes.get("norm_first", False), scale=sizes.get("scale", 1.0))
    ref = RefTransformer(sizes["vocab"], sizes["layers"], sizes["d"], sizes["heads"], sizes["d_ff"], 0.0, 32,
                         sizes.get("norm_first", False)).to(device=device, dtype=dtype).eval()
    ref_names = model_names(ref, sizes["layers"], sizes.get("norm_first", False), "the reference")
    with torch.no_grad():
        own = dict(ref.named_parameters())
        for k, t in c.items():
            own[ref_names[k]].copy_(t)
    return m, ref, c, what


def compare_model_with_reference(Transformer, RefTransformer, sizes: dict, seed: int) -> int:
    """Logits (float32, float64) and float64 gradients of every parameter against the reference's."""
    __tracebackhide__ = True
    n = 0
    for device in devices():
        for dtype in (torch.float32, torch.float64):
            m, ref, c, what = _twins(Transformer, RefTransformer, sizes, seed, device, dtype)
            src, tgt_in, src_mask, tgt_mask = _batch(device, seed, vocab=sizes["vocab"], src_lengths=(7, 2),
                                                     tgt_lengths=(4, 6))
            label = f"{what} (hidden, {dtype}, {device})"
            got = call(m, src, tgt_in, src_mask, tgt_mask, what=label)
            want = ref(src, tgt_in, src_mask, tgt_mask)
            expect_tensor(got, label, shape=want.shape, dtype=dtype, device=device)
            expect_close(got, want.detach(), label, dtype=_F32)
            if dtype == torch.float64:
                ref_params = dict(ref.named_parameters())
                ref_names = model_names(ref, sizes["layers"], sizes.get("norm_first", False), "the reference")
                expect_grads_close(got, want, c, {k: ref_params[ref_names[k]] for k in c}, f"the logits of {label}",
                                   seed=seed, dtype=_F32)
            n += 1
    return n


def compare_training_with_reference(train_steps, Transformer, LabelSmoothingLoss, ref, seed: int, warmup: int,
                                    factor: float) -> int:
    """Four training steps of the student's code and of the reference's from the same weights."""
    __tracebackhide__ = True
    sizes = dict(vocab=_V, layers=1, d=8, heads=2, d_ff=16)
    n = 0
    for device in devices():
        m, twin, _, what = _twins(Transformer, ref.Transformer, sizes, seed, device, torch.float64)
        batches = _train_batches(device, seed)
        label = f"train_steps on {what} (hidden, warmup={warmup}, factor={factor}, {device})"
        got = call(train_steps, m, batches, call(LabelSmoothingLoss, 0.1, PAD, what="LabelSmoothingLoss(0.1, PAD)"),
                   warmup, factor, what=label)
        want = ref.train_steps(twin, batches, ref.LabelSmoothingLoss(0.1, PAD), warmup, factor)
        if not isinstance(got, (list, tuple)) or len(got) != len(want) or not all(
                isinstance(v, (int, float)) and math.isclose(v, w, rel_tol=1e-5, abs_tol=1e-7)
                for v, w in zip(got, want)):
            fail(f"{label}: the losses are {got!r:.300}, expected {_fmt(want)}.", mistake="values_differ")
        n += 1
    return n


def compare_decoding_with_reference(greedy_decode, beam_search, Transformer, ref, seeds) -> int:
    """Greedy decoding of a padded batch and beam search (widths 1, 2, 5) against the reference's."""
    __tracebackhide__ = True
    sizes = dict(vocab=_DV + 2, layers=2, d=8, heads=2, d_ff=16, scale=2.5)
    n = 0
    for device in devices():
        for seed in seeds:
            m, twin, _, what = _twins(Transformer, ref.Transformer, sizes, seed, device, torch.float64)
            src = _sources(device, seed, (6, 2, 4))
            label = f"greedy_decode(model, src, 7) on {what} (hidden, {device})"
            got = expect_tensor(call(greedy_decode, m, src, 7, what=label), label, device=device)
            want = ref.greedy_decode(twin, src, 7)
            got = torch.cat([got, torch.full((got.shape[0], 7 - got.shape[1]), PAD, dtype=got.dtype, device=device)],
                            1) if got.dim() == 2 and got.shape[1] <= 7 else got
            if not torch.equal(got, want):
                fail(f"{label} wrote {got.tolist()}, expected {want.tolist()}.", mistake="values_differ")
            for k in (1, 2, 5):
                one = src[:1]
                label = f"beam_search(model, src, 5, {k}) on {what} (hidden, {device})"
                tokens, score = _tokens(call(beam_search, m, one, 5, k, 0.6, what=label), label)
                want_tokens, want_score = ref.beam_search(twin, one, 5, k, 0.6)
                if tokens != want_tokens.tolist() or not math.isclose(score, float(want_score), rel_tol=1e-6):
                    fail(f"{label} wrote {tokens} (score {score:.6g}), expected {want_tokens.tolist()} (score "
                         f"{float(want_score):.6g}).", mistake="values_differ")
                n += 1
    return n


def grade_trained_with_reference(model, ref, seed: int, n: int = 300) -> None:
    """The trained model's weights (``state_dict()``) in the reference's Transformer, the reference's
    greedy decoding on ``n`` held-out sentences drawn with ``seed``: at least THRESHOLD exactly right."""
    __tracebackhide__ = True
    _expect_model(model)
    c = _trained_weights(model, "the trained model", "cpu")
    vocab = toy_language.Vocab(toy_language.vocabulary())
    twin = ref.Transformer(len(vocab), TRAINED["num_layers"], TRAINED["d_model"], TRAINED["num_heads"],
                           TRAINED["d_ff"], 0.0, 64, TRAINED["norm_first"]).eval()
    ref_names = model_names(twin, TRAINED["num_layers"], TRAINED["norm_first"], "the reference")
    if c["embed"].shape != dict(twin.named_parameters())[ref_names["embed"]].shape:
        fail(f"the trained model's embedding has shape {tuple(c['embed'].shape)}, expected ({len(vocab)}, "
             f"{TRAINED['d_model']}).", mistake="wrong_parameter_shape")
    twin.load_state_dict({**twin.state_dict(), **{ref_names[k]: t for k, t in c.items()}})
    pairs = held_out(n, seed)
    src = toy_language.pad([vocab.encode(s) for s, _ in pairs])
    with torch.no_grad():
        out = ref.greedy_decode(twin, src, 14)
    right = exact_match([vocab.decode(o) for o in out], pairs)
    if right < THRESHOLD * n:
        fail(NOT_TRAINED, right=right, n=n, share=right / n, need=THRESHOLD)
