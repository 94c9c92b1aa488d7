"""Meta-training on Ray Train: N workers shard each meta-step's tasks, sum their results, step together.

Every worker draws the same global batch of tasks (the sampler is seeded identically) and takes the
tasks `rank, rank + N, ...`. Their accumulators (meta-gradient sums, inner-moment sums, losses,
counts) are summed with `torch.distributed.all_reduce` as one flat buffer -- DDP's wrapper cannot do
double backward, so there is none -- and every worker applies the same outer step. Rank 0 reports a
checkpoint through `ray.train.report` every `checkpoint_every` steps into `out/checkpoints/step-N`
(Ray's storage is the checkpoint store); after a worker dies, `FailureConfig` restarts the workers
from the last one. `session.connect` starts a new embedded local cluster unless an address (or RAY_ADDRESS) is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.metrics import Gauge

from raymeta.config import TrainConfig, apply_overrides, to_dict, with_absolute_paths
from raymeta.core.meta import Accumulator, MetaLearner, host_values
from raymeta.errors import UserError
from raymeta.infra.ray_session import check_resources, connect, describe, progress_while_short
from raymeta.infra.storage import RunStore
from raymeta.run.checkpoint import local_checkpoint
from raymeta.run.loop import Placement, StepHook, progress_line, run_loop

__all__ = ["all_reduce", "fit"]


def all_reduce(acc: Accumulator, learner: MetaLearner) -> Accumulator:
    """Sum accumulators across the Ray Train workers (a worker may hold no task this step)."""
    params = learner.flm.params()
    names = list(params)
    parts = [acc.grads]
    if learner.cfg.moment_policy == "shared" and learner.state is not None and learner.cfg.method != "metaicl":
        parts += [acc.m, acc.v]
    flat = torch.cat(
        [torch.cat([p.get(n, torch.zeros_like(params[n])).detach().reshape(-1).to(torch.float32) for n in names]) for p in parts]
    )
    scalars = torch.tensor(  # on the buffer's device: NCCL all-reduces device tensors only
        [acc.n, acc.support_loss, acc.query_loss, acc.n_tokens, 0.0 if acc.finite else 1.0],
        dtype=torch.float64,
        device=flat.device,
    )
    dist.all_reduce(flat)
    dist.all_reduce(scalars)
    tasks, support, query, tokens, non_finite = host_values(scalars)
    out = Accumulator()
    out.n, out.support_loss, out.query_loss, out.n_tokens, out.finite = int(tasks), support, query, int(tokens), non_finite == 0
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


def _worker(config: dict[str, Any]) -> None:
    cfg = apply_overrides(TrainConfig(), config["cfg"], "config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = RunStore(config["out"])
    gauges = _gauges() if rank == 0 else {}

    def publish(record: dict[str, Any]) -> None:
        """Rank 0: Ray metrics (dashboard, Prometheus); the driver prints progress from metrics.jsonl."""
        if rank != 0:
            return
        for key, gauge in gauges.items():
            gauge.set(float(record[key]), tags={"run": config["name"]})

    class RayPlacement(Placement):
        def save(self, step: int, write: Any, record: dict[str, Any]) -> str:
            name = f"step-{step:06d}"
            if self.rank == 0:  # Ray Train stores it under storage_path (the run folder), local or object storage
                with tempfile.TemporaryDirectory() as tmp:
                    write(Path(tmp))
                    ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
            else:
                ray.train.report(record)
            return out.uri(f"checkpoints/{name}")

    shard = len(range(rank, cfg.tasks.tasks_per_step, world))
    node = ray.get_runtime_context().get_node_id()
    where = {
        "rank": rank,
        "world": world,
        "node_id": node,
        "hostname": socket.gethostname(),
        "executor": cfg.placement.executor_for(shard),
    }
    out.write_text(f"placement/rank-{rank}.json", json.dumps(where, indent=2) + "\n")
    resume_dir = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # Ray Train's own (after a restart, or a run Ray Train stored): a local folder
        local = isinstance(checkpoint.filesystem, pafs.LocalFileSystem)
        resume_dir = Path(checkpoint.path) if local else Path(checkpoint.to_directory())
    elif config["resume"] is not None:  # the run folder's newest checkpoint, whoever wrote it
        resume_dir = local_checkpoint(out, config["resume"])
    place = RayPlacement(out, rank, world, all_reduce if world > 1 else None, ray.train.report)
    root = Path(config["root"]) if config["root"] else None
    device = ray.train.torch.get_device()  # the worker's GPU under use_gpu, else the CPU
    run_loop(
        cfg,
        place,
        resume_dir=resume_dir,
        progress=False,
        root=root,
        device=device,
        on_step=publish,
        after_step=config["after_step"],
    )


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
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # report latency: ~2 s otherwise
    joined = connect(address, log_to_driver=ray_logs)
    if progress:
        print(f"[raymeta] {describe()}", flush=True)
    place = cfg.placement
    what = "num_workers x (cpus_per_worker, use_gpu) + one Ray task (cpus_per_task, gpus_per_task)"
    check_resources(place.cpus_needed(), place.gpus_needed(), joined=joined, what=what)
    resources: dict[str, float] = {"CPU": place.cpus_per_worker}
    name = Path(out.location.rstrip("/")).name
    config = {
        "cfg": with_absolute_paths(to_dict(cfg)),
        "out": out.uri(),  # absolute: Ray Train starts workers (and Ray tasks start) in folders of their own
        "name": name,
        "root": str(root) if root else None,
        "after_step": after_step,
        "resume": latest,
    }
    trainer = TorchTrainer(
        _worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=place.num_workers,
            use_gpu=place.use_gpu,
            resources_per_worker=resources,
            placement_strategy=place.placement_strategy,
        ),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=out.uri(),  # Ray Train's storage: a local folder or a pyarrow URI (s3://, gs://)
            failure_config=FailureConfig(max_failures=place.max_failures),
            callbacks=callbacks,
        ),
    )
    start = int(latest.rsplit("-", 1)[1]) if latest else 0
    watch = StepPrinter(out, cfg.run.steps, cfg.meta.method, start) if progress else contextlib.nullcontext()
    with progress_while_short(place.cpus_needed(), place.gpus_needed()), watch:
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise UserError(f"{out}: the run finished without a checkpoint", key="out")
    return out.uri(f"checkpoints/{Path(result.checkpoint.path).name}")
