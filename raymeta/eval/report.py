"""Reports of evaluations: Markdown tables and a bar chart (mean with its 95 % CI and worst case over seeds, all and
unseen-domain targets), one table over several evaluations of one protocol, and paired comparisons."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raymeta.errors import UserError

__all__ = ["compare", "comparison_table", "load_results", "markdown_table", "plot_results"]

# the config keys that decide which test examples, seeds and prompts a score is over
PROTOCOL_KEYS = ("k", "seeds", "max_test_examples", "subsample_seed", "max_length_per_example", "newlines", "truncation")


def plot_results(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # deferred: matplotlib loads only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    groups = [("all", "mean"), ("all", "worst"), ("unseen_domain", "mean"), ("unseen_domain", "worst")]
    labels = ["all targets\nmean", "all targets\nworst seed", "unseen domain\nmean", "unseen domain\nworst seed"]
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, run) in enumerate(runs.items()):
        values = [100 * (run[g] or {}).get(stat, float("nan")) for g, stat in groups]
        # error bars: the 95 % CI of the means (worst cases have none)
        cis = [(run[g] or {}).get("ci95") if stat == "mean" else None for g, stat in groups]
        err = [
            [v - 100 * c[0] if c else 0 for v, c in zip(values, cis)],
            [100 * c[1] - v if c else 0 for v, c in zip(values, cis)],
        ]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=name, yerr=err, capsize=3)
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(groups))], labels)
    ax.set_ylabel("macro-F1 / accuracy (%)")
    ax.set_title(f"{results['setting']}: {results.get('model', '')}".strip(": "))
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _mean_ci(summary: dict[str, Any] | None) -> str:
    """`45.2 [41.0, 49.3]`: a mean and its 95 % CI in %."""
    if not summary:
        return "–"
    ci = summary.get("ci95")
    return f"{_pct(summary['mean'])} [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else _pct(summary["mean"])


def markdown_table(results: dict[str, Any], title: str | None = None) -> str:
    """Summary (mean / worst over seeds, all and unseen-domain targets), then per-task means."""
    runs = results["runs"]
    lines = [f"### {title or results['setting']}", ""]
    lines += ["| prompt | all: mean [95% CI] | all: worst | unseen: mean [95% CI] | unseen: worst |", "|---|---:|---:|---:|---:|"]
    for name, run in runs.items():
        a, u = run["all"], run["unseen_domain"] or {}
        lines.append(f"| {name} | {_mean_ci(a)} | {_pct(a['worst'])} | {_mean_ci(u)} | {_pct(u.get('worst'))} |")
    lines += ["", "Per task (mean over seeds [95% CI]; worst in parentheses):", ""]
    names = list(runs)
    lines += ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    unseen = set(results["unseen_domain_test"])
    for task in results["targets"]:
        first = runs[names[0]]["per_task"][task]
        cells = [f"{_mean_ci(runs[n]['per_task'][task])} ({_pct(runs[n]['per_task'][task]['worst'])})" for n in names]
        star = " *" if task in unseen else ""
        lines.append(f"| {task}{star} | {first['metric']} | " + " | ".join(cells) + " |")
    n_test = sorted({t["n_test"] for t in runs[names[0]]["per_task"].values()})
    lines += [
        "",
        "\\* unseen-domain target. Scores in %: macro-F1 (classification) or accuracy (multiple choice); "
        f"{'-'.join(map(str, n_test[:: max(len(n_test) - 1, 1)]))} test examples per task, "
        f"{len(results['config']['seeds'])} seeds. 95% CI: {results.get('ci95_method', 'none')}.",
    ]
    return "\n".join(lines) + "\n"


def load_results(path: Path) -> dict[str, Any]:
    """A `raymeta eval` results.json (a folder or the file); anything else is one `UserError`."""
    file = path / "results.json" if path.is_dir() else path
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: not a readable results.json ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("runs"), dict) or "setting" not in results:
        raise UserError(f"{file}: not a raymeta eval results.json (expected 'setting' and 'runs')")
    return results


def _protocol(results: dict[str, Any]) -> dict[str, Any]:
    config = results.get("config") or {}
    return {"setting": results["setting"], "targets": results.get("targets"), **{k: config.get(k) for k in PROTOCOL_KEYS}}


def check_same_protocol(named: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Refuse results of different settings, targets, k, seeds or test subsets (their scores do not compare)."""
    (label0, first), *rest = named
    want = _protocol(first)
    for label, results in rest:
        got = _protocol(results)
        diff = [k for k in want if want[k] != got[k]]
        if diff:
            shown = ", ".join(f"{k}={got[k]!r} (not {want[k]!r})" for k in diff[:3])
            raise UserError(f"{label}: another evaluation protocol than {label0}: {shown}; only like evaluations compare")


def comparison_table(named: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One summary row per (model, prompt/mode) over several evaluations of one protocol."""
    check_same_protocol(named)
    lines = [f"### {named[0][1]['setting']}", ""]
    lines += [
        "| model | prompt | all: mean [95% CI] | all: worst | unseen: mean [95% CI] | unseen: worst |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, results in named:
        for name, run in results["runs"].items():
            a, u = run["all"], run["unseen_domain"] or {}
            lines.append(f"| {label} | {name} | {_mean_ci(a)} | {_pct(a['worst'])} | {_mean_ci(u)} | {_pct(u.get('worst'))} |")
    return "\n".join(lines) + "\n"


def _pairable(label_a: str, a: dict[str, Any], label_b: str, b: dict[str, Any]) -> list[str]:
    """The runs both results hold; refuses results whose tasks, seeds or test examples differ."""
    check_same_protocol([(label_a, a), (label_b, b)])
    runs = [r for r in a["runs"] if r in b["runs"]]
    if not runs:
        raise UserError(f"{label_b}: no prompt/mode in common with {label_a} ({', '.join(a['runs'])} vs {', '.join(b['runs'])})")
    for run in runs:
        for task in a["targets"]:
            ta, tb = a["runs"][run]["per_task"][task], b["runs"][run]["per_task"][task]
            if "predictions" not in ta or "predictions" not in tb:
                old = label_b if "predictions" in ta else label_a
                raise UserError(f"{old}: no per-example predictions (an older results.json); evaluate again")
            if ta.get("test_hash") != tb.get("test_hash") or ta["n_test"] != tb["n_test"]:
                raise UserError(f"{label_b}: task {task!r} was scored on other test examples than in {label_a}; cannot pair them")
    return runs


def compare(label_a: str, a: dict[str, Any], label_b: str, b: dict[str, Any], half_width: float = 0.02) -> dict[str, Any]:
    """A − B per prompt/mode for all targets and the unseen-domain ones, with paired bootstrap 95 % CIs,
    and how many test examples per task would resolve ±`half_width`."""
    from raymeta.eval import stats  # deferred: numpy loads only to compare

    rows = []
    for run in _pairable(label_a, a, label_b, b):
        ra, rb = a["runs"][run], b["runs"][run]
        power = stats.examples_needed(ra, rb, a["targets"], half_width)
        rows.append({"run": run, "targets": "all", **stats.paired(ra, rb, a["targets"]), "power": power})
        if a["unseen_domain_test"]:
            rows.append({"run": run, "targets": "unseen_domain", **stats.paired(ra, rb, a["unseen_domain_test"])})
    return {
        "a": label_a,
        "b": label_b,
        "setting": a["setting"],
        "method": stats.METHOD.format(n=stats.REPLICATES, seed=stats.SEED),
        "rows": rows,
    }


def compare_table(comparison: dict[str, Any]) -> str:
    a, b = comparison["a"], comparison["b"]
    lines = [f"### {comparison['setting']}: {a} − {b} (paired)", ""]
    lines += [f"| prompt | targets | {a} | {b} | {a} − {b} [95% CI] | resolved |", "|---|---|---:|---:|---:|---|"]
    for r in comparison["rows"]:
        lo, hi = r["ci95"]
        verdict = ("yes: " + (f"{a} better" if lo > 0 else f"{b} better")) if r["resolved"] else "no"
        lines.append(
            f"| {r['run']} | {r['targets'].replace('_', ' ')} | {_pct(r['a'])} | {_pct(r['b'])} | "
            f"{100 * r['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | {verdict} |"
        )
    lines += ["", f"95% CI: {comparison['method']}.", ""]
    for r in comparison["rows"]:
        p = r.get("power")
        if p is None:
            continue
        need = (
            f"about {p['n_test_needed']} test examples per task"
            if p["n_test_needed"] is not None
            else "more seeds: the seeds alone leave it wider"
        )
        lines.append(
            f"- {r['run']}, all targets: ±{100 * p['half_width_now']:.1f} points now with {p['n_test_now']} test "
            f"examples per task; ±{100 * p['half_width']:.0f} points needs {need}."
        )
    return "\n".join(lines) + "\n"
