"""Bar chart of an evaluation: mean and worst case over seeds, all and unseen-domain targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_results"]


def plot_results(results: dict[str, Any], path: Path) -> None:
    import matplotlib

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
