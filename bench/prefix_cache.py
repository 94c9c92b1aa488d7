"""Option scoring on SmolLM2-135M: naive vs prefix-cached one test example at a time vs batched test examples.

For each k and prompt variant: the test examples of one (task, seed) of a 4-option task (multiemo
hotels sentences, 4-way sentiment) scored three ways, with identical predictions checked:
- `naive`: every (example, option) sequence in full (optional, `--naive`: slow);
- `per_example`: the demonstrations' keys/values cached once, one test example per forward pass (the
  scorer before batching; sequences of their own, as with channel prompts, were already batched);
- `batched`: many test examples per forward pass on the expanded cache, within `max_batch_tokens`.
Prints and saves JSON (bench/results/prefix_cache.json by default).

    python -m bench.prefix_cache [--ks 4 16] [--variants direct channel] [--n 50] [--threads 2] [--naive]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import environment
from raymeta.data import open_data
from raymeta.data.prompts import PromptBuilder, PromptFormat, default_max_length
from raymeta.eval.icl import predictions_from_losses
from raymeta.eval.scoring import OptionScorer
from raymeta.infra.io import atomic_write_json
from raymeta.model.load import load_model, load_tokenizer


def _case(model: Any, tokenizer: Any, data: Any, args: argparse.Namespace, k: int, variant: str) -> dict[str, Any]:
    demos = data.demonstrations(args.task, k, args.seed)
    tests = data.test_examples(args.task, k, args.seed)[: args.n]
    builder = PromptBuilder(tokenizer, PromptFormat(variant, 256, default_max_length(k, 256)))  # type: ignore[arg-type]
    prefix = builder.demonstrations(demos)
    seqs = [s for ex in tests for s in builder.test_sequences(ex, prefix)]
    ways = {"per_example": {"batch_examples": False}, "batched": {"batch_examples": True}}
    if args.naive:
        ways["naive"] = {"prefix_cache": False}
    timings, losses = {}, {}
    for name, kw in ways.items():
        scorer = OptionScorer(model, max_length=builder.fmt.max_length, max_batch_tokens=args.max_batch_tokens, **kw)
        start = time.perf_counter()
        losses[name] = scorer.score(seqs)
        timings[name] = time.perf_counter() - start
        print(f"k={k} {variant} {name}: {timings[name]:.2f} s", flush=True)
    preds = {name: predictions_from_losses(tests, ls) for name, ls in losses.items()}
    ref = losses["per_example"]
    return {
        "k": k,
        "variant": variant,
        "n_test_examples": len(tests),
        "n_sequences": len(seqs),
        "n_sequences_needing_truncation": sum(s.needs_truncation(builder.fmt.max_length) for s in seqs),
        "prefix_tokens": len(prefix),
        "mean_continuation_tokens": sum(len(s.context) + len(s.target) for s in seqs) / len(seqs),
        "seconds": timings,
        "speedup_batched_vs_per_example": timings["per_example"] / timings["batched"],
        **({"speedup_batched_vs_naive": timings["naive"] / timings["batched"]} if args.naive else {}),
        "identical_predictions": all(p == preds["per_example"] for p in preds.values()),
        "max_abs_loss_difference": max(abs(a - b) for ls in losses.values() for a, b in zip(ls, ref)),
        "accuracy": sum(p == ex.output for p, ex in zip(preds["batched"], tests)) / len(tests),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="multiemo-hotels_sentence_en")
    ap.add_argument("--n", type=int, default=50, help="test examples")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--variants", nargs="+", default=["direct", "channel"])
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--naive", action="store_true", help="also time naive scoring (slow)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results/prefix_cache.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = open_data(None)
    tokenizer, model = load_tokenizer("builtin"), load_model("builtin")
    _case(model, tokenizer, data, args, args.ks[0], args.variants[0])  # warm-up (allocator, kernels)
    cases = [_case(model, tokenizer, data, args, k, v) for k in args.ks for v in args.variants]
    result = {
        "benchmark": "prefix_cache",
        **environment(),
        "model": "SmolLM2-135M-Instruct (fp32)",
        "task": args.task,
        "seed": args.seed,
        "max_batch_tokens": args.max_batch_tokens,
        "cases": cases,
    }
    atomic_write_json(args.out, result)
    keys = ("k", "variant", "seconds", "speedup_batched_vs_per_example", "identical_predictions", "max_abs_loss_difference")
    print(json.dumps([{key: c[key] for key in keys} for c in cases], indent=1))


if __name__ == "__main__":
    main()
