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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raymeta.core.inner import adapt, inner_start
from raymeta.core.lm import Batch, FunctionalLM
from raymeta.core.optim import AdamState, OptimizerSpec, detached, optimizer_step, zeros_state
from raymeta.core.settings import (
    MAX_LR,
    METHODS,
    MOMENT_POLICIES,
    PRECISIONS,
    SCHEDULES,
    InnerConfig,
    MetaConfig,
    OuterConfig,
    schedule_factor,
)
from raymeta.errors import UserError

__all__ = [
    "MAX_LR",
    "METHODS",
    "MOMENT_POLICIES",
    "PRECISIONS",
    "SCHEDULES",
    "Accumulator",
    "InnerConfig",
    "MetaConfig",
    "MetaLearner",
    "OuterConfig",
    "StepMetrics",
    "TaskBatch",
    "TaskResult",
    "meta_share",
    "schedule_factor",
    "task_meta_gradient",
]


Tensors = dict[str, torch.Tensor]


def item(t: torch.Tensor) -> float:
    """A scalar tensor's value on the host. A meta-step's only device-to-host reads are these and
    `all_finite` (a loss, a norm, a finiteness check): everything else stays on the weights' device."""
    return float(t.detach())


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite, in one device-to-host read."""
    checks = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(checks).all()) if checks else True


def host_values(t: torch.Tensor) -> list[float]:
    """A small tensor's values on the host, in one read."""
    return [float(x) for x in t.detach().cpu().tolist()]


@dataclass(frozen=True)
class TaskBatch:
    task: str
    support: Batch
    query: Batch


@dataclass
class TaskResult:
    grads: Tensors
    inner_state: AdamState | None
    support_loss: float
    query_loss: float
    n_tokens: int
    support_grad_norm: float = float("nan")  # the first support gradient's global norm, before inner.grad_clip

    @property
    def finite(self) -> bool:
        return math.isfinite(self.support_loss) and math.isfinite(self.query_loss) and all_finite(self.grads.values())


def task_meta_gradient(
    flm: FunctionalLM, params: Tensors, outer_state: AdamState | None, batch: TaskBatch, cfg: MetaConfig
) -> TaskResult:
    """The meta-gradient G_i of one task (a pure function of its inputs: it can run in another process)."""
    device = flm.device

    def autocast(on: bool) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()

    # bf16: every pass under bf16 autocast; bf16_query: the query pass only (the inner loop, whose
    # gradients the inner Adam step and its derivative read, stays in fp32)
    inner_bf16 = cfg.precision == "bf16"
    query_bf16 = cfg.precision in ("bf16", "bf16_query")
    names = list(params)
    # the token positions the task's forward passes run (K support passes and one query pass)
    n_tokens = batch.support.n_positions * cfg.inner.steps + batch.query.n_positions
    with autocast(query_bf16):
        if cfg.method == "metaicl":
            loss = flm.loss(params, batch.query)
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            value = item(loss)
            return TaskResult(dict(zip(names, grads)), None, value, value, batch.query.n_positions)

    second = cfg.method == "maml_en_llm"
    spec = cfg.inner_spec(flm.no_decay_names() if cfg.no_decay else ())
    with autocast(inner_bf16):  # the one inner loop (raymeta.core.inner), as test-time adaptation runs it
        theta, state, first_loss, first_norm = adapt(
            flm,
            dict(params),
            batch.support,
            spec,
            inner_start(spec, cfg.moment_policy, params, outer_state),
            cfg.inner.steps,
            second_order=second,
            grad_clip=cfg.inner.grad_clip,
        )
    support_loss, support_norm = (
        host_values(torch.stack([first_loss.double(), first_norm.double()]))
        if first_loss is not None and first_norm is not None
        else (float("nan"), float("nan"))
    )
    # only `shared` reads the final inner moments: keeping them otherwise costs two model-sized buffers
    final_state = detached(state) if state is not None and cfg.shares_moments else None
    del state  # the graph keeps what the meta-gradient needs; drop the rest before the query pass

    with autocast(query_bf16):
        if cfg.method == "reptile":
            with torch.no_grad():
                query_loss = item(flm.loss(theta, batch.query))
            meta = {n: params[n].detach() - theta[n].detach() for n in names}
            return TaskResult(meta, final_state, support_loss, query_loss, n_tokens, support_norm)

        loss = flm.loss(theta, batch.query)
        wrt = [params[n] for n in names] if second else [theta[n] for n in names]
        meta_grads = torch.autograd.grad(loss, wrt)
        return TaskResult(dict(zip(names, meta_grads)), final_state, support_loss, item(loss), n_tokens, support_norm)


@dataclass
class StepMetrics:
    support_loss: float
    query_loss: float
    grad_norm: float  # the mean meta-gradient's global norm, before grad_clip
    skipped: bool
    n_tokens: int
    support_grad_norm: float = float("nan")  # mean over tasks of the first support gradient's norm, before inner.grad_clip
    meta_share: float | None = None  # ‖Δθ_meta‖ / ‖Δθ‖ of the outer Adam step under shared moments (else None)
    outer_lr: float = float("nan")  # the outer lr of this step (outer.schedule)


class Accumulator:
    """Running sums of the tasks' results: one gradient-sized buffer, whatever the number of tasks."""

    def __init__(self) -> None:
        self.n = 0
        self.grads: Tensors = {}
        self.m: Tensors = {}
        self.v: Tensors = {}
        self.support_loss = 0.0
        self.query_loss = 0.0
        self.support_grad_norm = 0.0
        self.n_tokens = 0
        self.finite = True

    def add(self, r: TaskResult) -> None:
        self.n += 1
        self.support_loss += r.support_loss
        self.query_loss += r.query_loss
        self.support_grad_norm += r.support_grad_norm
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


def meta_share(spec: OptimizerSpec, meta: Tensors, state: AdamState) -> float:
    """The meta-gradient's share of an outer Adam step under shared moments, ‖Δθ_meta‖ / ‖Δθ‖.

    The step is Δθ = −s·m'/d with m' = β1·m̄ + (1−β1)·g (m̄ the tasks' mean final inner moments, g the
    clipped meta-gradient) and d = sqrt(v'/bc2 + eps_root) + eps; it splits along m' into the support
    stream's β1·m̄ and the meta-gradient's (1−β1)·g, so Δθ_meta = −s·(1−β1)·g/d (the same s and d).
    Weight decay is left out of both. Read from the new state: one host read."""
    b1, b2 = spec.betas
    bc2 = 1 - b2**state.step
    total = torch.zeros((), dtype=torch.float64, device=next(iter(meta.values())).device)
    part = total.clone()
    for nm, g in meta.items():
        d = torch.sqrt(state.v[nm] / bc2 + spec.eps_root) + spec.eps
        total += (state.m[nm] / d).double().pow(2).sum()
        part += ((1 - b1) * g / d).double().pow(2).sum()
    return item(torch.sqrt(part / total))  # nan for a zero step


class MetaLearner:
    """Holds θ (the model's own parameters) and the outer optimizer state S; applies meta-steps.

    Works on any Hugging Face causal LM and on batches you build yourself::

        import torch, raymeta
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained("path/to/model", attn_implementation="eager")
        learner = raymeta.MetaLearner(model, raymeta.MetaConfig(method="maml_en_llm", moment_policy="shared"))
        ids = torch.randint(0, model.config.vocab_size, (1, 12))
        support = raymeta.Batch(ids, ((8, 12),))  # score tokens 8..11 of row 0
        query = raymeta.Batch(ids.roll(3, 1), ((8, 12),))
        metrics = learner.step([raymeta.TaskBatch("my-task", support, query)])
        print(metrics.query_loss, metrics.grad_norm)

    Every parameter with `requires_grad` is meta-trained (θ); the others stay as they are (bit for bit);
    the model is updated in place. A `peft.PeftModel` meta-trains its adapter tensors.
    """

    def __init__(self, model: torch.nn.Module, cfg: MetaConfig, *, total_steps: int | None = None) -> None:
        self.cfg = cfg.validate("MetaConfig")
        if cfg.outer.schedule != "constant" and total_steps is None:
            raise UserError(
                f"{cfg.outer.schedule} decays the outer lr to 0 at the run's last step: give MetaLearner(..., total_steps=N)",
                key="outer.schedule",
            )
        self.total_steps = total_steps
        self.updates = 0  # meta-steps taken (skipped ones included): where the outer schedule is
        # SDPA's math backend only where double backward is needed; elsewhere the default (faster) kernels
        self.flm = FunctionalLM(model, math_attention=cfg.method == "maml_en_llm", checkpointing=cfg.checkpoint_group)
        if not self.flm.names:
            raise UserError("no parameter of the model requires grad: nothing to meta-train", key="trainable")
        if cfg.method == "maml_en_llm":
            self.flm.check_double_backward()
        params = self.flm.params()
        self.no_decay = self.flm.no_decay_names() if cfg.no_decay else frozenset()
        self.state: AdamState | None = (
            zeros_state({n: p.detach() for n, p in params.items()}) if cfg.outer_spec().has_moments else None
        )
        self.skipped = 0

    def outer_lr(self) -> float:
        """The outer lr of the next meta-step (`outer.schedule` after `updates` steps)."""
        o = self.cfg.outer
        return o.lr * schedule_factor(o.schedule, o.warmup_steps, self.total_steps, self.updates)

    @property
    def shares_moments(self) -> bool:
        """Whether the outer step takes the tasks' mean final inner moments (`moment_policy: shared`, an
        outer optimizer with moments, and inner loops to take them from)."""
        return self.state is not None and self.cfg.shares_moments

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
        support, query, support_norm = acc.support_loss / n, acc.query_loss / n, acc.support_grad_norm / n
        spec = self.cfg.outer_spec(self.no_decay, self.outer_lr() / self.cfg.outer.lr)
        self.updates += 1  # a skipped step still moves the schedule on (as a step counter does)
        if not acc.finite:
            self.skipped += 1
            return StepMetrics(support, query, float("nan"), True, acc.n_tokens, support_norm, None, spec.lr)
        params = self.flm.params()
        meta = {nm: g / n for nm, g in acc.grads.items()}
        norm = item(torch.sqrt(sum((g.double().pow(2).sum() for g in meta.values()), torch.zeros((), dtype=torch.float64))))
        if not math.isfinite(norm):
            self.skipped += 1
            return StepMetrics(support, query, norm, True, acc.n_tokens, support_norm, None, spec.lr)
        if self.cfg.grad_clip and norm > self.cfg.grad_clip:
            meta = {nm: g * (self.cfg.grad_clip / norm) for nm, g in meta.items()}
        if self.shares_moments:
            assert self.state is not None
            self.state = AdamState(
                {nm: t / n for nm, t in acc.m.items()},
                {nm: t / n for nm, t in acc.v.items()},
                self.state.step + self.cfg.inner.steps,
            )
        with torch.no_grad():
            current = {nm: p.detach() for nm, p in params.items()}
            new, self.state = optimizer_step(spec, current, meta, self.state)
            for nm, p in params.items():
                p.copy_(new[nm])
            share = meta_share(spec, meta, self.state) if self.shares_moments and self.state is not None else None
        return StepMetrics(support, query, norm, False, acc.n_tokens, support_norm, share, spec.lr)

    def step(self, batches: Sequence[TaskBatch]) -> StepMetrics:
        return self.apply(self.accumulate(batches))
