"""Reports of evaluations: Markdown tables and a bar chart (mean and worst case over seeds, all and unseen-domain targets)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["comparison_table", "markdown_table", "plot_results"]


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
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=name)
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


def markdown_table(results: dict[str, Any], title: str | None = None) -> str:
    """Summary (mean / worst over seeds, all and unseen-domain targets), then per-task means."""
    runs = results["runs"]
    lines = [f"### {title or results['setting']}", ""]
    lines += ["| prompt | all: mean | all: worst | unseen: mean | unseen: worst |", "|---|---:|---:|---:|---:|"]
    for name, run in runs.items():
        a, u = run["all"], run["unseen_domain"] or {}
        lines.append(f"| {name} | {_pct(a['mean'])} | {_pct(a['worst'])} | {_pct(u.get('mean'))} | {_pct(u.get('worst'))} |")
    lines += ["", "Per task (mean over seeds; worst in parentheses):", ""]
    names = list(runs)
    lines += ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    unseen = set(results["unseen_domain_test"])
    for task in results["targets"]:
        first = runs[names[0]]["per_task"][task]
        cells = [f"{_pct(runs[n]['per_task'][task]['mean'])} ({_pct(runs[n]['per_task'][task]['worst'])})" for n in names]
        star = " *" if task in unseen else ""
        lines.append(f"| {task}{star} | {first['metric']} | " + " | ".join(cells) + " |")
    lines += ["", "\\* unseen-domain target. Scores in %: macro-F1 (classification) or accuracy (multiple choice)."]
    return "\n".join(lines) + "\n"


def comparison_table(named: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One summary row per (model, prompt/mode) over several evaluations of the same setting."""
    settings = {r["setting"] for _, r in named}
    lines = [f"### {', '.join(sorted(settings))}", ""]
    lines += ["| model | prompt | all: mean | all: worst | unseen: mean | unseen: worst |", "|---|---|---:|---:|---:|---:|"]
    for label, results in named:
        for name, run in results["runs"].items():
            a, u = run["all"], run["unseen_domain"] or {}
            lines.append(
                f"| {label} | {name} | {_pct(a['mean'])} | {_pct(a['worst'])} | {_pct(u.get('mean'))} | {_pct(u.get('worst'))} |"
            )
    return "\n".join(lines) + "\n"
