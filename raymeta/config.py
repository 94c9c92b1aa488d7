"""One typed config for meta-training, loadable from YAML and overridable with dotted keys.

    raymeta train config.yaml inner.lr=3e-5 outer.optimizer=adam tasks_per_step=8

The same dotted names are the keys of a Ray Tune `param_space`. Every problem is one `UserError`
naming the key (and the file) and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raymeta.errors import UserError
from raymeta.io import read_yaml
from raymeta.optim import OPTIMIZERS, OptimizerSpec

__all__ = [
    "METHODS",
    "MOMENT_POLICIES",
    "InnerConfig",
    "OuterConfig",
    "TrainConfig",
    "ValidationConfig",
    "load_config",
    "apply_overrides",
    "to_dict",
]

METHODS = ("maml_en_llm", "fomaml", "reptile", "metaicl")
MOMENT_POLICIES = ("none", "init", "shared")
VARIANTS = ("direct", "channel")
PRECISIONS = ("fp32", "bf16")
EXECUTORS = ("auto", "local", "ray")


@dataclass
class InnerConfig:
    optimizer: str = "adamw"
    lr: float = 1e-5
    steps: int = 1


@dataclass
class OuterConfig:
    optimizer: str = "adamw"
    lr: float = 1e-5


@dataclass
class ValidationConfig:
    """Held-out validation: `tasks` of the setting's meta-train tasks (a seeded choice among those
    whose pool examples all have options) are removed from meta-training; every `every` steps (and at
    the last step) rank 0 evaluates k-shot ICL on them: `k` demonstrations per seed drawn from the
    task's pool, `test_examples` other examples of the pool as the test set, `seeds` seeds. Reported
    as val_score (macro-F1 / accuracy, mean over tasks and seeds) and val_loss (mean loss of the gold
    option), optionally after `adapt_steps` steps of adaptation on the demonstrations (val_adapt_score)."""

    tasks: int = 0  # 0: no validation
    every: int = 0  # 0: at the last step only
    k: int = 4
    seeds: int = 1
    test_examples: int = 16
    adapt_steps: int = 0
    adapt_lr: float = 1e-5
    seed: int = 0


@dataclass
class TrainConfig:
    method: str = "maml_en_llm"
    model: str = "builtin"
    data: str | None = None  # a MetaICL-layout folder; None = the built-in BIG-bench settings
    setting: str = "bb_class_to_class"
    variant: str = "direct"
    k: int = 4  # demonstrations per training instance
    tasks_per_step: int = 2
    support_size: int = 1  # ICL instances per task for the inner loop
    query_size: int = 1  # ICL instances per task for the meta-gradient
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_root: float = 1e-16
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # on the meta-gradient's global norm; 0 turns clipping off
    moment_policy: str = "shared"
    precision: str = "fp32"
    activation_checkpointing: bool = False
    max_length_per_example: int = 256
    max_length: int = 512
    max_examples_per_task: int | None = None  # the limited-data setting: cap on each task's pool
    steps: int = 10  # meta-steps
    seed: int = 0
    checkpoint_every: int = 5
    keep_checkpoints: int = 0  # 0 keeps every checkpoint; N > 0 keeps the newest N (a SmolLM2 checkpoint is 1.6 GB)
    log_every: int = 1
    out: str = "runs/train"
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # placement
    distributed: bool = True  # Ray Train workers; false runs the loop in this process without Ray
    num_workers: int = 1
    executor: str = "auto"  # local | ray | auto (ray when a worker has more than one task a step)
    cpus_per_worker: float = 0.5
    cpus_per_task: float = 0.5
    use_gpu: bool = False
    max_failures: int = 1  # worker failures to recover from (from the last checkpoint)
    placement_strategy: str = "PACK"  # PACK | SPREAD (one worker per node where possible)

    def validate(self, where: str = "config") -> TrainConfig:
        def bad(key: str, expected: str, got: Any) -> UserError:
            return UserError(f"{where}: {key}: expected {expected}, got {got!r}")

        for key, value, allowed in (
            ("executor", self.executor, EXECUTORS),
            ("placement_strategy", self.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")),
            ("method", self.method, METHODS),
            ("variant", self.variant, VARIANTS),
            ("moment_policy", self.moment_policy, MOMENT_POLICIES),
            ("precision", self.precision, PRECISIONS),
            ("inner.optimizer", self.inner.optimizer, OPTIMIZERS),
            ("outer.optimizer", self.outer.optimizer, OPTIMIZERS),
        ):
            if value not in allowed:
                raise bad(key, "one of " + ", ".join(allowed), value)
        for key, rate in (("inner.lr", self.inner.lr), ("outer.lr", self.outer.lr)):
            if not rate > 0:
                raise bad(key, "a positive number", rate)
        for key, number in (
            ("eps", self.eps),
            ("eps_root", self.eps_root),
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
            ("keep_checkpoints", self.keep_checkpoints),
        ):
            if number < 0:
                raise bad(key, "a number >= 0", number)
        for key, count in (
            ("inner.steps", self.inner.steps),
            ("k", self.k),
            ("tasks_per_step", self.tasks_per_step),
            ("support_size", self.support_size),
            ("query_size", self.query_size),
            ("steps", self.steps),
            ("checkpoint_every", self.checkpoint_every),
            ("num_workers", self.num_workers),
            ("log_every", self.log_every),
        ):
            if count < 1:
                raise bad(key, "an integer >= 1", count)
        for key, cpus in (("cpus_per_worker", self.cpus_per_worker), ("cpus_per_task", self.cpus_per_task)):
            if not cpus > 0:
                raise bad(key, "a positive number of CPUs (fractions allowed)", cpus)
        v = self.validation
        for key, count in (("validation.k", v.k), ("validation.seeds", v.seeds), ("validation.test_examples", v.test_examples)):
            if count < 1:
                raise bad(key, "an integer >= 1", count)
        for key, count in (
            ("validation.tasks", v.tasks),
            ("validation.every", v.every),
            ("validation.adapt_steps", v.adapt_steps),
        ):
            if count < 0:
                raise bad(key, "an integer >= 0", count)
        if not v.adapt_lr > 0:
            raise bad("validation.adapt_lr", "a positive number", v.adapt_lr)
        if self.max_failures < -1:
            raise bad("max_failures", "an integer >= -1 (-1: unlimited)", self.max_failures)
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise bad("betas", "two numbers in [0, 1)", list(self.betas))
        if self.max_examples_per_task is not None and self.max_examples_per_task < self.k + 2:
            raise bad(
                "max_examples_per_task",
                f"at least k + 2 = {self.k + 2} (k demonstrations and support/query targets)",
                self.max_examples_per_task,
            )
        if self.max_length < self.max_length_per_example:
            raise bad("max_length", f"at least max_length_per_example ({self.max_length_per_example})", self.max_length)
        if self.activation_checkpointing and self.method != "metaicl":
            raise bad(
                "activation_checkpointing",
                "false for method " + self.method + " (recomputed activations would not see the adapted weights, which "
                "silently corrupts meta-gradients; it is exact, and allowed, for metaicl)",
                True,
            )
        if self.moment_policy != "none" and self.method in ("maml_en_llm", "fomaml", "reptile"):
            if not (self.inner_spec().has_moments and self.outer_spec().has_moments):
                raise bad(
                    "moment_policy",
                    "'none' unless inner.optimizer and outer.optimizer are both adam or adamw "
                    "(there are no moments to start from or share)",
                    self.moment_policy,
                )
        return self

    def cpus_needed(self) -> float:
        """CPUs one run holds at once: its Train workers, plus one Ray task when tasks run as Ray tasks."""
        return self.num_workers * self.cpus_per_worker + (self.cpus_per_task if self.executor != "local" else 0.0)

    def executor_for(self, tasks_on_worker: int) -> str:
        if self.executor != "auto":
            return self.executor
        return "ray" if self.distributed and tasks_on_worker > 1 else "local"

    def inner_spec(self) -> OptimizerSpec:
        return OptimizerSpec(self.inner.optimizer, self.inner.lr, self.betas, self.eps, self.eps_root, self.weight_decay)

    def outer_spec(self) -> OptimizerSpec:
        # the outer step is never differentiated: no guard, exactly torch.optim.Adam(W)
        return OptimizerSpec(self.outer.optimizer, self.outer.lr, self.betas, self.eps, 0.0, self.weight_decay)


def to_dict(cfg: Any) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["betas"] = list(cfg.betas)
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
            raise UserError(f"{where}: {key}: expected a list of {len(typing.get_args(tp))} numbers, got {value!r}")
        return tuple(_coerce(v, a, key, where) for v, a in zip(value, typing.get_args(tp)))
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-5 without a dot as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: {key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp}")


def _set(cfg: Any, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    target = cfg
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
                    _set(cfg, f"{dotted}.{sub}", subvalue, where)
            else:
                setattr(target, part, _coerce(value, hints[part], dotted, where))
        else:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise UserError(f"{where}: unknown key {dotted!r} ({'.'.join(parts[: i + 1])} has no sub-keys)")


def apply_overrides(cfg: TrainConfig, mapping: dict[str, Any], where: str) -> TrainConfig:
    for key, value in mapping.items():
        _set(cfg, key, value, where)
    return cfg


def load_config(path: Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then `key=value` overrides (values parsed as YAML), validated."""
    cfg = TrainConfig()
    if path is not None:
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
