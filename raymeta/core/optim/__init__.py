"""Functional, differentiable optimizers: SGD, Adam and AdamW over dicts of tensors.

`optimizer_step(spec, params, grads, state)` returns new parameters and a new state without touching
its inputs, so the step can be differentiated through (the inner loop of second-order MAML: build
`grads` with `create_graph=True` and the returned parameters carry the graph, moments included).

Adam's denominator uses a guarded square root, `sqrt(v_hat + eps_root) + eps`: the derivative of
sqrt at v = 0 is infinite, and v is exactly 0 for every weight whose gradient is 0 (the embedding
rows of tokens absent from a batch), which would turn second derivatives into NaN. With
`eps_root = 0` the step is `torch.optim.Adam(W)`'s (tested against it).

Two implementations of the same formula live side by side: `reference.py` (plain autograd
operations: the specification and the test oracle) and `adam.py` (one autograd node per tensor with a
hand-written backward: what runs).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from raymeta.core.optim.adam import adam_step
from raymeta.core.optim.reference import reference_step
from raymeta.core.optim.spec import OPTIMIZERS, AdamState, OptimizerSpec, Tensors, detached, zeros_state

__all__ = ["OPTIMIZERS", "AdamState", "OptimizerSpec", "detached", "optimizer_step", "reference_step", "zeros_state"]


def optimizer_step(
    spec: OptimizerSpec, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], state: AdamState | None
) -> tuple[Tensors, AdamState | None]:
    """One step of `spec` on every tensor in `params`; differentiable when the inputs carry a graph."""
    if spec.name == "sgd":
        return reference_step(spec, params, grads, state)
    if spec.name not in ("adam", "adamw"):
        raise ValueError(f"unknown optimizer {spec.name!r}")
    if state is None:
        raise ValueError("Adam needs a state (zeros_state(params) to start)")
    return adam_step(spec, params, grads, state)
