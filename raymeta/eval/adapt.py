"""Adaptation before evaluation: a few inner-optimizer steps on the k labelled examples of a target task.

The k examples become MetaICL training instances (each in turn is the target, the other k - 1 its
demonstrations); each step is one optimizer step on their mean loss, through the inner loop of
meta-training (`raymeta.core.inner.adapt`, first order). The adapted weights are written into the
model for the evaluation and restored afterwards.

Two kinds of adaptation (`AdaptConfig.source`):

- `explicit`: the optimizer, learning rate and step count given (`--adapt-steps/--adapt-lr/
  --adapt-optimizer`), from zero moments, default betas/eps, no weight decay.
- `as-trained`: the inner loop a checkpoint was meta-trained with (`AdaptConfig.as_trained`: its
  inner optimizer, lr, betas, eps, eps_root, weight decay, `inner.steps`, bf16 autocast under
  `precision: bf16`), starting from the saved outer state S under `moment_policy: init` or `shared`,
  exactly as a task's inner loop starts in training (`raymeta.core.inner.inner_start`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from raymeta.core.inner import adapt, inner_start
from raymeta.core.lm import FunctionalLM
from raymeta.core.meta import MAX_LR, MetaConfig
from raymeta.core.optim import OPTIMIZERS, AdamState, OptimizerSpec
from raymeta.data.layout import Example
from raymeta.data.prompts import PromptBuilder, make_batch
from raymeta.errors import UserError

__all__ = ["SOURCES", "AdaptConfig", "adapted"]

SOURCES = ("explicit", "as-trained")


@dataclass(frozen=True)
class AdaptConfig:
    steps: int
    optimizer: str = "adamw"
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_root: float = 1e-16
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # each support gradient's global norm before its step (inner.grad_clip); 0: off
    no_decay: bool = False  # no weight decay on norms, biases and embeddings (the run's no_decay)
    source: str = "explicit"  # explicit | as-trained
    moment_policy: str = "none"  # none: zero moments; init / shared: start from the outer state S
    precision: str = "fp32"  # bf16: the steps under bf16 autocast, as training's inner loop
    state_file: str | None = None  # S: a checkpoint's optimizer.safetensors, read where the adaptation runs
    state_step: int = 0  # S's step counter (the checkpoint's optimizer_step)
    state_sha256: str | None = None  # S's identity in cache keys and results
    checkpoint: str | None = None  # as-trained: the checkpoint the settings come from
    math_attention: bool = False  # as-trained maml_en_llm: SDPA's math kernel, as training's (bit-exact weights)
    trainable: str | None = None  # as-trained: the weights it trained (the run's `trainable`); None: all that require grad
    # S in memory (validation during training); never written to results or keys: state_sha256 names it
    state: AdamState | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"expected a positive integer, got {self.steps}", key="adapt.steps")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}", key="adapt.optimizer")
        if not 0 < self.lr <= MAX_LR:
            raise UserError(f"expected a positive number <= {MAX_LR:g}, got {self.lr}", key="adapt.lr")
        if self.source not in SOURCES:
            raise UserError(f"expected one of {', '.join(SOURCES)}, got {self.source!r}", key="adapt")
        if self.moment_policy != "none" and self.state is None and self.state_file is None:
            raise UserError(f"moment_policy {self.moment_policy} starts from the outer state S; none given", key="adapt")

    @classmethod
    def as_trained(
        cls,
        meta: MetaConfig,
        *,
        steps: int | None = None,
        state: AdamState | None = None,
        state_file: str | None = None,
        state_step: int | None = None,
        state_sha256: str | None = None,
        checkpoint: str | None = None,
        trainable: str | None = None,
    ) -> AdaptConfig:
        """The inner loop of `meta` (`steps` defaults to `inner.steps`), from S under init and shared.
        metaicl trains no inner loop: its `inner.*` settings run from zero moments (as without S)."""
        spec = meta.inner_spec()
        starts_from_s = spec.has_moments and meta.moment_policy != "none" and meta.method != "metaicl"
        policy = meta.moment_policy if starts_from_s and (state is not None or state_file is not None) else "none"
        return cls(
            steps=steps if steps is not None else meta.inner.steps,
            optimizer=spec.name,
            lr=spec.lr,
            betas=tuple(spec.betas),  # type: ignore[arg-type]
            eps=spec.eps,
            eps_root=spec.eps_root,
            weight_decay=spec.weight_decay,
            grad_clip=meta.inner.grad_clip,
            no_decay=meta.no_decay,
            source="as-trained",
            moment_policy=policy,
            precision="bf16" if meta.precision == "bf16" else "fp32",
            state_file=state_file if policy != "none" else None,
            state_step=(state.step if state is not None else state_step or 0) if policy != "none" else 0,
            state_sha256=state_sha256 if policy != "none" else None,
            checkpoint=checkpoint,
            trainable=trainable,
            math_attention=meta.method == "maml_en_llm",
            state=state if policy != "none" else None,
        )

    @property
    def suffix(self) -> str:
        """What a run's name gains: `+adapt2` (explicit) or `+as-trained1`."""
        return f"+adapt{self.steps}" if self.source == "explicit" else f"+as-trained{self.steps}"

    def spec(self, no_decay: frozenset[str] = frozenset()) -> OptimizerSpec:
        """The optimizer; `no_decay` names the weights without decay (read with `no_decay: true` only)."""
        exempt = no_decay if self.no_decay else frozenset()
        return OptimizerSpec(self.optimizer, self.lr, self.betas, self.eps, self.eps_root, self.weight_decay, exempt)

    def record(self) -> dict[str, Any]:
        """The settings as results.json and cache keys hold them (JSON types; S by its sha256 only)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "state"}
        out["betas"] = list(self.betas)
        return out

    def start(self, params: dict[str, torch.Tensor]) -> AdamState | None:
        """Where the inner optimizer starts: zero moments, or (a detached view of) S on the weights' device."""
        spec = self.spec()
        if self.moment_policy == "none":
            return inner_start(spec, "none", params, None)
        outer = self.state if self.state is not None else _read_state(self, params)
        missing = sorted(set(params) - set(outer.m))
        if missing:
            raise UserError(
                f"the outer state S has no moments for {len(missing)} of the weights adapted here (e.g. {missing[0]}); "
                "adapt the checkpoint with the weights it trained",
                key="adapt",
            )
        device = next(iter(params.values())).device
        picked = AdamState({n: outer.m[n].to(device) for n in params}, {n: outer.v[n].to(device) for n in params}, outer.step)
        return inner_start(spec, self.moment_policy, params, picked)


_STATES: dict[str, AdamState] = {}  # per process: the newest S read (a model-sized pair of buffers)


def _read_state(cfg: AdaptConfig, params: dict[str, torch.Tensor]) -> AdamState:
    from safetensors.torch import load_file  # deferred, as for checkpoints

    assert cfg.state_file is not None
    key = f"{cfg.state_file}:{cfg.state_sha256}:{cfg.state_step}"
    if key not in _STATES:
        device = next(iter(params.values())).device
        tensors = load_file(cfg.state_file, device=str(device))
        m = {n[2:]: t for n, t in tensors.items() if n.startswith("m.")}
        v = {n[2:]: t for n, t in tensors.items() if n.startswith("v.")}
        _STATES.clear()
        _STATES[key] = AdamState(m, v, cfg.state_step)
    return _STATES[key]


@contextmanager
def adapted(model: torch.nn.Module, builder: PromptBuilder, demos: Sequence[Example], cfg: AdaptConfig) -> Iterator[str]:
    """Adapt `model` in place on `demos`; yields a key that identifies the adapted weights (given the
    original ones), and restores the original weights on exit."""
    seqs = [builder.training_sequence([d for i, d in enumerate(demos) if i != j], demos[j]) for j in range(len(demos))]
    batch = make_batch(seqs, builder.fmt.max_length)
    key = hashlib.sha256(json.dumps([cfg.record(), batch.ids.tolist(), batch.spans]).encode()).hexdigest()
    flm = FunctionalLM(model, math_attention=cfg.math_attention)
    params = flm.params()
    if cfg.trainable is not None:  # as in training (raymeta.model.weights.restrict): the others stay as they are
        pattern = re.compile(cfg.trainable)
        params = {n: p for n, p in params.items() if pattern.search(n)}
    original = {n: p.detach().clone() for n, p in params.items()}
    spec = cfg.spec(flm.no_decay_names() if cfg.no_decay else frozenset())
    device = flm.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else contextlib.nullcontext()
    with autocast:  # the inner loop of meta-training (raymeta.core.inner), first order
        theta, *_ = adapt(
            flm, dict(params), batch, spec, cfg.start(params), cfg.steps, second_order=False, grad_clip=cfg.grad_clip
        )
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta[n])
        yield key
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(original[n])
