"""The optimizer steps written as plain elementwise autograd operations: the specification.

These are `torch.optim`'s SGD, Adam and AdamW formulas, with Adam's guarded square root
`sqrt(v̂ + eps_root) + eps`. Autograd differentiates them to any order, so they are the oracle that
the accelerated node in `adam.py` (hand-written backward, fused in-place passes) is tested against.
SGD has no node of its own: `optimizer_step` runs this one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from raymeta.core.optim.spec import AdamState, OptimizerSpec, Tensors

__all__ = ["reference_step"]


def reference_step(
    spec: OptimizerSpec, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], state: AdamState | None
) -> tuple[Tensors, AdamState | None]:
    """One step of `spec` on every tensor, out of place and differentiable in every input."""
    if spec.name == "sgd":
        new = {}
        for n, p in params.items():
            wd = spec.decay_of(n)
            g = grads[n] if wd == 0 else grads[n] + wd * p
            new[n] = p - spec.lr * g
        return new, state
    if state is None:
        raise ValueError("Adam needs a state (zeros_state(params) to start)")
    b1, b2 = spec.betas
    t = state.step + 1
    new_p, new_m, new_v = {}, {}, {}
    for n, p in params.items():
        g = grads[n]
        wd = spec.decay_of(n)
        if spec.name == "adam" and wd:
            g = g + wd * p
        if spec.name == "adamw" and wd:
            p = p * (1 - spec.lr * wd)
        m = b1 * state.m[n] + (1 - b1) * g
        v = b2 * state.v[n] + (1 - b2) * g * g
        new_p[n] = p - spec.lr / (1 - b1**t) * m / (torch.sqrt(v / (1 - b2**t) + spec.eps_root) + spec.eps)
        new_m[n], new_v[n] = m, v
    return new_p, AdamState(new_m, new_v, t)
