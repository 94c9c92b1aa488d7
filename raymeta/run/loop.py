"""The meta-training loop, shared by one process and every Ray Train worker: sample, step, log, checkpoint.

Layout of a run folder (`out`: a local folder, or object storage such as `s3://bucket/run`):

    config.yaml              the resolved config
    metrics.jsonl            one line per meta-step
    checkpoints/step-NNNNNN/ see `raymeta.run.checkpoint`

Resuming from a checkpoint gives the same trajectory as an uninterrupted run (bit for bit on CPU):
weights, optimizer state and sampler state are restored exactly, and the model runs in eval mode (no
dropout), so nothing else is random.
"""

from __future__ import annotations

import json
import math
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from raymeta.config import TrainConfig, to_dict
from raymeta.core.device import resolve_device
from raymeta.core.meta import Accumulator, MetaLearner, TaskBatch
from raymeta.data import open_data
from raymeta.data.prompts import PromptBuilder, PromptFormat, make_batch
from raymeta.data.sampler import MetaBatchSampler, TaskSample
from raymeta.infra.storage import RunStore
from raymeta.model.load import load_tokenizer, load_trainable, resolve_model_dir
from raymeta.run.checkpoint import load_optimizer, prune_checkpoints, write_checkpoint
from raymeta.run.executor import make_executor
from raymeta.run.tracking import open_tracker
from raymeta.run.validation import HeldOut, held_out_data, held_out_tasks, validate

__all__ = ["Placement", "StepHook", "build_sampler", "progress_line", "run_loop"]

StepHook = Callable[[int, dict[str, Any]], None]
"""Called on every worker after each meta-step (and its checkpoint) with (rank, the step's metrics)."""


def _tokenize(sample: TaskSample, builder: PromptBuilder) -> TaskBatch:
    def batch(instances):  # type: ignore[no-untyped-def]
        return make_batch([builder.training_sequence(i.demonstrations, i.target) for i in instances], builder.fmt.max_length)

    return TaskBatch(sample.task, batch(sample.support), batch(sample.query))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


Writer = Callable[[Path], None]


@dataclass
class Placement:
    """Where the loop runs: the run folder (local or object storage), rank and world size, how
    accumulators are summed across workers, how a checkpoint is stored and how metrics are reported.
    The defaults are one process, no Ray."""

    out: RunStore
    rank: int = 0
    world: int = 1
    reduce: Callable[[Accumulator, MetaLearner], Accumulator] | None = None
    report: Callable[[dict[str, Any]], None] | None = None

    def save(self, step: int, write: Writer, record: dict[str, Any]) -> str:
        rel = f"checkpoints/step-{step:06d}"
        self.out.put_dir(rel, write)
        return self.out.uri(rel)


def build_sampler(cfg: TrainConfig, root: Path | None) -> tuple[MetaBatchSampler, HeldOut | None]:
    """The meta-batch sampler over the setting's meta-train tasks, less those held out for validation."""
    t = cfg.tasks
    data = open_data(t.data, root)
    setting = data.setting(t.setting)
    pools = {task: data.pool_examples(task) for task in setting.train}
    held = held_out_tasks(cfg, setting, pools)
    sampler = MetaBatchSampler(
        {name: p for name, p in pools.items() if name not in held},
        k=t.k,
        tasks_per_step=t.tasks_per_step,
        support_size=t.support_size,
        query_size=t.query_size,
        seed=cfg.run.seed,
        max_examples_per_task=t.max_examples_per_task,
    )
    return sampler, (held_out_data(cfg, data, held, pools) if held else None)


def run_loop(
    cfg: TrainConfig,
    place: Placement,
    *,
    resume_dir: Path | None,
    progress: bool,
    root: Path | None = None,
    device: torch.device | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    after_step: StepHook | None = None,
) -> str | None:
    """The meta-training loop shared by one process and every Ray Train worker; everything of a step
    lives on `device` (default: the config's `device`)."""
    run = cfg.run
    device = device if device is not None else resolve_device(cfg.placement.device)
    sampler, held = build_sampler(cfg, root)
    model_spec = str(resume_dir) if resume_dir is not None else run.model
    tokenizer = load_tokenizer(model_spec, root)
    model = load_trainable(run.model, cfg.weights, resume=resume_dir, seed=run.seed, device=device, root=root)
    learner = MetaLearner(model, cfg.meta)
    start = 0
    if resume_dir is not None:
        state = json.loads((resume_dir / "state.json").read_text())
        start = state["step"]
        sampler.load_state(state["sampler"])
        learner.skipped = state["skipped"]
        if learner.state is not None:
            learner.state = load_optimizer(resume_dir, list(learner.flm.params()), state["optimizer_step"], device)
    shard = len(range(place.rank, cfg.tasks.tasks_per_step, place.world))
    # Ray tasks build the same model (adapters and frozen weights included) from a full model folder:
    # for LoRA the base (the adapter tensors come with each task), else the one this run starts from
    task_model = run.model if cfg.weights.adapter.type == "lora" else model_spec
    executor = make_executor(cfg.placement.executor_for(shard), str(resolve_model_dir(task_model, root)), cfg)

    lead = place.rank == 0
    store = place.out
    logged: list[str] = []  # metrics.jsonl, one line per step
    if lead:
        if resume_dir is None or not store.exists("config.yaml"):  # a resumed run keeps its original config.yaml
            store.write_text("config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if store.exists("metrics.jsonl"):
            logged = _kept_metrics(store.read_bytes("metrics.jsonl"), start, store.uri("metrics.jsonl"))
        store.write_text("metrics.jsonl", "".join(logged))
        if held is not None:
            validation = {"tasks": list(held.setting.test), "seeds": list(held.seeds)}
            store.write_text("validation.json", json.dumps(validation, indent=2) + "\n")

    t = cfg.tasks
    builder = PromptBuilder(tokenizer, PromptFormat(t.variant, t.max_length_per_example, t.max_length))  # type: ignore[arg-type]
    tracker = open_tracker(cfg, store, start) if lead else None
    began_run = time.perf_counter()
    try:
        final: str | None = str(resume_dir) if resume_dir is not None else None
        for step in range(start + 1, run.steps + 1):
            mine = sampler.sample()[place.rank :: place.world]  # every worker draws the same global batch
            began = time.perf_counter()
            acc = executor.accumulate(learner, [_tokenize(s, builder) for s in mine])
            if place.reduce is not None:
                acc = place.reduce(acc, learner)
            m = learner.apply(acc)
            seconds = time.perf_counter() - began
            record: dict[str, Any] = {
                "step": step,
                "meta_loss": m.query_loss,
                "support_loss": m.support_loss,
                "query_loss": m.query_loss,
                "grad_norm": m.grad_norm,
                "skipped_steps": learner.skipped,
                "tokens": m.n_tokens,
                "seconds": seconds,
                "tokens_per_s": m.n_tokens / seconds,
                "meta_steps_per_s": 1 / seconds,
                "peak_rss_mb": _peak_rss_mb(),
            }
            every = run.validation.every
            validating = held is not None and (step == run.steps or (every > 0 and step % every == 0))
            if held is not None and validating and lead:
                record.update(validate(model, tokenizer, held, cfg))
            if lead:
                logged.append(json.dumps(_strict(record), allow_nan=False) + "\n")
                store.append_line("metrics.jsonl", logged[-1], "".join(logged))
                if tracker is not None:
                    tracker.log(_strict(record))
                if progress:
                    rate = (time.perf_counter() - began_run) / (step - start)
                    print(progress_line(_strict(record), run.steps, rate, cfg.meta.method), flush=True)
            if on_step is not None:
                on_step(record)
            if step % run.checkpoint_every == 0 or step == run.steps:

                def write(folder: Path, at: int = step) -> None:
                    write_checkpoint(
                        folder,
                        model,
                        tokenizer,
                        learner.state,
                        step=at,
                        sampler_state=sampler.state(),
                        skipped=learner.skipped,
                        config=to_dict(cfg),
                    )

                final = place.save(step, write, record)
                if tracker is not None:
                    tracker.flush()
                if lead and run.keep_checkpoints:
                    prune_checkpoints(store, run.keep_checkpoints)
            elif place.report is not None and (step % run.log_every == 0 or validating):
                place.report(record)
            if after_step is not None:
                after_step(place.rank, record)
    finally:
        if tracker is not None:
            tracker.close()
    return final


def progress_line(record: dict[str, Any], steps: int, rate: float, method: str) -> str:
    """The one line printed per meta-step: where the run is, its losses, its speed and time left (at `rate`
    seconds per step)."""
    step = int(record["step"])
    val = f" val_score {record['val_score']:.4f}" if isinstance(record.get("val_score"), float) else ""
    fmt = lambda v: "nan" if v is None else f"{v:.4f}"  # noqa: E731 - a non-finite loss is null in the record
    return (
        f"[raymeta] {method} step {step}/{steps}  meta_loss {fmt(record['meta_loss'])}  support_loss "
        f"{fmt(record['support_loss'])}  grad_norm {record['grad_norm'] or float('nan'):.3g}  "
        f"{record['seconds']:.1f} s/step  skipped {record['skipped_steps']}{val}  eta {_clock(rate * (steps - step))}"
    )


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def _strict(record: dict[str, Any]) -> dict[str, Any]:
    """The record with every non-finite number as null: metrics.jsonl is strict JSON (no NaN, no Infinity)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _kept_metrics(data: bytes, start: int, where: str) -> list[str]:
    """The lines of an earlier metrics.jsonl up to step `start` (the resumed checkpoint's): later ones
    were logged after it and will be logged again; a line that does not parse (a write torn by a kill)
    is dropped with a warning."""
    kept = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            step = record["step"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            warnings.warn(f"{where}:{n}: not a whole metrics record (a torn write?); dropped", stacklevel=2)
            continue
        if isinstance(step, int) and step <= start:
            kept.append(json.dumps(_strict(record), allow_nan=False) + "\n")
    return kept
