"""Evaluation wall time in-process and with Ray workers (P9: a full evaluation of a setting on 2 cores).

Default (P9): mix_to_mix, all 10 targets, up to 100 test examples each, 5 seeds, k=4, direct
and channel prompts, ICL, SmolLM2-135M, no loss cache; timed in this process (`workers 0`) and with
Ray workers on an embedded local cluster (`workers N`, each with CPUs/N threads). Checks that every
way gives the same scores. Resumable: each finished measurement is kept in the JSON and skipped on a
rerun with the same arguments. Also writes the in-process results (with per-example predictions) to
OUT_DIR/results-inprocess.json, for `raymeta compare` and the power figure.

    python -m bench.eval_scale                                   # P9, workers 0 and 2
    python -m bench.eval_scale --seeds 100 --out bench/results/eval_scale_1seed.json   # a fifth of P9
    python -m bench.eval_scale --max-test-examples 20 --workers 0 1 2 --out bench/results/eval_scale_20.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.common import environment
from raymeta.infra.io import atomic_write_json


def _measure(workers: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from raymeta.data import open_data
    from raymeta.eval.icl import EvalConfig, evaluate_setting, model_fingerprint
    from raymeta.model.load import load_model, load_tokenizer

    data = open_data(None)
    setting = data.setting(args.setting)
    cfg = EvalConfig(k=args.k, seeds=tuple(args.seeds), modes=("icl",), max_test_examples=args.max_test_examples)
    started = time.perf_counter()
    if workers == 0:
        torch.set_num_threads(os.cpu_count() or 1)
        model, tokenizer = load_model("builtin"), load_tokenizer("builtin")
        results = evaluate_setting(model, tokenizer, data, setting, cfg, cache=None)
    else:
        from raymeta.eval.on_ray import ModelSource, evaluate_parallel

        model_id = model_fingerprint(load_model("builtin"))
        results = evaluate_parallel(ModelSource("builtin", device="cpu"), data, setting, cfg, model_id=model_id, workers=workers)
    seconds = time.perf_counter() - started
    n_examples = sum(t["n_test"] for t in next(iter(results["runs"].values()))["per_task"].values())
    return {"workers": workers, "seconds": seconds, "results": results, "test_examples_per_seed": n_examples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="mix_to_mix")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-test-examples", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 13, 21, 42, 87])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="0 = in-process")
    ap.add_argument("--out", type=Path, default=Path("bench/results/eval_scale.json"))
    args = ap.parse_args()
    key = {"setting": args.setting, "k": args.k, "max_test_examples": args.max_test_examples, "seeds": args.seeds}
    done: dict[str, Any] = {}
    if args.out.is_file():
        old = json.loads(args.out.read_text())
        if old.get("key") == key:
            done = {str(m["workers"]): m for m in old.get("measurements", [])}
    for w in args.workers:
        if str(w) in done:
            print(f"workers={w}: done before ({done[str(w)]['seconds']:.0f} s)")
            continue
        m = _measure(w, args)
        if w == 0:
            atomic_write_json(args.out.with_name(f"{args.out.stem}-results-inprocess.json"), m["results"])
        summary = {r: {"all": run["all"]["mean"], "all_ci95": run["all"]["ci95"]} for r, run in m["results"]["runs"].items()}
        runs = m.pop("results")["runs"]
        done[str(w)] = {
            **m,
            "summary": summary,
            "scores": {r: {t: v["seeds"] for t, v in run["per_task"].items()} for r, run in runs.items()},
        }
        print(f"workers={w}: {m['seconds']:.0f} s", flush=True)
        measurements = sorted(done.values(), key=lambda x: x["workers"])
        atomic_write_json(args.out, {"benchmark": "eval_scale", **environment(), "key": key, "measurements": measurements})
    measurements = sorted(done.values(), key=lambda x: x["workers"])
    same = all(m["scores"] == measurements[0]["scores"] for m in measurements)
    base = next((m["seconds"] for m in measurements if m["workers"] == 0), None)
    result = {
        "benchmark": "eval_scale",
        **environment(),
        "key": key,
        "measurements": measurements,
        "identical_scores": same,
        "goal_seconds": 1200,
        "speedup_vs_in_process": {str(m["workers"]): base / m["seconds"] for m in measurements} if base else None,
    }
    result["power"] = _power(args.out.with_name(f"{args.out.stem}-results-inprocess.json"))
    atomic_write_json(args.out, result)
    print(json.dumps({str(m["workers"]): round(m["seconds"]) for m in measurements}), "identical scores:", same)
    print(json.dumps(result["power"], indent=1))


def _power(path: Path) -> dict[str, Any] | None:
    """From the in-process results: each run's all-targets 95 % CI half-width now, and the test examples
    per task a CI of ±2 points would need (one model's mean; `raymeta compare` gives it for a difference)."""
    from raymeta.eval import stats

    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    out = {}
    for name, run in res["runs"].items():
        p = stats.examples_needed(run, None, res["targets"], half_width=0.02)
        out[name] = {
            k: p[k] for k in ("n_test_now", "half_width_now", "var_examples", "var_seeds", "test_set_scale", "n_test_needed")
        }
    return out


if __name__ == "__main__":
    main()
