"""The meta-training loop, one for every backend: `MetaTrainer(cfg, backend, callbacks).fit()`.

A meta-step samples the step's tasks, lets the executor run their inner loops (in this process or as
Ray tasks), sums the tasks' results across workers (`backend.reduce`) and takes the outer step. The
callbacks (`raymeta.run.callbacks`) do everything else in order: validation first (its scores join the
step's record), then the metrics file, tracking and the progress line. The trainer then saves a
checkpoint when one is due (`backend.save`: a checkpoint also carries the step's report) and otherwise
reports the record when a report is due (`backend.report`: Ray Train and, through it, Ray Tune).
Checkpoints follow `checkpoint_every`, reports `log_every` and every validation: the two schedules
are independent.

Backends: `Local` (this process) and `raymeta.run.ray_train.RayTrain` (one Ray Train worker).

Layout of a run folder (`out`: a local folder, or object storage such as `s3://bucket/run`):

    config.yaml              the resolved config
    metrics.jsonl            one line per meta-step
    validation.json          the held-out tasks and seeds, when validation is on
    checkpoints/step-NNNNNN/ see `raymeta.run.checkpoint`

Resuming from a checkpoint gives the same trajectory as an uninterrupted run (bit for bit on CPU):
weights, optimizer state and sampler state are restored exactly, and the model runs in eval mode (no
dropout), so nothing else is random.
"""

from __future__ import annotations

import contextlib
import json
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from raymeta.config import TrainConfig, to_dict
from raymeta.core.meta import Accumulator, MetaLearner, TaskBatch
from raymeta.data import open_data
from raymeta.data.prompts import PromptBuilder, PromptFormat, make_batch
from raymeta.data.sampler import MetaBatchSampler, TaskSample
from raymeta.infra.storage import RunStore
from raymeta.model.load import load_tokenizer, load_trainable, resolve_model_dir
from raymeta.run.checkpoint import load_optimizer, prune_checkpoints, write_checkpoint
from raymeta.run.executor import make_executor
from raymeta.run.validation import HeldOut, held_out_data, held_out_tasks

__all__ = ["Backend", "Callback", "Local", "MetaTrainer", "Restored", "build_sampler", "preflight", "tokenize"]

Writer = Callable[[Path], None]


@dataclass
class Restored:
    """A checkpoint to resume from: a local folder, where it lives (a path or a URI) and its state.json."""

    folder: Path
    location: str
    state: dict[str, Any]

    @classmethod
    def read(cls, folder: Path, location: str | None = None) -> Restored:
        return cls(folder, location or str(folder), json.loads((folder / "state.json").read_text()))


class Backend(Protocol):
    """Where a `MetaTrainer` runs: its run folder, rank and world size, device, and how it restores, sums
    the tasks' results across workers, saves a checkpoint, reports a record and keeps checkpoints."""

    out: RunStore
    rank: int
    world: int
    device: torch.device

    def restore(self) -> contextlib.AbstractContextManager[Restored | None]: ...
    def reduce(self, acc: Accumulator, learner: MetaLearner) -> Accumulator: ...
    def save(self, step: int, write: Writer, record: dict[str, Any]) -> str: ...
    def report(self, record: dict[str, Any]) -> None: ...
    def prune(self, keep: int) -> None: ...


class Local:
    """One process, no Ray: checkpoints go straight into the run folder; nothing to report to."""

    rank, world = 0, 1

    def __init__(self, out: RunStore, device: torch.device, restored: Restored | None = None) -> None:
        self.out, self.device, self.restored = out, device, restored

    @contextlib.contextmanager
    def restore(self) -> Iterator[Restored | None]:
        yield self.restored

    def reduce(self, acc: Accumulator, learner: MetaLearner) -> Accumulator:
        return acc

    def save(self, step: int, write: Writer, record: dict[str, Any]) -> str:
        rel = f"checkpoints/step-{step:06d}"
        self.out.put_dir(rel, write)
        return self.out.uri(rel)

    def report(self, record: dict[str, Any]) -> None:
        pass

    def prune(self, keep: int) -> None:
        prune_checkpoints(self.out, keep)


class Callback:
    """A part of a run that is not the meta-step: every hook gets the trainer (`cfg`, `backend`, `lead`,
    `model`, `tokenizer`, `sampler`, `held`, `start`, ...; in `on_end`, `error`: what ended the run, or
    None). `on_step` hooks may add keys to the record."""

    def on_start(self, trainer: MetaTrainer) -> None:
        pass

    def on_step(self, trainer: MetaTrainer, record: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, trainer: MetaTrainer, step: int, location: str) -> None:
        pass

    def after_step(self, trainer: MetaTrainer, record: dict[str, Any]) -> None:
        pass

    def on_end(self, trainer: MetaTrainer) -> None:
        pass


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


def preflight(cfg: TrainConfig, root: Path | None) -> None:
    """What the driver checks before Ray workers start: bad data, setting, held-out tasks or model fail
    here in one line, not inside a worker."""
    build_sampler(cfg, root)
    resolve_model_dir(cfg.run.model, root)


def tokenize(sample: TaskSample, builder: PromptBuilder) -> TaskBatch:
    """A sampled task as its support and query batches."""

    def batch(instances):  # type: ignore[no-untyped-def]
        return make_batch([builder.training_sequence(i.demonstrations, i.target) for i in instances], builder.fmt.max_length)

    return TaskBatch(sample.task, batch(sample.support), batch(sample.query))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetaTrainer:
    """Meta-training on one backend: `fit()` runs from the restored step (or 0) to `cfg.run.steps` and
    returns where the last checkpoint is (None only if no step ran and nothing was restored)."""

    def __init__(self, cfg: TrainConfig, backend: Backend, callbacks: Sequence[Callback] = (), *, root: Path | None = None):
        self.cfg, self.backend, self.callbacks, self.root = cfg, backend, list(callbacks), root
        self.lead = backend.rank == 0  # rank 0 writes the run folder's files
        self.final: str | None = None

    # the schedule: validations, checkpoints and reports
    def validation_due(self, step: int) -> bool:
        every = self.cfg.run.validation.every
        return self.held is not None and (step == self.cfg.run.steps or (every > 0 and step % every == 0))

    def checkpoint_due(self, step: int) -> bool:
        return step % self.cfg.run.checkpoint_every == 0 or step == self.cfg.run.steps

    def report_due(self, step: int) -> bool:
        return step % self.cfg.run.log_every == 0 or self.validation_due(step)

    def fit(self) -> str | None:
        with self.backend.restore() as restored:  # the restored folder stays there while the run goes
            self._setup(restored)
            return self._run()

    def _run(self) -> str | None:
        self._call("on_start")
        self.error: BaseException | None = None  # what ended the run, for on_end (None: it finished)
        try:
            for step in range(self.start + 1, self.cfg.run.steps + 1):
                record = self.meta_step(step)
                self._call("on_step", record)  # validation first: its scores join the record
                if self.checkpoint_due(step):
                    self.final = self.backend.save(step, self._writer(step), record)  # with the step's report
                    self._call("on_checkpoint", step, self.final)
                elif self.report_due(step):
                    self.backend.report(record)
                self._call("after_step", record)
        except BaseException as e:
            self.error = e
            raise
        finally:
            self._call("on_end")
        return self.final

    def _setup(self, restored: Restored | None) -> None:
        cfg, run, root = self.cfg, self.cfg.run, self.root
        self.sampler, self.held = build_sampler(cfg, root)
        model_spec = str(restored.folder) if restored is not None else run.model
        self.tokenizer = load_tokenizer(model_spec, root)
        resume = restored.folder if restored is not None else None
        self.model = load_trainable(run.model, cfg.weights, resume=resume, seed=run.seed, device=self.backend.device, root=root)
        self.learner = MetaLearner(self.model, cfg.meta, total_steps=run.steps)
        self.start = 0
        if restored is not None:
            state = restored.state
            self.start, self.final = state["step"], restored.location
            self.learner.updates = state["step"]  # the outer schedule resumes where it was
            self.sampler.load_state(state["sampler"], restored.location)
            self.learner.skipped = state["skipped"]
            if self.learner.state is not None:
                names = list(self.learner.flm.params())
                self.learner.state = load_optimizer(restored.folder, names, state["optimizer_step"], self.backend.device)
        b = self.backend
        shard = len(range(b.rank, cfg.tasks.tasks_per_step, b.world))
        # Ray tasks build the same model (adapters and frozen weights included) from a full model folder:
        # for LoRA the base (the adapter tensors come with each task), else the one this run starts from
        task_model = run.model if cfg.weights.adapter.type == "lora" else model_spec
        self.executor = make_executor(cfg.placement.executor_for(shard), str(resolve_model_dir(task_model, root)), cfg)
        t = cfg.tasks
        self.builder = PromptBuilder(self.tokenizer, PromptFormat(t.variant, t.max_length_per_example, t.max_length))  # type: ignore[arg-type]

    def meta_step(self, step: int) -> dict[str, Any]:
        """One meta-step on this worker's share of the step's tasks; its record (losses, speed, memory)."""
        b = self.backend
        mine = self.sampler.sample()[b.rank :: b.world]  # every worker draws the same global batch
        began = time.perf_counter()
        acc = self.executor.accumulate(self.learner, [tokenize(s, self.builder) for s in mine])
        m = self.learner.apply(b.reduce(acc, self.learner))
        seconds = time.perf_counter() - began
        return {
            "step": step,
            "meta_loss": m.query_loss,  # the meta-objective: the mean query loss after adaptation
            "support_loss": m.support_loss,
            "query_loss": m.query_loss,
            "grad_norm": m.grad_norm,  # the meta-gradient's, before grad_clip
            "support_grad_norm": m.support_grad_norm,  # the first support gradient's (mean over tasks), before inner.grad_clip
            **({"meta_share": m.meta_share} if m.meta_share is not None else {}),
            "outer_lr": m.outer_lr,
            "skipped_steps": self.learner.skipped,
            "tokens": m.n_tokens,
            "seconds": seconds,
            "tokens_per_s": m.n_tokens / seconds,
            "meta_steps_per_s": 1 / seconds,
            "peak_rss_mb": _peak_rss_mb(),
        }

    def _writer(self, step: int) -> Writer:
        def write(folder: Path) -> None:
            write_checkpoint(
                folder,
                self.model,
                self.tokenizer,
                self.learner.state,
                step=step,
                sampler_state=self.sampler.state(),
                skipped=self.learner.skipped,
                config=to_dict(self.cfg),
            )

        return write

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)
