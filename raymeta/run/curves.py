"""A run's learning curve as a Markdown table (what `raymeta train` prints at the end)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from raymeta.infra.storage import RunStore

__all__ = ["all_steps_skipped", "metrics_table"]

_COLUMNS = (
    ("step", "step", "{:d}"),
    ("meta_loss", "meta (query) loss", "{:.4f}"),
    ("support_loss", "support loss", "{:.4f}"),
    ("grad_norm", "meta-grad norm", "{:.3g}"),
    ("val_score", "val score", "{:.3f}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("seconds", "s/step", "{:.1f}"),
)


def _cell(value: object, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–" if value is None else str(value)
    return fmt.format(value)


def metrics_table(out: str | Path, max_rows: int = 12) -> str:
    """The rows of `out/metrics.jsonl` (at most `max_rows`, evenly spaced, first and last kept); `out`
    is a run folder, local or on object storage."""
    store = RunStore(out)
    text = store.read_text("metrics.jsonl") if store.exists("metrics.jsonl") else ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows:
        return ""
    if len(rows) > max_rows:
        picks = sorted({round(i * (len(rows) - 1) / (max_rows - 1)) for i in range(max_rows)})
        rows = [rows[i] for i in picks]
    columns = [c for c in _COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(key), fmt) for key, _, fmt in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def all_steps_skipped(out: str | Path) -> bool:
    """Whether every meta-step of the run in `out` was skipped (a non-finite loss or meta-gradient)."""
    store = RunStore(out)
    text = store.read_text("metrics.jsonl") if store.exists("metrics.jsonl") else ""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return False
    last = json.loads(lines[-1])
    return bool(last.get("step")) and last.get("skipped_steps", 0) >= last["step"]
