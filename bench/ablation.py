"""The optimizer ablation's table and plot, from a finished `raymeta tune tune_configs/optimizer_ablation.yaml`.

For every (inner optimizer, moment policy, outer optimizer) cell: the held-out validation score and
gold-option loss at the last step, and the trial's mean seconds per meta-step.

    python -m bench.ablation [runs/tune/optimizer_ablation] [--out bench/results/ablation]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path, nargs="?", default=Path("runs/tune/optimizer_ablation"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/ablation"))
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import yaml

    from raymeta.infra.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    rows = []
    for folder in sorted((args.sweep / "trials").iterdir()):  # every trial's own run folder (works mid-sweep too)
        if not (folder / "metrics.jsonl").is_file():
            continue
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        metrics = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        last = metrics[-1]
        finished = last["step"] == cfg["steps"] and "val_score" in last
        rows.append(
            {
                "trial_id": folder.name,
                "inner": cfg["inner"]["optimizer"],
                "moment_policy": cfg["moment_policy"],
                "outer": cfg["outer"]["optimizer"],
                "status": "completed" if finished else f"running or interrupted at step {last['step']}",
                "val_score": 100 * last["val_score"] if finished else None,
                "val_loss": last["val_loss"] if finished else None,
                "seconds_per_step": sum(m["seconds"] for m in metrics) / len(metrics),
                "steps": len(metrics),
                "skipped_steps": last["skipped_steps"],
            }
        )
    order = {"sgd": 0, "adam": 1, "adamw": 2, "none": 0, "init": 1, "shared": 2}
    rows.sort(key=lambda r: (order[r["inner"]], order[r["outer"]], order[r["moment_policy"]]))
    lines = [
        "| inner | moments | outer | val_score (%) | val_loss | s / step | status |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        score = "–" if r["val_score"] is None else f"{r['val_score']:.1f}"
        loss = "–" if r["val_loss"] is None else f"{r['val_loss']:.3f}"
        lines.append(
            f"| {r['inner']} | {r['moment_policy']} | {r['outer']} | {score} | {loss} | "
            f"{r['seconds_per_step']:.1f} | {r['status']} |"
        )
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "ablation.md", table)
    atomic_write_json(args.out / "ablation.json", {"sweep": str(args.sweep), "rows": rows})
    for name in ("trials.csv", "best_config.yaml", "importance.png"):
        if (args.sweep / name).is_file():
            shutil.copyfile(args.sweep / name, args.out / name)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['inner']}/{r['moment_policy']}/{r['outer']}" for r in rows]
    colors = [
        "tab:gray" if r["moment_policy"] == "none" else "tab:blue" if r["moment_policy"] == "init" else "tab:green" for r in rows
    ]
    for ax, metric, title in (
        (axes[0], "val_score", "val_score (%), higher is better"),
        (axes[1], "val_loss", "val_loss, lower is better"),
    ):
        ax.bar(range(len(rows)), [r[metric] or 0 for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), labels, rotation=75, fontsize=7)
        ax.set_title(title)
    fig.suptitle("optimizer ablation: inner / moment policy / outer (grey none, blue init, green shared)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(args.out / "ablation.png", buf.getvalue())
    print(table)


if __name__ == "__main__":
    main()
