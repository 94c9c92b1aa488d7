"""MetaICL's evaluation protocol: zero-shot and k-shot ICL over seeds, mean and worst case.

For each target task and seed, the demonstrations are `{task}_{k}_{seed}_train.jsonl` and the test
examples `{task}_{k}_{seed}_test.jsonl`; every option is scored by the mean cross-entropy of its
scored span and the option with the lowest loss is the prediction. A task's score is macro-F1
(classification) or accuracy (multiple choice) per seed; we report the mean and the worst seed per
task, and their averages over tasks, for all targets and for the `unseen_domain_test` subset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from raymeta.data.layout import DEFAULT_SEEDS, DataDir, Example, Setting
from raymeta.data.prompts import VARIANTS, PromptBuilder, PromptFormat, Scored, default_max_length
from raymeta.errors import UserError
from raymeta.eval.adapt import AdaptConfig, adapted
from raymeta.eval.metrics import accuracy, macro_f1, task_metric
from raymeta.eval.scoring import OptionScorer
from raymeta.io import atomic_write_json

__all__ = [
    "MODES",
    "EvalConfig",
    "LossCache",
    "model_fingerprint",
    "evaluate_setting",
    "predictions_from_losses",
    "gold_loss",
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
    return json.loads(json.dumps(asdict(cfg)))


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's class, config and every parameter and buffer (so a changed weight is a miss)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class LossCache:
    """Per-option losses on disk, keyed by everything that changes them.

    The key hashes the model fingerprint, the scorer's settings and the exact token ids of every
    sequence (which covers task, seed, k, variant, truncation and tokenizer). Losses are stored as
    JSON floats, which round-trip exactly, so a hit returns the very numbers a fresh run computed.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model_id: str, settings: dict[str, Any], seqs: Sequence[Scored]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"model": model_id, **settings}, sort_keys=True).encode())
        for s in seqs:
            h.update(json.dumps([s.prefix, s.context, s.target]).encode())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str, n: int) -> list[float] | None:
        path = self._path(key)
        if path.is_file():
            try:
                losses = json.loads(path.read_text())["losses"]
            except (json.JSONDecodeError, KeyError):
                losses = None
            if isinstance(losses, list) and len(losses) == n:
                self.hits += 1
                return [float(x) for x in losses]
        self.misses += 1
        return None

    def put(self, key: str, losses: Sequence[float]) -> None:
        atomic_write_json(self._path(key), {"losses": list(losses)})


def _subsample(examples: list[Example], cfg: EvalConfig, task: str) -> list[Example]:
    """A seeded subset of the test examples, the same for every seed of a task (as MetaICL keeps one
    test set), so that the spread over seeds comes from the demonstrations alone."""
    if cfg.max_test_examples is None or len(examples) <= cfg.max_test_examples:
        return examples
    rng = random.Random(cfg.subsample_seed * 1_000_003 + zlib.crc32(task.encode()))
    keep = sorted(rng.sample(range(len(examples)), cfg.max_test_examples))
    return [examples[i] for i in keep]


@dataclass
class _TaskData:
    task_type: str
    demos: dict[int, list[Example]] = field(default_factory=dict)
    tests: dict[int, list[Example]] = field(default_factory=dict)


def _score_task_seed(
    model: torch.nn.Module,
    builder: PromptBuilder,
    demos: list[Example] | None,
    tests: list[Example],
    cfg: EvalConfig,
    model_id: str,
    cache: LossCache | None,
) -> tuple[list[str], float]:
    """Predictions for the test examples of one (task, seed) under one prompt format, and the mean
    loss of the gold option."""
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
    return predictions_from_losses(tests, losses), gold_loss(tests, losses)


def gold_loss(tests: Sequence[Example], losses: Sequence[float]) -> float:
    """The mean loss of the correct option over the test examples."""
    total, at = 0.0, 0
    for ex in tests:
        total += losses[at + ex.options.index(ex.output)]
        at += len(ex.options)
    return total / len(tests)


def predictions_from_losses(tests: Sequence[Example], losses: Sequence[float]) -> list[str]:
    """The option with the lowest loss for each example, from the losses of all options in order."""
    predictions, at = [], 0
    for ex in tests:
        option_losses = losses[at : at + len(ex.options)]
        at += len(ex.options)
        predictions.append(ex.options[min(range(len(ex.options)), key=option_losses.__getitem__)])
    return predictions


def _summarise(per_task: dict[str, dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any] | None:
    if not tasks:
        return None
    means = [per_task[t]["mean"] for t in tasks]
    worsts = [per_task[t]["worst"] for t in tasks]
    return {"mean": sum(means) / len(means), "worst": sum(worsts) / len(worsts), "n_tasks": len(tasks)}


def evaluate_setting(
    model: torch.nn.Module,
    tokenizer: Any,
    data: DataDir,
    setting: Setting,
    cfg: EvalConfig,
    *,
    model_id: str | None = None,
    cache: LossCache | None = None,
    progress: bool = True,
    on_result: Callable[[str, str, int, float], None] | None = None,
) -> dict[str, Any]:
    """Evaluate a model on the target tasks of a setting; returns the results as a JSON-able dict."""
    model.eval()
    model_id = model_id or model_fingerprint(model)
    tasks: dict[str, _TaskData] = {}
    for task in setting.test:
        meta = data.task_meta(task)
        td = _TaskData(task_type=meta["task_type"])
        for seed in cfg.seeds:
            td.tests[seed] = _subsample(data.test_examples(task, cfg.k, seed), cfg, task)
            if "icl" in cfg.modes or cfg.adapt is not None:
                td.demos[seed] = data.demonstrations(task, cfg.k, seed)
        tasks[task] = td

    suffix = f"+adapt{cfg.adapt.steps}" if cfg.adapt is not None else ""
    builders = {}
    for variant in cfg.variants:
        for mode in cfg.modes:
            max_length = default_max_length(cfg.k if mode == "icl" else 0, cfg.max_length_per_example)
            fmt = PromptFormat(variant, cfg.max_length_per_example, max_length, cfg.newlines)  # type: ignore[arg-type]
            builders[variant, mode] = PromptBuilder(tokenizer, fmt)
    icl_max_length = default_max_length(cfg.k, cfg.max_length_per_example)
    scores: dict[tuple[str, str, str], dict[str, float]] = {}
    gold_losses: dict[tuple[str, str, str], list[float]] = {}
    bar = tqdm(
        total=len(builders) * len(tasks) * len(cfg.seeds), desc=f"evaluating {setting.name}", unit="run", disable=not progress
    )
    for variant in cfg.variants:
        for task, td in tasks.items():
            metric = macro_f1 if task_metric(td.task_type) == "macro_f1" else accuracy
            for seed in cfg.seeds:
                with contextlib.ExitStack() as stack:
                    run_id = model_id
                    if cfg.adapt is not None:
                        fmt = PromptFormat(variant, cfg.max_length_per_example, icl_max_length, cfg.newlines)  # type: ignore[arg-type]
                        key = stack.enter_context(adapted(model, PromptBuilder(tokenizer, fmt), td.demos[seed], cfg.adapt))
                        run_id = f"{model_id}+adapt:{key}"
                    for mode in cfg.modes:
                        demos = td.demos[seed] if mode == "icl" else None
                        tests = td.tests[seed]
                        preds, gold = _score_task_seed(model, builders[variant, mode], demos, tests, cfg, run_id, cache)
                        value = metric(preds, [ex.output for ex in tests])
                        scores.setdefault((variant, mode, task), {})[str(seed)] = value
                        gold_losses.setdefault((variant, mode, task), []).append(gold)
                        if on_result is not None:
                            on_result(f"{variant}/{mode}{suffix}", task, seed, value)
                        bar.update(1)

    runs: dict[str, Any] = {}
    for variant in cfg.variants:
        for mode in cfg.modes:
            per_task: dict[str, dict[str, Any]] = {}
            for task, td in tasks.items():
                seeds = scores[variant, mode, task]
                values = list(seeds.values())
                per_task[task] = {
                    "metric": task_metric(td.task_type),
                    "n_test": len(td.tests[cfg.seeds[0]]),
                    "seeds": seeds,
                    "mean": sum(values) / len(values),
                    "worst": min(values),
                    "gold_loss": sum(gold_losses[variant, mode, task]) / len(cfg.seeds),
                }
            runs[f"{variant}/{mode}{suffix}"] = {
                "per_task": per_task,
                "all": _summarise(per_task, setting.test),
                "unseen_domain": _summarise(per_task, setting.unseen_domain_test),
            }
    bar.close()
    return {
        "setting": setting.name,
        "targets": list(setting.test),
        "unseen_domain_test": list(setting.unseen_domain_test),
        "model_fingerprint": model_id,
        "config": config_record(cfg),
        "runs": runs,
    }
