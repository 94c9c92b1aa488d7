"""Running a sweep on Ray Tune: one Tune function per trial (a Ray Train run), Optuna as the searcher, ASHA."""

from __future__ import annotations

import copy
import os
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import ray
import ray.tune
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from raymeta.config import PlacementConfig
from raymeta.errors import UserError
from raymeta.infra.ray_session import check_resources, connect, describe, joined_address, progress_while_short, train_settings
from raymeta.infra.storage import RunStore
from raymeta.ray_compat import drain_tune_reports
from raymeta.run.api import train
from raymeta.run.checkpoint import latest_checkpoint
from raymeta.run.trainer import preflight
from raymeta.tune.outputs import write_outputs
from raymeta.tune.space import encode
from raymeta.tune.sweep import Sweep, trial_config

__all__ = ["run_sweep"]


def _trial(params: dict[str, Any], sweep: Sweep, root: str | None) -> None:
    """One Tune trial: a meta-training run on Ray Train, resumed from its own checkpoint if it has one."""
    trial_id = ray.tune.get_context().get_trial_id()
    out = sweep.trial_out(trial_id)
    cfg = trial_config(sweep, params, out)
    cfg.validate(f"trial {trial_id}")
    store = RunStore(out)
    if store.local is not None:
        store.local.mkdir(parents=True, exist_ok=True)
    starts = store.read_text("starts.log") if store.exists("starts.log") else ""
    line = f"{time.time():.3f}\n"  # one line each time this trial's function starts
    store.append_line("starts.log", line, starts + line)
    latest = latest_checkpoint(out)
    reports = ValidationReports(sweep.metric)
    train(cfg, resume=latest is not None, progress=False, root=Path(root) if root else None, callbacks=[reports])
    drain_tune_reports()


class ValidationReports(TuneReportCallback):
    """Forwards to Tune the reports that carry the objective (validation steps); a checkpoint between
    validations is reported to Ray Train only. Tune never needs raymeta's checkpoints: a resumed trial
    restarts from its own run folder."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, None)


def _scheduler(sweep: Sweep) -> Any:
    """ASHA over meta-steps: rungs at validation steps (`grace_period` and `max_t` counted in validations,
    as the sweep file says). A resumed trial repeats the validations after its last checkpoint with the
    same steps, which ASHA has already recorded."""
    if sweep.scheduler["type"] == "none":
        return None
    every = sweep.config.run.validation.every or sweep.max_steps()
    rounds = max(sweep.max_reports(), 1)
    return ASHAScheduler(
        time_attr="step",
        max_t=max(sweep.max_steps(), 1),
        grace_period=min(sweep.scheduler["grace_period"], rounds) * every,
        reduction_factor=sweep.scheduler["reduction_factor"],
    )


def _trial_placement(sweep: Sweep) -> PlacementConfig:
    """The placement of the largest trial the space can draw."""
    placement = copy.deepcopy(sweep.config.placement)
    for p in sweep.space:
        if p.kind == "choice":
            continue
        if "num_workers" in p.keys:
            placement.num_workers = max(placement.num_workers, int(p.args[1]))
        if "cpus_per_worker" in p.keys:
            placement.cpus_per_worker = max(placement.cpus_per_worker, float(p.args[1]))
    return placement


def _check_concurrency(sweep: Sweep, need: float, joined: bool) -> None:
    """Concurrent trials that cannot all fit would wait on each other's workers and Ray tasks."""
    total = ray.cluster_resources().get("CPU", 0.0)
    concurrent = sweep.max_concurrent_trials * need
    if concurrent > total:
        message = (
            f"{sweep.path}: max_concurrent_trials: {sweep.max_concurrent_trials} trials x {need:g} CPUs = {concurrent:g} CPUs, "
            f"but the Ray cluster has {total:g}; their workers and Ray tasks would wait on each other"
        )
        if not joined:  # a local cluster will not grow
            raise UserError(message + "; lower max_concurrent_trials or the trial's resources")
        warnings.warn(message + " (unless the cluster autoscales)", stacklevel=2)


def run_sweep(
    sweep: Sweep, *, resume: bool = False, address: str | None = None, root: Path | None = None, verbose: int = 1
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns a summary (also written as the run folder's files)."""
    joined_address(address)  # --address against $RAY_ADDRESS: one line, before anything
    store = RunStore(sweep.location)
    store.check_writable()
    if resume and not store.exists("experiment/tuner.pkl"):
        raise UserError(f"no sweep to resume in {sweep.location} (no {store.uri('experiment/tuner.pkl')})", key="resume")
    if not resume and store.exists("experiment"):
        raise UserError(f"{sweep.location}: holds an earlier sweep; pass --resume to finish it, or set --out to a new folder")
    preflight(sweep.config, root)
    train_settings()
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # the experiment state is small: save it often
    # Tune warns whenever handling a result takes over 0.5 s; the Optuna study's SQLite write takes ~1.3 s
    # on a busy 2-core machine, every report, and the warning says nothing the user can act on
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "5")
    # the dashboard serves the state API that Ray Train uses to free a stopped trial's placement group
    joined = connect(address, dashboard=True, log_to_driver=verbose > 1)
    if verbose:
        print(f"[raymeta] {describe()}", flush=True)
    placement = _trial_placement(sweep)
    need_cpus, need_gpus = placement.cpus_needed() + sweep.trial_cpus, placement.gpus_needed()
    check_resources(need_cpus, need_gpus, joined=joined, what=f"{sweep.path}: resources: a trial")
    _check_concurrency(sweep, need_cpus, joined)
    sweep.out.mkdir(parents=True, exist_ok=True)
    if sweep.remote and store.exists("study.db"):  # resuming a remote sweep: its study, back in the staging folder
        (sweep.out / "study.db").write_bytes(store.read_bytes("study.db"))

    # Tune refuses an all-zero request: a trial that holds no CPU asks for 1 MiB of memory instead
    request: dict[str, float] = {"cpu": sweep.trial_cpus} if sweep.trial_cpus > 0 else {"cpu": 0.0, "memory": float(1 << 20)}
    trainable = tune.with_resources(tune.with_parameters(_trial, sweep=sweep, root=str(root) if root else None), request)
    if resume:
        tuner = tune.Tuner.restore(store.uri("experiment"), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        storage = optuna.storages.RDBStorage(f"sqlite:///{sweep.out / 'study.db'}")
        sampler: optuna.samplers.BaseSampler
        if sweep.search == "grid":
            sampler = optuna.samplers.GridSampler({p.name: [encode(v) for v in p.args] for p in sweep.space}, seed=sweep.seed)
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
            run_config=tune.RunConfig(name="experiment", storage_path=sweep.location, verbose=verbose),
        )
    with progress_while_short(need_cpus, need_gpus):
        results = tuner.fit()
    return write_outputs(sweep, results)
