"""Functional, differentiable optimizers: SGD, Adam and AdamW over dicts of tensors.

`step(params, grads, state)` returns new parameters and a new state without touching its inputs,
so the step can be differentiated through (the inner loop of second-order MAML: build `grads` with
`create_graph=True` and the returned parameters carry the graph, moments included).

Adam's denominator uses a guarded square root, `sqrt(v_hat + eps_root) + eps`: the derivative of
sqrt at v = 0 is infinite, and v is exactly 0 for every weight whose gradient is 0 (the embedding
rows of tokens absent from a batch), which would turn second derivatives into NaN. With
`eps_root = 0` the step is `torch.optim.Adam(W)`'s (tested against it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["OPTIMIZERS", "AdamState", "OptimizerSpec", "zeros_state", "detached", "optimizer_step"]

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


def optimizer_step(
    spec: OptimizerSpec, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], state: AdamState | None
) -> tuple[Tensors, AdamState | None]:
    """One step of `spec` on every tensor in `params`; differentiable when the inputs carry a graph."""
    if spec.name == "sgd":
        new = {}
        for n, p in params.items():
            g = grads[n] if spec.weight_decay == 0 else grads[n] + spec.weight_decay * p
            new[n] = p - spec.lr * g
        return new, state
    if spec.name not in ("adam", "adamw"):
        raise ValueError(f"unknown optimizer {spec.name!r}")
    assert state is not None, "Adam needs a state (zeros_state(params) to start)"
    b1, b2 = spec.betas
    step = state.step + 1
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    new_p, new_m, new_v = {}, {}, {}
    for n, p in params.items():
        g = grads[n]
        if spec.name == "adamw":
            p = p * (1 - spec.lr * spec.weight_decay) if spec.weight_decay else p
        elif spec.weight_decay:
            g = g + spec.weight_decay * p
        m = b1 * state.m[n] + (1 - b1) * g
        v = b2 * state.v[n] + (1 - b2) * g * g
        denom = torch.sqrt(v / bc2 + spec.eps_root) + spec.eps
        new_p[n] = p - (spec.lr / bc1) * m / denom
        new_m[n], new_v[n] = m, v
    return new_p, AdamState(new_m, new_v, step)
