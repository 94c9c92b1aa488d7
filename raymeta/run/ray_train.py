"""Meta-training on Ray Train: N workers shard each meta-step's tasks, sum their results, step together.

Every worker runs the same `MetaTrainer` on the `RayTrain` backend. Every worker draws the same global
batch of tasks (the sampler is seeded identically) and takes the tasks `rank, rank + N, ...`. Their
accumulators (meta-gradient sums, inner-moment sums, losses, counts) are summed with
`torch.distributed.all_reduce` as one flat buffer -- DDP's wrapper cannot do double backward, so there
is none -- and every worker applies the same outer step. Rank 0 saves a checkpoint through
`ray.train.report` into `out/checkpoints/step-N` (Ray Train's storage is the run folder;
`CheckpointConfig(num_to_keep=keep_checkpoints)` keeps the newest ones); after a worker dies,
`FailureConfig` restarts the workers from the last one (`ray.train.get_checkpoint()`). A `UserError`
in a worker ends the run at once, as the one line it is, without spending restarts on it.
`ray_session.connect` starts a new embedded local cluster unless an address (or RAY_ADDRESS) is given.
"""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer
from ray.util.metrics import Gauge

from raymeta.config import TrainConfig, apply_overrides, to_dict, with_absolute_paths
from raymeta.core.meta import Accumulator, MetaLearner, host_values
from raymeta.errors import UserError
from raymeta.infra.ray_session import check_resources, connect, describe, progress_while_short, train_settings
from raymeta.infra.storage import RunStore
from raymeta.run.callbacks import StepHook, progress_line, standard_callbacks
from raymeta.run.checkpoint import local_checkpoint
from raymeta.run.trainer import Callback, MetaTrainer, Restored, Writer

__all__ = ["RayTrain", "all_reduce", "fit", "user_error"]


def all_reduce(acc: Accumulator, learner: MetaLearner) -> Accumulator:
    """Sum accumulators across the Ray Train workers (a worker may hold no task this step)."""
    params = learner.flm.params()
    names = list(params)
    parts = [acc.grads]
    if learner.shares_moments:
        parts += [acc.m, acc.v]
    # in the weights' own dtype (float64 runs keep their precision; bf16 runs send half of float32's bytes;
    # with more than two workers a bf16 sum rounds more than once); mixed dtypes travel as float32
    dtypes = {params[n].dtype for n in names}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    flat = torch.cat(
        [torch.cat([p.get(n, torch.zeros_like(params[n])).detach().reshape(-1).to(dtype) for n in names]) for p in parts]
    )
    scalars = torch.tensor(  # on the buffer's device: NCCL all-reduces device tensors only
        [acc.n, acc.support_loss, acc.query_loss, acc.support_grad_norm, acc.n_tokens, 0.0 if acc.finite else 1.0],
        dtype=torch.float64,
        device=flat.device,
    )
    dist.all_reduce(flat)
    dist.all_reduce(scalars)
    tasks, support, query, support_norm, tokens, non_finite = host_values(scalars)
    out = Accumulator()
    out.n, out.support_loss, out.query_loss, out.n_tokens, out.finite = int(tasks), support, query, int(tokens), non_finite == 0
    out.support_grad_norm = support_norm
    at = 0
    for target in [out.grads, out.m, out.v][: len(parts)]:
        for n in names:
            size = params[n].numel()
            target[n] = flat[at : at + size].view_as(params[n]).to(params[n].dtype)
            at += size
    return out


METRICS = (
    "meta_loss",
    "support_loss",
    "query_loss",
    "grad_norm",
    "skipped_steps",
    "tokens_per_s",
    "meta_steps_per_s",
    "peak_rss_mb",
)


def _gauges() -> dict[str, Any]:
    return {key: Gauge(f"raymeta_{key}", description=f"raymeta meta-training: {key}", tag_keys=("run",)) for key in METRICS}


class RayTrain:
    """The `MetaTrainer` backend of one Ray Train worker: all-reduce across the workers, checkpoints and
    reports through `ray.train.report`, restore from `ray.train.get_checkpoint()` (after a restart, or a
    run Ray Train stored) or else from the run folder's checkpoint `resume` (whoever wrote it)."""

    def __init__(self, out: RunStore, resume: str | None) -> None:
        ctx = ray.train.get_context()
        self.out, self.resume = out, resume
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()  # the worker's GPU under use_gpu, else the CPU

    @contextlib.contextmanager
    def restore(self) -> Iterator[Restored | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:  # local storage: the folder itself; else a copy
                yield Restored.read(Path(folder), self.out.uri(f"checkpoints/{Path(checkpoint.path).name}"))
        elif self.resume is not None:
            yield Restored.read(local_checkpoint(self.out, self.resume), self.out.uri(self.resume))
        else:
            yield None

    def reduce(self, acc: Accumulator, learner: MetaLearner) -> Accumulator:
        return all_reduce(acc, learner) if self.world > 1 else acc

    def save(self, step: int, write: Writer, record: dict[str, Any]) -> str:
        name = f"step-{step:06d}"
        if self.rank == 0:  # Ray Train stores it under storage_path (the run folder), local or object storage
            with tempfile.TemporaryDirectory() as tmp:
                write(Path(tmp))
                ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        else:
            ray.train.report(record)
        return self.out.uri(f"checkpoints/{name}")

    def report(self, record: dict[str, Any]) -> None:
        ray.train.report(record)

    def prune(self, keep: int) -> None:
        pass  # CheckpointConfig(num_to_keep=keep) has Ray Train delete the older ones


class Gauges(Callback):
    """Rank 0's Ray metrics (Prometheus, Grafana), tagged with the run's name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_start(self, trainer: MetaTrainer) -> None:
        make = lambda key: Gauge(f"raymeta_{key}", description=f"raymeta meta-training: {key}", tag_keys=("run",))  # noqa: E731
        self.gauges = {key: make(key) for key in METRICS} if trainer.lead else {}

    def on_step(self, trainer: MetaTrainer, record: dict[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            gauge.set(float(record[key]), tags={"run": self.name})


def _worker(config: dict[str, Any]) -> None:
    cfg = apply_overrides(TrainConfig(), config["cfg"], "config")
    backend = RayTrain(RunStore(config["out"]), config["resume"])
    shard = len(range(backend.rank, cfg.tasks.tasks_per_step, backend.world))
    where = {
        "rank": backend.rank,
        "world": backend.world,
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "executor": cfg.placement.executor_for(shard),
    }
    backend.out.write_text(f"placement/rank-{backend.rank}.json", json.dumps(where, indent=2) + "\n")
    callbacks = standard_callbacks(cfg, progress=False, after_step=config["after_step"], extra=(Gauges(config["name"]),))
    root = Path(config["root"]) if config["root"] else None
    MetaTrainer(cfg, backend, callbacks, root=root).fit()


class _EndOnUserError(UserCallback):
    """On the Ray Train controller: a worker's `UserError` (bad input, found where only a worker could
    find it) ends the run at once. Ray Train retries every worker error up to `max_failures`; an error
    raised here is the controller's own, which it does not retry."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for error in worker_exceptions.values():
            found = user_error(error)
            if found is not None:
                raise found


def user_error(error: BaseException | None) -> UserError | None:
    """The `UserError` inside an error that Ray Train or a Ray task wrapped (causes, `cause`, controller
    and worker failures), if there is one."""
    seen: set[int] = set()
    todo: list[Any] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        if isinstance(e, BaseException):
            todo += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None)]
            failures = getattr(e, "worker_failures", None)
            if isinstance(failures, dict):
                todo += list(failures.values())
    return None


class StepPrinter:
    """On the driver, while Ray Train runs: one progress line per new record of the run's metrics.jsonl
    (rank 0 appends one per meta-step), polled every `every` seconds (object storage: every 5 s)."""

    def __init__(self, out: RunStore, steps: int, method: str, start: int = 0, every: float | None = None) -> None:
        self.out, self.steps, self.method = out, steps, method
        self.every = every if every is not None else (5.0 if out.remote else 1.0)
        self.done = threading.Event()
        self.seen = self.first = start  # a resumed run prints from its checkpoint's step on
        self.began = time.monotonic()

    def _records(self) -> list[dict[str, Any]]:
        try:
            data = self.out.read_bytes("metrics.jsonl") if self.out.exists("metrics.jsonl") else b""
        except OSError:
            return []
        records = []
        for line in data.splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)]

    def poll(self) -> None:
        for record in self._records():
            if record["step"] > self.seen:
                self.seen = record["step"]
                rate = (time.monotonic() - self.began) / max(self.seen - self.first, 1)
                print(progress_line(record, self.steps, rate, self.method), flush=True)

    def _run(self) -> None:
        while not self.done.wait(self.every):
            self.poll()

    def __enter__(self) -> StepPrinter:
        self.thread = threading.Thread(target=self._run, name="raymeta-progress", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.poll()


def fit(
    cfg: TrainConfig,
    out: RunStore,
    latest: str | None,
    *,
    address: str | None,
    progress: bool,
    root: Path | None,
    callbacks: list[Any] | None = None,
    after_step: StepHook | None = None,
    ray_logs: bool = False,
) -> str:
    """Run meta-training as a Ray Train job; returns where the final checkpoint is (a path or a URI).
    `latest` is the checkpoint (`checkpoints/step-N` in `out`) to resume from. With `progress` the driver
    prints one line per meta-step (read from the run's metrics.jsonl); the Ray processes' own output
    reaches this terminal only with `ray_logs` (it is always in Ray's log folder and the dashboard)."""
    train_settings()
    joined = connect(address, log_to_driver=ray_logs)
    if progress:
        print(f"[raymeta] {describe()}", flush=True)
    placement = cfg.placement
    what = "num_workers x (cpus_per_worker, use_gpu) + one Ray task (cpus_per_task, gpus_per_task)"
    check_resources(placement.cpus_needed(), placement.gpus_needed(), joined=joined, what=what)
    resources: dict[str, float] = {"CPU": placement.cpus_per_worker}
    name = Path(out.location.rstrip("/")).name
    config = {
        "cfg": with_absolute_paths(to_dict(cfg)),
        "out": out.uri(),  # absolute: Ray Train starts workers (and Ray tasks start) in folders of their own
        "name": name,
        "root": str(root) if root else None,
        "after_step": after_step,
        "resume": latest,
    }
    ray_callbacks: list[Any] = [_EndOnUserError(), *(callbacks or [])]
    trainer = TorchTrainer(
        _worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=placement.num_workers,
            use_gpu=placement.use_gpu,
            resources_per_worker=resources,
            placement_strategy=placement.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name="checkpoints",
            storage_path=out.uri(),  # Ray Train's storage: a local folder or a pyarrow URI (s3://, gs://)
            failure_config=FailureConfig(max_failures=placement.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints or None, checkpoint_score_attribute="step", checkpoint_score_order="max"
            ),
            callbacks=ray_callbacks,
        ),
    )
    start = int(latest.rsplit("-", 1)[1]) if latest else 0
    watch = StepPrinter(out, cfg.run.steps, cfg.meta.method, start) if progress else contextlib.nullcontext()
    with progress_while_short(placement.cpus_needed(), placement.gpus_needed()), watch:
        try:
            result = trainer.fit()
        except Exception as e:  # Ray Train raises what ended the run; a worker's UserError stays the one line it is
            found = user_error(e)
            if found is None:
                raise
            raise found from None
    if result.error is not None:
        raise user_error(result.error) or result.error
    if result.checkpoint is None:
        raise UserError(f"{out}: the run finished without a checkpoint", key="out")
    return out.uri(f"checkpoints/{Path(result.checkpoint.path).name}")
