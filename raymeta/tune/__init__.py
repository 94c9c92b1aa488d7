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
`raymeta.train`) whose `TuneReportCallback` forwards rank 0's reports to Tune. Trials report
at every validation step only (their checkpoint interval is set to the validation interval), so ASHA
compares trials at equal meta-steps. The run folder holds:

    experiment/          Ray Tune's experiment state (what `--resume` restores)
    study.db             the Optuna study (SQLite), written as trials finish
    trials/<trial_id>/   each trial's meta-training run (config.yaml, metrics.jsonl, checkpoints/)
    trials.csv           every trial: status, parameters, objective
    best_config.yaml     the best trial's full config; `raymeta train best_config.yaml` runs it
    objective.png, importance.png, parallel.png, slice.png   Optuna's matplotlib plots of the finished trials

Optuna's dashboard reads the study as it runs: `optuna-dashboard sqlite:///OUT/study.db`.
"""

from raymeta.tune.run import run_sweep
from raymeta.tune.sweep import METRICS, Sweep, load_sweep, trial_config

__all__ = ["METRICS", "Sweep", "load_sweep", "run_sweep", "trial_config"]
