"""One typed config for meta-training, loadable from YAML and overridable with dotted keys.

    raymeta train config.yaml inner.lr=3e-5 outer.optimizer=adam tasks_per_step=8

The same dotted names are the keys of a Ray Tune `param_space`. Every problem is one `UserError`
naming the key (and the file) and what was expected.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raymeta.core.device import DEVICE_CHOICES, is_device_spec
from raymeta.core.meta import MAX_LR, METHODS, MOMENT_POLICIES, PRECISIONS, InnerConfig, MetaConfig, OuterConfig
from raymeta.data.prompts import VARIANTS
from raymeta.errors import UserError, echo
from raymeta.infra.io import read_yaml
from raymeta.model.weights import ADAPTER_TYPES, AdapterConfig, WeightsConfig

__all__ = [
    "ADAPTER_TYPES",
    "EXECUTORS",
    "METHODS",
    "MOMENT_POLICIES",
    "PRECISIONS",
    "VARIANTS",
    "InnerConfig",
    "MetaConfig",
    "OuterConfig",
    "PlacementConfig",
    "TRACKERS",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "ValidationConfig",
    "with_absolute_paths",
    "AdapterConfig",
    "WeightsConfig",
    "apply_overrides",
    "keys",
    "load_config",
    "parse_overrides",
    "set_key",
    "to_dict",
]

EXECUTORS = ("auto", "local", "ray")
ADAPT_SOURCES = ("as-trained", "explicit")  # raymeta.eval.adapt.SOURCES
TRACKERS = ("none", "tensorboard", "mlflow")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def _bad(where: str, key: str, expected: str, got: Any) -> UserError:
    return UserError(f"expected {expected}, got {echo(got)}", key=key, where=where)


def _at_least(where: str, low: int, pairs: Any) -> None:
    for key, count in pairs:
        if count < low:
            raise _bad(where, key, f"an integer >= {low}", count)


@dataclass
class TaskConfig:
    """Which tasks meta-training draws from and how they become meta-batches of ICL prompts."""

    data: str | None = None  # a MetaICL-layout folder; None = the built-in settings (raymeta fetch)
    setting: str = "mix_to_mix"
    variant: str = "direct"
    k: int = 4  # demonstrations per training instance
    tasks_per_step: int = 2
    support_size: int = 1  # ICL instances per task for the inner loop
    query_size: int = 1  # ICL instances per task for the meta-gradient
    max_length_per_example: int = 256
    max_length: int = 512
    max_examples_per_task: int | None = None  # the limited-data setting: cap on each task's pool

    def validate(self, where: str) -> None:
        if self.variant not in VARIANTS:
            raise _bad(where, "variant", "one of " + ", ".join(VARIANTS), self.variant)
        _at_least(
            where,
            1,
            (
                ("k", self.k),
                ("tasks_per_step", self.tasks_per_step),
                ("support_size", self.support_size),
                ("query_size", self.query_size),
                ("max_length_per_example", self.max_length_per_example),
            ),
        )
        if self.max_examples_per_task is not None and self.max_examples_per_task < self.k + 2:
            raise _bad(
                where,
                "max_examples_per_task",
                f"at least k + 2 = {self.k + 2} (k demonstrations and support/query targets)",
                self.max_examples_per_task,
            )
        if self.max_length < self.max_length_per_example:
            raise _bad(where, "max_length", f"at least max_length_per_example ({self.max_length_per_example})", self.max_length)


@dataclass
class ValidationConfig:
    """Held-out validation: `tasks` of the setting's meta-train tasks (a seeded choice among those
    whose pool examples all have options) are removed from meta-training; every `every` steps (and at
    the last step) rank 0 evaluates k-shot ICL on them: `k` demonstrations per seed drawn from the
    task's pool, `test_examples` other examples of the pool as the test set, `seeds` seeds. Reported
    as val_score (macro-F1 / accuracy, mean over tasks and seeds) and val_loss (mean loss of the gold
    option), optionally after `adapt_steps` steps of adaptation on the demonstrations (val_adapt_score):
    `adapt: as-trained` (the default) runs the run's own inner loop (inner optimizer and its settings,
    from the current outer state S under init/shared); `adapt: explicit` runs `inner.optimizer` at
    `adapt_lr` from zero moments (what validation did before raymeta 0.2)."""

    tasks: int = 0  # 0: no validation
    every: int = 0  # 0: at the last step only
    k: int = 4
    seeds: int = 1
    test_examples: int = 16
    adapt_steps: int = 0
    adapt: str = "as-trained"  # as-trained | explicit
    adapt_lr: float = 1e-5  # explicit only
    seed: int = 0

    def validate(self, where: str) -> None:
        _at_least(
            where,
            1,
            (("validation.k", self.k), ("validation.seeds", self.seeds), ("validation.test_examples", self.test_examples)),
        )
        _at_least(
            where,
            0,
            (
                ("validation.tasks", self.tasks),
                ("validation.every", self.every),
                ("validation.adapt_steps", self.adapt_steps),
                ("validation.seed", self.seed),
            ),
        )
        if self.adapt not in ADAPT_SOURCES:
            raise _bad(where, "validation.adapt", "one of " + ", ".join(ADAPT_SOURCES), self.adapt)
        if not 0 < self.adapt_lr <= MAX_LR:
            raise _bad(where, "validation.adapt_lr", f"a positive number <= {MAX_LR:g}", self.adapt_lr)


@dataclass
class RunConfig:
    """One run: the model it starts from, its length and seed, its folder, checkpoints, logs, validation."""

    model: str = "builtin"
    steps: int = 10  # meta-steps
    seed: int = 0
    checkpoint_every: int = 5
    keep_checkpoints: int = 0  # 0 keeps every checkpoint; N > 0 keeps the newest N (a SmolLM2 checkpoint is 1.6 GB)
    log_every: int = 1
    out: str = "runs/train"
    tracking: str = "none"  # none | tensorboard | mlflow (rank 0 logs what metrics.jsonl holds, and the config)
    tracking_uri: str | None = None  # mlflow: its tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///OUT/mlflow.db)
    tracking_experiment: str = "raymeta"  # mlflow: the experiment's name
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def validate(self, where: str) -> None:
        _at_least(where, 1, (("steps", self.steps), ("checkpoint_every", self.checkpoint_every), ("log_every", self.log_every)))
        _at_least(where, 0, (("seed", self.seed),))  # numpy's generators take no negative seed
        if self.keep_checkpoints < 0:
            raise _bad(where, "keep_checkpoints", "a number >= 0", self.keep_checkpoints)
        if self.tracking not in TRACKERS:
            raise _bad(where, "tracking", "one of " + ", ".join(TRACKERS), self.tracking)
        if not self.tracking_experiment.strip():
            raise _bad(where, "tracking_experiment", "a non-empty name", self.tracking_experiment)
        self.validation.validate(where)


@dataclass
class PlacementConfig:
    """Where the run's work goes: Ray Train workers, the executor of the per-task adaptations, resources."""

    distributed: bool = True  # Ray Train workers; false runs the loop in this process without Ray
    device: str = "auto"  # this process's device when distributed is false: auto | cpu | cuda | cuda:N
    num_workers: int = 1
    executor: str = "auto"  # local | ray | auto (ray when a worker has more than one task a step)
    cpus_per_worker: float = 0.5
    cpus_per_task: float = 0.5
    use_gpu: bool = False  # one GPU per Ray Train worker (the worker's device is ray.train.torch.get_device())
    gpus_per_task: float = 0.0  # GPUs per Ray task of the executor (fractions share a GPU)
    max_failures: int = 1  # worker failures to recover from (from the last checkpoint)
    placement_strategy: str = "PACK"  # PACK | SPREAD (one worker per node where possible)

    def validate(self, where: str) -> None:
        for key, value, allowed in (
            ("executor", self.executor, EXECUTORS),
            ("placement_strategy", self.placement_strategy, PLACEMENT_STRATEGIES),
        ):
            if value not in allowed:
                raise _bad(where, key, "one of " + ", ".join(allowed), value)
        _at_least(where, 1, (("num_workers", self.num_workers),))
        for key, cpus in (("cpus_per_worker", self.cpus_per_worker), ("cpus_per_task", self.cpus_per_task)):
            if not cpus > 0:
                raise _bad(where, key, "a positive number of CPUs (fractions allowed)", cpus)
        if self.max_failures < -1:
            raise _bad(where, "max_failures", "an integer >= -1 (-1: unlimited)", self.max_failures)
        if not is_device_spec(self.device):
            raise _bad(where, "device", DEVICE_CHOICES, self.device)
        if self.distributed and self.device.startswith("cuda") and not self.use_gpu:
            raise _bad(
                where, "device", "auto or cpu for Ray Train workers without use_gpu (set use_gpu: true for GPUs)", self.device
            )
        if self.distributed and self.device == "cpu" and self.use_gpu:
            raise _bad(where, "device", "auto or cuda with use_gpu: true", self.device)
        if not self.gpus_per_task >= 0:
            raise _bad(where, "gpus_per_task", "a number of GPUs >= 0 (fractions allowed)", self.gpus_per_task)

    def cpus_needed(self) -> float:
        """CPUs one run holds at once: its Train workers, plus one Ray task when tasks run as Ray tasks."""
        return self.num_workers * self.cpus_per_worker + (self.cpus_per_task if self.executor != "local" else 0.0)

    def gpus_needed(self) -> float:
        """GPUs one run holds at once: one per Train worker under use_gpu, plus one Ray task's gpus_per_task."""
        return self.num_workers * float(self.use_gpu) + (self.gpus_per_task if self.executor != "local" else 0.0)

    def executor_for(self, tasks_on_worker: int) -> str:
        if self.executor != "auto":
            return self.executor
        return "ray" if self.distributed and tasks_on_worker > 1 else "local"


@dataclass
class TrainConfig:
    """A whole meta-training run: the algorithm (`meta`, what `raymeta.core` reads), the weights it
    changes (`weights`: `trainable`, `adapter.*`), its tasks, the run
    and its placement. Users see one flat set of keys (`inner.lr`, `tasks_per_step`, `num_workers`, ...):
    each key belongs to one section, `keys()` lists them and `to_dict` writes them."""

    meta: MetaConfig = field(default_factory=MetaConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    run: RunConfig = field(default_factory=RunConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    def validate(self, where: str = "config") -> TrainConfig:
        self.meta.validate(where)
        self.weights.validate(where)
        if self.meta.precision == "bf16" and self.meta.method == "maml_en_llm" and self.weights.adapter.type == "none":
            warnings.warn(
                "precision bf16 puts the inner loop under bf16 autocast, which moves full-weight second-order "
                "meta-gradients far from fp32's while the Adam moments are young (SmolLM2, first step: cosine 0.39; "
                "after 20 steps: 0.9995; docs/precision.md); precision: bf16_query keeps the inner loop in fp32 "
                "(cosine >= 0.994 at both), and with LoRA bf16 is faithful",
                UserWarning,
                stacklevel=1,  # one place: shown once per process, however often a config is validated
            )
        self.tasks.validate(where)
        self.run.validate(where)
        if self.meta.outer.warmup_steps > self.run.steps:
            raise _bad(where, "outer.warmup_steps", f"at most steps ({self.run.steps})", self.meta.outer.warmup_steps)
        self.placement.validate(where)
        return self


@functools.cache
def keys() -> dict[str, str]:
    """Every top-level config key and the section that holds it, in `to_dict`'s order."""
    sections = typing.get_type_hints(TrainConfig)
    return {f.name: section for section, tp in sections.items() for f in dataclasses.fields(tp)}


def with_absolute_paths(flat: dict[str, Any]) -> dict[str, Any]:
    """`model` and `data` that name a folder here, made absolute: the processes Ray starts (Train workers, tasks)
    run in folders of their own, where a relative path names nothing (or something else)."""
    out = dict(flat)
    for key in ("model", "data"):
        value = out.get(key)
        if isinstance(value, str) and value != "builtin" and "://" not in value and Path(value).expanduser().exists():
            out[key] = str(Path(value).expanduser().resolve())
    return out


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The flat key -> value mapping (JSON and YAML types) that `apply_overrides` reads back."""
    out: dict[str, Any] = {}
    for section in dataclasses.fields(TrainConfig):
        out.update(dataclasses.asdict(getattr(cfg, section.name)))
    out["betas"] = list(cfg.meta.betas)
    for loop in ("inner", "outer"):  # JSON and YAML types: lists, not tuples
        betas = getattr(cfg.meta, loop).betas
        out[loop]["betas"] = list(betas) if betas is not None else None
    return out


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, where)
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(typing.get_args(tp)):
            raise UserError(f"{where}: {key}: expected a list of {len(typing.get_args(tp))} numbers, got {echo(value)}")
        return tuple(_coerce(v, a, key, where) for v, a in zip(value, typing.get_args(tp)))
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {key}: expected true or false, got {echo(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: {key}: expected an integer, got {echo(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-5 without a dot as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where}: {key}: expected a number, got {echo(value)}")
        if not math.isfinite(float(value)):  # nan would silently switch a check off (grad_clip), inf overflow
            raise UserError(f"{where}: {key}: expected a finite number, got {echo(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return ",".join(value)  # a YAML list of names (adapter.target_modules)
        if not isinstance(value, str):
            raise UserError(f"{where}: {key}: expected a string, got {echo(value)}")
        return value
    raise TypeError(f"unsupported config type {tp}")


def set_key(cfg: Any, dotted: str, value: Any, where: str) -> None:
    """Set one dotted key (`inner.lr`) of a config from a YAML value, coerced to the key's type."""
    parts = dotted.split(".")
    target = cfg
    if isinstance(cfg, TrainConfig):
        owners = keys()
        if parts[0] not in owners:
            raise UserError(f"{where}: unknown key {dotted!r} (known: {', '.join(sorted(owners))})")
        target = getattr(cfg, owners[parts[0]])
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(target)}
        if part not in names:
            prefix = ".".join(parts[:i])
            known = ", ".join(sorted((f"{prefix}." if prefix else "") + n for n in names))
            raise UserError(f"{where}: unknown key {dotted!r} (known: {known})")
        hints = typing.get_type_hints(type(target))
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hints[part]):
                if not isinstance(value, dict):
                    raise UserError(f"{where}: {dotted}: expected a mapping of its keys, got {value!r}")
                for sub, subvalue in value.items():
                    set_key(cfg, f"{dotted}.{sub}", subvalue, where)
            else:
                setattr(target, part, _coerce(value, hints[part], dotted, where))
        else:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise UserError(f"{where}: unknown key {dotted!r} ({'.'.join(parts[: i + 1])} has no sub-keys)")


def apply_overrides(cfg: TrainConfig, mapping: dict[str, Any], where: str) -> TrainConfig:
    for key, value in mapping.items():
        set_key(cfg, key, value, where)
    return cfg


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: {"inner": {"lr": 1}} -> {"inner.lr": 1}."""
    items: dict[str, Any] = {}
    for k, v in d.items():
        items.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return items


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then `key=value` overrides (values parsed as YAML), validated."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        data = read_yaml(path, "config file") or {}
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of config keys")
        apply_overrides(cfg, data, str(path))
    apply_overrides(cfg, parse_overrides(overrides or [], "override"), "command line")
    return cfg.validate(str(path) if path is not None else "config")


def parse_overrides(items: list[str], where: str) -> dict[str, Any]:
    """`key=value` items as a mapping, values parsed as YAML (a string where that fails)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"{where} {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out
