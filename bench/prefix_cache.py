"""Prefix-cached vs naive option scoring on SmolLM2-135M: time and identical predictions.

k=16 demonstrations of a 4-option task (multiemo hotels sentences, 4-way sentiment), 50 test
examples, direct prompts. Prints and saves JSON (bench/results/prefix_cache.json by default).

    python -m bench.prefix_cache [--task multiemo-hotels_sentence_en] [--n 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import environment
from raymeta.data import open_data
from raymeta.data.prompts import PromptBuilder, PromptFormat
from raymeta.eval.icl import predictions_from_losses
from raymeta.eval.scoring import OptionScorer
from raymeta.io import atomic_write_json
from raymeta.models import load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="multiemo-hotels_sentence_en")
    ap.add_argument("--n", type=int, default=50, help="test examples")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--variant", default="direct")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results/prefix_cache.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = open_data(None)
    demos = data.demonstrations(args.task, args.k, args.seed)
    tests = data.test_examples(args.task, args.k, args.seed)[: args.n]
    tokenizer, model = load_tokenizer("builtin"), load_model("builtin")
    builder = PromptBuilder(tokenizer, PromptFormat(args.variant, 256, min(256 * args.k, 1024)))  # type: ignore[arg-type]
    prefix = builder.demonstrations(demos)
    per_example = [builder.test_sequences(ex, prefix) for ex in tests]
    seqs = [s for group in per_example for s in group]
    n_truncated = sum(s.needs_truncation(builder.fmt.max_length) for s in seqs)

    timings, losses = {}, {}
    for name, cached in (("prefix_cached", True), ("naive", False)):
        scorer = OptionScorer(model, max_length=builder.fmt.max_length, prefix_cache=cached)
        start = time.perf_counter()
        losses[name] = scorer.score(seqs)
        timings[name] = time.perf_counter() - start
        print(f"{name}: {timings[name]:.1f} s")

    pred_c, pred_n = predictions_from_losses(tests, losses["prefix_cached"]), predictions_from_losses(tests, losses["naive"])
    result = {
        "benchmark": "prefix_cache",
        **environment(),
        "model": "SmolLM2-135M-Instruct (fp32)",
        "task": args.task,
        "variant": args.variant,
        "k": args.k,
        "seed": args.seed,
        "n_test_examples": len(tests),
        "n_options": len(tests[0].options),
        "n_sequences": len(seqs),
        "n_sequences_needing_truncation": n_truncated,
        "prefix_tokens": len(prefix),
        "mean_continuation_tokens": sum(len(s.context) + len(s.target) for s in seqs) / len(seqs),
        "seconds": timings,
        "speedup": timings["naive"] / timings["prefix_cached"],
        "identical_predictions": pred_c == pred_n,
        "max_abs_loss_difference": max(abs(a - b) for a, b in zip(losses["prefix_cached"], losses["naive"])),
        "accuracy": sum(p == ex.output for p, ex in zip(pred_c, tests)) / len(tests),
    }
    atomic_write_json(args.out, result)
    print(
        json.dumps({k: result[k] for k in ("seconds", "speedup", "identical_predictions", "max_abs_loss_difference")}, indent=2)
    )


if __name__ == "__main__":
    main()
