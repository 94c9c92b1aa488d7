"""How much does the second-order term weigh in MAML-en-LLM's meta-gradient, in the paper campaign's setting?

With an Adam(W) inner step the adapted weights are θ' = θ − α·m̂/(√v̂ + ε). From fresh moments (step 0) the
first step is α·g/(|g| + ε) per weight, whose derivative in g, α·ε/(|g| + ε)², is far from 0 only where |g|
is near ε. With shared moments (the paper's policy) the step is α·(β1·m + (1−β1)·g)/√(β2·v + (1−β2)·g²)
after bias correction, and the second-order term is of order α·(1−β1)/√v̂ · H. Either way it scales with
the inner lr α, which the campaign's sweeps put at 3e-5. This measures it on the
built-in SmolLM2-135M with real meta-train tasks of the built-in data at `bench/paper.py`'s CPU sizes (k=4, 64-token
examples, one support and one query instance, K=1 inner step): for each inner lr of the campaign's grid,
the relative L2 distance and cosine between MAML-en-LLM's and FOMAML's meta-gradients (mean over tasks),
with FOMAML − MetaICL as the scale of a first-order change, from fresh moments and from the moments
after a few shared-moment outer steps.

    python -m bench.second_order [--tasks 2] [--warm-steps 5] [--out bench/results/second_order.json]
    python -m bench.second_order geometry [--tasks 6] [--warm-steps 20]   # the geometry study (so_geometry.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from bench.common import environment

LRS = (1e-5, 3e-5, 1e-4, 3e-4)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    dot = sum(float((a[n].double() * b[n].double()).sum()) for n in a)
    na = sum(float(a[n].double().pow(2).sum()) for n in a) ** 0.5
    nb = sum(float(b[n].double().pow(2).sum()) for n in a) ** 0.5
    diff = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in a) ** 0.5
    return {"rel_l2": diff / na, "cosine": dot / (na * nb), "norm_a": na, "norm_b": nb}


def campaign_overrides(model: str, setting: str, tasks: int, data: str | None, seed: int | None = None) -> list[str]:
    """The config of the paper campaign's CPU sizes that both second-order studies measure in."""
    return [
        f"model={model}",
        f"setting={setting}",
        "k=4",
        f"tasks_per_step={tasks}",
        "max_length=256",
        "max_length_per_example=64",
        "moment_policy=shared",
        "inner.optimizer=adamw",
        "outer.optimizer=adamw",
        "inner.lr=3e-5",
        "outer.lr=3e-5",
        "validation.tasks=0",
        *([f"seed={seed}"] if seed is not None else []),
        *([f"data={data}"] if data else []),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["geometry"]:  # the geometry study (#49 item 6): bench/so_geometry.py
        from bench import so_geometry

        return so_geometry.main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--data", default=None, help="data folder (default: the built-in one)")
    ap.add_argument("--setting", default="mix_to_mix")
    ap.add_argument("--tasks", type=int, default=2, help="task samples per measurement (meta-gradients averaged)")
    ap.add_argument("--warm-steps", type=int, default=5, help="shared-moment FOMAML outer steps before the warm rows")
    ap.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS))
    ap.add_argument("--out", type=Path, default=Path("bench/results/second_order.json"))
    args = ap.parse_args(argv)

    from raymeta.config import load_config
    from raymeta.core.meta import MetaLearner, task_meta_gradient
    from raymeta.data.prompts import PromptBuilder, PromptFormat
    from raymeta.model.load import load_tokenizer, load_trainable
    from raymeta.run.trainer import build_sampler, tokenize

    overrides = campaign_overrides(args.model, args.setting, args.tasks, args.data)
    cfg = load_config(None, overrides)
    model = load_trainable(args.model, cfg.weights)
    learner = MetaLearner(model, dataclasses.replace(cfg.meta, method="maml_en_llm"))  # math attention: double backward
    sampler, _ = build_sampler(cfg, None)
    t = cfg.tasks
    builder = PromptBuilder(load_tokenizer(args.model), PromptFormat(t.variant, t.max_length_per_example, t.max_length))  # type: ignore[arg-type]

    def batches():  # type: ignore[no-untyped-def]
        return [tokenize(s, builder) for s in sampler.sample()]

    def mean_grad(method: str, lr: float, tasks) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
        meta = dataclasses.replace(cfg.meta, method=method, inner=dataclasses.replace(cfg.meta.inner, lr=lr))
        params = learner.flm.params()
        total: dict[str, torch.Tensor] = {}
        for b in tasks:
            r = task_meta_gradient(learner.flm, params, learner.state, b, meta)
            for n, g in r.grads.items():
                total[n] = total[n] + g.detach() if n in total else g.detach().clone()
        return {n: g / len(tasks) for n, g in total.items()}

    rows = []
    lrs = [float(x) for x in args.lrs.split(",")]

    def measure(state_name: str) -> None:
        tasks = batches()
        icl = mean_grad("metaicl", lrs[0], tasks)
        for lr in lrs:
            began = time.time()
            fo = mean_grad("fomaml", lr, tasks)
            so = mean_grad("maml_en_llm", lr, tasks)
            row = {
                "moments": state_name,
                "moment_step": learner.state.step if learner.state is not None else 0,
                "inner_lr": lr,
                "maml_vs_fomaml": _distance(so, fo),
                "fomaml_vs_metaicl": _distance(fo, icl),
                "seconds": round(time.time() - began, 1),
            }
            rows.append(row)
            print(
                f"{state_name:>6} lr {lr:<7g} MAML vs FOMAML rel L2 {row['maml_vs_fomaml']['rel_l2']:.3e} "
                f"cos {row['maml_vs_fomaml']['cosine']:.6f} | FOMAML vs MetaICL rel L2 "
                f"{row['fomaml_vs_metaicl']['rel_l2']:.3e} ({row['seconds']} s)",
                flush=True,
            )

    measure("fresh")
    fo_cfg = dataclasses.replace(cfg.meta, method="fomaml")
    cfg_maml = learner.cfg
    learner.cfg = fo_cfg
    for _ in range(args.warm_steps):
        learner.step(batches())
    learner.cfg = cfg_maml
    measure("warm")

    result = {"benchmark": "second_order", **environment(), "config": overrides, "warm_steps": args.warm_steps, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
