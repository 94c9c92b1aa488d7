"""GPU smoke test: raymeta's CUDA paths on one GPU, end to end, with SmolLM2-135M and the built-in data.

    python -m bench.gpu_smoke [--out bench/results/gpu_smoke.json] [--steps 3]

1. one task's second-order meta-gradient (maml_en_llm, AdamW inner, shared moments from a fresh outer
   state) on real built-in batches, on the CPU and on the GPU in fp32 (goal: relative L2 <= 1e-3) and
   on the GPU with `precision: bf16` and `bf16_query` (reported against the GPU's fp32, with their speed-ups);
2. single-process meta-training on the GPU (`distributed: false, device: cuda`), fp32 and bf16: s/step;
3. a 1-worker Ray Train run with `use_gpu: true` (the worker's device from `ray.train.torch.get_device()`);
4. Ray tasks sharing the GPU (`executor: ray, gpus_per_task: 0.5`, two tasks a step);
5. a GPU evaluation (`raymeta.evaluate(..., device="cuda")`) against the same evaluation on the CPU.

Every part is timed and recorded, a failing part with its error, in one JSON file with the GPU's name.
Needs CUDA and the fetched assets (`raymeta fetch`); about 5 minutes on one modern GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("bench/results/gpu_smoke.json")


def _part(name: str, fn: Callable[[], dict[str, Any]], record: dict[str, Any]) -> None:
    began = time.perf_counter()
    try:
        record[name] = {"ok": True, **fn()}
    except Exception as e:  # a smoke test records every failure and goes on to the next part
        record[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    record[name]["seconds"] = round(time.perf_counter() - began, 2)
    print(f"[gpu_smoke] {name}: {'ok' if record[name]['ok'] else 'FAILED ' + record[name]['error']}", flush=True)


def _task_batch(k: int = 2) -> Any:
    from raymeta.config import load_config
    from raymeta.data.prompts import PromptBuilder, PromptFormat
    from raymeta.model.load import load_tokenizer
    from raymeta.run.trainer import build_sampler, tokenize

    cfg = load_config(None, [f"k={k}", "tasks_per_step=1", "max_length_per_example=64", "max_length=256"])
    sampler, _ = build_sampler(cfg, None)
    builder = PromptBuilder(load_tokenizer("builtin"), PromptFormat("direct", 64, 256))
    return tokenize(sampler.sample()[0], builder)


def _meta_gradient(device: str, precision: str, batch: Any) -> Any:
    import torch

    from raymeta.core.meta import InnerConfig, MetaConfig, MetaLearner, task_meta_gradient
    from raymeta.model.load import load_model

    model = load_model("builtin", device=device)
    for p in model.parameters():
        p.requires_grad_(True)
    cfg = MetaConfig(method="maml_en_llm", inner=InnerConfig(lr=1e-4), moment_policy="shared", precision=precision)
    learner = MetaLearner(model, cfg)
    began = time.perf_counter()
    r = task_meta_gradient(learner.flm, learner.flm.params(), learner.state, batch, learner.cfg)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    return torch.cat([g.detach().double().cpu().reshape(-1) for g in r.grads.values()]), seconds


def _compare(a: Any, b: Any) -> dict[str, float]:
    return {
        "relative_l2": float((a - b).norm() / b.norm()),
        "cosine": float((a @ b) / (a.norm() * b.norm())),
        "norm": float(a.norm()),
        "reference_norm": float(b.norm()),
    }


def _meta_gradients() -> dict[str, Any]:
    batch = _task_batch()
    cpu, cpu_s = _meta_gradient("cpu", "fp32", batch)
    gpu, gpu_s = _meta_gradient("cuda", "fp32", batch)
    gpu_bf16, bf16_s = _meta_gradient("cuda", "bf16", batch)
    gpu_bq, bq_s = _meta_gradient("cuda", "bf16_query", batch)
    fp32 = _compare(gpu, cpu)
    return {
        "gpu_fp32_vs_cpu_fp32": fp32,
        "goal_relative_l2": 1e-3,
        "goal_met": fp32["relative_l2"] <= 1e-3,
        "gpu_bf16_vs_gpu_fp32": _compare(gpu_bf16, gpu),
        "gpu_bf16_query_vs_gpu_fp32": _compare(gpu_bq, gpu),
        "seconds": {"cpu_fp32": cpu_s, "gpu_fp32": gpu_s, "gpu_bf16": bf16_s, "gpu_bf16_query": bq_s},
    }


def _train(work: Path, name: str, *overrides: str) -> dict[str, Any]:
    from raymeta.config import load_config
    from raymeta.run.api import train

    cfg = load_config(
        Path("configs/tiny.yaml"),
        [f"out={work / name}", "validation.tasks=0", "tasks_per_step=2", "keep_checkpoints=1", *overrides],
    )
    final = train(cfg, progress=False)
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines() if line]
    return {
        "overrides": list(overrides),
        "checkpoint": str(final),
        "seconds_per_step": [round(r["seconds"], 3) for r in rows],
        "meta_loss": [r["meta_loss"] for r in rows],
        "skipped": rows[-1]["skipped_steps"],
    }


def _evaluate() -> dict[str, Any]:
    from raymeta.run.api import evaluate

    options = dict(k=4, seeds=(100,), variants=("direct",), modes=("icl",), max_test_examples=5, cache=False)
    began = time.perf_counter()
    gpu = evaluate("builtin", device="cuda", **options)
    gpu_s = time.perf_counter() - began
    began = time.perf_counter()
    cpu = evaluate("builtin", device="cpu", **options)
    cpu_s = time.perf_counter() - began
    g, c = gpu["runs"]["direct/icl"], cpu["runs"]["direct/icl"]
    same = all(g["per_task"][t]["seeds"] == c["per_task"][t]["seeds"] for t in g["per_task"])
    return {
        "gpu_score": g["all"]["mean"],
        "cpu_score": c["all"]["mean"],
        "same_scores": same,
        "seconds": {"gpu": gpu_s, "cpu": cpu_s},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=3, help="meta-steps of each training run (default 3)")
    args = parser.parse_args(argv)

    import torch

    from bench.common import environment
    from raymeta.infra.io import atomic_write_json

    if not torch.cuda.is_available():
        print("bench.gpu_smoke: no CUDA device here; nothing to test", file=sys.stderr)
        return 2
    record: dict[str, Any] = {"environment": environment(), "gpu": torch.cuda.get_device_name(0)}
    steps = f"steps={args.steps}"
    with tempfile.TemporaryDirectory(prefix="raymeta-gpu-smoke-") as tmp:
        work = Path(tmp)
        _part("meta_gradient", _meta_gradients, record)
        _part("train_fp32", lambda: _train(work, "fp32", steps, "device=cuda", "distributed=false"), record)
        _part("train_bf16", lambda: _train(work, "bf16", steps, "device=cuda", "distributed=false", "precision=bf16"), record)
        _part(
            "ray_train_use_gpu",
            lambda: _train(
                work, "ray-train", "steps=2", "distributed=true", "use_gpu=true", "executor=local", "cpus_per_worker=1"
            ),
            record,
        )
        _part(
            "ray_tasks_half_gpu",
            lambda: _train(work, "ray-tasks", "steps=2", "distributed=false", "device=cuda", "executor=ray", "gpus_per_task=0.5"),
            record,
        )
        _part("evaluate", _evaluate, record)
    record["all_ok"] = all(part.get("ok") for part in record.values() if isinstance(part, dict) and "ok" in part)
    atomic_write_json(args.out, record)
    print(json.dumps({k: v for k, v in record.items() if k != "environment"}, indent=2, default=str)[:6000])
    return 0 if record["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
