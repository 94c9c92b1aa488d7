"""Memory, time and agreement of exact activation checkpointing (raymeta.core.checkpointing), per task.

One task's meta-gradient (`task_meta_gradient`: K inner steps on a support sequence, the query pass, the
meta-gradient), unsaved against checkpointed with 1 and 2 decoder layers per checkpoint. Models: `toy12`
(a Llama of 12 layers, d=576, 9 heads, 3 KV heads, MLP 1536, a 2048-token vocabulary, random seeded
weights: SmolLM2's width at 12 layers) and `smollm2` (the fetched SmolLM2-135M, 30 layers). One
sequence per batch, its last 16 tokens scored.

Each row runs in fresh processes after a 16-token warm-up: peak memory (max RSS minus RSS before the
step, glibc mmap threshold 64 KiB: bench/common.py) in one, time in another, which also saves the
meta-gradient so that the checkpointed rows are compared with the unsaved one (global relative L2).
Rows are saved as they finish; a rerun keeps them (`--fresh` starts over).

`--agreement` compares, at 64 tokens on toy12, the fp32 meta-gradients (unsaved and checkpointed) with the
float64 unsaved one, and float64 checkpointed with float64 unsaved. A fresh Adam inner loop (zero moments)
is ill-conditioned: its step is about lr·sign(g), so fp32 rounding alone moves the unsaved meta-gradient
far from float64's; the checkpointed one should be no farther.

    python -m bench.checkpointing [--models toy12] [--ks 1,2] [--tokens 512] [--methods maml_sgd,maml_adamw,fomaml]
                                  [--every 0,1,2] [--out bench/results/checkpointing.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

METHODS = {
    "maml_sgd": ("maml_en_llm", "sgd", "none"),
    "maml_adamw": ("maml_en_llm", "adamw", "shared"),
    "fomaml": ("fomaml", "adamw", "shared"),
}


def _model(name: str):  # type: ignore[no-untyped-def]
    import torch

    if name == "smollm2":
        from raymeta.model.load import load_model

        model = load_model("builtin")
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=2048,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=12,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def one(spec: dict[str, Any], measure: str, grads_path: str | None) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from bench.common import measure_step
    from raymeta.core.lm import Batch, FunctionalLM
    from raymeta.core.meta import MetaConfig, TaskBatch, task_meta_gradient

    torch.set_num_threads(spec["threads"])
    method, inner, policy = METHODS[spec["method"]]
    every = spec["every"]
    cfg = MetaConfig(
        method=method, moment_policy=policy, activation_checkpointing=every > 0, activation_checkpointing_every=max(every, 1)
    )
    cfg.inner.optimizer, cfg.inner.steps, cfg.inner.lr = inner, spec["K"], 1e-3 if inner == "sgd" else 1e-4
    model = _model(spec["model"])
    flm = FunctionalLM(model, math_attention=method == "maml_en_llm", checkpointing=cfg.checkpoint_group)
    params = flm.params()
    vocab, T = model.config.vocab_size, spec["tokens"]

    def batch(seed: int, length: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        return Batch(torch.randint(0, vocab, (1, length), generator=g), ((length - 16, length),))

    task = TaskBatch("t", batch(1, T), batch(2, T))
    task_meta_gradient(flm, params, None, TaskBatch("w", batch(3, 17), batch(4, 17)), cfg)  # warm-up
    out: dict[str, Any] = {}

    def step() -> None:
        out["r"] = task_meta_gradient(flm, params, None, task, cfg)

    measured, _ = measure_step(step, measure, 1)
    if grads_path:
        save_file({n: g.contiguous() for n, g in out["r"].grads.items()}, grads_path)
    return {**measured, "query_loss": out["r"].query_loss, "params_millions": sum(p.numel() for p in params.values()) / 1e6}


def _rel(a_path: str, b_path: str) -> float:
    from safetensors.torch import load_file

    a, b = load_file(a_path), load_file(b_path)
    num = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in b)
    return (num / sum(float(b[n].double().pow(2).sum()) for n in b)) ** 0.5


def agreement(threads: int) -> list[dict[str, Any]]:
    import copy

    import torch

    from raymeta.core.lm import Batch, FunctionalLM
    from raymeta.core.meta import MetaConfig, TaskBatch, task_meta_gradient

    def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        num = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in b)
        return (num / sum(float(b[n].double().pow(2).sum()) for n in b)) ** 0.5

    torch.set_num_threads(threads)
    base = _model("toy12")
    T = 64

    def batch(seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        return Batch(torch.randint(0, base.config.vocab_size, (1, T), generator=g), ((T - 16, T),))

    task = TaskBatch("t", batch(1), batch(2))
    rows = []
    for name in ("maml_sgd", "maml_adamw"):
        method, inner, policy = METHODS[name]
        cfg = MetaConfig(method=method, moment_policy=policy)
        cfg.inner.optimizer, cfg.inner.lr, cfg.inner.steps = inner, 1e-3 if inner == "sgd" else 1e-4, 1
        g = {}
        for dtype in (torch.float64, torch.float32):
            for every in (0, 1):
                flm = FunctionalLM(copy.deepcopy(base).to(dtype), checkpointing=every)
                g[dtype, every] = task_meta_gradient(flm, flm.params(), None, task, cfg).grads
        f64, f32 = torch.float64, torch.float32
        row = {
            "method": name,
            "tokens": T,
            "fp64_checkpointed_vs_fp64_unsaved": rel(g[f64, 1], g[f64, 0]),
            "fp32_unsaved_vs_fp64": rel(g[f32, 0], g[f64, 0]),
            "fp32_checkpointed_vs_fp64": rel(g[f32, 1], g[f64, 0]),
            "fp32_checkpointed_vs_fp32_unsaved": rel(g[f32, 1], g[f32, 0]),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="toy12")
    ap.add_argument("--ks", default="1,2", help="inner steps K")
    ap.add_argument("--tokens", default="512", help="sequence lengths (support and query)")
    ap.add_argument("--methods", default="maml_sgd,maml_adamw,fomaml", help=", ".join(METHODS))
    ap.add_argument("--every", default="0,1,2", help="layers per checkpoint; 0: unsaved (the reference, run first)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="discard the rows already in --out")
    ap.add_argument("--agreement", action="store_true", help="only the fp32/float64 agreement check (saved with the rows)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/checkpointing.json"))
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(json.loads(args.one[0]), args.one[1], args.one[2] if args.one[2] != "-" else None)))
        return 0

    from bench.common import environment, memory_env, memory_measurement

    old: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() and not args.fresh else {}
    rows = old.get("rows", [])
    if args.agreement:
        old.update(environment=environment(), agreement=agreement(args.threads), rows=rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(old, indent=2) + "\n")
        return 0
    done = {json.dumps(r["spec"], sort_keys=True) for r in rows}
    specs = [
        {"model": m, "method": meth, "K": int(k), "tokens": int(t), "every": int(e), "threads": args.threads}
        for m in args.models.split(",")
        for t in args.tokens.split(",")
        for meth in args.methods.split(",")
        for k in args.ks.split(",")
        for e in args.every.split(",")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            key = json.dumps(spec, sort_keys=True)
            if key in done:
                continue
            ref = f"{tmp}/{spec['model']}-{spec['method']}-{spec['K']}-{spec['tokens']}-0.safetensors"
            mine = ref if spec["every"] == 0 else f"{tmp}/mine.safetensors"
            row: dict[str, Any] = {"spec": spec}
            for measure, env, path in (("time", None, mine), ("memory", memory_env(), "-")):
                cmd = [sys.executable, "-m", "bench.checkpointing", "--one", key, measure, path]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if res.returncode != 0:
                    row[measure] = {"error": (res.stderr.strip().splitlines() or ["?"])[-1]}
                else:
                    row[measure] = json.loads(res.stdout.strip().splitlines()[-1])
            if spec["every"] and Path(ref).is_file() and "error" not in row["time"]:
                row["relative_l2_vs_unsaved"] = _rel(mine, ref)
            rows.append(row)
            mem, t = row["memory"].get("peak_extra_mib"), row["time"].get("seconds")
            print(
                f"{spec['model']} {spec['method']} K={spec['K']} T={spec['tokens']} every={spec['every']}: "
                f"peak +{mem if mem is None else round(mem)} MiB, {t if t is None else round(t, 2)} s, "
                f"rel {row.get('relative_l2_vs_unsaved', '-')}",
                flush=True,
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            report = {**old, "environment": environment(), "memory_measurement": memory_measurement(), "rows": rows}
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
