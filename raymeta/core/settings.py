"""The algorithm's settings: `MetaConfig` (method, inner and outer loops, moment policy, clipping,
precision) and the outer learning-rate schedule. What `raymeta.core.meta` reads; the config keys of
`raymeta train` (`inner.lr`, `outer.schedule`, ...) are its field names."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from raymeta.core.optim import OPTIMIZERS, OptimizerSpec
from raymeta.errors import UserError

__all__ = [
    "MAX_LR",
    "METHODS",
    "MOMENT_POLICIES",
    "PRECISIONS",
    "SCHEDULES",
    "InnerConfig",
    "MetaConfig",
    "OuterConfig",
    "schedule_factor",
]

METHODS = ("maml_en_llm", "fomaml", "reptile", "metaicl")
MOMENT_POLICIES = ("none", "init", "shared")
PRECISIONS = ("fp32", "bf16", "bf16_query")


@dataclass
class InnerConfig:
    optimizer: str = "adamw"
    lr: float = 1e-5
    steps: int = 1
    grad_clip: float = 0.0  # each support gradient's global norm before its inner step (differentiable); 0: off
    betas: tuple[float, float] | None = None  # None: the flat `betas` (both loops)
    eps: float | None = None  # None: the flat `eps`
    weight_decay: float | None = None  # None: the flat `weight_decay`


SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class OuterConfig:
    optimizer: str = "adamw"
    lr: float = 1e-5
    betas: tuple[float, float] | None = None  # None: the flat `betas` (both loops)
    eps: float | None = None  # None: the flat `eps`
    weight_decay: float | None = None  # None: the flat `weight_decay`
    schedule: str = "constant"  # the outer lr over the run: constant | linear | cosine (to 0 at the last step)
    warmup_steps: int = 0  # linear warm-up from 0 over the first N meta-steps (Hugging Face's schedules)


def schedule_factor(schedule: str, warmup: int, total: int | None, done: int) -> float:
    """The outer lr's multiplier for the meta-step after `done` earlier ones, as Hugging Face's
    get_{constant,linear,cosine}_schedule_with_warmup: `done / warmup` during warm-up (0 at the first
    step), then constant, linear to 0 or half a cosine to 0 at step `total`."""
    if done < warmup:
        return done / warmup
    if schedule == "constant":
        return 1.0
    assert total is not None
    progress = (done - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


MAX_LR = 1e6  # Adam's step lr / (1 - beta1) must fit a float32; 1e6 is far beyond any useful rate


@dataclass
class MetaConfig:
    """The algorithm: method, inner and outer optimizers, moment policy, clipping, precision.

    The names are the config keys of `raymeta train` (`inner.lr`, `moment_policy`, ...); this is all
    that `task_meta_gradient` and `MetaLearner` read. Data, run and placement settings live elsewhere
    (`raymeta.config.TrainConfig` composes them)."""

    method: str = "maml_en_llm"
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_root: float = 1e-16
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # on the meta-gradient's global norm; 0 turns clipping off
    no_decay: bool = False  # no weight decay on norms, biases and embeddings (both loops)
    moment_policy: str = "shared"
    precision: str = "fp32"
    activation_checkpointing: bool = False
    activation_checkpointing_every: int = 1  # decoder layers per checkpoint (more: less memory, more recompute)

    def validate(self, where: str = "config") -> MetaConfig:
        def bad(key: str, expected: str, got: Any) -> UserError:
            return UserError(f"expected {expected}, got {got!r}", key=key, where=where)

        for key, value, allowed in (
            ("outer.schedule", self.outer.schedule, SCHEDULES),
            ("method", self.method, METHODS),
            ("moment_policy", self.moment_policy, MOMENT_POLICIES),
            ("precision", self.precision, PRECISIONS),
            ("inner.optimizer", self.inner.optimizer, OPTIMIZERS),
            ("outer.optimizer", self.outer.optimizer, OPTIMIZERS),
        ):
            if value not in allowed:
                raise bad(key, "one of " + ", ".join(allowed), value)
        for key, rate in (("inner.lr", self.inner.lr), ("outer.lr", self.outer.lr)):
            if not 0 < rate <= MAX_LR:
                raise bad(key, f"a positive number <= {MAX_LR:g} (larger ones overflow the float32 update)", rate)
        for key, number in (
            ("eps", self.eps),
            ("eps_root", self.eps_root),
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
            ("inner.grad_clip", self.inner.grad_clip),
            ("inner.eps", self.inner.eps or 0.0),
            ("outer.eps", self.outer.eps or 0.0),
            ("inner.weight_decay", self.inner.weight_decay or 0.0),
            ("outer.weight_decay", self.outer.weight_decay or 0.0),
            ("outer.warmup_steps", self.outer.warmup_steps),
        ):
            if number < 0:
                raise bad(key, "a number >= 0", number)
        if self.inner.steps < 1:
            raise bad("inner.steps", "an integer >= 1", self.inner.steps)
        for key, betas in (("betas", self.betas), ("inner.betas", self.inner.betas), ("outer.betas", self.outer.betas)):
            if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
                raise bad(key, "two numbers in [0, 1)", list(betas))
        if self.activation_checkpointing_every < 1:
            raise bad("activation_checkpointing_every", "an integer >= 1", self.activation_checkpointing_every)
        if self.moment_policy != "none" and self.method in ("maml_en_llm", "fomaml", "reptile"):
            if not (self.inner_spec().has_moments and self.outer_spec().has_moments):
                raise bad(
                    "moment_policy",
                    "'none' unless inner.optimizer and outer.optimizer are both adam or adamw "
                    "(there are no moments to start from or share)",
                    self.moment_policy,
                )
        return self

    @property
    def checkpoint_group(self) -> int:
        """Decoder layers per activation checkpoint; 0 without checkpointing (FunctionalLM's `checkpointing`)."""
        return self.activation_checkpointing_every if self.activation_checkpointing else 0

    @property
    def shares_moments(self) -> bool:
        """Whether the tasks' final inner moments become the outer optimizer's (`shared`; MetaICL has no
        inner loop to take them from)."""
        return self.moment_policy == "shared" and self.method != "metaicl"

    def inner_spec(self, no_decay: Iterable[str] = ()) -> OptimizerSpec:
        """The inner optimizer; `no_decay` names the weights without weight decay (with `no_decay: true`)."""
        inner = self.inner
        return OptimizerSpec(
            inner.optimizer,
            inner.lr,
            inner.betas if inner.betas is not None else self.betas,
            inner.eps if inner.eps is not None else self.eps,
            self.eps_root,
            inner.weight_decay if inner.weight_decay is not None else self.weight_decay,
            frozenset(no_decay) if self.no_decay else frozenset(),
        )

    def outer_spec(self, no_decay: Iterable[str] = (), lr_factor: float = 1.0) -> OptimizerSpec:
        """The outer optimizer at `lr_factor` times `outer.lr` (its schedule). Never differentiated: no
        guard, exactly torch.optim.Adam(W)."""
        outer = self.outer
        return OptimizerSpec(
            outer.optimizer,
            outer.lr * lr_factor,
            outer.betas if outer.betas is not None else self.betas,
            outer.eps if outer.eps is not None else self.eps,
            0.0,
            outer.weight_decay if outer.weight_decay is not None else self.weight_decay,
            frozenset(no_decay) if self.no_decay else frozenset(),
        )
