"""Ray's overhead: one meta-step with the Ray-task executor vs in-process, fit() start-up, report cost.

1. One maml_en_llm meta-step (AdamW inner, shared moments; n=4 tasks, K=1, one 256-token support and
   query sequence each) through `LocalExecutor` and `RayExecutor` on the same inputs, after a warm-up
   step (which loads the model into the Ray worker processes), for SmolLM2-135M and a 4-layer GPT-2.
   On 2 CPUs the local executor runs the 4 tasks one after another on 2 threads; the Ray executor
   runs them as tasks of `cpus_per_task` CPUs each (a task gets one BLAS thread per CPU): with 1 CPU
   two tasks run at once, with 2 CPUs one at a time. Each `--cpus-per-task` value is measured.
2. `TorchTrainer.fit()` on the tiny model: 20 steps with a report every step vs every 20th step
   (the difference / 19 is the cost of one report), and the start-up time (fit time minus steps).

    python -m bench.ray_overhead [--models tiny_gpt2,smollm2] [--cpus-per-task 1,2] [--out bench/results/ray_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def executor_step(name: str, executor_kind: str, tokens: int, cpus_per_task: float) -> float:
    """Seconds of one meta-step through one executor (run in a fresh process: see main)."""
    import ray

    from bench.common import bench_model
    from raymeta.config import load_config
    from raymeta.core.lm import Batch
    from raymeta.core.meta import MetaLearner, TaskBatch
    from raymeta.model.load import resolve_model_dir
    from raymeta.run.executor import LocalExecutor, RayExecutor

    model = bench_model(name)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(resolve_model_dir("builtin")) if name == "smollm2" else tmp
        if name != "smollm2":
            model.save_pretrained(tmp)
        cfg = load_config(
            None,
            [
                "method=maml_en_llm",
                "inner.optimizer=adamw",
                "moment_policy=shared",
                "tasks_per_step=4",
                f"cpus_per_task={cpus_per_task}",
            ],
        )
        learner = MetaLearner(model, cfg.meta)
        vocab = model.config.vocab_size

        def tasks(length: int) -> list[TaskBatch]:
            def b(seed: int) -> Batch:
                g = torch.Generator().manual_seed(seed)
                return Batch(torch.randint(0, vocab, (1, length), generator=g), ((length - 16, length),))

            return [TaskBatch(f"t{i}", b(2 * i), b(2 * i + 1)) for i in range(4)]

        if executor_kind == "ray":
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
            executor = RayExecutor(model_dir, cfg)
        else:
            executor = LocalExecutor()
        executor.accumulate(learner, tasks(32))  # warm-up (loads the model into each Ray worker process)
        start = time.perf_counter()
        acc = executor.accumulate(learner, tasks(tokens))
        seconds = time.perf_counter() - start
        print(f"{name} {executor_kind}: {seconds:.2f} s (meta_loss {acc.query_loss / acc.n:.4f})", flush=True)
        if executor_kind == "ray":
            ray.shutdown()
    return seconds


def fit_overheads(root: Path) -> dict:
    from transformers import GPT2Tokenizer

    from raymeta.config import load_config
    from raymeta.infra.paths import paths
    from raymeta.run.api import train
    from tests.conftest import make_data_dir, tiny_gpt2

    tiny_gpt2().save_pretrained(root / "model")
    GPT2Tokenizer.from_pretrained(paths().gpt2_tokenizer).save_pretrained(root / "model")
    make_data_dir(root / "data", k=4)
    runs = {}
    for log_every in (1, 20):
        steps: list[float] = []
        cfg = load_config(
            None,
            [
                f"model={root / 'model'}",
                f"data={root / 'data'}",
                "setting=toy",
                f"out={root / f'run{log_every}'}",
                "k=2",
                "steps=20",
                "checkpoint_every=20",
                f"log_every={log_every}",
                "max_length=256",
                "num_workers=1",
            ],
        )
        start = time.perf_counter()
        train(cfg, progress=False)
        total = time.perf_counter() - start
        lines = [json.loads(x) for x in (root / f"run{log_every}" / "metrics.jsonl").read_text().splitlines()]
        steps = [x["seconds"] for x in lines]
        runs[log_every] = {"fit_seconds": total, "sum_step_seconds": sum(steps), "mean_step_seconds": sum(steps) / len(steps)}
        print(f"fit with log_every={log_every}: {total:.1f} s (steps {sum(steps):.1f} s)", flush=True)
    per_report = (runs[1]["fit_seconds"] - runs[20]["fit_seconds"]) / 19
    return {
        "runs": runs,
        "startup_seconds": runs[20]["fit_seconds"] - runs[20]["sum_step_seconds"],
        "seconds_per_report": per_report,
        "report_share_of_tiny_step": per_report / runs[1]["mean_step_seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny_gpt2,smollm2")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--cpus-per-task", default="1,2", help="comma-separated values to measure the ray executor at")
    ap.add_argument("--out", type=Path, default=Path("bench/results/ray_overhead.json"))
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "EXECUTOR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.one:
        print(json.dumps({"seconds": executor_step(args.one[0], args.one[1], args.tokens, float(args.cpus_per_task))}))
        return
    import ray

    from bench.common import environment
    from raymeta.infra.io import atomic_write_json

    executors = []
    cpts = [float(x) for x in args.cpus_per_task.split(",")]
    for model in args.models.split(","):
        timings = {}
        # each in a fresh process: freed memory is not returned to the OS
        for kind, cpt in [("local", 1.0)] + [("ray", c) for c in cpts]:
            cmd = [sys.executable, "-m", "bench.ray_overhead", "--one", model, kind, "--tokens", str(args.tokens)]
            proc = subprocess.run([*cmd, "--cpus-per-task", str(cpt)], capture_output=True, text=True, check=True)
            name = "local" if kind == "local" else f"ray_cpus_per_task_{cpt:g}"
            timings[name] = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
            print(f"{model} {name}: {timings[name]:.2f} s", flush=True)
        overhead = {k: v / timings["local"] - 1 for k, v in timings.items() if k != "local"}
        executors.append({"model": model, "seconds": timings, "ray_over_local": overhead})
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        fit = fit_overheads(Path(tmp))
    ray.shutdown()
    result = {
        "benchmark": "ray_overhead",
        **environment(),
        "executor": executors,
        "fit": fit,
    }
    atomic_write_json(args.out, result)
    print(json.dumps({"executor": executors, "fit": {k: v for k, v in fit.items() if k != "runs"}}, indent=2))


if __name__ == "__main__":
    main()
