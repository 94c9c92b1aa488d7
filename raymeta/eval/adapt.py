"""Adaptation before evaluation: a few inner-optimizer steps on the k labelled examples of a target task.

The k examples become MetaICL training instances (each in turn is the target, the other k - 1 its
demonstrations); each step is one optimizer step on their mean loss, through the inner loop of
meta-training (`raymeta.core.inner.adapt`, first order, from zero moments). The adapted weights are
written into the model for the evaluation and restored afterwards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from raymeta.core.inner import adapt, inner_start
from raymeta.core.lm import FunctionalLM
from raymeta.core.meta import MAX_LR
from raymeta.core.optim import OPTIMIZERS, OptimizerSpec
from raymeta.data.layout import Example
from raymeta.data.prompts import PromptBuilder, make_batch
from raymeta.errors import UserError

__all__ = ["AdaptConfig", "adapted"]


@dataclass(frozen=True)
class AdaptConfig:
    steps: int
    optimizer: str = "adamw"
    lr: float = 1e-5

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"expected a positive integer, got {self.steps}", key="adapt.steps")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}", key="adapt.optimizer")
        if not 0 < self.lr <= MAX_LR:
            raise UserError(f"expected a positive number <= {MAX_LR:g}, got {self.lr}", key="adapt.lr")


@contextmanager
def adapted(model: torch.nn.Module, builder: PromptBuilder, demos: Sequence[Example], cfg: AdaptConfig) -> Iterator[str]:
    """Adapt `model` in place on `demos`; yields a key that identifies the adapted weights (given the
    original ones), and restores the original weights on exit."""
    seqs = [builder.training_sequence([d for i, d in enumerate(demos) if i != j], demos[j]) for j in range(len(demos))]
    batch = make_batch(seqs, builder.fmt.max_length)
    key = hashlib.sha256(json.dumps([asdict(cfg), batch.ids.tolist(), batch.spans]).encode()).hexdigest()
    flm = FunctionalLM(model, math_attention=False)
    params = flm.params()
    original = {n: p.detach().clone() for n, p in params.items()}
    spec = OptimizerSpec(cfg.optimizer, cfg.lr)
    # the inner loop of meta-training (raymeta.core.inner), first order, from zero moments
    theta, _, _ = adapt(flm, dict(params), batch, spec, inner_start(spec, "none", params, None), cfg.steps, second_order=False)
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta[n])
        yield key
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(original[n])
