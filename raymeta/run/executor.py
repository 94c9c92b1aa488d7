"""Where the per-task inner adaptations run: in the calling process, or as parallel Ray tasks.

`local` runs the tasks one after another in this process. `ray` puts the weights and the optimizer
state into the object store once per meta-step (numpy arrays, read zero-copy by the tasks) and runs
one Ray task per meta-task: the whole inner loop and the query backward run inside the task (autograd
graphs cannot cross processes), which returns its meta-gradient and final inner moments. The model
object (the architecture; the weights are replaced by the ones passed in) is cached per Ray worker
process and device. Tasks are pure functions of their inputs, so Ray retries them when their process
dies; they are scheduled on the caller's node (soft affinity) with `cpus_per_task` CPUs and
`gpus_per_task` GPUs each (a fraction shares a GPU); a task that holds a GPU runs on it, and its results
come back to the caller's device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymeta.config import TrainConfig
from raymeta.core.lm import FunctionalLM
from raymeta.core.meta import Accumulator, MetaConfig, MetaLearner, TaskBatch, TaskResult, task_meta_gradient
from raymeta.core.optim import AdamState
from raymeta.model.load import load_model
from raymeta.model.weights import WeightsConfig, prepare

__all__ = ["LocalExecutor", "RayExecutor", "make_executor"]


class LocalExecutor:
    def accumulate(self, learner: MetaLearner, batches: Sequence[TaskBatch]) -> Accumulator:
        return learner.accumulate(batches)


_MODELS: dict[str, tuple[torch.nn.Module, FunctionalLM]] = {}


def _numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: t.detach().cpu().numpy() for n, t in tensors.items()}


def _torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # object-store arrays are read-only; nothing writes to them in place
        warnings.simplefilter("ignore", UserWarning)
        return {n: torch.from_numpy(a) for n, a in arrays.items()}


def _on(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Object-store arrays as tensors on `device` (no copy on the CPU)."""
    return {n: t.to(device) for n, t in _torch(arrays).items()}


def _state(m: dict[str, np.ndarray] | None, v: dict[str, np.ndarray] | None, step: int, device: torch.device) -> AdamState | None:
    return AdamState(_on(m, device), _on(v, device), step) if m is not None and v is not None else None


def _run_task(
    model_dir: str,
    params: dict[str, np.ndarray],
    state: dict[str, Any] | None,
    batch: TaskBatch,
    cfg: MetaConfig,
    weights: WeightsConfig,
    cpus: float,
    before: Callable[[], None] | None,
) -> dict[str, Any]:
    """The body of one Ray task (module level so that it pickles by reference)."""
    if before is not None:
        before()
    # one BLAS thread per CPU held, rounded up (Ray gives a fractional task one): 0.5 + 1.5 on a 2-core node
    # lets the one running task use both cores while its Train worker waits
    torch.set_num_threads(max(1, math.ceil(cpus - 1e-9)))
    # the task's GPU when it holds one (Ray sets CUDA_VISIBLE_DEVICES to it), else the CPU
    device = torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")
    key = f"{model_dir}@{device}@{weights}@{cfg.method == 'maml_en_llm'}@{cfg.checkpoint_group}"
    if key not in _MODELS:
        _MODELS.clear()  # the newest only: a worker process outlives runs and restarts (each a new folder)
        model = prepare(load_model(model_dir, device=device), weights)  # trainable values come with the task
        flm = FunctionalLM(model, math_attention=cfg.method == "maml_en_llm", checkpointing=cfg.checkpoint_group)
        _MODELS[key] = (model, flm)
    _, flm = _MODELS[key]
    theta = {n: t.requires_grad_() for n, t in _on(params, device).items()}
    outer = _state(state["m"], state["v"], state["step"], device) if state is not None else None
    r = task_meta_gradient(flm, theta, outer, batch, cfg)
    inner = r.inner_state if cfg.shares_moments else None  # only `shared` needs the moments back
    return {
        "grads": _numpy(r.grads),
        "m": _numpy(inner.m) if inner is not None else None,
        "v": _numpy(inner.v) if inner is not None else None,
        "step": inner.step if inner is not None else 0,
        "support_loss": r.support_loss,
        "query_loss": r.query_loss,
        "n_tokens": r.n_tokens,
        "support_grad_norm": r.support_grad_norm,
    }


class RayExecutor:
    """`before_task`, when given, is called at the start of every Ray task, in the task's process (a
    picklable callable: logging, or fault injection in tests)."""

    def __init__(
        self,
        model_dir: str,
        cfg: TrainConfig,
        runtime_env: dict[str, Any] | None = None,
        before_task: Callable[[], None] | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.meta = cfg.meta
        self.weights = cfg.weights
        self.cpus = cfg.placement.cpus_per_task
        self.before_task = before_task
        node = ray.get_runtime_context().get_node_id()
        self.remote = ray.remote(_run_task).options(
            num_cpus=self.cpus,
            num_gpus=cfg.placement.gpus_per_task,
            max_retries=3,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=True),
            runtime_env=runtime_env,
        )

    def accumulate(self, learner: MetaLearner, batches: Sequence[TaskBatch]) -> Accumulator:
        acc = Accumulator()
        if not batches:
            return acc
        device = next(iter(learner.flm.params().values())).device
        params_ref = ray.put(_numpy(learner.flm.params()))
        state = learner.state
        state_ref: Any = ray.put({"m": _numpy(state.m), "v": _numpy(state.v), "step": state.step}) if state is not None else None
        refs: list[Any] = [
            self.remote.remote(self.model_dir, params_ref, state_ref, b, self.meta, self.weights, self.cpus, self.before_task)
            for b in batches
        ]
        # Results are summed in task order (a deterministic sum) and each is released once added, so the
        # object store never holds every task's gradient and moments at once.
        for i in range(len(refs)):
            out = ray.get(refs[i])
            refs[i] = None
            inner = _state(out["m"], out["v"], out["step"], device)
            grads = _on(out["grads"], device)
            acc.add(TaskResult(grads, inner, out["support_loss"], out["query_loss"], out["n_tokens"], out["support_grad_norm"]))
            del out, inner, grads
        return acc


def make_executor(kind: str, model_dir: str, cfg: TrainConfig) -> LocalExecutor | RayExecutor:
    return RayExecutor(model_dir, cfg) if kind == "ray" else LocalExecutor()
