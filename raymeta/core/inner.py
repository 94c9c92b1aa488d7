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

__all__ = ["adapt", "clip_coefficient", "global_norm", "inner_start"]


def inner_start(spec: OptimizerSpec, policy: str, params: Tensors, outer_state: AdamState | None) -> AdamState | None:
    """Where a task's inner optimizer starts: no state for SGD; zero moments and step 0 under `none` (or
    without an outer state); a detached copy of the outer state S under `init` and `shared`."""
    if not spec.has_moments:
        return None
    if policy == "none" or outer_state is None:
        return zeros_state({n: p.detach() for n, p in params.items()})
    return detached(outer_state)


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of a list of tensors, differentiable: each tensor's norm in its own dtype (its
    backward keeps the tensor itself, no copy), their norm in float64."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t).double() for t in tensors]))


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor min(1, max_norm / (norm + 1e-6)), as a tensor."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def adapt(
    flm: FunctionalLM,
    theta: Tensors,
    batch: Batch,
    spec: OptimizerSpec,
    state: AdamState | None,
    steps: int,
    *,
    second_order: bool,
    grad_clip: float = 0.0,
) -> tuple[Tensors, AdamState | None, torch.Tensor | None, torch.Tensor | None]:
    """`steps` steps of `spec` on `batch` from `theta` and `state`; returns θ_K, the final state, the
    loss before the first step and the first support gradient's global norm before clipping (both
    detached, on the weights' device; None for 0 steps).

    `grad_clip > 0` scales each step's support gradient to at most that global norm before the step
    (torch's clip_grad_norm_ rule), inside the graph: second order differentiates through the clip."""
    names = list(theta)
    first_loss = first_norm = None
    if not second_order:
        theta = {n: t.detach().requires_grad_() for n, t in theta.items()}
    for k in range(steps):
        loss, grads = flm.loss_and_grads(theta, batch, create_graph=second_order)
        if k == 0:
            first_loss = loss.detach()
            with torch.no_grad():
                first_norm = global_norm([g.detach() for g in grads])
        if grad_clip > 0:
            norm = first_norm if k == 0 and not second_order else global_norm(grads)
            assert norm is not None
            coef = clip_coefficient(norm, grad_clip)
            grads = [g * coef.to(g.dtype) for g in grads]
        theta, state = optimizer_step(spec, theta, dict(zip(names, grads)), state)
        if not second_order:
            theta = {n: t.detach().requires_grad_() for n, t in theta.items()}
            state = detached(state) if state is not None else None
    return theta, state, first_loss, first_norm
