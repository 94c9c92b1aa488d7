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
from raymeta.infra.io import atomic_write_bytes, atomic_write_text
from raymeta.infra.storage import RunStore
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


def _study(sweep: Sweep, rows: Sequence[TrialRow]) -> optuna.Study:
    """The finished trials (those with a value) as an in-memory Optuna study, for Optuna's own plots."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {p.name: p.distribution() for p in sweep.space}
    study = optuna.create_study(study_name=sweep.name, direction="maximize" if sweep.mode == "max" else "minimize")
    for r in rows:
        if r.value is not None and all(v is not None for v in r.params.values()):
            study.add_trial(optuna.trial.create_trial(params=dict(r.params), distributions=dists, value=r.value))
    return study


PLOTS = {
    "objective.png": "plot_optimization_history",
    "importance.png": "plot_param_importances",
    "parallel.png": "plot_parallel_coordinate",
    "slice.png": "plot_slice",
}


def _plots(sweep: Sweep, rows: Sequence[TrialRow]) -> list[Path]:
    """Optuna's matplotlib plots of the sweep (history, importances, parallel coordinates with the
    space's log axes, slices), each a PNG in the sweep folder; a plot Optuna cannot draw yet (fewer
    than 2 finished trials) is a figure that says so."""
    import warnings

    import matplotlib.pyplot as plt  # deferred: pyplot is loaded only to draw
    from optuna.visualization import matplotlib as optuna_plots

    study = _study(sweep, rows)
    written = []
    for name, function in PLOTS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning, and its warnings on too few trials
            try:
                drawn: Any = getattr(optuna_plots, function)(study, target_name=sweep.metric)
            except (ValueError, RuntimeError, ZeroDivisionError) as e:
                drawn = plt.subplots(figsize=(6, 2))[1]
                drawn.text(0.5, 0.5, f"not drawn yet: {str(e).splitlines()[0][:80]}", ha="center", va="center")
                drawn.set_axis_off()
        ax = drawn.flat[0] if hasattr(drawn, "flat") else drawn
        fig = ax.figure
        fig.suptitle(f"{sweep.name}: {len(study.trials)} finished trials", fontsize=9)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(sweep.out / name, buf.getvalue())
        written.append(sweep.out / name)
    return written


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
        cfg.run.log_every = sweep.config.run.log_every  # the base's interval, not the trial's report cadence
        header = (
            f"# best trial {best.trial_id} of sweep {sweep.name} ({sweep.path}): {sweep.metric} = {best.value:.6g}\n"
            f"# run it with: raymeta train {sweep.out / 'best_config.yaml'}\n"
        )
        atomic_write_text(sweep.out / "best_config.yaml", header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
        summary["best"] = {"trial_id": best.trial_id, sweep.metric: best.value, "params": best.params}
    _plots(sweep, rows)
    if sweep.remote:  # the files the sweep wrote in its staging folder go to the sweep's place on object storage
        store = RunStore(sweep.remote)
        for name in ("trials.csv", "best_config.yaml", "study.db", *PLOTS):
            if (sweep.out / name).is_file():
                store.write_bytes(name, (sweep.out / name).read_bytes())
    return summary
