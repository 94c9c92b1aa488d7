"""Held-out validation during meta-training: some meta-train tasks are kept out and evaluated by ICL.

`validation.tasks = N` picks N of the setting's meta-train tasks (a seeded choice among the tasks
whose pool examples can be scored: every example has at least two options and its output among
them), removes them from meta-training, and builds from each pool a small evaluation set in
MetaICL's shape: one test set of `test_examples` examples, and per seed `k` demonstrations drawn from
the rest of the pool. The target tasks of the setting are never touched, so tuning on this score
does not leak into the reported results.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from raymeta.config import TrainConfig
from raymeta.core.optim import AdamState
from raymeta.data.layout import DataDir, Example, Setting
from raymeta.errors import UserError
from raymeta.eval.adapt import AdaptConfig
from raymeta.eval.icl import EvalConfig, evaluate_setting

__all__ = ["HeldOut", "held_out_data", "held_out_tasks", "validate", "validation_adaptation"]


def _scorable(examples: Sequence[Example]) -> bool:
    return all(len(e.options) >= 2 and e.output in e.options for e in examples)


def held_out_tasks(cfg: TrainConfig, setting: Setting, pools: dict[str, list[Example]]) -> tuple[str, ...]:
    """The meta-train tasks held out for validation (empty when validation is off)."""
    v = cfg.run.validation
    if v.tasks == 0:
        return ()
    need = v.k + v.test_examples
    usable = sorted(t for t in setting.train if len(pools[t]) >= need and _scorable(pools[t]))
    if len(usable) < v.tasks:
        raise UserError(
            f"validation.tasks: {v.tasks} held-out tasks asked for, but setting {setting.name!r} has only {len(usable)} "
            f"meta-train tasks whose pools have >= k + test_examples = {need} examples, all with options"
        )
    if len(setting.train) - v.tasks < cfg.tasks.tasks_per_step:
        raise UserError(
            f"validation.tasks: holding out {v.tasks} of {len(setting.train)} meta-train tasks leaves fewer than "
            f"tasks_per_step = {cfg.tasks.tasks_per_step}"
        )
    rng = random.Random(v.seed)
    return tuple(sorted(rng.sample(usable, v.tasks)))


@dataclass
class HeldOut:
    """The validation tasks in the shape `evaluate_setting` reads (a stand-in for a `DataDir`)."""

    setting: Setting
    metas: dict[str, dict[str, Any]]
    demos: dict[tuple[str, int], list[Example]]
    tests: dict[str, list[Example]]
    seeds: tuple[int, ...]

    def task_meta(self, task: str) -> dict[str, Any]:
        return self.metas[task]

    def demonstrations(self, task: str, k: int, seed: int) -> list[Example]:
        return self.demos[task, seed]

    def test_examples(self, task: str, k: int, seed: int) -> list[Example]:
        return self.tests[task]


def held_out_data(cfg: TrainConfig, data: DataDir, tasks: Sequence[str], pools: dict[str, list[Example]]) -> HeldOut:
    v = cfg.run.validation
    seeds = tuple(range(v.seeds))
    demos: dict[tuple[str, int], list[Example]] = {}
    tests: dict[str, list[Example]] = {}
    for task in tasks:
        order = list(range(len(pools[task])))
        random.Random(v.seed * 1_000_003 + zlib.crc32(task.encode())).shuffle(order)
        tests[task] = [pools[task][i] for i in order[: v.test_examples]]
        rest = order[v.test_examples :]
        for seed in seeds:
            pick = random.Random(seed * 7_919 + zlib.crc32(task.encode())).sample(rest, v.k)
            demos[task, seed] = [pools[task][i] for i in pick]
    setting = Setting(name="validation", train=(), test=tuple(tasks))
    return HeldOut(setting, {t: data.task_meta(t) for t in tasks}, demos, tests, seeds)


def validation_adaptation(cfg: TrainConfig, state: AdamState | None, step: int) -> AdaptConfig | None:
    """What val_adapt_* adapts with: the run's own inner loop from the outer state S as it is now (as-trained,
    the default), or `inner.optimizer` at `adapt_lr` from zero moments (explicit); None without adapt_steps."""
    v = cfg.run.validation
    if not v.adapt_steps:
        return None
    if v.adapt == "explicit":
        return AdaptConfig(v.adapt_steps, cfg.meta.inner.optimizer, v.adapt_lr)
    return AdaptConfig.as_trained(cfg.meta, steps=v.adapt_steps, state=state, state_sha256=f"in-memory:step-{step}")


def validate(
    model: Any, tokenizer: Any, held: HeldOut, cfg: TrainConfig, state: AdamState | None = None, step: int = 0
) -> dict[str, float]:
    """ICL on the held-out tasks (and after adaptation when asked): val_score, val_loss[, val_adapt_*].
    `state` is the outer optimizer's state S (as-trained adaptation starts from it under init/shared)."""
    v = cfg.run.validation
    modes = [(m, m.training) for m in model.modules()]  # each module's own: model.train(flag) would copy the root's
    out: dict[str, float] = {}
    runs: list[tuple[str, AdaptConfig | None]] = [("val", None)]
    adapt = validation_adaptation(cfg, state, step)
    if adapt is not None:
        runs.append(("val_adapt", adapt))
    for prefix, adapt in runs:
        ecfg = EvalConfig(
            k=v.k,
            seeds=held.seeds,
            variants=(cfg.tasks.variant,),
            modes=("icl",),
            max_length_per_example=cfg.tasks.max_length_per_example,
            truncation="shared",
            adapt=adapt,
        )
        res = evaluate_setting(model, tokenizer, held, held.setting, ecfg, model_id="validation", progress=False)  # type: ignore[arg-type]
        (run,) = res["runs"].values()
        out[f"{prefix}_score"] = run["all"]["mean"]
        out[f"{prefix}_loss"] = sum(t["gold_loss"] for t in run["per_task"].values()) / len(run["per_task"])
    for module, training in modes:
        module.training = training
    return out
