"""One meta-step of maml_en_llm, fomaml, reptile or metaicl, in pure PyTorch.

Notation: θ the trainable weights; S the outer optimizer's state (m, v, step); for each task i a
support batch and a separate query batch of ICL instances.

- metaicl:     G_i = ∇_θ L_query(θ).
- maml_en_llm: θ_i = θ; K inner steps θ_i ← InnerOpt(θ_i, ∇L_support(θ_i)) keeping the graph
               (moments included); G_i = ∇_θ L_query(θ_i), differentiated through the inner loop.
- fomaml:      the same with the graph cut: G_i = ∇_{θ_i} L_query(θ_i).
- reptile:     G_i = θ − θ_i (a pseudo-gradient: outer SGD with lr ε gives θ + ε·mean_i(θ_i − θ)).
The outer optimizer steps θ with mean_i G_i (after clipping its global norm to `grad_clip`).

Moment policies (Adam-family inner and outer optimizers):
- none:   each task's inner Adam starts from zero moments and step 0.
- init:   each task's inner Adam starts from a detached copy of S = (m, v, step); S is then updated by
          the outer step alone.
- shared: one state for both loops. Tasks start from S as in `init`. After the tasks,
          S.m = mean_i m_i and S.v = mean_i v_i (the tasks' final inner moments) and S.step += K (every
          task advanced the counter by its K inner steps); then the outer step updates S with the
          meta-gradient (S.step += 1) and its bias correction uses that counter: 1 − β^(step).

Tasks are processed one at a time and their meta-gradients accumulated: at most one task's graph is
alive. A non-finite loss or meta-gradient skips the whole update (counted), so no NaN reaches the
weights or the optimizer state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from raymeta.config import TrainConfig
from raymeta.errors import UserError
from raymeta.optim import AdamState, detached, optimizer_step, zeros_state
from raymeta.prompts import Scored

__all__ = [
    "Batch",
    "make_batch",
    "FunctionalLM",
    "TaskBatch",
    "TaskResult",
    "task_meta_gradient",
    "Accumulator",
    "StepMetrics",
    "MetaLearner",
]

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids and, per row, the [start, end) span of scored tokens."""

    ids: torch.Tensor
    spans: tuple[tuple[int, int], ...]

    @property
    def n_tokens(self) -> int:
        return sum(e for _, e in self.spans)


def make_batch(seqs: Sequence[Scored], max_length: int) -> Batch:
    built = [s.full(max_length, allow_truncation=True) for s in seqs]
    ids = torch.zeros(len(built), max(len(b) for b, _ in built), dtype=torch.long)
    spans = []
    for row, (seq, start) in enumerate(built):
        ids[row, : len(seq)] = torch.tensor(seq)
        spans.append((max(start, 1), len(seq)))
    return Batch(ids, tuple(spans))


@dataclass(frozen=True)
class TaskBatch:
    task: str
    support: Batch
    query: Batch


class FunctionalLM:
    """A Hugging Face causal LM called with an explicit dict of weights (`torch.func.functional_call`).

    The loss is MetaICL's: per sequence the mean cross-entropy of its scored tokens, then the mean over
    sequences. Logits are computed at the scored positions only. It is computed in the weights' dtype
    (upcast to at least float32), not with HF's loss, which upcasts float64 down to float32.
    """

    def __init__(self, model: torch.nn.Module, *, math_attention: bool = True) -> None:
        hf: object = model
        self.model = model
        self.base: torch.nn.Module = hf.base_model  # type: ignore[attr-defined]
        self.prefix = hf.base_model_prefix + "."  # type: ignore[attr-defined]
        named = dict(model.named_parameters())
        head = hf.get_output_embeddings()  # type: ignore[attr-defined]
        by_id = {id(p): n for n, p in named.items()}
        if id(head.weight) not in by_id:
            raise UserError("model: its output head's weight is not one of its parameters; unsupported model")
        self.head_name = by_id[id(head.weight)]
        self.head_bias = head.bias
        self.names = [n for n, p in named.items() if p.requires_grad]
        self.math_attention = math_attention

    def params(self) -> Tensors:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def attention(self) -> Iterator[None]:
        """SDPA restricted to the math backend: the flash/efficient kernels have no double backward."""
        if self.math_attention:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.MATH]):
                yield
        else:
            yield

    def loss(self, params: Tensors, batch: Batch) -> torch.Tensor:
        base_params = {n[len(self.prefix) :]: t for n, t in params.items() if n.startswith(self.prefix)}
        ids = batch.ids.to(params[self.head_name].device)
        with self.attention():
            hidden = functional_call(self.base, base_params, (ids,), {"use_cache": False}).last_hidden_state
        rows = torch.cat([torch.full((e - s,), b, dtype=torch.long) for b, (s, e) in enumerate(batch.spans)]).to(ids.device)
        cols = torch.cat([torch.arange(s, e) for s, e in batch.spans]).to(ids.device)
        logits = F.linear(hidden[rows, cols - 1], params[self.head_name], self.head_bias)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        token_loss = F.cross_entropy(logits, ids[rows, cols], reduction="none")
        weights = torch.cat([torch.full((e - s,), 1.0 / (e - s), dtype=token_loss.dtype) for s, e in batch.spans]).to(
            token_loss.device
        )
        return (token_loss * weights).sum() / len(batch.spans)

    def check_double_backward(self) -> None:
        """Fail clearly at start-up when the attention implementation cannot do second order."""
        params = self.params()
        batch = Batch(torch.tensor([[1, 2, 3, 4]]), ((1, 4),))
        try:
            loss = self.loss(params, batch)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
            total = sum((g.pow(2).sum() for g in grads if g is not None), torch.zeros(()))
            torch.autograd.grad(total, list(params.values()), allow_unused=True)
        except RuntimeError as e:
            impl = getattr(getattr(self.model, "config", None), "_attn_implementation", "?")
            first = str(e).splitlines()[0]
            raise UserError(
                f"model: attention implementation {impl!r} has no double backward ({first}); load it with "
                "attn_implementation='eager' or use SDPA's math backend"
            ) from None


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing of each decoder layer (Hugging Face's), exact for `metaicl` only.

    Only the layers themselves are put in training mode (HF checkpoints a layer when it is training);
    their children stay in eval mode, so no dropout is switched on.
    """
    hf: Any = model
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise UserError(f"activation_checkpointing: {type(model).__name__} does not support gradient checkpointing")
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise UserError(f"activation_checkpointing: no checkpointable layers found in {type(model).__name__}")
    for layer in layers:
        layer.training = True


@dataclass
class TaskResult:
    grads: Tensors
    inner_state: AdamState | None
    support_loss: float
    query_loss: float
    n_tokens: int

    @property
    def finite(self) -> bool:
        return (
            math.isfinite(self.support_loss)
            and math.isfinite(self.query_loss)
            and all(bool(torch.isfinite(g).all()) for g in self.grads.values())
        )


def _inner_start(cfg: TrainConfig, params: Tensors, outer_state: AdamState | None) -> AdamState | None:
    if not cfg.inner_spec().has_moments:
        return None
    if cfg.moment_policy == "none" or outer_state is None:
        return zeros_state({n: p.detach() for n, p in params.items()})
    return detached(outer_state)


def task_meta_gradient(
    flm: FunctionalLM, params: Tensors, outer_state: AdamState | None, batch: TaskBatch, cfg: TrainConfig
) -> TaskResult:
    """The meta-gradient G_i of one task (a pure function of its inputs: it can run in another process)."""
    autocast = torch.autocast(params[flm.head_name].device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    names = list(params)
    n_tokens = batch.support.n_tokens * cfg.inner.steps + batch.query.n_tokens
    with autocast:
        if cfg.method == "metaicl":
            loss = flm.loss(params, batch.query)
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            value = float(loss.detach())
            return TaskResult(dict(zip(names, grads)), None, value, value, batch.query.n_tokens)

        second = cfg.method == "maml_en_llm"
        theta = dict(params) if second else {n: p.detach().requires_grad_() for n, p in params.items()}
        state = _inner_start(cfg, params, outer_state)
        support_loss = float("nan")
        for k in range(cfg.inner.steps):
            loss = flm.loss(theta, batch.support)
            if k == 0:
                support_loss = float(loss.detach())
            grads = torch.autograd.grad(loss, [theta[n] for n in names], create_graph=second)
            theta, state = optimizer_step(cfg.inner_spec(), theta, dict(zip(names, grads)), state)
            if not second:
                theta = {n: t.detach().requires_grad_() for n, t in theta.items()}
                state = detached(state) if state is not None else None
        # only `shared` reads the final inner moments: keeping them otherwise costs two model-sized buffers
        final_state = detached(state) if state is not None and cfg.moment_policy == "shared" else None
        del state, grads, loss  # the graph keeps what the meta-gradient needs; drop the rest before the query pass

        if cfg.method == "reptile":
            with torch.no_grad():
                query_loss = float(flm.loss(theta, batch.query))
            meta = {n: params[n].detach() - theta[n].detach() for n in names}
            return TaskResult(meta, final_state, support_loss, query_loss, n_tokens)

        loss = flm.loss(theta, batch.query)
        wrt = [params[n] for n in names] if second else [theta[n] for n in names]
        meta_grads = torch.autograd.grad(loss, wrt)
        return TaskResult(dict(zip(names, meta_grads)), final_state, support_loss, float(loss.detach()), n_tokens)


@dataclass
class StepMetrics:
    support_loss: float
    query_loss: float
    grad_norm: float
    skipped: bool
    n_tokens: int


class Accumulator:
    """Running sums of the tasks' results: one gradient-sized buffer, whatever the number of tasks."""

    def __init__(self) -> None:
        self.n = 0
        self.grads: Tensors = {}
        self.m: Tensors = {}
        self.v: Tensors = {}
        self.support_loss = 0.0
        self.query_loss = 0.0
        self.n_tokens = 0
        self.finite = True

    def add(self, r: TaskResult) -> None:
        self.n += 1
        self.support_loss += r.support_loss
        self.query_loss += r.query_loss
        self.n_tokens += r.n_tokens
        if not r.finite:
            self.finite = False
            return
        for target, source in (
            (self.grads, r.grads),
            (self.m, r.inner_state.m if r.inner_state else {}),
            (self.v, r.inner_state.v if r.inner_state else {}),
        ):
            for name, t in source.items():
                if name in target:
                    target[name] += t.detach()
                else:
                    target[name] = t.detach().clone()


class MetaLearner:
    """Holds θ (the model's own parameters) and the outer optimizer state S; applies meta-steps."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig) -> None:
        self.cfg = cfg
        # SDPA's math backend only where double backward is needed; elsewhere the default (faster) kernels
        self.flm = FunctionalLM(model, math_attention=cfg.method == "maml_en_llm")
        if cfg.method == "maml_en_llm":
            self.flm.check_double_backward()
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        params = self.flm.params()
        self.state: AdamState | None = (
            zeros_state({n: p.detach() for n, p in params.items()}) if cfg.outer_spec().has_moments else None
        )
        self.skipped = 0

    def accumulate(self, batches: Sequence[TaskBatch], acc: Accumulator | None = None) -> Accumulator:
        """Run the tasks one at a time (one graph alive at most) and sum their results."""
        acc = acc or Accumulator()
        params = self.flm.params()
        for b in batches:
            acc.add(task_meta_gradient(self.flm, params, self.state, b, self.cfg))
        return acc

    def apply(self, acc: Accumulator) -> StepMetrics:
        """Average the tasks' meta-gradients (and moments, for `shared`) and take the outer step."""
        n = acc.n
        support, query = acc.support_loss / n, acc.query_loss / n
        if not acc.finite:
            self.skipped += 1
            return StepMetrics(support, query, float("nan"), True, acc.n_tokens)
        params = self.flm.params()
        meta = {nm: g / n for nm, g in acc.grads.items()}
        norm = float(torch.sqrt(sum((g.double().pow(2).sum() for g in meta.values()), torch.zeros((), dtype=torch.float64))))
        if not math.isfinite(norm):
            self.skipped += 1
            return StepMetrics(support, query, norm, True, acc.n_tokens)
        if self.cfg.grad_clip and norm > self.cfg.grad_clip:
            meta = {nm: g * (self.cfg.grad_clip / norm) for nm, g in meta.items()}
        if self.cfg.moment_policy == "shared" and self.state is not None and self.cfg.method != "metaicl":
            self.state = AdamState(
                {nm: t / n for nm, t in acc.m.items()},
                {nm: t / n for nm, t in acc.v.items()},
                self.state.step + self.cfg.inner.steps,
            )
        with torch.no_grad():
            current = {nm: p.detach() for nm, p in params.items()}
            new, self.state = optimizer_step(self.cfg.outer_spec(), current, meta, self.state)
            for nm, p in params.items():
                p.copy_(new[nm])
        return StepMetrics(support, query, norm, False, acc.n_tokens)

    def step(self, batches: Sequence[TaskBatch]) -> StepMetrics:
        return self.apply(self.accumulate(batches))
