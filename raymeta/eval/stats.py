"""Confidence intervals, paired comparisons and a power figure for MetaICL-protocol results, by bootstrap.

Resampling unit: within each target task, the test examples (one draw of example indices per task,
shared by all its seeds: MetaICL keeps one test set per task and only the demonstrations change with
the seed) and the seeds (drawn with replacement); the target tasks are fixed (they are the
population the claim is about). A replicate recomputes each drawn seed's metric (macro-F1 is not a mean
over examples, so it is recomputed from the drawn predictions), averages over the drawn seeds, then over
tasks. The interval is the 2.5 and 97.5 percentiles of `REPLICATES` replicates.

The draws depend only on the task's name, its number of test examples and seeds, and `SEED`, so they
are reproducible, and two evaluations of the same tasks, seeds and test examples get the very same
draws: `paired` takes the difference replicate by replicate (a paired bootstrap).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "REPLICATES",
    "SEED",
    "METHOD",
    "Draws",
    "draws",
    "task_replicates",
    "summary_ci",
    "paired",
    "paired_over_training_seeds",
    "examples_needed",
]

REPLICATES = 2000
SEED = 0
METHOD = (
    "percentile bootstrap, {n} replicates, seed {seed}: test examples resampled within each task (one draw shared "
    "by its seeds) and seeds resampled with replacement; tasks fixed"
)


class Draws:
    """Multiplicity weights of one task's bootstrap draws: `examples` (B, n) and `seeds` (B, S)."""

    def __init__(self, examples: np.ndarray, seeds: np.ndarray) -> None:
        self.examples = examples
        self.seeds = seeds


def _multiplicities(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    idx = rng.integers(0, n, size=(b, n))
    w = np.zeros((b, n))
    np.add.at(w, (np.arange(b)[:, None], idx), 1.0)
    return w


def draws(task: str, n: int, s: int, *, resample: str = "both", replicates: int = REPLICATES) -> Draws:
    """The task's draws; `resample` "examples" or "seeds" keeps the other fixed (weights of one)."""
    rng = np.random.default_rng([SEED, zlib.crc32(task.encode()), n, s])
    ex = _multiplicities(rng, replicates, n)
    sd = _multiplicities(rng, replicates, s)
    if resample == "examples":
        sd = np.ones_like(sd)
    elif resample == "seeds":
        ex = np.ones_like(ex)
    return Draws(ex, sd)


def _metric(record: dict[str, Any], w: np.ndarray) -> np.ndarray:
    """(B, S): each replicate's metric for each seed, examples weighted by `w` (B, n)."""
    seeds = list(record["seeds"])
    pred = np.array([record["predictions"][s] for s in seeds])  # (S, n)
    gold = np.array([record["gold"][s] for s in seeds])  # (S, n): the same rows when the test set is shared
    if record["metric"] == "accuracy":
        return (w @ (pred == gold).T.astype(float)) / w.sum(1, keepdims=True)
    labels = int(max(pred.max(), gold.max())) + 1
    p = np.eye(labels)[pred]  # (S, n, L)
    g = np.eye(labels)[gold]  # (S, n, L)
    tp = np.einsum("bi,sil->bsl", w, p * g)
    n_pred = np.einsum("bi,sil->bsl", w, p)
    n_gold = np.einsum("bi,sil->bsl", w, g)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(n_pred > 0, tp / n_pred, 1.0)  # MetaICL's convention (see metrics.macro_f1)
        recall = np.where(n_gold > 0, tp / n_gold, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = n_gold > 0
    return (f1 * present).sum(-1) / present.sum(-1)


def task_replicates(record: dict[str, Any], task: str, *, resample: str = "both") -> np.ndarray:
    """(B,) bootstrap replicates of the task's mean over seeds."""
    n, s = record["n_test"], len(record["seeds"])
    d = draws(task, n, s, resample=resample)
    return (_metric(record, d.examples) * d.seeds).sum(1) / s


def _ci(reps: np.ndarray) -> list[float]:
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return [float(lo), float(hi)]


def run_replicates(run: dict[str, Any], tasks: Sequence[str], *, resample: str = "both") -> np.ndarray:
    """(B,) replicates of the mean over `tasks` of one run (a `runs[name]` entry of results)."""
    return np.mean([task_replicates(run["per_task"][t], t, resample=resample) for t in tasks], axis=0)


def summary_ci(run: dict[str, Any], tasks: Sequence[str]) -> list[float] | None:
    return _ci(run_replicates(run, tasks)) if tasks else None


def task_ci(record: dict[str, Any], task: str) -> list[float]:
    return _ci(task_replicates(record, task))


def paired(run_a: dict[str, Any], run_b: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """A − B over `tasks`: the difference of the means, its paired 95 % CI, and whether it is resolved."""
    diff = run_replicates(run_a, tasks) - run_replicates(run_b, tasks)
    point = float(np.mean([run_a["per_task"][t]["mean"] - run_b["per_task"][t]["mean"] for t in tasks]))
    lo, hi = _ci(diff)
    return {"a": _mean(run_a, tasks), "b": _mean(run_b, tasks), "diff": point, "ci95": [lo, hi], "resolved": lo > 0 or hi < 0}


def _mean(run: dict[str, Any], tasks: Sequence[str]) -> float:
    return float(np.mean([run["per_task"][t]["mean"] for t in tasks]))


def examples_needed(
    run_a: dict[str, Any], run_b: dict[str, Any] | None, tasks: Sequence[str], half_width: float = 0.02
) -> dict[str, Any]:
    """How many test examples per task a 95 % CI of ±`half_width` needs (of A − B when B is given).

    The bootstrap variance is split into a part from the test examples (resampled with the seeds fixed),
    which shrinks as 1/n, and a part from the seeds (resampled with the examples fixed), which does not:
    var(n') ≈ var_examples · n / n' + var_seeds, with every task's test set scaled alike; n is the mean
    over tasks. None when the seeds alone leave the interval wider."""

    def reps(resample: str) -> np.ndarray:
        r = run_replicates(run_a, tasks, resample=resample)
        return r - run_replicates(run_b, tasks, resample=resample) if run_b is not None else r

    n = float(np.mean([run_a["per_task"][t]["n_test"] for t in tasks]))
    var_e, var_s = float(np.var(reps("examples"))), float(np.var(reps("seeds")))
    target = (half_width / 1.96) ** 2
    scale = None if var_s >= target else var_e / (target - var_s)  # every task's test set times this
    return {
        "half_width": half_width,
        "n_test_now": round(n, 1),
        "test_set_scale": scale,
        "half_width_now": float(1.96 * np.sqrt(var_e + var_s)),
        "var_examples": var_e,
        "var_seeds": var_s,
        "n_test_needed": None if scale is None else int(np.ceil(n * scale)),
    }


def paired_over_training_seeds(
    runs_a: Sequence[dict[str, Any]], runs_b: Sequence[dict[str, Any]], tasks: Sequence[str]
) -> dict[str, Any]:
    """mean(A) − mean(B) where A and B are each several meta-training runs (training seeds) of a method,
    all evaluated on the same tasks, seeds and test examples.

    A replicate draws the training runs of A and of B with replacement (independently: run i of A and
    run i of B share nothing but their seed number) and, for every drawn run, the same test-example and
    evaluation-seed draws (the paired bootstrap of `paired`), so the interval holds all three sources of
    variance. With 3 runs a side the resampling of training runs is coarse; `per_seed` lists each run's
    mean and `t_ci95` gives Welch's t interval over the runs' means as a cross-check. `var_runs` and
    `var_common` split the replicates' variance into the part from drawing training runs (it shrinks as
    more runs are added) and the part from the shared test examples and evaluation seeds (it does not):
    `training_seeds_needed` uses them."""
    if not runs_a or not runs_b:
        raise ValueError("expected at least one run of each method")
    ra = np.array([run_replicates(r, tasks) for r in runs_a])  # (Ra, B)
    rb = np.array([run_replicates(r, tasks) for r in runs_b])
    rng = np.random.default_rng([SEED, len(runs_a), len(runs_b), zlib.crc32(",".join(tasks).encode())])
    b = ra.shape[1]
    pick_a = rng.integers(0, len(runs_a), size=(b, len(runs_a)))
    pick_b = rng.integers(0, len(runs_b), size=(b, len(runs_b)))
    cols = np.arange(b)[:, None]
    diff = ra[pick_a, cols].mean(1) - rb[pick_b, cols].mean(1)
    var_common = float(np.var(ra.mean(0) - rb.mean(0)))  # every run kept: the examples' and seeds' draws only
    means_a = [_mean(r, tasks) for r in runs_a]
    means_b = [_mean(r, tasks) for r in runs_b]
    point = float(np.mean(means_a) - np.mean(means_b))
    lo, hi = _ci(diff)
    return {
        "a": float(np.mean(means_a)),
        "b": float(np.mean(means_b)),
        "diff": point,
        "ci95": [lo, hi],
        "resolved": lo > 0 or hi < 0,
        "per_seed": {"a": means_a, "b": means_b},
        "t_ci95": _welch(means_a, means_b),
        "var_runs": max(float(np.var(diff)) - var_common, 0.0),
        "var_common": var_common,
    }


def training_seeds_needed(p: dict[str, Any], half_width: float) -> int | None:
    """Training runs a side for a 95 % interval of ±`half_width` around a `paired_over_training_seeds`
    result `p` (n runs a side now): var(n') ≈ var_runs · n / n' + var_common. None when the shared test
    examples and evaluation seeds alone leave the interval wider (more test examples would help, not seeds)."""
    n = len(p["per_seed"]["a"])
    room = (half_width / 1.96) ** 2 - p["var_common"]
    if room <= 0:
        return None
    return max(n, int(np.ceil(n * p["var_runs"] / room)))


def _welch(a: Sequence[float], b: Sequence[float]) -> list[float] | None:
    """Welch's 95 % t interval of mean(a) − mean(b); None with fewer than 2 values a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = float(np.sqrt(va + vb))
    d = float(np.mean(a) - np.mean(b))
    if se == 0:
        return [d, d]
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = float(np.interp(df, np.arange(1, len(_T975) + 1), _T975)) if df <= len(_T975) else 1.96
    return [d - t * se, d + t * se]


# Student's t 97.5 % quantiles for 1..30 degrees of freedom (Welch's df is fractional: interpolated)
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)
