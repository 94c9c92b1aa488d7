"""Hyperparameter sweeps: Ray Tune + Optuna (TPE) over meta-training configs, ASHA early stopping.

A sweep file (YAML) names a base config, fixed overrides, a search space over any config key, the
objective (a validation metric on held-out meta-train tasks) and how many trials to run:

    base: ../configs/quickstart.yaml       # optional; relative to this file
    config: {steps: 4, validation: {tasks: 3, every: 2}}
    metric: val_score                      # val_score | val_loss | val_adapt_score | val_adapt_loss
    mode: max
    num_samples: 6
    max_concurrent_trials: 1
    seed: 0
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or {type: none}
    search: tpe                            # tpe | random | grid (grid: choices only; num_samples = grid size)
    resources: {num_workers: 1, cpus_per_worker: 1.0}                # per trial (config keys)
    space:
      inner.lr: {loguniform: [1.0e-6, 1.0e-3]}
      inner.steps: {int: [1, 3]}
      outer.optimizer: {choice: [adam, adamw]}
      inner.optimizer+moment_policy: {choice: [[sgd, none], [adamw, shared]]}   # joint choice

Each trial is one distributed meta-training run: a Tune function builds a `TorchTrainer` (through
`raymeta.train.train`) whose `TuneReportCallback` forwards rank 0's reports to Tune. Trials report
at every validation step only (their checkpoint interval is set to the validation interval), so ASHA
compares trials at equal meta-steps. The run folder holds:

    experiment/          Ray Tune's experiment state (what `--resume` restores)
    study.db             the Optuna study (SQLite), written as trials finish
    trials/<trial_id>/   each trial's meta-training run (config.yaml, metrics.jsonl, checkpoints/)
    trials.csv           every trial: status, parameters, objective
    best_config.yaml     the best trial's full config; `raymeta train best_config.yaml` runs it
    objective.png, importance.png, parallel.png
"""

from __future__ import annotations

import copy
import csv
import io
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raymeta.config import TrainConfig, _set, apply_overrides, to_dict
from raymeta.errors import UserError
from raymeta.io import atomic_write_text, read_yaml

__all__ = ["DISTRIBUTIONS", "METRICS", "Sweep", "load_sweep", "run_sweep", "trial_config"]

DISTRIBUTIONS = ("loguniform", "uniform", "int", "logint", "choice")
SEARCHES = ("tpe", "random", "grid")  # Optuna samplers: TPESampler, RandomSampler, GridSampler (each seeded)
METRICS = {"val_score": "max", "val_loss": "min", "val_adapt_score": "max", "val_adapt_loss": "min"}
_TOP_KEYS = (
    "name",
    "base",
    "config",
    "metric",
    "mode",
    "num_samples",
    "max_concurrent_trials",
    "seed",
    "scheduler",
    "search",
    "resources",
    "space",
    "out",
)
_RESOURCE_KEYS = ("num_workers", "cpus_per_worker", "cpus_per_task", "use_gpu", "executor", "trial_cpus")


@dataclass
class Param:
    name: str  # a config key, or several joined by "+" (a joint choice)
    kind: str
    args: list[Any]

    @property
    def keys(self) -> list[str]:
        return self.name.split("+")

    def distribution(self) -> Any:
        import optuna.distributions as d

        if self.kind == "loguniform":
            return d.FloatDistribution(float(self.args[0]), float(self.args[1]), log=True)
        if self.kind == "uniform":
            return d.FloatDistribution(float(self.args[0]), float(self.args[1]))
        if self.kind in ("int", "logint"):
            return d.IntDistribution(int(self.args[0]), int(self.args[1]), log=self.kind == "logint")
        return d.CategoricalDistribution([_encode(v) for v in self.args])

    def decode(self, value: Any) -> dict[str, Any]:
        """The config keys and values a sampled value stands for."""
        if self.kind == "choice":
            value = next(v for v in self.args if _encode(v) == value)
        if len(self.keys) > 1:
            return dict(zip(self.keys, value))
        return {self.name: value}


def _encode(value: Any) -> Any:
    """Optuna's categorical choices must be scalars: lists (joint choices) become 'a,b'."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


@dataclass
class Sweep:
    path: Path
    name: str
    base: dict[str, Any]
    metric: str
    mode: str
    num_samples: int
    max_concurrent_trials: int
    seed: int
    scheduler: dict[str, Any]
    search: str
    trial_cpus: float
    space: list[Param]
    out: Path
    config: TrainConfig = field(default_factory=TrainConfig)

    def max_reports(self) -> int:
        """How many times a trial reports (ASHA's max_t): once per validation step."""
        steps = self.config.steps
        for p in self.space:
            if "steps" in p.keys and p.kind in ("int", "logint"):
                steps = max(steps, int(p.args[1]))
        every = self.config.validation.every
        return math.ceil(steps / every) if every else 1


def _number(value: Any, where: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected a number, got {value!r}") from None


def _parse_param(name: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(f"{where}: expected one distribution, e.g. {{loguniform: [1.0e-6, 1.0e-3]}}, got {spec!r}")
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise UserError(f"{where}: unknown distribution {kind!r} (expected one of {', '.join(DISTRIBUTIONS)})")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise UserError(f"{where}: choice: expected a non-empty list of values, got {args!r}")
        if "+" in name:
            n = len(name.split("+"))
            for v in args:
                if not isinstance(v, list) or len(v) != n:
                    raise UserError(f"{where}: choice: a joint key of {n} config keys needs lists of {n} values, got {v!r}")
        return Param(name, kind, list(args))
    if "+" in name:
        raise UserError(f"{where}: a joint key (a+b) takes only a choice distribution, got {kind!r}")
    if not isinstance(args, list) or len(args) != 2:
        raise UserError(f"{where}: {kind}: expected [low, high], got {args!r}")
    low, high = (_number(a, where) for a in args)
    if not low < high:
        raise UserError(f"{where}: {kind}: empty range [{args[0]}, {args[1]}] (low must be below high)")
    if kind in ("loguniform", "logint") and low <= 0:
        raise UserError(f"{where}: {kind}: the range must be positive, got low = {args[0]}")
    if kind in ("int", "logint") and (low != int(low) or high != int(high)):
        raise UserError(f"{where}: {kind}: expected integer bounds, got {args!r}")
    return Param(name, kind, [args[0], args[1]] if kind not in ("int", "logint") else [int(low), int(high)])


def load_sweep(path: Path, *, num_samples: int | None = None, out: Path | None = None) -> Sweep:
    """Read and check a sweep file; every problem is one line naming the key."""
    raw = read_yaml(path, "sweep file") or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with keys {', '.join(_TOP_KEYS)}")
    for key in raw:
        if key not in _TOP_KEYS:
            raise UserError(f"{path}: unknown key {key!r} (known: {', '.join(_TOP_KEYS)})")
    name = str(raw.get("name", path.stem))
    base: dict[str, Any] = {}
    if raw.get("base") is not None:
        base_path = (path.parent / str(raw["base"])).resolve()
        if not base_path.is_file() and Path(str(raw["base"])).is_file():
            base_path = Path(str(raw["base"])).resolve()
        if not base_path.is_file():
            raise UserError(f"{path}: base: config file {raw['base']!r} not found (relative to {path.parent})")
        base = read_yaml(base_path, "base config") or {}
        if not isinstance(base, dict):
            raise UserError(f"{base_path}: expected a mapping of config keys")
    cfg = apply_overrides(TrainConfig(), copy.deepcopy(base), str(raw.get("base")))
    fixed = raw.get("config") or {}
    if not isinstance(fixed, dict):
        raise UserError(f"{path}: config: expected a mapping of config keys")
    apply_overrides(cfg, fixed, f"{path}: config")
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict):
        raise UserError(f"{path}: resources: expected a mapping with keys {', '.join(_RESOURCE_KEYS)}")
    trial_cpus = 0.0  # the Tune function only waits on its TorchTrainer
    for key, value in resources.items():
        if key not in _RESOURCE_KEYS:
            raise UserError(f"{path}: resources: unknown key {key!r} (known: {', '.join(_RESOURCE_KEYS)})")
        if key == "trial_cpus":
            trial_cpus = _number(value, f"{path}: resources.trial_cpus")
            if trial_cpus < 0:
                raise UserError(f"{path}: resources.trial_cpus: expected a number >= 0 (fractions allowed), got {value!r}")
        else:
            _set(cfg, key, value, f"{path}: resources")
    cfg.validate(f"{path}: config")

    metric = raw.get("metric", "val_score")
    if metric not in METRICS:
        raise UserError(f"{path}: metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    mode = raw.get("mode", METRICS[metric])
    if mode not in ("min", "max"):
        raise UserError(f"{path}: mode: expected min or max, got {mode!r}")
    if cfg.validation.tasks < 1:
        raise UserError(
            f"{path}: config.validation.tasks: a sweep needs held-out validation tasks (the objective), expected >= 1, "
            f"got {cfg.validation.tasks}"
        )
    if metric.startswith("val_adapt") and cfg.validation.adapt_steps < 1:
        raise UserError(f"{path}: metric: {metric} needs config.validation.adapt_steps >= 1")

    counts = {}
    for key, default, low in (("num_samples", 8, 1), ("max_concurrent_trials", 1, 1), ("seed", 0, 0)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{path}: {key}: expected an integer >= {low}, got {value!r}")
        counts[key] = value
    if num_samples is not None:
        counts["num_samples"] = num_samples

    scheduler = raw.get("scheduler") or {"type": "asha"}
    if not isinstance(scheduler, dict) or scheduler.get("type", "asha") not in ("asha", "none"):
        raise UserError(f"{path}: scheduler: expected {{type: asha, grace_period: N, reduction_factor: N}} or {{type: none}}")
    scheduler = {"type": "asha", "grace_period": 1, "reduction_factor": 2, **scheduler}
    for key in scheduler:
        if key not in ("type", "grace_period", "reduction_factor"):
            raise UserError(f"{path}: scheduler: unknown key {key!r} (known: type, grace_period, reduction_factor)")
    for key, low in (("grace_period", 1), ("reduction_factor", 2)):
        value = scheduler[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{path}: scheduler.{key}: expected an integer >= {low}, got {value!r}")

    space_raw = raw.get("space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise UserError(f"{path}: space: expected a mapping of config keys to distributions (at least one)")
    space = []
    for key_name, spec in space_raw.items():
        where = f"{path}: space.{key_name}"
        param = _parse_param(str(key_name), spec, where)
        for key in param.keys:  # the key exists and takes values of this type
            probe = copy.deepcopy(cfg)
            if param.kind == "choice":
                for value in param.args:
                    one = dict(zip(param.keys, value)) if len(param.keys) > 1 else {key: value}
                    _set(probe, key, one[key], where)
            else:
                for value in param.args:
                    _set(probe, key, value, where)
        if len(param.keys) > 1:  # a joint choice lists whole combinations: each must be a valid config
            for value in param.args:
                probe = copy.deepcopy(cfg)
                for key, v in zip(param.keys, value):
                    _set(probe, key, v, where)
                try:
                    probe.validate(where)
                except UserError as e:
                    raise UserError(f"{e} (in the combination {value})") from None
        space.append(param)
    search = raw.get("search", "tpe")
    if search not in SEARCHES:
        raise UserError(f"{path}: search: expected one of {', '.join(SEARCHES)}, got {search!r}")
    if search == "grid":
        for p in space:
            if p.kind != "choice":
                raise UserError(f"{path}: search: grid takes choice distributions only; space.{p.name} is {p.kind}")
        size = math.prod(len(p.args) for p in space)
        if num_samples is None and "num_samples" not in raw:
            counts["num_samples"] = size
    sweep_out = out or Path(str(raw.get("out", f"runs/tune/{name}")))
    return Sweep(
        path=path,
        name=name,
        base=to_dict(cfg),
        metric=metric,
        mode=mode,
        num_samples=counts["num_samples"],
        max_concurrent_trials=counts["max_concurrent_trials"],
        seed=counts["seed"],
        scheduler=scheduler,
        search=search,
        trial_cpus=trial_cpus,
        space=space,
        out=sweep_out.resolve(),
        config=cfg,
    )


def trial_config(sweep: Sweep, params: dict[str, Any], out: Path) -> TrainConfig:
    """The full config of one trial: base and fixed keys, the sampled values, and its run folder.

    Reports happen at validation steps only (checkpoint_every = validation.every), so every result
    Tune sees carries the objective."""
    cfg = apply_overrides(TrainConfig(), copy.deepcopy(sweep.base), "sweep")
    for p in sweep.space:
        if p.name in params:
            apply_overrides(cfg, p.decode(params[p.name]), f"space.{p.name}")
    every = cfg.validation.every or cfg.steps
    cfg.checkpoint_every = every
    cfg.log_every = every
    cfg.out = str(out)
    return cfg


def _trial(params: dict[str, Any], sweep: Sweep, root: str | None) -> None:
    """One Tune trial: a meta-training run on Ray Train, resumed from its own checkpoint if it has one."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raymeta.train import latest_checkpoint, train

    trial_id = ray.tune.get_context().get_trial_id()
    out = sweep.out / "trials" / trial_id
    cfg = trial_config(sweep, params, out)
    cfg.validate(f"trial {trial_id}")
    out.mkdir(parents=True, exist_ok=True)
    with (out / "starts.log").open("a") as f:  # one line each time this trial's function starts
        f.write(f"{time.time():.3f}\n")
    latest = latest_checkpoint(out)
    train(cfg, resume=latest is not None, progress=False, root=Path(root) if root else None, callbacks=[TuneReportCallback()])
    _wait_for_reports_to_reach_tune()


def _wait_for_reports_to_reach_tune(timeout: float = 300.0, quiet_polls: int = 3) -> None:
    """Return only once Tune has taken every report that Ray Train forwarded.

    Ray 2.60's TuneReportCallback puts rank 0's reports on a one-slot Ray queue; the trial's main
    thread moves each one to the session's result queue when Tune asks for the next result. When the
    trial function returns, Tune's wrapper puts its end-of-trial marker straight on that result queue.
    If the final report was still on the Ray queue then, it lands behind the marker and Tune drops
    it: the trial ends one report short (seen in CI: a finished trial whose last result was step 3 of
    4). So wait until both queues have stayed empty for a few polls."""
    from ray.train._internal.session import get_session

    session = get_session()
    relay = getattr(session, "_inter_actor_queue", None)
    results = getattr(session, "result_queue", None)
    if relay is None and results is None:
        return
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < quiet_polls and time.monotonic() < deadline:
        busy = (relay is not None and not relay.empty()) or (results is not None and not results.empty())
        quiet = 0 if busy else quiet + 1
        time.sleep(0.1)


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
        steps = trial_config(sweep, dict(r.config or {}), sweep.out).steps
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raymeta.io import atomic_write_bytes

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
        choices = [_encode(v) for v in p.args]
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
    import optuna

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
        cfg.checkpoint_every = sweep.config.checkpoint_every  # the base's intervals, not the trial's report cadence
        cfg.log_every = sweep.config.log_every
        header = (
            f"# best trial {best.trial_id} of sweep {sweep.name} ({sweep.path}): {sweep.metric} = {best.value:.6g}\n"
            f"# run it with: raymeta train {sweep.out / 'best_config.yaml'}\n"
        )
        atomic_write_text(sweep.out / "best_config.yaml", header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
        summary["best"] = {"trial_id": best.trial_id, sweep.metric: best.value, "params": best.params}
    _plots(sweep, rows)
    return summary


def _scheduler(sweep: Sweep) -> Any:
    if sweep.scheduler["type"] == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(sweep.max_reports(), 1),
        grace_period=min(sweep.scheduler["grace_period"], max(sweep.max_reports(), 1)),
        reduction_factor=sweep.scheduler["reduction_factor"],
    )


def _check_resources(sweep: Sweep, address: str | None) -> None:
    """One trial must fit in the cluster, or it would wait forever."""
    import ray

    cfg = copy.deepcopy(sweep.config)
    for p in sweep.space:  # the largest value a trial may draw
        if p.kind == "choice":
            continue
        if "num_workers" in p.keys:
            cfg.num_workers = max(cfg.num_workers, int(p.args[1]))
        if "cpus_per_worker" in p.keys:
            cfg.cpus_per_worker = max(cfg.cpus_per_worker, float(p.args[1]))
    need = cfg.cpus_needed() + sweep.trial_cpus
    total = ray.cluster_resources().get("CPU", 0.0)
    if need > total:
        raise UserError(
            f"{sweep.path}: resources: a trial needs num_workers x cpus_per_worker (+ cpus_per_task + trial_cpus) = "
            f"{need:g} CPUs, but the Ray cluster has {total:g}; lower them (fractions allowed) or add nodes"
        )
    concurrent = sweep.max_concurrent_trials * need
    if concurrent > total:
        message = (
            f"{sweep.path}: max_concurrent_trials: {sweep.max_concurrent_trials} trials x {need:g} CPUs = {concurrent:g} CPUs, "
            f"but the Ray cluster has {total:g}; their workers and Ray tasks would wait on each other"
        )
        if not address:  # a local cluster will not grow
            raise UserError(message + "; lower max_concurrent_trials or the trial's resources")
        import warnings

        warnings.warn(message + " (unless the cluster autoscales)", stacklevel=2)
    if cfg.use_gpu and not address and ray.cluster_resources().get("GPU", 0.0) < cfg.num_workers:
        raise UserError(f"{sweep.path}: resources.use_gpu: the local Ray cluster has no GPU for {cfg.num_workers} worker(s)")


def run_sweep(
    sweep: Sweep, *, resume: bool = False, address: str | None = None, root: Path | None = None, verbose: int = 1
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns a summary (also written as the run folder's files)."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from raymeta.train import _sampler

    experiment = sweep.out / "experiment"
    if resume and not (experiment / "tuner.pkl").is_file():
        raise UserError(f"--resume: no sweep to resume in {sweep.out} (no {experiment / 'tuner.pkl'})")
    if not resume and experiment.exists():
        raise UserError(f"{sweep.out}: holds an earlier sweep; pass --resume to finish it, or set --out to a new folder")
    _sampler(sweep.config, root)  # pre-flight on the driver: data, setting and held-out tasks fail here in one line
    from raymeta.models import resolve_model_dir

    resolve_model_dir(sweep.config.model, root)

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # the experiment state is small: save it often
    if not ray.is_initialized():
        try:
            # the dashboard serves the state API that Ray Train uses to free a stopped trial's placement group
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=True, log_to_driver=verbose > 1)
        except ConnectionError as e:
            raise UserError(f"--address {address}: cannot connect to a Ray cluster ({e})") from None
    _check_resources(sweep, address)
    sweep.out.mkdir(parents=True, exist_ok=True)

    # Tune refuses an all-zero request: a trial that holds no CPU asks for 1 MiB of memory instead
    request: dict[str, float] = {"cpu": sweep.trial_cpus} if sweep.trial_cpus > 0 else {"cpu": 0.0, "memory": float(1 << 20)}
    trainable = tune.with_resources(tune.with_parameters(_trial, sweep=sweep, root=str(root) if root else None), request)
    if resume:
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        storage = optuna.storages.RDBStorage(f"sqlite:///{sweep.out / 'study.db'}")
        sampler: optuna.samplers.BaseSampler
        if sweep.search == "grid":
            sampler = optuna.samplers.GridSampler({p.name: [_encode(v) for v in p.args] for p in sweep.space}, seed=sweep.seed)
        elif sweep.search == "random":
            sampler = optuna.samplers.RandomSampler(seed=sweep.seed)
        else:
            sampler = optuna.samplers.TPESampler(seed=sweep.seed)
        search = OptunaSearch(
            space={p.name: p.distribution() for p in sweep.space},
            metric=sweep.metric,
            mode=sweep.mode,
            sampler=sampler,
            storage=storage,
            study_name=sweep.name,
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=search,
                scheduler=_scheduler(sweep),
                num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent_trials,
                metric=sweep.metric,
                mode=sweep.mode,
            ),
            run_config=tune.RunConfig(name="experiment", storage_path=str(sweep.out), verbose=verbose),
        )
    results = tuner.fit()
    return write_outputs(sweep, results)
