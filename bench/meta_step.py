"""Time and peak memory of one meta-step per method, on the same inputs.

Methods: metaicl, fomaml, maml_en_llm with an SGD inner loop, maml_en_llm with an AdamW inner loop and
shared moments. Models: a 4-layer GPT-2 with the full 50257-token vocabulary (random weights) and
SmolLM2-135M. n=2 tasks, K=1, support and query of one 256-token sequence each (the last 16 tokens
scored). Each (model, method) runs in two fresh processes, both after a 16-token warm-up step: one
times `--repeats` steps with the default allocator (the median is reported), the other measures peak
memory as the maximum RSS minus the RSS just before one step, with glibc's mmap threshold at 64 KiB
so that RSS follows the live tensors (see `bench/common.py`).

    python -m bench.meta_step [--models tiny_gpt2,smollm2] [--tokens 256] [--repeats 3] [--out bench/results/meta_step.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

METHODS = {
    "metaicl": ["method=metaicl"],
    "fomaml": ["method=fomaml", "inner.optimizer=adamw", "moment_policy=shared"],
    "maml_en_llm_sgd": ["method=maml_en_llm", "inner.optimizer=sgd", "moment_policy=none"],
    "maml_en_llm_adamw_shared": ["method=maml_en_llm", "inner.optimizer=adamw", "moment_policy=shared"],
}


def one(model_name: str, method: str, tokens: int, threads: int | None, measure: str, repeats: int) -> dict:
    import torch

    from bench.common import bench_model, measure_step
    from raymeta.config import load_config
    from raymeta.core.lm import Batch
    from raymeta.core.meta import MetaLearner, TaskBatch

    if threads:
        torch.set_num_threads(threads)
    model = bench_model(model_name)
    vocab = model.config.vocab_size
    cfg = load_config(None, [*METHODS[method], "tasks_per_step=2", "inner.steps=1", "inner.lr=1e-5", "outer.lr=1e-5"])
    learner = MetaLearner(model, cfg.meta)

    def batch(seed: int, length: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        return Batch(torch.randint(0, vocab, (1, length), generator=g), ((length - min(16, length - 1), length),))

    def tasks(length: int) -> list[TaskBatch]:
        return [TaskBatch(f"t{i}", batch(2 * i, length), batch(2 * i + 1, length)) for i in range(2)]

    learner.step(tasks(16))  # warm-up: first-call overheads out of the timing
    # each timed step updates the weights: the later steps see slightly different ones
    measured, metrics = measure_step(lambda: learner.step(tasks(tokens)), measure, repeats)
    if measure == "memory":
        return measured
    return {
        "model": model_name,
        "method": method,
        "params_millions": sum(p.numel() for p in model.parameters()) / 1e6,
        **measured,
        "meta_loss": metrics.query_loss,
        "grad_norm": metrics.grad_norm,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny_gpt2,smollm2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per method (the median is reported)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/meta_step.json"))
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "METHOD", "MEASURE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one[:2], args.tokens, args.threads, args.one[2], args.repeats)))
        return

    from bench.common import environment, memory_env, memory_measurement
    from raymeta.io import atomic_write_json

    rows = []
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            cmd = [sys.executable, "-m", "bench.meta_step", "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            row = {}
            for measure, env in (("time", None), ("memory", memory_env())):
                one_cmd = [*cmd, "--one", model_name, method, measure]
                proc = subprocess.run(one_cmd, capture_output=True, text=True, check=True, env=env)
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows.append(row)
            print(f"{model_name:10s} {method:26s} {row['seconds']:8.2f} s  peak +{row['peak_extra_mib']:8.0f} MiB")
    ratios = {}
    for model_name in args.models.split(","):
        by = {r["method"]: r for r in rows if r["model"] == model_name}
        if "fomaml" in by:
            ratios[model_name] = {
                f"{m}/fomaml": {
                    "time": by[m]["seconds"] / by["fomaml"]["seconds"],
                    "peak_memory": by[m]["peak_extra_mib"] / by["fomaml"]["peak_extra_mib"],
                }
                for m in by
                if m.startswith("maml_en_llm")
            }
    result = {
        "benchmark": "meta_step",
        **environment(),
        "tasks": 2,
        "inner_steps": 1,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "memory_measurement": memory_measurement(),
        "rows": rows,
        "ratios": ratios,
    }
    atomic_write_json(args.out, result)
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
