"""Chapter 7 corpus: the whole Transformer. Honest submissions written differently from the reference
(the generator tied before the initialisation, logits by F.linear, a loss from an explicit smoothed
distribution or from logsumexp, the schedule in two branches, zero_grad through the model, a greedy
loop that stops when every sentence has ended, beam search with heapq) must get full marks on what
they run; the classic mistakes get exactly the points their working exercises deserve (training and
decoding built on a failing model, loss or schedule fail too, and the message names the culprit); a
model that was never trained, or trained in the wrong direction, gets no points for exercise 6,
and neither does one whose own answers are looked up from the data module while its weights are
untrained.

Every submission pastes its own chapter 3-6 modules (from those chapters' corpora) into the four
paste cells. The training cell is locked: nbgrader restores it as released in every submission it
grades (a student cannot change or delete it), so the cases that go through nbgrader keep it, and a
model is left untrained or trained the wrong way by the student's own code (a train_step, a cell
added after the training). Cases graded by the fast tier only may delete it to save its 15-20 s
(exercise 6 then gets 0: no `model`), as stated per case.
"""
from __future__ import annotations


from .ch04 import EMB_FUNCTIONAL, PE_PERSISTENT_FUNCTIONAL, SIN_EXP_LOG
from .ch05 import swap
from .ch06 import DECODER_DEEPCOPY, ENCODER_PASTE, INPUTS_ROLL, LAYER_NO_CAUSAL, LAYER_SUBLAYERS, MHA_PASTE
from .common import Case, answers, delete, drop_narrative_code, insert, reference_answers, then, tiers

EXERCISES = ("transformer_tests", "loss_tests", "rate_tests", "train_step_tests", "decode_tests",
             "trained_model_tests")
FULL = dict(zip(EXERCISES, (5.0, 3.0, 2.0, 3.0, 4.0, 3.0)))
ZERO = {k: 0.0 for k in FULL}


def without(*zeroed: str) -> dict:
    """Full marks except the named test cells (transformer, loss, rate, train_step, decode, trained_model)."""
    return {k: 0.0 if k[:-len("_tests")] in zeroed else v for k, v in FULL.items()}


# ---- the pastes ---------------------------------------------------------------------------------

POSITIONS_PASTE = "\n".join([SIN_EXP_LOG, PE_PERSISTENT_FUNCTIONAL, EMB_FUNCTIONAL])
DECODER_PASTE = "\n".join([LAYER_SUBLAYERS, DECODER_DEEPCOPY, INPUTS_ROLL])
DECODER_PASTE_NO_CAUSAL = "\n".join([LAYER_NO_CAUSAL, DECODER_DEEPCOPY, INPUTS_ROLL])
PASTES = dict(mha_from_ch03=MHA_PASTE, positions_from_ch04=POSITIONS_PASTE, encoder_from_ch05=ENCODER_PASTE,
              decoder_from_ch06=DECODER_PASTE)

# ---- exercise 1, written differently ------------------------------------------------------------

MODEL_TIED_FIRST = '''
class Transformer(nn.Module):
    def __init__(self, vocab_size, num_layers=2, d_model=64, num_heads=4, d_ff=256, dropout=0.1, max_len=64,
                 norm_first=False):
        super().__init__()
        self.embed = Embeddings(vocab_size, d_model)
        self.generator = nn.Linear(d_model, vocab_size)
        self.generator.weight = self.embed.embedding.weight          # tied first
        self.pos = PositionalEncoding(d_model, max_len=max_len, dropout=dropout)
        self.encoder = Encoder(num_layers, d_model, num_heads, d_ff, dropout=dropout, norm_first=norm_first)
        self.decoder = Decoder(num_layers, d_model, num_heads, d_ff, dropout=dropout, norm_first=norm_first)
        shared = self.embed.embedding.weight
        for p in self.parameters():
            if p is shared:
                nn.init.normal_(p, 0.0, d_model ** -0.5)
            elif p.dim() == 2:
                nn.init.xavier_uniform_(p)
        self.generator.bias.data.zero_()
        self.d_model = d_model

    def encode(self, src, src_mask):
        return self.encoder(self.pos(self.embed(src)), src_mask)

    def decode(self, memory, src_mask, tgt_in, tgt_mask):
        h = self.decoder(self.pos(self.embed(tgt_in)), memory, tgt_mask=tgt_mask, memory_mask=src_mask)
        return F.linear(h, self.generator.weight, self.generator.bias)

    def forward(self, src, tgt_in, src_mask=None, tgt_mask=None):
        return self.decode(self.encode(src, src_mask), src_mask, tgt_in, tgt_mask)
'''

MODEL_NOT_TIED = swap(MODEL_TIED_FIRST, "        self.generator.weight = self.embed.embedding.weight          # tied first\n",
                      "")

# ---- exercise 2 ---------------------------------------------------------------------------------

LOSS_EXPLICIT_Q = '''
class LabelSmoothingLoss(nn.Module):
    """The smoothed target distribution written out."""
    def __init__(self, smoothing, pad_id):
        super().__init__()
        self.s, self.pad = smoothing, pad_id

    def forward(self, logits, target):
        log_p = torch.log_softmax(logits, -1)
        q = F.one_hot(target, logits.shape[-1]).to(log_p.dtype) * (1 - self.s) + self.s / logits.shape[-1]
        per_token = -(q * log_p).sum(-1)
        return per_token[target != self.pad].mean()
'''

LOSS_LOGSUMEXP = '''
class LabelSmoothingLoss(nn.Module):
    def __init__(self, smoothing, pad_id):
        super().__init__()
        self.smoothing, self.pad_id = smoothing, pad_id

    def forward(self, logits, target):
        z, t = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
        lse = torch.logsumexp(z, -1)
        nll = lse - z.gather(1, t[:, None])[:, 0]
        keep = (t != self.pad_id).to(z.dtype)
        return (((1 - self.smoothing) * nll + self.smoothing * (lse - z.mean(-1))) * keep).sum() / keep.sum()
'''

LOSS_SMOOTHING_ON_PAD = '''
class LabelSmoothingLoss(nn.Module):
    def __init__(self, smoothing, pad_id):
        super().__init__()
        self.smoothing, self.pad_id = smoothing, pad_id

    def forward(self, logits, target):
        log_p = torch.log_softmax(logits, -1)
        real = target != self.pad_id
        nll = -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return ((1 - self.smoothing) * nll[real].sum() + (self.smoothing * -log_p.mean(-1)).sum()) / real.sum()
'''

# ---- exercise 3 ---------------------------------------------------------------------------------

RATE_BRANCHES = '''
def rate(step, d_model, warmup, factor=1.0):
    if step < warmup:
        return factor * step / (warmup ** 1.5 * d_model ** 0.5)
    return factor / math.sqrt(d_model * step)
'''

RATE_NO_WARMUP = '''
def rate(step, d_model, warmup, factor=1.0):
    return factor * d_model ** -0.5 * step ** -0.5
'''

# ---- exercise 4 (the given make_optimizer and train_steps kept) --------------------------------

STEP_GIVEN = reference_answers("ch07_translation")["train_step_answer"].split("def make_optimizer", 1)[1]
STEP_GIVEN = "def make_optimizer" + STEP_GIVEN

STEP_SET_TO_NONE = '''
def train_step(model, batch, optimizer, scheduler, criterion):
    src, tgt = batch
    model.zero_grad(set_to_none=True)
    model.train(True)
    tgt_in = shift_right(tgt, start_id=START, pad_id=PAD)
    loss = criterion(model(src, tgt_in, src_mask=(src != PAD).unsqueeze(1), tgt_mask=target_mask(tgt_in, PAD)), tgt)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach().item()


''' + STEP_GIVEN

STEP_NO_SHIFT = swap(STEP_SET_TO_NONE, "    tgt_in = shift_right(tgt, start_id=START, pad_id=PAD)\n", "    tgt_in = tgt\n")
# Reads the batch backwards: the model learns to translate English into Lingo.
STEP_WRONG_DIRECTION = swap(STEP_SET_TO_NONE, "    src, tgt = batch\n", "    tgt, src = batch\n")

# ---- exercise 5 ---------------------------------------------------------------------------------

DECODE_HEAP = '''
import heapq


def greedy_decode(model, src, max_len):
    mask = (src != PAD)[:, None, :]
    memory = model.encode(src, mask)
    written = torch.full((src.shape[0], 1), START, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        token = model.decode(memory, mask, written, target_mask(written, PAD))[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, PAD), token)
        written = torch.cat([written, token[:, None]], 1)
        done = done | (token == END)
        if bool(done.all()):
            break                                # every sentence has ended: fewer columns
    return written[:, 1:]


def beam_search(model, src, max_len, beam_size, alpha=0.6):
    mask = (src != PAD)[:, None, :]
    memory = model.encode(src, mask)
    live, finished = [(0.0, [START])], []
    for _ in range(max_len):
        if not live:
            break
        prefixes = torch.tensor([h for _, h in live], device=src.device)
        log_p = torch.log_softmax(model.decode(memory.expand(len(live), -1, -1), mask, prefixes,
                                               target_mask(prefixes, PAD))[:, -1], -1).tolist()
        candidates = [(s + lp, h + [tok]) for (s, h), row in zip(live, log_p) for tok, lp in enumerate(row)]
        best = heapq.nlargest(beam_size, candidates, key=lambda c: c[0])
        finished += [c for c in best if c[1][-1] == END]
        live = [c for c in best if c[1][-1] != END]
    finished += live
    penalty = lambda c: ((5 + len(c[1]) - 1) / 6) ** alpha  # noqa: E731
    score, tokens = max(finished, key=lambda c: c[0] / penalty(c))
    return torch.tensor(tokens[1:], device=src.device), score / penalty((score, tokens))
'''

DECODE_AFTER_END = swap(DECODE_HEAP, '''        token = torch.where(done, torch.full_like(token, PAD), token)
''', "")

# ---- exercise 6: cells added after the training cell -------------------------------------------

UNTRAINED = '''
model = Transformer(len(Vocab(toy_language.vocabulary())), 1, 32, 4, 64, 0.0, 64).eval()
'''

# An untrained model whose own methods translate perfectly, by looking the sentences up in the
# data module: its answers are right, its weights are not.
LOOKUP_CHEAT = UNTRAINED + '''
_table = {}
for _split in toy_language.splits().values():
    for _s, _t in _split:
        _table[tuple(Vocab(toy_language.vocabulary()).encode(_s))] = Vocab(toy_language.vocabulary()).encode(_t)


def _cheat_greedy(src, max_len):
    out = torch.full((src.shape[0], max_len), PAD, dtype=torch.long)
    for i, row in enumerate(src.tolist()):
        ids = _table.get(tuple(t for t in row if t != PAD), [END])[:max_len]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


model.translate = _cheat_greedy
'''


def ok(**overrides):
    return answers(**{**PASTES, "transformer_answer": MODEL_TIED_FIRST, "loss_answer": LOSS_EXPLICIT_Q,
                      "rate_answer": RATE_BRANCHES, "train_step_answer": STEP_SET_TO_NONE,
                      "decode_answer": DECODE_HEAP, **overrides})


def quick(*edits):
    """Drop the demo cells and the training cell (fast tier only: exercise 6 then gets 0)."""
    return then(drop_narrative_code, *edits, delete("train_translator"))


def trained(*edits, after_training: str | None = None):
    """Drop the demo cells, keep the training cell (it runs, 15-20 s), add a cell after it if given."""
    more = [insert(after_training, after="train_translator")] if after_training is not None else []
    return then(drop_narrative_code, *edits, *more)


def reference_with_pastes(nb):
    return answers(**{**reference_answers("ch07_translation"), **PASTES})(nb)


CASES = [
    # ---------------------------------------------------------------- honest
    Case("reference_full_narrative", FULL, reference_with_pastes,
         note="the source notebook's own answers, the narrative kept (figures, demos, the training cell)"),
    Case("honest_tied_first_explicit_q_heap", without("trained_model"), quick(ok()),
         note="fast tier only, training cell deleted: exercise 6 gets 0"),
    Case("honest_logsumexp_reference_rest", without("trained_model"),
         quick(ok(loss_answer=LOSS_LOGSUMEXP,
                  transformer_answer=reference_answers("ch07_translation")["transformer_answer"])),
         note="fast tier only, training cell deleted: exercise 6 gets 0"),

    # ---------------------------------------------------------------- nothing done, nothing trained
    Case("untouched_release", ZERO, lambda nb: nb),
    Case("model_never_trained", without("trained_model"),
         then(drop_narrative_code, ok(), insert(UNTRAINED, after="train_translator"), delete("train_translator")),
         note="a cell after the training cell replaces the model by an untrained one of the right sizes"),
    Case("model_trained_in_the_wrong_direction", without("train_step", "trained_model"),
         trained(ok(train_step_answer=STEP_WRONG_DIRECTION)),
         note="train_step reads (tgt, src): the training cell trains English to Lingo; the weights load, "
              "the translations are wrong"),

    # ---------------------------------------------------------------- the pastes
    Case("pasted_decoder_without_causal_mask", without("transformer", "train_step", "decode", "trained_model"),
         quick(ok(decoder_from_ch06=DECODER_PASTE_NO_CAUSAL))),

    # ---------------------------------------------------------------- mistakes (later exercises use them)
    Case("generator_not_tied", without("transformer", "train_step", "decode", "trained_model"),
         quick(ok(transformer_answer=MODEL_NOT_TIED))),
    Case("smoothing_mass_on_pad", without("loss", "train_step", "trained_model"),
         quick(ok(loss_answer=LOSS_SMOOTHING_ON_PAD))),
    Case("warmup_missing", without("rate", "train_step", "trained_model"), quick(ok(rate_answer=RATE_NO_WARMUP))),
    Case("no_shift_right", without("train_step", "trained_model"), quick(ok(train_step_answer=STEP_NO_SHIFT))),
    Case("greedy_continues_after_end", without("decode", "trained_model"),
         quick(ok(decode_answer=DECODE_AFTER_END))),

    # ---------------------------------------------------------------- answers from the model's own methods
    Case("lookup_model_untrained_weights", without("trained_model"),
         then(drop_narrative_code, ok(), insert(LOOKUP_CHEAT, after="train_translator"), delete("train_translator")),
         note="untrained weights, but its translate() looks every answer up: the grader reads the weights, "
              "never the model's own answers"),
]

# Graded through nbgrader: the reference (it trains there, ~40 s; not again in the fast tier, as
# tests/test_chapters.py trains the reference in-process) and the blank release, in both tiers.
# The module attacks (changing itself between calls, never returning) are chapters 4-6's hostile
# cases and tests/test_seam.py's; a graded trained model goes through the sandbox in test_seam too.
tiers(CASES, full={"untouched_release"}, full_only={"reference_full_narrative"})
