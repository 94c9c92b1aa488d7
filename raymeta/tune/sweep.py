"""A sweep file, read and checked: base config, fixed keys, search space, objective, scheduler, resources.

Every problem is one line naming the key; nothing starts before the whole file is checked.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymeta.config import TrainConfig, apply_overrides, set_key, to_dict
from raymeta.errors import UserError
from raymeta.infra.io import read_yaml
from raymeta.infra.paths import paths
from raymeta.infra.storage import is_uri
from raymeta.tune.space import Param, number, parse_space

__all__ = ["METRICS", "SEARCHES", "Sweep", "load_sweep", "trial_config"]

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
    out: Path  # the sweep's files (study.db, trials.csv, plots); for a remote sweep, a local staging copy
    config: TrainConfig = field(default_factory=TrainConfig)
    remote: str | None = None  # object storage for Tune's experiment state, the trials' run folders and the files

    @property
    def location(self) -> str:
        """Where the sweep lives, as the user wrote it: a local folder or a URI."""
        return self.remote or str(self.out)

    def trial_out(self, trial_id: str) -> str:
        return f"{self.remote.rstrip('/')}/trials/{trial_id}" if self.remote else str(self.out / "trials" / trial_id)

    def max_steps(self) -> int:
        """The most meta-steps a trial can run (the space may sample `steps`)."""
        steps = self.config.run.steps
        for p in self.space:
            if "steps" in p.keys and p.kind in ("int", "logint"):
                steps = max(steps, int(p.args[1]))
        return steps

    def max_reports(self) -> int:
        """How many times a trial reports to Tune: once per validation step."""
        every = self.config.run.validation.every
        return math.ceil(self.max_steps() / every) if every else 1


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
            trial_cpus = number(value, f"{path}: resources.trial_cpus")
            if trial_cpus < 0:
                raise UserError(f"{path}: resources.trial_cpus: expected a number >= 0 (fractions allowed), got {value!r}")
        else:
            set_key(cfg, key, value, f"{path}: resources")
    cfg.validate(f"{path}: config")

    metric = raw.get("metric", "val_score")
    if metric not in METRICS:
        raise UserError(f"{path}: metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    mode = raw.get("mode", METRICS[metric])
    if mode not in ("min", "max"):
        raise UserError(f"{path}: mode: expected min or max, got {mode!r}")
    if cfg.run.validation.tasks < 1:
        raise UserError(
            f"{path}: config.validation.tasks: a sweep needs held-out validation tasks (the objective), expected >= 1, "
            f"got {cfg.run.validation.tasks}"
        )
    if metric.startswith("val_adapt") and cfg.run.validation.adapt_steps < 1:
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

    space = parse_space(raw.get("space"), cfg, str(path))
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
    where_to = str(out or raw.get("out", f"runs/tune/{name}"))
    remote = where_to if is_uri(where_to) else None
    # a remote sweep keeps its SQLite study and tables in a local staging folder, uploaded as they change
    sweep_out = paths().root / "sweeps" / hashlib.sha256(where_to.encode()).hexdigest()[:16] if remote else Path(where_to)
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
        remote=remote,
        config=cfg,
    )


def trial_config(sweep: Sweep, params: dict[str, Any], out: str | Path) -> TrainConfig:
    """The full config of one trial: base and fixed keys, the sampled values, and its run folder.

    The trial reports at validation steps (log_every = validation.every), and only those reports reach
    Tune, so every result Tune sees carries the objective; it checkpoints on its own schedule
    (`checkpoint_every`, `keep_checkpoints`)."""
    cfg = apply_overrides(TrainConfig(), copy.deepcopy(sweep.base), "sweep")
    for p in sweep.space:
        if p.name in params:
            apply_overrides(cfg, p.decode(params[p.name]), f"space.{p.name}")
    run = cfg.run
    run.log_every = run.validation.every or run.steps
    run.out = str(out)
    if run.tracking == "mlflow" and not run.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        run.tracking_uri = f"sqlite:///{sweep.out.resolve() / 'mlflow.db'}"  # one store for the sweep: a run per trial
    if run.tracking_experiment == TrainConfig().run.tracking_experiment:
        run.tracking_experiment = sweep.name
    return cfg
