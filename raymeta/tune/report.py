"""A sweep's outputs from Tune's results: trials.csv, best_config.yaml and the plots.

Works on a finished sweep and on one restored mid-way (`raymeta tune --resume`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import optuna
import yaml

from raymeta.config import to_dict
from raymeta.io import atomic_write_bytes, atomic_write_text
from raymeta.storage import RunStore
from raymeta.tune.space import Param, encode
from raymeta.tune.sweep import Sweep, trial_config

matplotlib.use("Agg")

__all__ = ["TrialRow", "write_outputs"]


def _objective_value(metrics: dict[str, Any], metric: str) -> float | None:
    value = metrics.get(metric)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


@dataclass
class TrialRow:
    trial_id: str
    status: str
    iterations: int
    value: float | None
    params: dict[str, Any]
    error: str = ""
    number: int = 0  # Tune's running number: the order trials started
    step: int = 0  # the meta-step of the last report


def _rows(sweep: Sweep, results: Any) -> list[TrialRow]:
    """One row per trial. A trial is completed when its last report is at its own final step.

    Tune's iteration count is not the test: a trial resumed after a killed driver restarts from its
    raymeta checkpoint, and the restored experiment state can be a report behind it, so the count can
    fall short though the trial ran every step; and a sampled `steps` below the space's top needs
    fewer reports than ASHA's max_t."""
    rows = []
    for r in results:
        metrics = r.metrics or {}
        iterations = int(metrics.get("training_iteration", 0) or 0)
        last_step = int(metrics.get("step", 0) or 0)
        steps = trial_config(sweep, dict(r.config or {}), sweep.out).run.steps
        if r.error is not None:
            status = "error"
        elif last_step < steps:
            status = "stopped_early"
        else:
            status = "completed"
        params = {p.name: (r.config or {}).get(p.name) for p in sweep.space}
        error = str(r.error).strip().splitlines()[-1][:300] if r.error is not None else ""
        parts = Path(r.path).name.split("_")  # _trial_<id>_<number>_<params>_<date>
        trial_id = metrics.get("trial_id") or parts[2]
        number = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0
        value = _objective_value(metrics, sweep.metric)
        row = TrialRow(str(trial_id), status, iterations, value, params, error, number, last_step)
        rows.append(row)
    rows.sort(key=lambda x: (x.number, x.trial_id))  # the order Tune started them
    return rows


def _write_csv(sweep: Sweep, rows: Sequence[TrialRow]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "trial_id", "status", "step", "reports", sweep.metric, *[p.name for p in sweep.space], "error"])
    for r in rows:
        value = "" if r.value is None else r.value
        w.writerow([r.number, r.trial_id, r.status, r.step, r.iterations, value, *r.params.values(), r.error])
    atomic_write_text(sweep.out / "trials.csv", buf.getvalue())


def _best(sweep: Sweep, rows: Sequence[TrialRow]) -> TrialRow | None:
    """The best trial among those that ran to the end (early-stopped trials were judged on fewer steps)."""
    done = [r for r in rows if r.status == "completed" and r.value is not None] or [r for r in rows if r.value is not None]
    if not done:
        return None
    return (max if sweep.mode == "max" else min)(done, key=lambda r: r.value)  # type: ignore[arg-type,return-value]


def _plots(sweep: Sweep, rows: Sequence[TrialRow]) -> list[Path]:
    import matplotlib.pyplot as plt  # deferred: pyplot is loaded only to draw

    def save(fig: Any, name: str) -> Path:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(sweep.out / name, buf.getvalue())
        return sweep.out / name

    written = []
    scored = [(r.number, r) for r in rows if r.value is not None]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = {"completed": "tab:blue", "stopped_early": "tab:orange", "error": "tab:red"}
    for status, color in colors.items():
        pts = [(i, float(r.value or 0.0)) for i, r in scored if r.status == status]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, label=status)
    best_so_far, running = [], None
    for _, r in scored:
        assert r.value is not None
        running = r.value if running is None else (max if sweep.mode == "max" else min)(running, r.value)
        best_so_far.append(running)
    if scored:
        ax.step([i for i, _ in scored], best_so_far, where="post", color="gray", label="best so far")
    ax.set_xlabel("trial (in the order they started)")
    ax.set_ylabel(sweep.metric)
    ax.set_title(f"{sweep.name}: {sweep.metric} per trial (last report)")
    ax.legend(fontsize=8)
    written.append(save(fig, "objective.png"))

    importances = _importances(sweep, rows)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * max(1, len(importances))))
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set_xlabel("importance (Optuna fANOVA)")
    else:
        ax.text(0.5, 0.5, "needs at least 2 finished trials that differ", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(f"{sweep.name}: parameter importances")
    written.append(save(fig, "importance.png"))

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * (len(sweep.space) + 1)), 4))
    axes = [p.name for p in sweep.space] + [sweep.metric]

    def position(p: Param | None, value: Any, all_values: list[Any]) -> float:
        if p is None or p.kind != "choice":
            nums = [float(v) for v in all_values if v is not None]
            lo, hi = min(nums), max(nums)
            x = float(value)
            if p is not None and p.kind in ("loguniform", "logint"):
                lo, hi, x = math.log(lo), math.log(hi), math.log(x)
            return 0.5 if hi == lo else (x - lo) / (hi - lo)
        choices = [encode(v) for v in p.args]
        return choices.index(value) / max(1, len(choices) - 1)

    if scored:
        values = [r.value for _, r in scored]
        lo, hi = min(values), max(values)  # type: ignore[type-var]
        cmap = plt.get_cmap("viridis")
        for _, r in scored:
            ys = [position(p, r.params[p.name], [x.params[p.name] for _, x in scored]) for p in sweep.space]
            ys.append(position(None, r.value, values))
            shade = 0.5 if hi == lo else (r.value - lo) / (hi - lo)  # type: ignore[operator]
            ax.plot(range(len(axes)), ys, color=cmap(shade if sweep.mode == "max" else 1 - shade), alpha=0.8)
    ax.set_xticks(range(len(axes)), axes, rotation=20, fontsize=8)
    ax.set_yticks([])
    ax.set_title(f"{sweep.name}: parallel coordinates (colour: {sweep.metric}, brighter is better)")
    written.append(save(fig, "parallel.png"))
    return written


def _importances(sweep: Sweep, rows: Sequence[TrialRow]) -> dict[str, float]:
    """Optuna's fANOVA importances over the finished trials (empty when they cannot be computed)."""
    trials = []
    dists = {p.name: p.distribution() for p in sweep.space}
    for r in rows:
        if r.value is None or any(v is None for v in r.params.values()):
            continue
        trials.append(optuna.trial.create_trial(params=dict(r.params), distributions=dists, value=r.value))
    if len(trials) < 2:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if sweep.mode == "max" else "minimize")
    study.add_trials(trials)
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):
        return {}


def write_outputs(sweep: Sweep, results: Any) -> dict[str, Any]:
    """trials.csv, best_config.yaml and the plots, from a finished (or restored) sweep."""
    rows = _rows(sweep, results)
    _write_csv(sweep, rows)
    best = _best(sweep, rows)
    summary: dict[str, Any] = {
        "trials": len(rows),
        "completed": sum(r.status == "completed" for r in rows),
        "stopped_early": sum(r.status == "stopped_early" for r in rows),
        "errors": sum(r.status == "error" for r in rows),
        "best": None,
    }
    if best is not None:
        cfg = trial_config(sweep, best.params, Path(f"runs/{sweep.name}-best"))
        cfg.run.checkpoint_every = sweep.config.run.checkpoint_every  # the base's intervals, not the trial's report cadence
        cfg.run.log_every = sweep.config.run.log_every
        header = (
            f"# best trial {best.trial_id} of sweep {sweep.name} ({sweep.path}): {sweep.metric} = {best.value:.6g}\n"
            f"# run it with: raymeta train {sweep.out / 'best_config.yaml'}\n"
        )
        atomic_write_text(sweep.out / "best_config.yaml", header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
        summary["best"] = {"trial_id": best.trial_id, sweep.metric: best.value, "params": best.params}
    _plots(sweep, rows)
    if sweep.remote:  # the files the sweep wrote in its staging folder go to the sweep's place on object storage
        store = RunStore(sweep.remote)
        for name in ("trials.csv", "best_config.yaml", "study.db", "objective.png", "importance.png", "parallel.png"):
            if (sweep.out / name).is_file():
                store.write_bytes(name, (sweep.out / name).read_bytes())
    return summary
