"""The inner loop, one for meta-training (`task_meta_gradient`), test-time adaptation and validation.

`adapt` takes K steps of an inner optimizer on one support batch from weights θ and an optimizer state.
With `second_order` every step keeps its graph (θ_K is a differentiable function of θ, moments
included: MAML-en-LLM); otherwise each step starts from detached tensors (FOMAML, Reptile, and
adaptation before evaluation), and θ_K comes back as fresh leaves that require grad.
"""

from __future__ import annotations

import torch

from raymeta.core.lm import Batch, FunctionalLM, Tensors
from raymeta.core.optim import AdamState, OptimizerSpec, detached, optimizer_step, zeros_state

__all__ = ["adapt", "inner_start"]


def inner_start(spec: OptimizerSpec, policy: str, params: Tensors, outer_state: AdamState | None) -> AdamState | None:
    """Where a task's inner optimizer starts: no state for SGD; zero moments and step 0 under `none` (or
    without an outer state); a detached copy of the outer state S under `init` and `shared`."""
    if not spec.has_moments:
        return None
    if policy == "none" or outer_state is None:
        return zeros_state({n: p.detach() for n, p in params.items()})
    return detached(outer_state)


def adapt(
    flm: FunctionalLM,
    theta: Tensors,
    batch: Batch,
    spec: OptimizerSpec,
    state: AdamState | None,
    steps: int,
    *,
    second_order: bool,
) -> tuple[Tensors, AdamState | None, torch.Tensor | None]:
    """`steps` steps of `spec` on `batch` from `theta` and `state`; returns θ_K, the final state, and the
    loss before the first step (detached, on the weights' device; None for 0 steps)."""
    names = list(theta)
    first_loss = None
    if not second_order:
        theta = {n: t.detach().requires_grad_() for n, t in theta.items()}
    for k in range(steps):
        loss = flm.loss(theta, batch)
        if k == 0:
            first_loss = loss.detach()
        grads = torch.autograd.grad(loss, [theta[n] for n in names], create_graph=second_order)
        theta, state = optimizer_step(spec, theta, dict(zip(names, grads)), state)
        if not second_order:
            theta = {n: t.detach().requires_grad_() for n, t in theta.items()}
            state = detached(state) if state is not None else None
    return theta, state, first_loss
