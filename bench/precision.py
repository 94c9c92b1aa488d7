"""How far bf16 moves the meta-gradient: fp32 vs bf16 policies (and fp64 vs fp32 on a tiny model).

For maml_en_llm, fomaml and metaicl, one task's meta-gradient G (AdamW inner loop, lr 1e-4, K=1, shared
moments) on a real meta-batch of the built-in data (SmolLM2-135M, mix_to_mix, k=4, 256-token
prompts), under each precision policy, against the fp32 one computed in the same process:

- fp32 with one BLAS thread instead of the default: the noise floor (only the summation order changes);
- bf16: every pass under bf16 autocast (weights, gradients, Adam and accumulators stay fp32);
- bf16_query: the inner loop in fp32, the query pass under bf16 autocast.

At two outer states, for full-weight training and (`_lora` states) for LoRA r=16 on every linear
layer: `fresh` (the pretrained weights, zero moments) and `realistic` (the weights and shared
moments after `--realistic-steps` real maml_en_llm meta-steps, trained once with `raymeta train`
and kept under raymeta's home; for LoRA with lr 1e-3). Reported: cosine and relative L2 error against fp32, norms, and the
step time (median of `--repeats`). `tiny_fp64` does the same on a tiny random Llama with fp64 as the
reference (there fp32 itself is measured). Progress is saved after every row: rerun to resume.

    python -m bench.precision [--states tiny_fp64,fresh,realistic,fresh_lora,realistic_lora]
                              [--realistic-steps 20] [--out bench/results/precision.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

METHODS = ("maml_en_llm", "fomaml", "metaicl")
POLICIES = ("fp32_1thread", "bf16", "bf16_query")


def _meta_cfg(method: str, precision: str) -> Any:
    from raymeta.config import load_config

    policy = "shared" if method != "metaicl" else "none"
    over = [f"method={method}", f"moment_policy={policy}", "inner.lr=1e-4", "inner.steps=1", f"precision={precision}"]
    return load_config(None, over).meta


def _flat(grads: dict[str, Any]) -> Any:
    import torch

    return torch.cat([g.detach().reshape(-1).to(torch.float64) for g in grads.values()])


def _compare(g: Any, ref: Any) -> dict[str, float]:
    cos = float((g @ ref) / (g.norm() * ref.norm()))
    return {"cosine": cos, "rel_l2": float((g - ref).norm() / ref.norm()), "norm": float(g.norm()), "ref_norm": float(ref.norm())}


def _gradient(flm: Any, params: Any, state: Any, batch: Any, method: str, precision: str, repeats: int) -> tuple[Any, float]:
    import torch

    from raymeta.core.meta import task_meta_gradient

    cfg = _meta_cfg(method, precision)
    times, flat = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        r = task_meta_gradient(flm, params, state, batch, cfg)
        times.append(time.perf_counter() - started)
        flat = _flat(r.grads)
        del r
    assert flat is not None and bool(torch.isfinite(flat).all())
    return flat, statistics.median(times)


def _real_batch(tokenizer: Any) -> Any:
    from raymeta.config import load_config
    from raymeta.data.prompts import PromptBuilder, PromptFormat
    from raymeta.run.trainer import build_sampler, tokenize

    cfg = load_config(None, ["k=4", "max_length=256", "max_length_per_example=64", "tasks_per_step=2", "seed=7"])
    sampler, _ = build_sampler(cfg, None)
    builder = PromptBuilder(tokenizer, PromptFormat("direct", 64, 256))
    return tokenize(sampler.sample()[0], builder)


LORA = ["adapter.type=lora", "adapter.r=16", "adapter.alpha=32", "adapter.target_modules=all-linear"]


def _realistic_checkpoint(steps: int, lora: bool) -> Path:
    """A run of `steps` real maml_en_llm meta-steps (shared moments) under raymeta's home; resumed if cut short."""
    from raymeta.config import load_config
    from raymeta.infra.paths import home
    from raymeta.run.api import train
    from raymeta.run.checkpoint import latest_checkpoint

    out = home() / "bench" / f"precision-state-{steps}{'-lora' if lora else ''}"
    over = [
        *(LORA if lora else []),
        *(["inner.lr=1e-3", "outer.lr=1e-3"] if lora else []),
        "method=maml_en_llm",
        "moment_policy=shared",
        "inner.lr=1e-4",
        "outer.lr=1e-5",
        "k=4",
        "max_length=256",
        "max_length_per_example=64",
        "tasks_per_step=2",
        f"steps={steps}",
        "checkpoint_every=5",
        "keep_checkpoints=1",
        "distributed=false",
        f"out={out}",
    ]
    latest = latest_checkpoint(out)
    final = train(load_config(None, over), resume=latest is not None, progress=True)
    return Path(final)


def _smollm2_state(state: str, steps: int) -> tuple[Any, Any, Any]:
    """(model, tokenizer, outer AdamState) at the named state (`_lora`: LoRA r=16 on every linear layer)."""

    from raymeta.config import load_config
    from raymeta.core.lm import FunctionalLM
    from raymeta.core.optim import zeros_state
    from raymeta.model.load import load_tokenizer, load_trainable
    from raymeta.run.checkpoint import load_optimizer

    lora = state.endswith("_lora")
    weights = load_config(None, LORA if lora else []).weights
    tokenizer = load_tokenizer("builtin")
    if state.startswith("fresh"):
        model = load_trainable("builtin", weights)
        return model, tokenizer, zeros_state(FunctionalLM(model).params())
    ckpt = _realistic_checkpoint(steps, lora)
    model = load_trainable("builtin", weights, resume=ckpt)
    names = list(FunctionalLM(model).params())
    opt_step = json.loads((ckpt / "state.json").read_text())["optimizer_step"]
    return model, tokenizer, load_optimizer(ckpt, names, opt_step)


def run_state(state: str, steps: int, repeats: int, done: set[tuple[str, str, str]], save: Any) -> None:
    import torch

    from raymeta.core.lm import FunctionalLM

    threads = torch.get_num_threads()
    if state == "tiny_fp64":
        from raymeta.core.meta import TaskBatch
        from raymeta.core.optim import zeros_state
        from tests.conftest import tiny_llama
        from tests.test_meta import _batch

        models = {dt: tiny_llama(vocab_size=97, dtype=dt) for dt in (torch.float64, torch.float32)}
        batch = TaskBatch("t", _batch(1, rows=2, length=24), _batch(2, rows=2, length=24))
        ref_flm = FunctionalLM(models[torch.float64])
        flm = FunctionalLM(models[torch.float32])
        for method in METHODS:
            ref, _ = _gradient(ref_flm, ref_flm.params(), zeros_state(ref_flm.params()), batch, method, "fp32", 1)
            for precision in ("fp32", "bf16", "bf16_query"):
                if (state, method, precision) in done:
                    continue
                g, secs = _gradient(flm, flm.params(), zeros_state(flm.params()), batch, method, precision, repeats)
                save(
                    {
                        "state": state,
                        "method": method,
                        "policy": precision,
                        "reference": "fp64",
                        **_compare(g, ref),
                        "seconds": secs,
                    }
                )
        return

    model, tokenizer, outer = _smollm2_state(state, steps)
    flm = FunctionalLM(model)
    params = flm.params()
    batch = _real_batch(tokenizer)
    _gradient(flm, params, outer, batch, "metaicl", "fp32", 1)  # warm-up
    for method in METHODS:
        if all((state, method, p) in done for p in POLICIES):
            continue
        ref, ref_secs = _gradient(flm, params, outer, batch, method, "fp32", repeats)
        for policy in POLICIES:
            if (state, method, policy) in done:
                continue
            if policy == "fp32_1thread":
                torch.set_num_threads(1)
                g, secs = _gradient(flm, params, outer, batch, method, "fp32", 1)
                torch.set_num_threads(threads)
            else:
                g, secs = _gradient(flm, params, outer, batch, method, policy, repeats)
            row = {"state": state, "method": method, "policy": policy, "reference": f"fp32 ({threads} threads)"}
            row.update(_compare(g, ref), seconds=secs, fp32_seconds=ref_secs, speedup=ref_secs / secs)
            row["tokens"] = [int(batch.support.ids.shape[1]), int(batch.query.ids.shape[1])]
            save(row)
            del g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--states", default="tiny_fp64,fresh,realistic,fresh_lora,realistic_lora")
    ap.add_argument("--realistic-steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2, help="timed gradients per policy (the median is reported)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/precision.json"))
    args = ap.parse_args()

    from bench.common import environment
    from raymeta.infra.io import atomic_write_json

    result: dict[str, Any] = {"benchmark": "precision", "rows": []}
    if args.out.is_file():
        result = json.loads(args.out.read_text())
    result.update(environment(), realistic_steps=args.realistic_steps, repeats=args.repeats)
    done = {(r["state"], r["method"], r["policy"]) for r in result["rows"]}

    def save(row: dict[str, Any]) -> None:
        result["rows"].append(row)
        atomic_write_json(args.out, result)
        print(
            f"{row['state']:10s} {row['method']:12s} {row['policy']:13s} cosine {row['cosine']:.5f}  rel_l2 {row['rel_l2']:.4f}  "
            f"norm {row['norm']:.4g} (ref {row['ref_norm']:.4g})  {row['seconds']:.2f} s",
            flush=True,
        )

    for state in args.states.split(","):
        run_state(state, args.realistic_steps, args.repeats, done, save)


if __name__ == "__main__":
    main()
