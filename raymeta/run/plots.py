"""Learning curves of one or several runs (`raymeta plot RUN [RUN ...]`), read from their metrics.jsonl.

One PNG of panels -- meta (query) loss, support loss, held-out validation score and loss, meta-gradient
norm -- with every run overlaid, labelled by its folder. Runs may be local folders or object storage.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raymeta.errors import UserError
from raymeta.infra.io import atomic_write_bytes
from raymeta.infra.storage import RunStore

__all__ = ["PANELS", "load_curves", "plot_runs"]

PANELS = (
    ("meta_loss", "meta (query) loss", False),
    ("support_loss", "support loss", False),
    ("val_score", "validation score (held-out tasks)", False),
    ("val_loss", "validation loss", False),
    ("grad_norm", "meta-gradient norm", True),
)


def load_curves(run: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a run folder, or the .jsonl file itself; a torn last line
    is skipped); one line if it has none."""
    if str(run).endswith(".jsonl") and Path(run).is_file():
        text, where = Path(run).read_text(), str(run)
    else:
        store = RunStore(run, key="run")
        where = store.uri("metrics.jsonl")
        if not store.exists("metrics.jsonl"):
            raise UserError(f"{where}: not found (expected a run folder of raymeta train)", key="run")
        text = store.read_text("metrics.jsonl")
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    if not records:
        raise UserError(f"{where}: holds no meta-step yet", key="run")
    return records


def _labels(runs: Sequence[str | Path]) -> list[str]:
    """Each run's folder name, with its parent where two names clash."""
    names = [Path(str(r).rstrip("/")).name.removesuffix(".jsonl") for r in runs]
    if len(set(names)) == len(names):
        return names
    return ["/".join(Path(str(r).rstrip("/")).parts[-2:]) for r in runs]


def plot_runs(runs: Sequence[str | Path], out: Path, smooth: int = 1) -> Path:
    """Draw the runs' learning curves into `out` (PNG); `smooth` > 1 adds a moving average of that many
    steps over the raw (faint) curves. Panels no run logged are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = [load_curves(r) for r in runs]  # every run read (and refused) before anything is drawn
    panels = [p for p in PANELS if any(any(_finite(rec.get(p[0])) for rec in c) for c in curves)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title, log) in zip(axes[0], panels):
        for label, records, color in zip(_labels(runs), curves, [f"C{i % 10}" for i in range(len(runs))]):
            points = [(r["step"], float(r[key])) for r in records if _finite(r.get(key))]
            if not points:
                continue
            xs, ys = zip(*points)
            marker = "o" if len(points) < 30 or key.startswith("val_") else None
            if smooth > 1 and len(points) > smooth:
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
                avg = [sum(ys[max(0, i - smooth + 1) : i + 1]) / len(ys[max(0, i - smooth + 1) : i + 1]) for i in range(len(ys))]
                ax.plot(xs, avg, color=color, label=label)
            else:
                ax.plot(xs, ys, color=color, marker=marker, markersize=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("meta-step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
