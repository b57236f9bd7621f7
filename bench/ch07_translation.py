"""Chapter 7's reference Transformer: how fast it learns to translate, its training step against
``nn.Transformer``'s, and greedy against beam decoding.

1. **Training to 99 %.** The reference ``Transformer`` (from ``solutions/``), larger than the
   chapter's (d_model 64, one encoder and one decoder layer, 4 heads, d_ff 128), trained with the
   reference's ``train_step`` (label smoothing 0.1, Adam, warmup 200) on the chapter's data, on
   ``--threads`` CPU threads; every 100 steps greedy decoding of the 1,000 held-out test
   sentences. Reported: the time (training only, evaluation excluded) and steps until the exact
   match first reaches 99 %, and the exact match at the end (``--seconds`` of training at most).
2. **Step time against nn.Transformer.** The same sizes as an ``nn.Transformer`` (with the same
   shared embedding and output layer around it), one training step (forward, loss, backward, Adam)
   on the same batch: median milliseconds of each and their ratio; and the largest difference of
   the two models' logits in float32 with the reference's weights copied into ``nn.Transformer``.
3. **Decoding.** The trained model: greedy decoding (batched) and beam search of width 4 (one
   sentence at a time) on 200 test sentences: sentences per second and exact match.

The last line holds the figures (JSON).

    python bench/ch07_translation.py [--threads 2] [--seconds 300] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from autograder.checks import toy_language
from autograder.checks.ch07 import model_names, torch_transformer
from autograder.checks.toy_language import PAD, START, Vocab
from autograder.reference import reference

SIZES = dict(num_layers=1, d_model=64, num_heads=4, d_ff=128)


def exact_match(ref, model, src, references, device) -> float:
    vocab = Vocab(toy_language.vocabulary())
    with torch.no_grad():
        out = ref.greedy_decode(model.eval(), src.to(device), 14)
    model.train()
    return sum(vocab.decode(o) == r for o, r in zip(out.cpu(), references)) / len(references)


def train(ref, device, seconds: float) -> dict:
    data, vocab = toy_language.splits(), Vocab(toy_language.vocabulary())
    batches = [(s.to(device), t.to(device))
               for s, t in toy_language.batches(data["train"], vocab, max_tokens=800, shuffle_seed=0)]
    src = toy_language.pad([vocab.encode(s) for s, _ in data["test"]])
    references = [t for _, t in data["test"]]
    torch.manual_seed(0)
    model = ref.Transformer(len(vocab), SIZES["num_layers"], SIZES["d_model"], SIZES["num_heads"], SIZES["d_ff"],
                            0.0, 64).to(device)
    criterion = ref.LabelSmoothingLoss(0.1, PAD)
    optimizer, scheduler = ref.make_optimizer(model, 200)
    trained, step, reached, em = 0.0, 0, None, 0.0
    while trained < seconds:
        start = time.perf_counter()
        for _ in range(100):
            ref.train_step(model, batches[step % len(batches)], optimizer, scheduler, criterion)
            step += 1
        if device == "cuda":
            torch.cuda.synchronize()
        trained += time.perf_counter() - start
        em = exact_match(ref, model, src, references, device)
        print(f"step {step:5d}  {trained:6.1f} s of training  test exact match {em:.1%}", flush=True)
        if reached is None and em >= 0.99:
            reached = {"seconds": round(trained, 1), "steps": step}
            break
    return {"model": model, "reached_99": reached, "final_exact": em, "steps": step, "seconds": round(trained, 1)}


def step_time(ref, device, reps: int = 30) -> dict:
    """Median ms per training step, the reference against nn.Transformer of the same sizes."""
    vocab = Vocab(toy_language.vocabulary())
    data = toy_language.splits()
    batches = toy_language.batches(data["train"], vocab, max_tokens=800)
    src, tgt = batches[len(batches) // 2]
    src, tgt = src.to(device), tgt.to(device)
    torch.manual_seed(0)
    ours = ref.Transformer(len(vocab), SIZES["num_layers"], SIZES["d_model"], SIZES["num_heads"], SIZES["d_ff"],
                           0.0, 64).to(device)
    names = model_names(ours, SIZES["num_layers"], False, "the reference")
    params = dict(ours.named_parameters())
    theirs = {k: params[v].detach().clone().requires_grad_() for k, v in names.items()}
    tgt_in = ref.shift_right(tgt, START, PAD)
    src_mask, tgt_mask = (src != PAD)[:, None, :], ref.target_mask(tgt_in, PAD)
    with torch.no_grad():
        diff = (ours.eval()(src, tgt_in, src_mask, tgt_mask)
                - torch_transformer(theirs, SIZES["num_heads"], False, src, tgt_in, src_mask, tgt_mask)).abs().max()
    ours.train()
    criterion = ref.LabelSmoothingLoss(0.1, PAD)
    opt_ours, sched = ref.make_optimizer(ours, 200)
    opt_theirs = torch.optim.Adam(list(theirs.values()), lr=1e-3, betas=(0.9, 0.98), eps=1e-9)

    def theirs_step():
        logits = torch_transformer(theirs, SIZES["num_heads"], False, src, tgt_in, src_mask, tgt_mask)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), label_smoothing=0.1,
                               ignore_index=PAD)
        opt_theirs.zero_grad()
        loss.backward()
        opt_theirs.step()

    def timed(fn):
        out = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - start)
        return 1000 * statistics.median(out)

    ms_ours = timed(lambda: ref.train_step(ours, (src, tgt), opt_ours, sched, criterion))
    ms_theirs = timed(theirs_step)
    return {"ms_reference": round(ms_ours, 2), "ms_nn_transformer": round(ms_theirs, 2),
            "ratio": round(ms_ours / ms_theirs, 2), "forward_max_abs_diff_float32": float(diff)}


def decoding(ref, model, device, n: int = 200) -> dict:
    data, vocab = toy_language.splits(), Vocab(toy_language.vocabulary())
    pairs = data["test"][:n]
    src = toy_language.pad([vocab.encode(s) for s, _ in pairs]).to(device)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        greedy = [vocab.decode(o) for o in ref.greedy_decode(model, src, 14).cpu()]
    greedy_s = time.perf_counter() - start
    start = time.perf_counter()
    beam = []
    with torch.no_grad():
        for i in range(n):
            one = src[i:i + 1, :int((src[i] != PAD).sum())]
            beam.append(vocab.decode(ref.beam_search(model, one, 14, 4)[0].cpu()))
    beam_s = time.perf_counter() - start
    right = [t for _, t in pairs]
    return {"greedy_sentences_per_s": round(n / greedy_s, 1), "beam4_sentences_per_s": round(n / beam_s, 1),
            "greedy_exact": sum(a == b for a, b in zip(greedy, right)) / n,
            "beam4_exact": sum(a == b for a, b in zip(beam, right)) / n}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = reference("ch07_translation")
    result = train(ref, args.device, args.seconds)
    figures = {"device": args.device, "threads": args.threads, "sizes": SIZES,
               "reached_99_percent": result["reached_99"], "final_test_exact": result["final_exact"],
               "steps": result["steps"], "training_seconds": result["seconds"],
               **step_time(ref, args.device), **decoding(ref, result["model"], args.device)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
