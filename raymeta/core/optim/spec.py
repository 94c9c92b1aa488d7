"""What an optimizer step is given: its hyperparameters (`OptimizerSpec`) and Adam's state (`AdamState`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["OPTIMIZERS", "AdamState", "OptimizerSpec", "Tensors", "detached", "zeros_state"]

OPTIMIZERS = ("sgd", "adam", "adamw")
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "adamw"
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_root: float = 1e-16
    weight_decay: float = 0.0
    no_decay: frozenset[str] = frozenset()  # weights stepped without weight decay (norms, biases, embeddings)

    def decay_of(self, name: str) -> float:
        return 0.0 if name in self.no_decay else self.weight_decay

    @property
    def has_moments(self) -> bool:
        return self.name in ("adam", "adamw")


@dataclass
class AdamState:
    """Adam's moments and step counter. `step` counts the updates the moments have seen."""

    m: Tensors
    v: Tensors
    step: int = 0


def zeros_state(params: Mapping[str, torch.Tensor]) -> AdamState:
    return AdamState({n: torch.zeros_like(p) for n, p in params.items()}, {n: torch.zeros_like(p) for n, p in params.items()}, 0)


def detached(state: AdamState) -> AdamState:
    """The state cut from any graph (what a task's inner loop starts from under `init` and `shared`).

    No copy: every step here is functional (nothing is written in place), and each copy of a state
    costs two model-sized buffers, which showed up as peak memory in bench/speed.py."""
    return AdamState({n: t.detach() for n, t in state.m.items()}, {n: t.detach() for n, t in state.v.items()}, state.step)
