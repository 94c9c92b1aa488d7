"""Time and peak memory of one meta-step per method, on the same inputs.

Methods: metaicl, fomaml, maml_en_llm with an SGD inner loop, maml_en_llm with an AdamW inner loop and
shared moments. Models: a 4-layer GPT-2 with the full 50257-token vocabulary (random weights) and
SmolLM2-135M. n=2 tasks, K=1, support and query of one 256-token sequence each (the last 16 tokens
scored). Each (model, method) runs in two fresh processes, both after a 16-token warm-up step: one
times `--repeats` steps with the default allocator (the median is reported), the other measures peak
memory as the maximum RSS minus the RSS just before one step, with glibc's mmap threshold at 64 KiB
so that RSS follows the live tensors (see `bench/common.py`).

Row groups (`--groups`): `full` (the four methods above, every weight trained); `lora` (SmolLM2 with
LoRA r=16, alpha 32, on every linear layer: metaicl, fomaml, maml_en_llm); `lora_k` (maml_en_llm with
LoRA at K=2 and K=4, 512-token sequences); `lora_ray` (maml_en_llm with LoRA, the two tasks in-process
vs as two Ray tasks of one CPU each on an embedded 2-CPU Ray: time only, the tasks' memory is in other
processes). Ratios: second order / FOMAML (full and LoRA), LoRA / full per method, Ray / in-process.
Rows are saved as they finish; `--resume` keeps them and measures the rest.

    python -m bench.meta_step [--models tiny_gpt2,smollm2] [--groups full,lora,lora_k,lora_ray] [--tokens 256]
                              [--repeats 3] [--resume] [--out bench/results/meta_step.json]
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
LORA = ["adapter.type=lora", "adapter.r=16", "adapter.alpha=32", "adapter.target_modules=all-linear"]

# row groups: (method, LoRA?, inner steps K, tokens (None: --tokens), executor)
GROUPS = {
    "full": [(m, False, 1, None, "local") for m in METHODS],
    "lora": [(m, True, 1, None, "local") for m in ("metaicl", "fomaml", "maml_en_llm_adamw_shared")],
    "lora_k": [("maml_en_llm_adamw_shared", True, k, 512, "local") for k in (2, 4)],
    "lora_ray": [("maml_en_llm_adamw_shared", True, 1, None, ex) for ex in ("local", "ray")],
}


def _row_name(spec: list) -> str:
    method, lora, k, tokens, executor = spec
    return (
        method
        + ("+lora16" if lora else "")
        + (f"@K{k}" if k != 1 else "")
        + (f"x{tokens}" if tokens else "")
        + ("+ray" if executor == "ray" else "")
    )


def one(model_name: str, spec: list, tokens: int, threads: int | None, measure: str, repeats: int) -> dict:
    import torch

    from bench.common import bench_model, measure_step
    from raymeta.config import load_config
    from raymeta.core.lm import Batch
    from raymeta.core.meta import MetaLearner, TaskBatch
    from raymeta.model.weights import prepare

    method, lora, k, row_tokens, executor_kind = spec
    tokens = row_tokens or tokens
    if threads:
        torch.set_num_threads(threads)
    over = [*METHODS[method], *(LORA if lora else []), "tasks_per_step=2", f"inner.steps={k}", "inner.lr=1e-5", "outer.lr=1e-5"]
    if executor_kind == "ray":
        over += ["executor=ray", "cpus_per_task=1"]
    cfg = load_config(None, over)
    model = prepare(bench_model(model_name), cfg.weights)
    vocab = model.config.vocab_size
    learner = MetaLearner(model, cfg.meta)
    if executor_kind == "ray":
        import ray

        from raymeta.model.load import resolve_model_dir
        from raymeta.run.executor import RayExecutor

        ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)
        executor = RayExecutor(str(resolve_model_dir("builtin")), cfg)

        def run(batches: list[TaskBatch]):  # type: ignore[no-untyped-def]
            return learner.apply(executor.accumulate(learner, batches))
    else:
        run = learner.step

    def batch(seed: int, length: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        return Batch(torch.randint(0, vocab, (1, length), generator=g), ((length - min(16, length - 1), length),))

    def tasks(length: int) -> list[TaskBatch]:
        return [TaskBatch(f"t{i}", batch(2 * i, length), batch(2 * i + 1, length)) for i in range(2)]

    run(tasks(16))  # warm-up: first-call overheads out of the timing (and the model into the Ray workers)
    # each timed step updates the weights: the later steps see slightly different ones
    measured, metrics = measure_step(lambda: run(tasks(tokens)), measure, repeats)
    if measure == "memory":
        return measured
    return {
        "model": model_name,
        "row": _row_name(spec),
        "method": method,
        "adapter": "lora r=16 all-linear" if lora else "none",
        "inner_steps": k,
        "tokens": tokens,
        "executor": executor_kind,
        "params_millions": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_millions": sum(p.numel() for p in learner.flm.params().values()) / 1e6,
        **measured,
        "meta_loss": metrics.query_loss,
        "grad_norm": metrics.grad_norm,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny_gpt2,smollm2")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per method (the median is reported)")
    ap.add_argument("--groups", default="full,lora,lora_k,lora_ray", help="row groups: " + ", ".join(GROUPS))
    ap.add_argument("--measures", default="time,memory", help="time, memory or both (memory alone: a row's peak only)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out and measure the rest")
    ap.add_argument("--out", type=Path, default=Path("bench/results/meta_step.json"))
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "SPEC", "MEASURE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], json.loads(args.one[1]), args.tokens, args.threads, args.one[2], args.repeats)))
        return

    from bench.common import memory_env

    rows: list[dict] = []
    if args.out.is_file() and args.resume:  # rows of an interrupted run are kept
        rows = json.loads(args.out.read_text()).get("rows", [])
    specs = [spec for g in args.groups.split(",") for spec in GROUPS[g]]
    for model_name in args.models.split(","):
        for spec in specs:
            if (spec[3] or spec[4] == "ray" or spec[1]) and model_name != "smollm2":
                continue  # LoRA, long and Ray rows: SmolLM2 only
            if any(r["model"] == model_name and r["row"] == _row_name(list(spec)) for r in rows):
                continue
            cmd = [sys.executable, "-m", "bench.meta_step", "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            row = {}
            measures = [("time", None)] + ([("memory", memory_env())] if spec[4] == "local" else [])
            measures = [(m, env) for m, env in measures if m in args.measures.split(",")]
            for measure, env in measures:
                one_cmd = [*cmd, "--one", model_name, json.dumps(list(spec)), measure]
                proc = subprocess.run(one_cmd, capture_output=True, text=True, check=True, env=env)
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            row.setdefault("row", _row_name(list(spec)))
            row.setdefault("model", model_name)
            rows.append(row)
            peak = f"peak +{row['peak_extra_mib']:8.0f} MiB" if "peak_extra_mib" in row else "peak (other processes)"
            secs = f"{row['seconds']:8.2f} s" if "seconds" in row else "(not timed)"
            print(f"{model_name:10s} {row['row']:40s} {secs}  {peak}", flush=True)
            _save(args, rows)
    print(json.dumps(_save(args, rows), indent=2))


def _ratio(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return None
    out = {"time": a["seconds"] / b["seconds"]}
    if "peak_extra_mib" in a and "peak_extra_mib" in b:
        out["peak_memory"] = a["peak_extra_mib"] / b["peak_extra_mib"]
    return out


def _save(args: argparse.Namespace, rows: list[dict]) -> dict:
    from bench.common import environment, memory_measurement
    from raymeta.infra.io import atomic_write_json

    ratios = {}
    for model_name in args.models.split(","):
        by = {r["row"]: r for r in rows if r["model"] == model_name}
        if "fomaml" in by:
            ratios[model_name] = {
                f"{m}/fomaml": _ratio(by[m], by["fomaml"])
                for m in by
                if m.startswith("maml_en_llm") and "+" not in m and "@" not in m
            }
        if "fomaml+lora16" in by:
            ratios[model_name]["maml_en_llm_adamw_shared+lora16/fomaml+lora16"] = _ratio(
                by.get("maml_en_llm_adamw_shared+lora16"), by["fomaml+lora16"]
            )
        for m in ("metaicl", "fomaml", "maml_en_llm_adamw_shared"):
            if f"{m}+lora16" in by and m in by:
                ratios[model_name][f"{m}+lora16/{m}"] = _ratio(by[f"{m}+lora16"], by[m])
        if "maml_en_llm_adamw_shared+lora16+ray" in by:
            ratios[model_name]["lora16 ray executor/local"] = _ratio(
                by["maml_en_llm_adamw_shared+lora16+ray"], by.get("maml_en_llm_adamw_shared+lora16")
            )
    result = {
        "benchmark": "meta_step",
        **environment(),
        "tasks": 2,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "memory_measurement": memory_measurement(),
        "rows": rows,
        "ratios": ratios,
    }
    atomic_write_json(args.out, result)
    return ratios


if __name__ == "__main__":
    main()
