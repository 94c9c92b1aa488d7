"""Meta-training on one process: sample, step, log, checkpoint, resume.

Layout of a run folder (`out`):

    config.yaml              the resolved config
    metrics.jsonl            one line per meta-step
    checkpoints/step-NNNNNN/ model/ (Hugging Face folder, safetensors, with the tokenizer),
                             optimizer.safetensors (the outer moments m.*, v.*), state.json (step,
                             optimizer step, sampler state, skipped steps, config)

`--resume` continues from the latest checkpoint and gives the same trajectory as an uninterrupted run
(bit for bit on CPU): weights, optimizer state and sampler state are restored exactly, and the model
runs in eval mode (no dropout), so nothing else is random.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from raymeta.config import TrainConfig, to_dict
from raymeta.data import open_data
from raymeta.errors import UserError
from raymeta.io import atomic_dir, atomic_write_json, atomic_write_text
from raymeta.meta import Accumulator, MetaLearner, TaskBatch, make_batch
from raymeta.optim import AdamState
from raymeta.prompts import PromptBuilder, PromptFormat
from raymeta.sampler import MetaBatchSampler, TaskSample
from raymeta.validation import HeldOut, held_out_data, held_out_tasks, validate

__all__ = ["Placement", "latest_checkpoint", "run_loop", "train"]


def _step_dirs(out: Path) -> list[Path]:
    """A run's checkpoint folders (`checkpoints/step-NNNNNN`), oldest first."""
    return sorted(p for p in (out / "checkpoints").glob("step-*") if p.is_dir() and p.name[5:].isdigit())


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint that has its state.json, if any."""
    found = [p for p in _step_dirs(out) if (p / "state.json").is_file()]
    return found[-1] if found else None


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (by step) of a run; the newest is never deleted."""
    for old in _step_dirs(out)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)


def _write_checkpoint(
    folder: Path, model: Any, tokenizer: Any, learner: MetaLearner, sampler: MetaBatchSampler, step: int
) -> None:
    """Write a checkpoint's files into an existing (temporary) folder."""
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    state = learner.state
    tensors = {}
    if state is not None:
        tensors = {
            **{f"m.{n}": t.contiguous() for n, t in state.m.items()},
            **{f"v.{n}": t.contiguous() for n, t in state.v.items()},
        }
    save_file(tensors, str(folder / "optimizer.safetensors"))
    atomic_write_json(
        folder / "state.json",
        {
            "step": step,
            "optimizer_step": state.step if state is not None else 0,
            "sampler": sampler.state(),
            "skipped": learner.skipped,
            "config": to_dict(learner.cfg),
        },
    )


def _load_optimizer(path: Path, names: list[str], step: int) -> AdamState:
    tensors = load_file(str(path / "optimizer.safetensors"))
    return AdamState({n: tensors[f"m.{n}"] for n in names}, {n: tensors[f"v.{n}"] for n in names}, step)


def _tokenize(sample: TaskSample, builder: PromptBuilder) -> TaskBatch:
    def batch(instances):  # type: ignore[no-untyped-def]
        return make_batch([builder.training_sequence(i.demonstrations, i.target) for i in instances], builder.fmt.max_length)

    return TaskBatch(sample.task, batch(sample.support), batch(sample.query))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


Writer = Callable[[Path], None]


@dataclass
class Placement:
    """Where the loop runs: rank and world size, how accumulators are summed across workers, how a
    checkpoint is stored and how metrics are reported. The defaults are one process, no Ray."""

    out: Path
    rank: int = 0
    world: int = 1
    reduce: Callable[[Accumulator, MetaLearner], Accumulator] | None = None
    report: Callable[[dict[str, Any]], None] | None = None

    def save(self, step: int, write: Writer, record: dict[str, Any]) -> Path:
        path = self.out / "checkpoints" / f"step-{step:06d}"
        with atomic_dir(path) as tmp:
            write(tmp)
        return path


def _sampler(cfg: TrainConfig, root: Path | None) -> tuple[MetaBatchSampler, HeldOut | None]:
    """The meta-batch sampler over the setting's meta-train tasks, less those held out for validation."""
    data = open_data(cfg.data, root)
    setting = data.setting(cfg.setting)
    pools = {task: data.pool_examples(task) for task in setting.train}
    held = held_out_tasks(cfg, data, setting, pools)
    sampler = MetaBatchSampler(
        {t: p for t, p in pools.items() if t not in held},
        k=cfg.k,
        tasks_per_step=cfg.tasks_per_step,
        support_size=cfg.support_size,
        query_size=cfg.query_size,
        seed=cfg.seed,
        max_examples_per_task=cfg.max_examples_per_task,
    )
    return sampler, (held_out_data(cfg, data, held, pools) if held else None)


def run_loop(
    cfg: TrainConfig,
    place: Placement,
    *,
    resume_dir: Path | None,
    progress: bool,
    root: Path | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> Path | None:
    """The meta-training loop shared by one process and every Ray Train worker."""
    from raymeta.executor import make_executor
    from raymeta.models import load_model, load_tokenizer, resolve_model_dir

    sampler, held = _sampler(cfg, root)
    model_spec = str(resume_dir) if resume_dir is not None else cfg.model
    tokenizer = load_tokenizer(model_spec, root)
    model = load_model(model_spec, root=root)
    for p in model.parameters():
        p.requires_grad_(True)
    learner = MetaLearner(model, cfg)
    start = 0
    if resume_dir is not None:
        state = json.loads((resume_dir / "state.json").read_text())
        start = state["step"]
        sampler.load_state(state["sampler"])
        learner.skipped = state["skipped"]
        if learner.state is not None:
            learner.state = _load_optimizer(resume_dir, list(learner.flm.params()), state["optimizer_step"])
    shard = len(range(place.rank, cfg.tasks_per_step, place.world))
    executor = make_executor(cfg.executor_for(shard), str(resolve_model_dir(model_spec, root)), cfg)

    lead = place.rank == 0
    metrics_path = place.out / "metrics.jsonl"
    if lead:
        place.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(place.out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        kept = []
        if metrics_path.is_file():
            kept = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
        atomic_write_text(metrics_path, "".join(line + "\n" for line in kept))
        if held is not None:
            atomic_write_json(place.out / "validation.json", {"tasks": list(held.setting.test), "seeds": list(held.seeds)})

    builder = PromptBuilder(tokenizer, PromptFormat(cfg.variant, cfg.max_length_per_example, cfg.max_length))  # type: ignore[arg-type]
    bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.method} meta-training", unit="step", disable=not (progress and lead))
    final = resume_dir
    for step in range(start + 1, cfg.steps + 1):
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
        every = cfg.validation.every
        validating = held is not None and (step == cfg.steps or (every > 0 and step % every == 0))
        if held is not None and validating and lead:
            record.update(validate(model, tokenizer, held, cfg))
        if lead:
            with metrics_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
        if on_step is not None:
            on_step(record)
        bar.update(1)
        bar.set_postfix(meta_loss=f"{m.query_loss:.3f}", support=f"{m.support_loss:.3f}", skipped=learner.skipped)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:

            def write(folder: Path, at: int = step) -> None:
                _write_checkpoint(folder, model, tokenizer, learner, sampler, at)

            final = place.save(step, write, record)
            if lead and cfg.keep_checkpoints:
                prune_checkpoints(place.out, cfg.keep_checkpoints)
        elif place.report is not None and (step % cfg.log_every == 0 or validating):
            place.report(record)
    bar.close()
    return final


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    root: Path | None = None,
    address: str | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    callbacks: list[Any] | None = None,
) -> Path:
    """Run (or resume) meta-training, on Ray Train workers or (distributed=false) in this process;
    returns the final checkpoint folder."""
    out = Path(cfg.out).resolve()
    latest = latest_checkpoint(out)
    if resume and latest is None:
        raise UserError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if not resume and latest is not None:
        raise UserError(f"out={cfg.out}: holds checkpoints of an earlier run; pass --resume to continue it or choose another out")
    if latest is not None and json.loads((latest / "state.json").read_text())["step"] >= cfg.steps:
        return latest  # already finished: nothing to resume
    if cfg.distributed:
        from raymeta.distributed import fit
        from raymeta.models import resolve_model_dir

        # pre-flight on the driver: bad data, setting or model fail here in one line, not inside a Ray worker
        _sampler(cfg, root)
        resolve_model_dir(str(latest) if latest is not None else cfg.model, root)

        return fit(cfg, out, latest, address=address, progress=progress, root=root, callbacks=callbacks)
    final = run_loop(cfg, Placement(out), resume_dir=latest, progress=progress, root=root, on_step=on_step)
    assert final is not None
    return final
