"""Exact activation checkpointing for every method, second order included (`activation_checkpointing`).

Hugging Face's checkpointing recomputes a decoder layer from the module's own weights; under
`functional_call` the adapted inner weights θ_k are in place only while the forward runs, so its
recompute would see θ_0. Here every layer is recomputed from the tensors it was called with, passed to
the checkpoint as explicit inputs (adapted weights, LoRA adapters; the frozen base is the module's own,
which never changes). Hugging Face's own hook is the entry point: each `GradientCheckpointingLayer`
calls `_gradient_checkpointing_func(forward, hidden, *positional)`, which is set here.

- **Forwards** (first order, the query pass, metaicl): each group of `every` layers runs inside a
  non-reentrant `torch.utils.checkpoint` whose inputs are the group's input h and its weights. The
  graph keeps h per group; the backward recomputes the group.
- **The second-order inner gradient** (`grads`): `autograd.grad(loss, θ, create_graph=True)` through
  checkpointed forwards saves nothing, because the double-backward graph records the recomputed
  activations (measured: 1494 vs 1513 MiB). Instead the inner backward runs group by group from the
  top: the part above the last layer (final norm, head) by autograd, then for each group, from the last
  down, its vector-Jacobian product (dh_i, dW_i) = VJP(h_i, dh_{i+1}, W_i) as one autograd node
  (`_GroupVJP`) that keeps only its inputs: its backward (the outer backward's pass through it)
  recomputes the group's forward and backward with a graph and differentiates that. The outer graph
  holds h_i and dh_{i+1} per group and inner step, instead of every activation of every layer.
  Finally the part below the first layer (the embeddings) by autograd from dh_0.

Parts above and below the layers are told apart by aliases: each trainable weight outside the
layers enters the model as a view of itself (one for the base model, another for a head tied to the
embedding), so the gradient of the top part stops at the views and never runs through the layers.
Layers are recomputed under the autocast state and attention kernel of their first run; their
children stay in eval mode (no dropout, so no random state to replay).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from raymeta.errors import UserError

__all__ = ["LayerCheckpointing"]

Tensors = dict[str, torch.Tensor]


class _Bound(torch.nn.Module):
    """Calls a layer's unwrapped forward (Hugging Face's partial, kwargs bound) with given weights in place
    (public `functional_call` over this holder, whose only child is the layer)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return fn(*args)


@dataclass
class _Call:
    """One layer call as the Hugging Face loop made it: the layer's index, its forward (kwargs bound), its
    extra positional arguments (masks, None caches), the input h and, for a group's last, the output."""

    index: int
    fn: Callable[..., torch.Tensor]
    rest: tuple[Any, ...]
    h: torch.Tensor
    out: torch.Tensor | None = None


@dataclass
class _Tape:
    theta: Tensors
    record: bool
    groups: list[list[_Call]] = field(default_factory=list)  # what ran, group by group (recorded)
    pending: list[_Call] = field(default_factory=list)  # the group being filled (every > 1)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class LayerCheckpointing:
    """Installed on a `FunctionalLM` by `activation_checkpointing`: its layers checkpoint themselves."""

    def __init__(self, hf: torch.nn.Module, names: Sequence[str], every: int, attention: Callable[[], Any]) -> None:
        from transformers.modeling_layers import GradientCheckpointingLayer  # deferred: only where it is used

        found = [(q, m) for q, m in hf.named_modules() if isinstance(m, GradientCheckpointingLayer)]
        if not found:
            raise UserError(f"no checkpointable decoder layers found in {type(hf).__name__}", key="activation_checkpointing")
        if every < 1:
            raise UserError(f"expected an integer >= 1, got {every!r}", key="activation_checkpointing_every")
        self.every = every
        self.attention = attention
        self.layers = [m for _, m in found]
        self.holders = [_Bound(m) for m in self.layers]
        # each layer's trainable weights, by their names in θ and in the holder
        self.layer_names = [[n for n in names if n.startswith(q + ".")] for q, _ in found]
        self.local = [{n: "layer." + n[len(q) + 1 :] for n in ns} for (q, _), ns in zip(found, self.layer_names)]
        inside = {n for ns in self.layer_names for n in ns}
        self.outside = [n for n in names if n not in inside]  # embeddings, final norm, head
        self.tape: _Tape | None = None
        self._install()

    def _install(self) -> None:
        for i, layer in enumerate(self.layers):
            layer.gradient_checkpointing = True
            layer.training = True  # the layer only (HF checkpoints a layer in training); children stay in eval
            layer._gradient_checkpointing_func = partial(self._layer_call, i)  # type: ignore[assignment]

    # -- the forward ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self, theta: Tensors, *, record: bool) -> Iterator[_Tape]:
        """Calls of the model inside this see θ's layer weights as checkpoint inputs; `record` keeps the
        calls for `grads`."""
        self._install()  # again: another FunctionalLM on the same model may have put its own in place
        previous, self.tape = self.tape, _Tape(theta, record)
        try:
            yield self.tape
        finally:
            self.tape = previous

    def _weights(self, i: int) -> list[torch.Tensor]:
        assert self.tape is not None
        return [self.tape.theta[n] for n in self.layer_names[i]]

    def _run(self, calls: Sequence[_Call], h: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        """Layers `calls` in order from h, each with its slice of `weights` in place."""
        at = 0
        with self.attention():
            for c in calls:
                names = self.layer_names[c.index]
                params = {self.local[c.index][n]: w for n, w in zip(names, weights[at : at + len(names)])}
                at += len(names)
                h = functional_call(self.holders[c.index], params, (c.fn, h, *c.rest), strict=False)
        return h

    def _layer_call(self, i: int, fn: Callable[..., torch.Tensor], h: torch.Tensor, *rest: Any) -> torch.Tensor:
        tape = self.tape
        if tape is None:  # a call from outside raymeta's loss (generation, HF's own forward): no checkpoint
            return fn(h, *rest)
        call = _Call(i, fn, rest, h)
        last = i == len(self.layers) - 1
        # groups of `every` layers: all but the last of a group run without a graph (their values feed
        # Hugging Face's loop); the last runs the whole group from the group's input in one checkpoint
        tape.pending.append(call)
        if len(tape.pending) < self.every and not last:
            with torch.no_grad():
                return self._run([call], h, *self._weights(i))
        group, tape.pending = tape.pending, []
        weights = [w for c in group for w in self._weights(c.index)]
        group[-1].out = checkpoint(self._run, group, group[0].h, *weights, use_reentrant=False)
        if tape.record:
            tape.groups.append(group)
        return group[-1].out

    # -- the second-order inner gradient ---------------------------------------------------------------------
    def grads(
        self, loss: torch.Tensor, tape: _Tape, outside: dict[str, list[torch.Tensor]], names: Sequence[str]
    ) -> list[torch.Tensor]:
        """∇_θ loss with a graph (create_graph), computed group by group from a recorded forward.

        `outside` maps each trainable weight outside the layers to the alias (or aliases, summed) it
        entered the model as: {name: [alias, ...]}."""
        groups = tape.groups
        if [c.index for g in groups for c in g] != list(range(len(self.layers))):
            raise RuntimeError("the recorded forward did not run every decoder layer once, in order")
        alias_list = [(n, a) for n, aliases in outside.items() for a in aliases]
        top_out = groups[-1][-1].out
        assert top_out is not None
        below = _reaches(groups[0][0].h, [a for _, a in alias_list])
        top = [(n, a) for (n, a), b in zip(alias_list, below) if not b]
        bottom = [(n, a) for (n, a), b in zip(alias_list, below) if b]
        total: dict[str, torch.Tensor] = {}

        def add(names_: Sequence[str], got: Sequence[torch.Tensor | None]) -> None:
            for n, g in zip(names_, got):
                if g is not None:
                    total[n] = total[n] + g if n in total else g

        wrt = [top_out] + [a for _, a in top]
        got = torch.autograd.grad(loss, wrt, create_graph=True, allow_unused=True)
        dh = got[0] if got[0] is not None else torch.zeros_like(top_out)
        add([n for n, _ in top], got[1:])
        autocast = _autocast_state(top_out.device.type)
        for group in reversed(groups):
            gnames = [n for c in group for n in self.layer_names[c.index]]
            weights = [tape.theta[n] for n in gnames]
            h = group[0].h
            if not h.requires_grad and not weights:  # nothing below this group trains (a `trainable` subset)
                break
            out = _GroupVJP.apply(self, group, autocast, h.requires_grad, h, dh, *weights)
            dh = out[0]
            add(gnames, out[1:])
        h0 = groups[0][0].h
        if bottom and h0.requires_grad:
            add([n for n, _ in bottom], torch.autograd.grad(h0, [a for _, a in bottom], dh, create_graph=True, allow_unused=True))
        return [total[n] if n in total else torch.zeros_like(tape.theta[n]) for n in names]


def _reaches(root: torch.Tensor, aliases: Sequence[torch.Tensor]) -> list[bool]:
    """Which aliases `root`'s graph reaches: the part below the first layer, a few nodes (the walk stops
    at the aliases, whose own history is the earlier inner steps)."""
    ends = {a.grad_fn for a in aliases}
    seen: set[Any] = set()
    stack = [root.grad_fn] if root.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node not in ends:
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return [a.grad_fn in seen for a in aliases]


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(grad)


class _GroupVJP(torch.autograd.Function):
    """(dh_in, dW) = the VJP of a group of layers at (h_in, W) against dh_out; keeps only its inputs.

    Its backward recomputes the group's forward and backward with a graph and differentiates the VJP:
    the double backward of one group at a time."""

    @staticmethod
    def forward(
        ctx: Any,
        owner: LayerCheckpointing,
        group: list[_Call],
        autocast: Any,
        h_grad: bool,
        h: torch.Tensor,
        dh: torch.Tensor,
        *weights: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.owner, ctx.group, ctx.autocast, ctx.h_grad = owner, group, autocast, h_grad
        ctx.save_for_backward(h, dh, *weights)
        with torch.enable_grad():
            hs, ws = _leaf(h, h_grad), [_leaf(w, True) for w in weights]
            out = _vjp(owner, group, autocast, hs, dh.detach(), ws, create_graph=False)
        return tuple(g.detach() for g in out)

    @staticmethod
    def backward(ctx: Any, *grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        h, dh, *weights = ctx.saved_tensors
        with torch.enable_grad():
            hs, dhs, ws = _leaf(h, ctx.h_grad), _leaf(dh, True), [_leaf(w, True) for w in weights]
            out = _vjp(ctx.owner, ctx.group, ctx.autocast, hs, dhs, ws, create_graph=True)
            inputs = ([hs] if ctx.h_grad else []) + [dhs, *ws]
            pairs = [(o, g) for o, g in zip(out, grad_out) if o.requires_grad]
            raw = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True) if pairs else ()
        got = [torch.zeros_like(x) if g is None else g for g, x in zip(raw or [None] * len(inputs), inputs)]
        dh_in = got.pop(0) if ctx.h_grad else None
        return (None, None, None, None, dh_in, *got)


def _vjp(
    owner: LayerCheckpointing,
    group: list[_Call],
    autocast: tuple[bool, torch.dtype],
    h: torch.Tensor,
    dh: torch.Tensor,
    weights: list[torch.Tensor],
    *,
    create_graph: bool,
) -> list[torch.Tensor]:
    """[dh_in (zeros when h needs no gradient), dW...] of the group at (h, weights) against dh."""
    on, dtype = autocast
    with torch.autocast(h.device.type, dtype=dtype, enabled=on):
        out = owner._run(group, h, *weights)
    wrt = ([h] if h.requires_grad else []) + weights
    raw = torch.autograd.grad(out, wrt, dh, create_graph=create_graph, allow_unused=True)
    got = [torch.zeros_like(x) if g is None else g for g, x in zip(raw, wrt)]
    return got if h.requires_grad else [torch.zeros_like(h), *got]
