"""Adam(W)'s step as one autograd node per tensor, with a hand-written backward (the accelerated op).

`adam_step` is what `optimizer_step` runs for adam and adamw; `reference.py` holds the same step as
plain elementwise autograd operations, and the tests hold each against the other (and against
`torch.optim`).

The node saves only its inputs (g, m, v, and p for L2 decay) and recomputes the rest when the
meta-gradient flows back. Built from elementwise autograd ops, the same step kept four model-sized
intermediates alive through the query pass of every task (sqrt(v̂), its sum with eps, the scaled m,
and the new moments) and ran about twice as many model-sized elementwise passes (bench/speed.py
measured the difference).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from raymeta.core.optim.spec import AdamState, OptimizerSpec, Tensors

__all__ = ["adam_step"]


def adam_step(
    spec: OptimizerSpec, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], state: AdamState
) -> tuple[Tensors, AdamState]:
    """One Adam (L2 decay) or AdamW (decoupled decay) step of every tensor; differentiable in all inputs."""
    b1, b2 = spec.betas
    step = state.step + 1
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    decay = 1 - spec.lr * spec.weight_decay if spec.name == "adamw" and spec.weight_decay else 1.0
    l2 = spec.weight_decay if spec.name == "adam" else 0.0
    consts = _AdamConsts(spec.lr, b1, b2, bc1, bc2, spec.eps, spec.eps_root, decay, l2)
    exempt = _AdamConsts(spec.lr, b1, b2, bc1, bc2, spec.eps, spec.eps_root, 1.0, 0.0)  # spec.no_decay's weights
    new_p, new_m, new_v = {}, {}, {}
    for n, p in params.items():
        c = exempt if n in spec.no_decay else consts
        new_p[n], new_m[n], new_v[n] = _AdamStep.apply(p, grads[n], state.m[n], state.v[n], c)
    return new_p, AdamState(new_m, new_v, step)


@dataclass(frozen=True)
class _AdamConsts:
    lr: float
    b1: float
    b2: float
    bc1: float
    bc2: float
    eps: float
    eps_root: float
    decay: float  # AdamW's decoupled factor 1 - lr * weight_decay (1.0: none)
    l2: float  # Adam's L2 coefficient, added to the gradient (0.0: none)


# Elements per chunk on a CPU: the step runs a dozen elementwise passes, and on a chunk of 1 MB per
# tensor they stay in the cache instead of each reading and writing whole model-sized tensors in
# memory (`python -m bench.adam_step`). On a GPU every chunk would be another dozen kernel launches,
# so there a tensor is one chunk.
_CHUNK = 1 << 18


def _chunks(t: torch.Tensor) -> list[slice]:
    n = t.numel()
    if t.device.type != "cpu":
        return [slice(0, n)]
    return [slice(i, min(i + _CHUNK, n)) for i in range(0, n, _CHUNK)]


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1)


def _adam_moments(
    p: torch.Tensor | None,
    g: torch.Tensor,
    m0: torch.Tensor,
    v0: torch.Tensor,
    c: _AdamConsts,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the effective gradient, m', v') in torch.optim's fused operations: lerp and addcmul."""
    if c.l2:
        assert p is not None
        g = torch.add(g, p, alpha=c.l2)
    m, v = out if out is not None else (torch.empty_like(m0), torch.empty_like(v0))
    torch.lerp(m0, g, 1 - c.b1, out=m)
    torch.mul(v0, c.b2, out=v).addcmul_(g, g, value=1 - c.b2)
    return g, m, v


def _root_(v: torch.Tensor, c: _AdamConsts) -> torch.Tensor:
    """sqrt(v/bc2 + eps_root), computed in place in `v`."""
    v.div_(c.bc2)
    if c.eps_root:
        v.add_(c.eps_root)
    return v.sqrt_()


def _forward_chunk(p: torch.Tensor, g: torch.Tensor, m0: torch.Tensor, v0: torch.Tensor, c: _AdamConsts, out: tuple) -> None:
    """p', m', v' of one chunk, written into `out` (slices of the outputs)."""
    new_p, m, v = out
    _, m, v = _adam_moments(p, g, m0, v0, c, out=(m, v))
    denom = torch.div(v, c.bc2)
    if c.eps_root:
        denom.add_(c.eps_root)
    denom.sqrt_()
    if c.eps:
        denom.add_(c.eps)
    base = p.mul(c.decay) if c.decay != 1.0 else p
    torch.addcdiv(base, m, denom, value=-(c.lr / c.bc1), out=new_p)


def _backward_chunk(
    p: torch.Tensor | None,
    g: torch.Tensor,
    m0: torch.Tensor,
    v0: torch.Tensor,
    a_p: torch.Tensor | None,
    a_m: torch.Tensor | None,
    a_v: torch.Tensor | None,
    c: _AdamConsts,
    out: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
) -> None:
    """∂g, ∂m0 and ∂v0 of one chunk (see `_AdamStep`), written into `out` (slices; None: not needed)."""
    out_g, out_m0, out_v0 = out
    g_eff, m, r = _adam_moments(p, g, m0, v0, c)
    s = c.lr / c.bc1
    if a_p is not None:
        r = _root_(r, c)
        d = r + c.eps if c.eps else r
        q = a_p / d
        dr = r.mul_(d)  # d·r, in place of r (d is r itself when eps = 0: r²)
        if a_m is None and a_v is None and out_m0 is None and out_v0 is None:
            # the last inner step: ∂g = s·q·((1-β2)/bc2 · g·m'/(d·r) - (1-β1)), in 4 passes
            gm = m.mul_(g_eff).mul_(q)
            out_g.copy_(q.mul_(-s * (1 - c.b1)).addcdiv_(gm, dr, value=s * (1 - c.b2) / c.bc2))
            return
        adj_v = m.mul_(q).div_(dr).mul_(s / (2 * c.bc2))
        adj_m = q.mul_(-s)
        if a_m is not None:
            adj_m.add_(a_m)
        if a_v is not None:
            adj_v.add_(a_v)
    else:
        adj_m = a_m if a_m is not None else torch.zeros_like(g)
        adj_v = a_v if a_v is not None else torch.zeros_like(g)
    torch.mul(adj_m, 1 - c.b1, out=out_g).addcmul_(g_eff, adj_v, value=2 * (1 - c.b2))
    if out_m0 is not None:
        torch.mul(adj_m, c.b1, out=out_m0)
    if out_v0 is not None:
        torch.mul(adj_v, c.b2, out=out_v0)


class _AdamStep(torch.autograd.Function):
    """One Adam(W) step of one tensor: (p, g, m0, v0) -> (p', m', v'), differentiable in all four inputs.

    With r = sqrt(v'/bc2 + eps_root), d = r + eps, p' = decay·p - s·m'/d (s = lr/bc1) and q = a_p/d,
    the adjoints are
    ā_m = a_m - s·q,  ā_v = a_v + s·q·m'/(2·bc2·d·r),
    ∂g = (1-β1)·ā_m + 2(1-β2)·g·ā_v,  ∂m0 = β1·ā_m,  ∂v0 = β2·ā_v,  ∂p = decay·a_p + l2·∂g.
    The backward itself is not differentiable again (third order is never needed).

    Both directions are written for memory bandwidth, which bounds them on a CPU: fused operations
    (lerp, addcmul, addcdiv), in-place updates, and chunks of `_CHUNK` elements, so that the dozen
    passes over a chunk run in cache and only the inputs and outputs travel to memory. Written as
    whole-tensor separate operations, the Adam step was 47 % of a SmolLM2 second-order meta-step.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, p: torch.Tensor, g: torch.Tensor, m0: torch.Tensor, v0: torch.Tensor, c: _AdamConsts
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outs = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (p, m0, v0))
        ins = [t.reshape(-1) for t in (p, g, m0, v0)]
        flat_outs = [o.view(-1) for o in outs]
        for sl in _chunks(p):
            fp, fg, fm0, fv0 = (t[sl] for t in ins)
            _forward_chunk(fp, fg, fm0, fv0, c, tuple(o[sl] for o in flat_outs))
        ctx.c = c
        ctx.save_for_backward(p if c.l2 else None, g, m0, v0)
        ctx.set_materialize_grads(False)
        return outs[0], outs[1], outs[2]

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, a_p: torch.Tensor | None, a_m: torch.Tensor | None, a_v: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        c: _AdamConsts = ctx.c
        p, g, m0, v0 = ctx.saved_tensors
        if a_p is None and a_m is None and a_v is None:
            return None, None, None, None, None

        def new() -> torch.Tensor:
            return torch.empty_like(g, memory_format=torch.contiguous_format)

        grad_g = new()
        grad_m0 = new() if ctx.needs_input_grad[2] else None
        grad_v0 = new() if ctx.needs_input_grad[3] else None
        ins = [_flat(t) for t in (p, a_p, a_m, a_v)]
        fg, fm0, fv0, out_g = (t.reshape(-1) for t in (g, m0, v0, grad_g))
        outs = [_flat(t) for t in (grad_m0, grad_v0)]
        for sl in _chunks(g):
            fp, fap, fam, fav = (t[sl] if t is not None else None for t in ins)
            out_m0, out_v0 = (t[sl] if t is not None else None for t in outs)
            _backward_chunk(fp, fg[sl], fm0[sl], fv0[sl], fap, fam, fav, c, (out_g[sl], out_m0, out_v0))
        grad_p = None
        if ctx.needs_input_grad[0]:
            if a_p is None:
                grad_p = torch.zeros_like(g)
            else:  # no copy when there is no decay: a model-sized buffer at the peak of the meta-gradient
                grad_p = a_p * c.decay if c.decay != 1.0 else a_p
            if c.l2:
                grad_p = grad_p + c.l2 * grad_g
        return grad_p, grad_g if ctx.needs_input_grad[1] else None, grad_m0, grad_v0, None
