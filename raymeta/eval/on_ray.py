"""Evaluation as Ray tasks: the units of an evaluation (`raymeta.eval.icl.plan`) spread over N workers.

What moves where:
- the driver reads the data folder, plans the units and sends each one with its examples (a few KB of
  text): workers need no data folder;
- each worker is a Ray actor that loads the model once (from `ModelSource`: the built-in model from its
  node's raymeta home, or a folder every node can read: on a cluster, shared storage), scores the units
  it is given, one at a time, and returns predictions and option losses (a few KB per unit);
- the loss cache is a folder all workers write: entries are content-addressed and written atomically
  (`raymeta.eval.cache`), so concurrent writers are safe; on a cluster without shared storage each node
  keeps its own and a miss is recomputed;
- the driver assembles the results exactly as an in-process run does (`assemble`, keyed by unit), so
  the numbers do not depend on which worker ran what, or in which order.

Units are handed out longest first, as workers become free (Ray's `ActorPool`).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util import ActorPool
from tqdm import tqdm

from raymeta.eval.icl import EvalConfig, Unit, UnitResult, assemble, plan, sample_records

__all__ = ["ModelSource", "evaluate_parallel"]


@dataclass(frozen=True)
class ModelSource:
    """How a worker loads the model: the arguments of `raymeta.model.load.load_model`."""

    spec: str
    dtype: str = "float32"
    device: str = "auto"
    root: str | None = None
    base_model: str | None = None
    merge: bool = False


class _Worker:
    def __init__(self, source: ModelSource, threads: int, cache_dir: str | None) -> None:
        import torch

        from raymeta.core.device import resolve_device
        from raymeta.eval.cache import LossCache
        from raymeta.model.load import load_model, load_tokenizer, quiet_libraries

        quiet_libraries()
        torch.set_num_threads(threads)
        root = Path(source.root) if source.root else None
        self.tokenizer = load_tokenizer(source.spec, root)
        self.model = load_model(
            source.spec,
            dtype=source.dtype,
            device=resolve_device(source.device),
            root=root,
            base_model=source.base_model,
            merge=source.merge,
        )
        self.model.eval()
        self.cache = LossCache(Path(cache_dir)) if cache_dir else None

    def run(self, unit: Unit, cfg: EvalConfig, model_id: str) -> list[UnitResult]:
        from raymeta.eval.icl import score_unit

        return score_unit(self.model, self.tokenizer, unit, cfg, model_id, self.cache)

    def cache_counts(self) -> tuple[int, int]:
        return (self.cache.hits, self.cache.misses) if self.cache is not None else (0, 0)


def evaluate_parallel(
    source: ModelSource,
    data: Any,
    setting: Any,
    cfg: EvalConfig,
    *,
    model_id: str,
    workers: int,
    address: str | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float = 0.0,
    cache_dir: Path | None = None,
    progress: bool = True,
    samples: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`evaluate_setting` with the units spread over `workers` Ray actors (an embedded local cluster
    unless `address` or $RAY_ADDRESS names one). Returns the same results dict, plus `workers` and the
    loss cache's hits and misses over all workers."""
    from raymeta.infra.ray_session import check_resources, connect, describe, joined_address, progress_while_short

    joined_address(address)  # --address against $RAY_ADDRESS: one line, before anything
    units = plan(data, setting, cfg)  # reads and validates the data before Ray starts
    started_here = not ray.is_initialized()
    joined = connect(address, dashboard=False, log_to_driver=False)
    if progress:
        print(f"[raymeta] {describe()}", file=sys.stderr, flush=True)
    try:
        cpus = cpus_per_worker if cpus_per_worker is not None else max(ray.cluster_resources().get("CPU", 1.0) / workers, 0.01)
        ready = check_resources(
            workers * cpus, workers * gpus_per_worker, joined=joined, what=f"evaluation with {workers} workers"
        )
        threads = max(1, int(cpus))  # torch threads per worker: its share of the CPUs
        env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}}
        actor = ray.remote(_Worker).options(
            num_cpus=cpus, num_gpus=gpus_per_worker, max_restarts=1, max_task_retries=1, runtime_env=env
        )
        pool_actors: list[Any] = [actor.remote(source, threads, str(cache_dir) if cache_dir else None) for _ in range(workers)]
        order = sorted(units, key=lambda u: -sum(len(ex.options) for ex in u.tests) * len(u.modes))
        results: list[UnitResult] = []
        cfg_ref, id_ref = ray.put(cfg), ray.put(model_id)
        pool = ActorPool(pool_actors)
        bar = tqdm(total=len(units), desc=f"evaluating {setting.name} ({workers} workers)", unit="run", disable=not progress)
        with bar, progress_while_short(workers * cpus, workers * gpus_per_worker) if not ready else contextlib.nullcontext():
            for out in pool.map_unordered(lambda a, u: a.run.remote(u, cfg_ref, id_ref), order):
                results.extend(out)
                bar.update(1)
        counts = ray.get([a.cache_counts.remote() for a in pool_actors])
        for a in pool_actors:
            ray.kill(a)
    finally:
        if started_here and not joined:
            ray.shutdown()
    if samples is not None:
        samples.extend(sample_records(units, results, cfg))
    res = assemble(setting, cfg, units, results, model_id)
    res["workers"] = {"n": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus_per_worker, "joined_cluster": joined}
    if cache_dir is not None:
        res["loss_cache"] = {"hits": sum(h for h, _ in counts), "misses": sum(m for _, m in counts)}
    return res
