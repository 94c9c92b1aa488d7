"""MetaICL's evaluation protocol: zero-shot and k-shot ICL over seeds, mean and worst case, with 95 % CIs.

For each target task and seed, the demonstrations are `{task}_{k}_{seed}_train.jsonl` and the test
examples `{task}_{k}_{seed}_test.jsonl`; every option is scored by the mean cross-entropy of its
scored span and the option with the lowest loss is the prediction. A task's score is macro-F1
(classification) or accuracy (multiple choice) per seed; we report the mean and the worst seed per
task, and their averages over tasks, for all targets and for the `unseen_domain_test` subset. Every
mean carries a bootstrap 95 % confidence interval (`raymeta.eval.stats`); the per-example predictions
it is computed from are kept in the results, so `raymeta compare` can pair two evaluations.

The work is cut into units, one per (variant, task, seed) and mode (both modes in one unit when the
model is adapted first, since they share the adapted weights); `plan` makes them, `score_unit` runs one
(in this process or in a Ray worker, `raymeta.eval.on_ray`), `assemble` turns their results into the
results dict, whatever order they finished in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from tqdm import tqdm

from raymeta.data.layout import DEFAULT_SEEDS, Example, Setting
from raymeta.data.prompts import VARIANTS, PromptBuilder, PromptFormat, default_max_length
from raymeta.errors import UserError
from raymeta.eval import stats
from raymeta.eval.adapt import AdaptConfig, adapted
from raymeta.eval.cache import LossCache, model_fingerprint
from raymeta.eval.metrics import accuracy, macro_f1, task_metric
from raymeta.eval.scoring import OptionScorer

__all__ = [
    "MODES",
    "EvalConfig",
    "LossCache",
    "Unit",
    "UnitResult",
    "assemble",
    "config_record",
    "evaluate_setting",
    "gold_loss",
    "model_fingerprint",
    "plan",
    "predictions_from_losses",
    "score_unit",
]

MODES = ("zero-shot", "icl")
# metaicl: each sequence is left-truncated on its own (MetaICL, exact; sequences that need it cannot
#          share the cached demonstrations and are scored in full).
# shared:  when some sequence of a (task, seed) would not fit, the demonstrations are left-truncated
#          once, to max_length - (longest context + target of that task and seed), so every sequence
#          fits and all share one cached prefix. Identical to `metaicl` when nothing needs truncation.
TRUNCATION = ("metaicl", "shared")


@dataclass(frozen=True)
class EvalConfig:
    k: int = 16
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    variants: tuple[str, ...] = VARIANTS
    modes: tuple[str, ...] = MODES
    max_test_examples: int | None = None
    subsample_seed: int = 0
    max_length_per_example: int = 256
    newlines: bool = True
    prefix_cache: bool = True
    truncation: str = "metaicl"
    max_batch_tokens: int = 16384
    adapt: AdaptConfig | None = None

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATION:
            raise UserError(f"expected one of {', '.join(TRUNCATION)}, got {self.truncation!r}", key="truncation")
        if self.k < 1:
            raise UserError(f"expected a positive integer, got {self.k}", key="k")
        if not self.seeds:
            raise UserError("expected at least one seed", key="seeds")
        for v in self.variants:
            if v not in VARIANTS:
                raise UserError(f"unknown variant {v!r}; expected {', '.join(VARIANTS)}", key="variants")
        for m in self.modes:
            if m not in MODES:
                raise UserError(f"unknown mode {m!r}; expected {', '.join(MODES)}", key="modes")
        if self.max_test_examples is not None and self.max_test_examples < 1:
            raise UserError(f"expected a positive integer, got {self.max_test_examples}", key="max_test_examples")


def config_record(cfg: EvalConfig) -> dict[str, Any]:
    """The evaluation config as results files store it (JSON types: lists, not tuples)."""
    record = asdict(replace(cfg, adapt=None))
    record["adapt"] = cfg.adapt.record() if cfg.adapt is not None else None  # S by its sha256, not its tensors
    return json.loads(json.dumps(record))


def _subsample(examples: list[Example], cfg: EvalConfig, task: str) -> list[Example]:
    """A seeded subset of the test examples, the same for every seed of a task (as MetaICL keeps one
    test set), so that the spread over seeds comes from the demonstrations alone."""
    if cfg.max_test_examples is None or len(examples) <= cfg.max_test_examples:
        return examples
    rng = random.Random(cfg.subsample_seed * 1_000_003 + zlib.crc32(task.encode()))
    keep = sorted(rng.sample(range(len(examples)), cfg.max_test_examples))
    return [examples[i] for i in keep]


@dataclass(frozen=True)
class Unit:
    """One piece of an evaluation: a (variant, task, seed) under one or more modes, with its examples."""

    variant: str
    task: str
    task_type: str
    seed: int
    modes: tuple[str, ...]
    tests: tuple[Example, ...]
    demos: tuple[Example, ...] | None  # needed for ICL and for adaptation


@dataclass
class UnitResult:
    variant: str
    mode: str
    task: str
    seed: int
    score: float
    gold_loss: float
    predictions: list[int]  # the chosen option of each test example
    losses: list[float]  # every option's loss, examples in order


def plan(data: Any, setting: Setting, cfg: EvalConfig) -> list[Unit]:
    """The units of an evaluation, in the order the in-process run takes them."""
    units = []
    need_demos = "icl" in cfg.modes or cfg.adapt is not None
    per_mode = [cfg.modes] if cfg.adapt is not None else [(m,) for m in cfg.modes]
    loaded = {}
    for task in setting.test:
        task_type = data.task_meta(task)["task_type"]
        for seed in cfg.seeds:
            tests = tuple(_subsample(data.test_examples(task, cfg.k, seed), cfg, task))
            demos = tuple(data.demonstrations(task, cfg.k, seed)) if need_demos else None
            loaded[task, seed] = (task_type, tests, demos)
    for variant in cfg.variants:
        for task in setting.test:
            for seed in cfg.seeds:
                task_type, tests, demos = loaded[task, seed]
                for modes in per_mode:
                    units.append(Unit(variant, task, task_type, seed, modes, tests, demos))
    return units


def _builder(tokenizer: Any, cfg: EvalConfig, variant: str, k: int) -> PromptBuilder:
    fmt = PromptFormat(variant, cfg.max_length_per_example, default_max_length(k, cfg.max_length_per_example), cfg.newlines)  # type: ignore[arg-type]
    return PromptBuilder(tokenizer, fmt)


def score_unit(
    model: torch.nn.Module, tokenizer: Any, unit: Unit, cfg: EvalConfig, model_id: str, cache: LossCache | None
) -> list[UnitResult]:
    """Score one unit: adapt first when asked (restoring the weights after), then each of its modes."""
    metric = macro_f1 if task_metric(unit.task_type) == "macro_f1" else accuracy
    out = []
    with contextlib.ExitStack() as stack:
        run_id = model_id
        if cfg.adapt is not None:
            assert unit.demos is not None
            key = stack.enter_context(adapted(model, _builder(tokenizer, cfg, unit.variant, cfg.k), unit.demos, cfg.adapt))
            run_id = f"{model_id}+adapt:{key}"
        for mode in unit.modes:
            builder = _builder(tokenizer, cfg, unit.variant, cfg.k if mode == "icl" else 0)
            demos = list(unit.demos) if mode == "icl" and unit.demos is not None else None
            losses = _score_task_seed(model, builder, demos, list(unit.tests), cfg, run_id, cache)
            chosen = _choices(unit.tests, losses)
            value = metric([ex.options[c] for ex, c in zip(unit.tests, chosen)], [ex.output for ex in unit.tests])
            out.append(UnitResult(unit.variant, mode, unit.task, unit.seed, value, gold_loss(unit.tests, losses), chosen, losses))
    return out


def _score_task_seed(
    model: torch.nn.Module,
    builder: PromptBuilder,
    demos: list[Example] | None,
    tests: list[Example],
    cfg: EvalConfig,
    model_id: str,
    cache: LossCache | None,
) -> list[float]:
    """Every option's loss for the test examples of one (task, seed) under one prompt format."""
    prefix = builder.demonstrations(demos) if demos else []
    per_example = [builder.test_sequences(ex, prefix) for ex in tests]
    max_length = builder.fmt.max_length
    if prefix and cfg.truncation == "shared":
        longest = max(len(s.context) + len(s.target) for seqs in per_example for s in seqs)
        excess = len(prefix) + longest - max_length
        if excess > 0:
            prefix = prefix[excess:]
            per_example = [builder.test_sequences(ex, prefix) for ex in tests]
    flat = [s for seqs in per_example for s in seqs]
    settings = {
        "max_length": max_length,
        "allow_truncation": demos is not None,
        "prefix_cache": cfg.prefix_cache,
        "scorer": "packed" if cfg.prefix_cache else "naive",
        "dtype": str(next(model.parameters()).dtype),
    }
    key = LossCache.key(model_id, settings, flat) if cache is not None else ""
    losses = cache.get(key, len(flat)) if cache is not None else None
    if losses is None:
        scorer = OptionScorer(
            model,
            max_length=max_length,
            allow_truncation=demos is not None,
            prefix_cache=cfg.prefix_cache,
            max_batch_tokens=cfg.max_batch_tokens,
        )
        losses = scorer.score(flat)
        if cache is not None:
            cache.put(key, losses)
    return losses


def _choices(tests: Sequence[Example], losses: Sequence[float]) -> list[int]:
    """The index of the option with the lowest loss for each example (the first on a tie)."""
    chosen, at = [], 0
    for ex in tests:
        option_losses = losses[at : at + len(ex.options)]
        at += len(ex.options)
        chosen.append(min(range(len(ex.options)), key=option_losses.__getitem__))
    return chosen


def gold_loss(tests: Sequence[Example], losses: Sequence[float]) -> float:
    """The mean loss of the correct option over the test examples."""
    total, at = 0.0, 0
    for ex in tests:
        total += losses[at + ex.options.index(ex.output)]
        at += len(ex.options)
    return total / len(tests)


def predictions_from_losses(tests: Sequence[Example], losses: Sequence[float]) -> list[str]:
    """The option with the lowest loss for each example, from the losses of all options in order."""
    return [ex.options[c] for ex, c in zip(tests, _choices(tests, losses))]


def _labels(tests: Sequence[Example], metric: str) -> tuple[list[str] | None, dict[str, int] | None]:
    """For macro-F1, ids of the labels (every option of the task, first seen first); None for accuracy."""
    if metric != "macro_f1":
        return None, None
    labels = list(dict.fromkeys(o for ex in tests for o in ex.options))
    return labels, {label: i for i, label in enumerate(labels)}


def _test_hash(tests: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in tests:
        h.update(json.dumps(ex.to_json(), sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def _summarise(per_task: dict[str, dict[str, Any]], tasks: Sequence[str], run: dict[str, Any]) -> dict[str, Any] | None:
    if not tasks:
        return None
    means = [per_task[t]["mean"] for t in tasks]
    worsts = [per_task[t]["worst"] for t in tasks]
    return {
        "mean": sum(means) / len(means),
        "ci95": stats.summary_ci(run, tasks),
        "worst": sum(worsts) / len(worsts),
        "n_tasks": len(tasks),
    }


def assemble(
    setting: Setting, cfg: EvalConfig, units: Sequence[Unit], results: Iterable[UnitResult], model_id: str
) -> dict[str, Any]:
    """The results dict (JSON-able) from the units and their results (in any order)."""
    by_key = {(r.variant, r.mode, r.task, r.seed): r for r in results}
    unit_of = {(u.task, u.seed): u for u in units}
    suffix = cfg.adapt.suffix if cfg.adapt is not None else ""
    runs: dict[str, Any] = {}
    for variant in cfg.variants:
        for mode in cfg.modes:
            per_task: dict[str, dict[str, Any]] = {}
            for task in setting.test:
                first = unit_of[task, cfg.seeds[0]]
                metric = task_metric(first.task_type)
                labels, ids = _labels(first.tests, metric)
                rs = [by_key[variant, mode, task, seed] for seed in cfg.seeds]
                values = [r.score for r in rs]
                tests = {seed: unit_of[task, seed].tests for seed in cfg.seeds}
                per_task[task] = {
                    "metric": metric,
                    "n_test": len(first.tests),
                    "seeds": {str(r.seed): r.score for r in rs},
                    "mean": sum(values) / len(values),
                    "worst": min(values),
                    "gold_loss": sum(r.gold_loss for r in rs) / len(rs),
                    "test_hash": _test_hash([ex for seed in cfg.seeds for ex in tests[seed]]),
                    "labels": labels,
                    # per seed, per test example: the predicted and the correct option (label ids for macro-F1)
                    "predictions": {
                        str(r.seed): [ids[ex.options[c]] if ids else c for ex, c in zip(tests[r.seed], r.predictions)] for r in rs
                    },
                    "gold": {
                        str(seed): [ids[ex.output] if ids else ex.options.index(ex.output) for ex in tests[seed]]
                        for seed in cfg.seeds
                    },
                }
                if len({len(t) for t in tests.values()}) == 1:
                    per_task[task]["ci95"] = stats.task_ci(per_task[task], task)
            run: dict[str, Any] = {"per_task": per_task}
            run["all"] = _summarise(per_task, setting.test, run)
            run["unseen_domain"] = _summarise(per_task, setting.unseen_domain_test, run)
            runs[f"{variant}/{mode}{suffix}"] = run
    return {
        "setting": setting.name,
        "targets": list(setting.test),
        "unseen_domain_test": list(setting.unseen_domain_test),
        "model_fingerprint": model_id,
        "config": config_record(cfg),
        "ci95_method": stats.METHOD.format(n=stats.REPLICATES, seed=stats.SEED),
        "runs": runs,
    }


def sample_records(units: Sequence[Unit], results: Iterable[UnitResult], cfg: EvalConfig) -> Iterable[dict[str, Any]]:
    """One record per scored test example: its option losses, the prediction and the gold output."""
    suffix = cfg.adapt.suffix if cfg.adapt is not None else ""
    tests = {(u.task, u.seed): u.tests for u in units}
    for r in sorted(results, key=lambda r: (r.variant, r.mode, r.task, r.seed)):
        at = 0
        for i, (ex, c) in enumerate(zip(tests[r.task, r.seed], r.predictions)):
            losses = r.losses[at : at + len(ex.options)]
            at += len(ex.options)
            yield {
                "run": f"{r.variant}/{r.mode}{suffix}",
                "task": r.task,
                "seed": r.seed,
                "index": i,
                "input": ex.input,
                "options": list(ex.options),
                "option_losses": losses,
                "prediction": ex.options[c],
                "gold": ex.output,
                "correct": ex.options[c] == ex.output,
            }


def evaluate_setting(
    model: torch.nn.Module,
    tokenizer: Any,
    data: Any,
    setting: Setting,
    cfg: EvalConfig,
    *,
    model_id: str | None = None,
    cache: LossCache | None = None,
    progress: bool = True,
    on_result: Callable[[str, str, int, float], None] | None = None,
    samples: list[dict[str, Any]] | None = None,
    before_unit: Callable[[Unit], None] | None = None,
) -> dict[str, Any]:
    """Evaluate a model on the target tasks of a setting in this process; returns the results as a
    JSON-able dict. `data` is a `DataDir` (or anything with its `task_meta`, `test_examples` and
    `demonstrations`); when `samples` is a list, every test example's record is appended to it.
    `before_unit` is called before each unit is scored and may raise to stop there (a deadline): the
    finished units' losses are in `cache`, so a rerun picks up where this one stopped."""
    model.eval()
    model_id = model_id or model_fingerprint(model)
    units = plan(data, setting, cfg)
    suffix = cfg.adapt.suffix if cfg.adapt is not None else ""
    results: list[UnitResult] = []
    with tqdm(total=len(units), desc=f"evaluating {setting.name}", unit="run", disable=not progress) as bar:
        for unit in units:
            if before_unit is not None:
                before_unit(unit)
            for r in score_unit(model, tokenizer, unit, cfg, model_id, cache):
                results.append(r)
                if on_result is not None:
                    on_result(f"{r.variant}/{r.mode}{suffix}", r.task, r.seed, r.score)
            bar.update(1)
    if samples is not None:
        samples.extend(sample_records(units, results, cfg))
    return assemble(setting, cfg, units, results, model_id)
