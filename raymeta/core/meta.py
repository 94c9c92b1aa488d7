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
from dataclasses import dataclass, field
from typing import Any

import torch

from raymeta.core.inner import adapt, inner_start
from raymeta.core.lm import Batch, FunctionalLM, enable_activation_checkpointing
from raymeta.core.optim import OPTIMIZERS, AdamState, OptimizerSpec, detached, optimizer_step, zeros_state
from raymeta.errors import UserError

__all__ = [
    "METHODS",
    "MOMENT_POLICIES",
    "PRECISIONS",
    "Accumulator",
    "InnerConfig",
    "MetaConfig",
    "MetaLearner",
    "OuterConfig",
    "StepMetrics",
    "TaskBatch",
    "TaskResult",
    "task_meta_gradient",
]

METHODS = ("maml_en_llm", "fomaml", "reptile", "metaicl")
MOMENT_POLICIES = ("none", "init", "shared")
PRECISIONS = ("fp32", "bf16", "bf16_query")

Tensors = dict[str, torch.Tensor]


@dataclass
class InnerConfig:
    optimizer: str = "adamw"
    lr: float = 1e-5
    steps: int = 1


@dataclass
class OuterConfig:
    optimizer: str = "adamw"
    lr: float = 1e-5


MAX_LR = 1e6  # Adam's step lr / (1 - beta1) must fit a float32; 1e6 is far beyond any useful rate


@dataclass
class MetaConfig:
    """The algorithm: method, inner and outer optimizers, moment policy, clipping, precision.

    The names are the config keys of `raymeta train` (`inner.lr`, `moment_policy`, ...); this is all
    that `task_meta_gradient` and `MetaLearner` read. Data, run and placement settings live elsewhere
    (`raymeta.config.TrainConfig` composes them)."""

    method: str = "maml_en_llm"
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_root: float = 1e-16
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # on the meta-gradient's global norm; 0 turns clipping off
    moment_policy: str = "shared"
    precision: str = "fp32"
    activation_checkpointing: bool = False

    def validate(self, where: str = "config") -> MetaConfig:
        def bad(key: str, expected: str, got: Any) -> UserError:
            return UserError(f"expected {expected}, got {got!r}", key=key, where=where)

        for key, value, allowed in (
            ("method", self.method, METHODS),
            ("moment_policy", self.moment_policy, MOMENT_POLICIES),
            ("precision", self.precision, PRECISIONS),
            ("inner.optimizer", self.inner.optimizer, OPTIMIZERS),
            ("outer.optimizer", self.outer.optimizer, OPTIMIZERS),
        ):
            if value not in allowed:
                raise bad(key, "one of " + ", ".join(allowed), value)
        for key, rate in (("inner.lr", self.inner.lr), ("outer.lr", self.outer.lr)):
            if not 0 < rate <= MAX_LR:
                raise bad(key, f"a positive number <= {MAX_LR:g} (larger ones overflow the float32 update)", rate)
        for key, number in (
            ("eps", self.eps),
            ("eps_root", self.eps_root),
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
        ):
            if number < 0:
                raise bad(key, "a number >= 0", number)
        if self.inner.steps < 1:
            raise bad("inner.steps", "an integer >= 1", self.inner.steps)
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise bad("betas", "two numbers in [0, 1)", list(self.betas))
        if self.activation_checkpointing and self.method != "metaicl":
            raise bad(
                "activation_checkpointing",
                "false for method " + self.method + " (recomputed activations would not see the adapted weights, which "
                "silently corrupts meta-gradients; it is exact, and allowed, for metaicl)",
                True,
            )
        if self.moment_policy != "none" and self.method in ("maml_en_llm", "fomaml", "reptile"):
            if not (self.inner_spec().has_moments and self.outer_spec().has_moments):
                raise bad(
                    "moment_policy",
                    "'none' unless inner.optimizer and outer.optimizer are both adam or adamw "
                    "(there are no moments to start from or share)",
                    self.moment_policy,
                )
        return self

    @property
    def shares_moments(self) -> bool:
        """Whether the tasks' final inner moments become the outer optimizer's (`shared`; MetaICL has no
        inner loop to take them from)."""
        return self.moment_policy == "shared" and self.method != "metaicl"

    def inner_spec(self) -> OptimizerSpec:
        return OptimizerSpec(self.inner.optimizer, self.inner.lr, self.betas, self.eps, self.eps_root, self.weight_decay)

    def outer_spec(self) -> OptimizerSpec:
        # the outer step is never differentiated: no guard, exactly torch.optim.Adam(W)
        return OptimizerSpec(self.outer.optimizer, self.outer.lr, self.betas, self.eps, 0.0, self.weight_decay)


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
    spec = cfg.inner_spec()
    with autocast(inner_bf16):  # the one inner loop (raymeta.core.inner), as test-time adaptation runs it
        theta, state, first_loss = adapt(
            flm,
            dict(params),
            batch.support,
            spec,
            inner_start(spec, cfg.moment_policy, params, outer_state),
            cfg.inner.steps,
            second_order=second,
        )
    support_loss = item(first_loss) if first_loss is not None else float("nan")
    # only `shared` reads the final inner moments: keeping them otherwise costs two model-sized buffers
    final_state = detached(state) if state is not None and cfg.shares_moments else None
    del state  # the graph keeps what the meta-gradient needs; drop the rest before the query pass

    with autocast(query_bf16):
        if cfg.method == "reptile":
            with torch.no_grad():
                query_loss = item(flm.loss(theta, batch.query))
            meta = {n: params[n].detach() - theta[n].detach() for n in names}
            return TaskResult(meta, final_state, support_loss, query_loss, n_tokens)

        loss = flm.loss(theta, batch.query)
        wrt = [params[n] for n in names] if second else [theta[n] for n in names]
        meta_grads = torch.autograd.grad(loss, wrt)
        return TaskResult(dict(zip(names, meta_grads)), final_state, support_loss, item(loss), n_tokens)


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

    def __init__(self, model: torch.nn.Module, cfg: MetaConfig) -> None:
        self.cfg = cfg.validate("MetaConfig")
        # SDPA's math backend only where double backward is needed; elsewhere the default (faster) kernels
        self.flm = FunctionalLM(model, math_attention=cfg.method == "maml_en_llm")
        if not self.flm.names:
            raise UserError("no parameter of the model requires grad: nothing to meta-train", key="trainable")
        if cfg.method == "maml_en_llm":
            self.flm.check_double_backward()
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        params = self.flm.params()
        self.state: AdamState | None = (
            zeros_state({n: p.detach() for n, p in params.items()}) if cfg.outer_spec().has_moments else None
        )
        self.skipped = 0

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
        support, query = acc.support_loss / n, acc.query_loss / n
        if not acc.finite:
            self.skipped += 1
            return StepMetrics(support, query, float("nan"), True, acc.n_tokens)
        params = self.flm.params()
        meta = {nm: g / n for nm, g in acc.grads.items()}
        norm = item(torch.sqrt(sum((g.double().pow(2).sum() for g in meta.values()), torch.zeros((), dtype=torch.float64))))
        if not math.isfinite(norm):
            self.skipped += 1
            return StepMetrics(support, query, norm, True, acc.n_tokens)
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
            new, self.state = optimizer_step(self.cfg.outer_spec(), current, meta, self.state)
            for nm, p in params.items():
                p.copy_(new[nm])
        return StepMetrics(support, query, norm, False, acc.n_tokens)

    def step(self, batches: Sequence[TaskBatch]) -> StepMetrics:
        return self.apply(self.accumulate(batches))
