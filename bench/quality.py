"""The paper's comparison on real tasks: raw zero-shot and ICL, MetaICL, MAML-en-LLM, FOMAML, Reptile.

At an equal meta-training budget (the same meta-steps, tasks per step, instances per task, k and
token limits for every method), on a built-in setting with SmolLM2-135M, with MetaICL's
evaluation protocol (seeds, mean and worst case, all targets and unseen-domain targets), direct and
channel prompts, plus:
- adaptation evaluation (`adapt_steps` steps on each target task's k examples) for MetaICL and
  MAML-en-LLM;
- the limited-data setting (each meta-train pool capped at `limited_examples`) for both.
It then checks the paper's claims (MAML-en-LLM ≥ MetaICL + 2 points on unseen-domain targets, + 4 after
adaptation, + 2 with limited data) on the mean over seeds and reports what the runs show.

    python -m bench.quality --size cpu          # SmolLM2 on 2 CPU cores: about 12 hours, nearly all evaluation
    python -m bench.quality --size cpu --core-only --set inner.lr=1e-4 --set outer.lr=1e-4 --out DIR   # about 7 hours
    python -m bench.quality --size cpu --eval-workers 2 ...   # evaluations on Ray workers (a cluster: RAY_ADDRESS)
    python -m bench.quality --size gpu          # MetaICL-sized, for a GPU node (not run: no GPU lent)
    python -m bench.quality --size smoke --model DIR --data DIR --setting toy   # minutes; used by the tests

Resumable: every training run resumes from its checkpoint and every finished evaluation is kept
(`OUT/eval/*.json`, reused only for the same weights, setting and protocol); rerun the same command
after an interruption. A rerun into the same OUT with other settings (`--set`) is refused.
Writes OUT/quality.json, OUT/quality.md and OUT/quality.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.common import evaluate_to_file

SIZES: dict[str, dict[str, Any]] = {
    "smoke": {
        "train": {
            "steps": 2,
            "k": 2,
            "tasks_per_step": 2,
            "max_length": 256,
            "max_length_per_example": 64,
            "keep_checkpoints": 1,
            "checkpoint_every": 2,
        },
        "eval": {"k": 4, "seeds": (100, 13), "max_test_examples": 4},
        "adapt_steps": 1,
        "limited_examples": 8,
    },
    "cpu": {
        "train": {
            "steps": 30,
            "k": 4,
            "tasks_per_step": 2,
            "max_length": 256,
            "max_length_per_example": 64,
            "keep_checkpoints": 1,
            "checkpoint_every": 10,
        },
        # 100 test examples per task (all of the smaller ones), from the power figure of bench/eval_scale.py:
        # one model's all-targets mean at that size (85 per task on average) is ±1.9 points with direct prompts
        # and ±3.4 with channel prompts (one seed; channel would need 246 per task for ±2);
        # with 8 test examples and 2 seeds it was ±7.5. It costs time: ~16 min per seed of an evaluation here.
        "eval": {"k": 4, "seeds": (100, 13, 21, 42, 87), "max_test_examples": 100},
        "adapt_steps": 1,
        "limited_examples": 32,
    },
    "gpu": {
        "train": {
            "steps": 1000,
            "k": 16,
            "tasks_per_step": 8,
            "support_size": 4,
            "query_size": 4,
            "max_length": 1024,
            "max_length_per_example": 256,
            "keep_checkpoints": 1,
            "checkpoint_every": 100,
            "precision": "bf16",
            "distributed": True,
            "use_gpu": True,
        },
        "eval": {"k": 16, "seeds": (100, 13, 21, 42, 87), "max_test_examples": None},
        "adapt_steps": 4,
        "limited_examples": 64,
    },
}
METHODS = ("metaicl", "maml_en_llm", "fomaml", "reptile")
CLAIMS = (  # (name, candidate model, baseline model, run key, threshold in points)
    ("unseen-domain targets", "maml_en_llm", "metaicl", "icl", 2.0),
    ("after adaptation", "maml_en_llm", "metaicl", "icl+adapt", 4.0),
    ("limited data", "maml_en_llm-limited", "metaicl-limited", "icl", 2.0),
)


def _overrides(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as a mapping, checked against the config now."""
    from raymeta.config import TrainConfig, apply_overrides, parse_overrides

    out = parse_overrides(items, "--set")
    apply_overrides(TrainConfig(), out, "--set")
    return out


def _run_config(name: str, overrides: dict[str, Any], out: Path, base: dict[str, Any]) -> Any:
    """The training config of run `name`; refused if OUT/runs/NAME was trained with other settings
    (resuming it would mix two configs, and a finished one would be reused as is)."""
    from raymeta.config import TrainConfig, apply_overrides, flatten, to_dict
    from raymeta.errors import UserError
    from raymeta.infra.io import read_yaml

    cfg = apply_overrides(TrainConfig(), {**base, **overrides, "out": str(out / "runs" / name)}, f"quality:{name}")
    cfg.validate(f"quality:{name}")
    saved_path = Path(cfg.run.out) / "config.yaml"
    if saved_path.is_file():
        saved, now = flatten(read_yaml(saved_path, "run config") or {}), flatten(to_dict(cfg))
        differ = sorted(k for k in saved.keys() & now.keys() if saved[k] != now[k])
        if differ:
            raise UserError(f"{saved_path}: this run was trained with other settings ({', '.join(differ)}); use another --out")
    return cfg


def _train(cfg: Any) -> Path:
    from raymeta.run.api import train
    from raymeta.run.checkpoint import latest_checkpoint

    return train(cfg, resume=latest_checkpoint(Path(cfg.run.out)) is not None, progress=True)


def _evaluate(label: str, model_spec: str, out: Path, size: dict[str, Any], args: argparse.Namespace, adapt: bool) -> dict:
    from raymeta.eval.adapt import AdaptConfig
    from raymeta.eval.icl import EvalConfig

    e = size["eval"]
    cfg = EvalConfig(
        k=e["k"],
        seeds=tuple(e["seeds"]),
        variants=("direct", "channel"),
        modes=("icl",) if adapt or label != "raw" else ("zero-shot", "icl"),
        max_test_examples=e["max_test_examples"],
        truncation="shared",
        adapt=AdaptConfig(size["adapt_steps"]) if adapt else None,
    )
    path = out / "eval" / f"{label}{'+adapt' if adapt else ''}.json"
    return evaluate_to_file(path, label, model_spec, args.data, args.setting, cfg, workers=args.eval_workers)


def _rows(evals: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for label, res in evals.items():
        for run, r in res["runs"].items():
            variant, mode = run.split("/", 1)
            mode = "icl+adapt" if "+adapt" in mode else mode
            u = r["unseen_domain"] or {}
            rows.append(
                {
                    "model": label.replace("+adapt", ""),
                    "variant": variant,
                    "mode": mode,
                    "all_mean": 100 * r["all"]["mean"],
                    "all_ci95": [100 * x for x in r["all"]["ci95"]],
                    "all_worst": 100 * r["all"]["worst"],
                    "unseen_mean": 100 * u["mean"] if u else None,
                    "unseen_ci95": [100 * x for x in u["ci95"]] if u else None,
                    "unseen_worst": 100 * u["worst"] if u else None,
                }
            )
    return rows


def _claims(evals: dict[str, dict]) -> list[dict[str, Any]]:
    """Each claim per prompt variant: the paired difference on the unseen-domain targets with its bootstrap
    95 % CI (`raymeta compare`), whether the point estimate reaches the paper's threshold, whether the
    difference is resolved (the CI excludes 0), and how many test examples per task would resolve ±2."""
    from raymeta.eval import stats

    out = []
    for name, cand, base, mode, threshold in CLAIMS:
        a, b = (
            evals.get(cand + ("+adapt" if mode == "icl+adapt" else "")),
            evals.get(base + ("+adapt" if mode == "icl+adapt" else "")),
        )
        if a is None or b is None or not a["unseen_domain_test"]:
            continue
        for variant in ("direct", "channel"):
            run = next(
                (r for r in a["runs"] if r.startswith(f"{variant}/icl") and ("+adapt" in r) == (mode == "icl+adapt")), None
            )
            if run is None or run not in b["runs"]:
                continue
            tasks = a["unseen_domain_test"]
            p = stats.paired(a["runs"][run], b["runs"][run], tasks)
            power = stats.examples_needed(a["runs"][run], b["runs"][run], tasks)
            out.append(
                {
                    "claim": f"{cand} >= {base} + {threshold:g} on unseen-domain targets ({name})",
                    "variant": variant,
                    "difference_points": 100 * p["diff"],
                    "ci95_points": [100 * x for x in p["ci95"]],
                    "holds": 100 * p["diff"] >= threshold,
                    "resolved": p["resolved"],
                    "threshold_in_ci": 100 * p["ci95"][0] <= threshold <= 100 * p["ci95"][1],
                    "n_test_for_2_points": power["n_test_needed"],
                }
            )
    return out


def _markdown(rows: list[dict[str, Any]], claims: list[dict[str, Any]], title: str) -> str:
    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:.1f}"

    def ci(x: list[float] | None) -> str:
        return "" if x is None else f" [{x[0]:.1f}, {x[1]:.1f}]"

    lines = [
        f"### {title}",
        "",
        "| model | prompt | mode | all: mean [95% CI] | all: worst | unseen: mean [95% CI] | unseen: worst |",
    ]
    lines.append("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['mode']} | {f(r['all_mean'])}{ci(r.get('all_ci95'))} | {f(r['all_worst'])} | "
            f"{f(r['unseen_mean'])}{ci(r.get('unseen_ci95'))} | {f(r['unseen_worst'])} |"
        )
    lines += [
        "",
        "| paper's claim | prompt | difference (points) [paired 95% CI] | reaches the threshold | resolved (CI excludes 0) "
        "| test examples per task for ±2 |",
        "|---|---|---:|---|---|---:|",
    ]
    for c in claims:
        lo, hi = c["ci95_points"]
        need = c["n_test_for_2_points"] if c["n_test_for_2_points"] is not None else "more seeds"
        lines.append(
            f"| {c['claim']} | {c['variant']} | {c['difference_points']:+.1f} [{lo:+.1f}, {hi:+.1f}] | "
            f"{'yes' if c['holds'] else 'no'} | {'yes' if c['resolved'] else 'no'} | {need} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raymeta.infra.io import atomic_write_bytes

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, variant in zip(axes, ("direct", "channel")):
        sel = [r for r in rows if r["variant"] == variant]
        names = [f"{r['model']}\n{r['mode']}" for r in sel]
        x = range(len(sel))
        ax.bar([i - 0.2 for i in x], [r["all_mean"] for r in sel], 0.4, label="all targets")
        ax.bar([i + 0.2 for i in x], [r["unseen_mean"] or 0 for r in sel], 0.4, label="unseen domain")
        ax.set_xticks(list(x), names, rotation=60, fontsize=7, ha="right")
        ax.set_title(f"{title} — {variant}")
        ax.set_ylabel("macro-F1 / accuracy (%), mean over seeds")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--data", default=None, help="data folder (default: the built-in settings)")
    ap.add_argument("--setting", default="mix_to_mix")
    ap.add_argument("--variant", default="direct", help="prompt variant for meta-training (evaluation uses both)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a training config override for every method, e.g. --set inner.lr=1e-4 (repeatable)",
    )
    ap.add_argument(
        "--core-only", action="store_true", help="skip the adaptation and limited-data runs (the methods' ICL rows only)"
    )
    ap.add_argument(
        "--eval-workers", type=int, default=None, help="run each evaluation on N Ray workers (raymeta eval --workers)"
    )
    args = ap.parse_args(argv)

    from bench.common import environment
    from raymeta.infra.io import atomic_write_json, atomic_write_text

    size = SIZES[args.size]
    out = (args.out or Path(f"bench/results/quality-{args.size}-{args.setting}")).resolve()
    base = {
        "model": args.model,
        "data": args.data,
        "setting": args.setting,
        "variant": args.variant,
        "distributed": False,
        **size["train"],
        **_overrides(args.set),
    }
    methods = args.methods.split(",")
    extras = [] if args.core_only else [m for m in ("metaicl", "maml_en_llm") if m in methods]
    runs = {m: _run_config(m, {"method": m}, out, base) for m in methods}  # every run checked before any work
    for m in extras:
        limited = {"method": m, "max_examples_per_task": size["limited_examples"]}
        runs[f"{m}-limited"] = _run_config(f"{m}-limited", limited, out, base)

    evals: dict[str, dict] = {"raw": _evaluate("raw", args.model, out, size, args, adapt=False)}
    finals: dict[str, Path] = {}
    for method in methods:
        finals[method] = _train(runs[method])
        evals[method] = _evaluate(method, str(finals[method]), out, size, args, adapt=False)
    for method in extras:
        evals[f"{method}+adapt"] = _evaluate(method, str(finals[method]), out, size, args, adapt=True)
        final = _train(runs[f"{method}-limited"])
        evals[f"{method}-limited"] = _evaluate(f"{method}-limited", str(final), out, size, args, adapt=False)

    rows = _rows(evals)
    claims = _claims(evals)
    title = f"{args.setting}, {args.size} size" + "".join(f", {item}" for item in args.set)
    atomic_write_json(
        out / "quality.json",
        {
            "benchmark": "quality",
            **environment(),
            "size": args.size,
            "train": base,
            "eval": size["eval"],
            "rows": rows,
            "claims": claims,
        },
    )
    atomic_write_text(out / "quality.md", _markdown(rows, claims, title))
    _plot(rows, out / "quality.png", title)
    print(_markdown(rows, claims, title))


if __name__ == "__main__":
    import sys

    from raymeta.errors import UserError

    try:
        main()
    except UserError as e:
        print(f"quality: error: {e}", file=sys.stderr)
        sys.exit(2)
