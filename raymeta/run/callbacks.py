"""What a run does besides its meta-steps, as `MetaTrainer` callbacks, in the order they run.

- `Validation`: held-out ICL scores (`val_score`, `val_loss`, ...) into the record on validation steps.
- `MetricsFile`: config.yaml, validation.json and one line of metrics.jsonl per step (strict JSON).
- `Tracking`: TensorBoard or MLflow, flushed with each report and each checkpoint.
- `Progress`: one line per step on stdout.
- `KeepCheckpoints`: all but the newest `keep_checkpoints` deleted after each checkpoint.
- `StepHooks`: the caller's own functions, after each step.

`standard_callbacks(cfg, ...)` is the list a run uses. Only rank 0 (`trainer.lead`) writes files.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import yaml

from raymeta.config import TrainConfig, to_dict
from raymeta.run.trainer import Callback, MetaTrainer
from raymeta.run.validation import validate

__all__ = [
    "KeepCheckpoints",
    "MetricsFile",
    "Progress",
    "StepHook",
    "StepHooks",
    "Tracking",
    "Validation",
    "progress_line",
    "standard_callbacks",
    "strict",
]

StepHook = Callable[[int, dict[str, Any]], None]
"""Called on every worker after each meta-step (and its checkpoint) with (rank, the step's metrics)."""


class Validation(Callback):
    def on_step(self, trainer: MetaTrainer, record: dict[str, Any]) -> None:
        if trainer.lead and trainer.held is not None and trainer.validation_due(record["step"]):
            record.update(
                validate(trainer.model, trainer.tokenizer, trainer.held, trainer.cfg, trainer.learner.state, record["step"])
            )


class MetricsFile(Callback):
    """config.yaml (a resumed run keeps its original one), validation.json, and metrics.jsonl: the lines of
    an earlier run up to the resumed step, then one per step."""

    def on_start(self, trainer: MetaTrainer) -> None:
        self.logged: list[str] = []
        if not trainer.lead:
            return
        store = trainer.backend.out
        if trainer.start == 0 or not store.exists("config.yaml"):
            store.write_text("config.yaml", yaml.safe_dump(to_dict(trainer.cfg), sort_keys=False))
        if store.exists("metrics.jsonl"):
            self.logged = kept_metrics(store.read_bytes("metrics.jsonl"), trainer.start, store.uri("metrics.jsonl"))
        store.write_text("metrics.jsonl", "".join(self.logged))
        if trainer.held is not None:
            validation = {"tasks": list(trainer.held.setting.test), "seeds": list(trainer.held.seeds)}
            store.write_text("validation.json", json.dumps(validation, indent=2) + "\n")

    def on_step(self, trainer: MetaTrainer, record: dict[str, Any]) -> None:
        if trainer.lead:
            self.logged.append(json.dumps(strict(record), allow_nan=False) + "\n")
            trainer.backend.out.append_line("metrics.jsonl", self.logged[-1], "".join(self.logged))


class Tracking(Callback):
    """The run's tracker (`tracking: tensorboard | mlflow`), on rank 0."""

    def on_start(self, trainer: MetaTrainer) -> None:
        from raymeta.run.tracking import open_tracker

        self.tracker = open_tracker(trainer.cfg, trainer.backend.out, trainer.start) if trainer.lead else None

    def on_step(self, trainer: MetaTrainer, record: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.log(strict(record))
            if trainer.report_due(record["step"]):  # what a report tells Ray Tune is in the tracker's files too
                self.tracker.flush()

    def on_checkpoint(self, trainer: MetaTrainer, step: int, location: str) -> None:
        if self.tracker is not None:
            self.tracker.flush()

    def on_end(self, trainer: MetaTrainer) -> None:
        tracker = getattr(self, "tracker", None)  # None when on_start never ran
        if tracker is not None:
            tracker.close(failed=getattr(trainer, "error", None) is not None)


class Progress(Callback):
    def on_start(self, trainer: MetaTrainer) -> None:
        self.began = time.perf_counter()

    def on_step(self, trainer: MetaTrainer, record: dict[str, Any]) -> None:
        if trainer.lead:
            rate = (time.perf_counter() - self.began) / (record["step"] - trainer.start)
            print(progress_line(strict(record), trainer.cfg.run.steps, rate, trainer.cfg.meta.method), flush=True)


class KeepCheckpoints(Callback):
    def on_checkpoint(self, trainer: MetaTrainer, step: int, location: str) -> None:
        if trainer.lead and trainer.cfg.run.keep_checkpoints:
            trainer.backend.prune(trainer.cfg.run.keep_checkpoints)


class StepHooks(Callback):
    """`on_step(record)` after the step's record is logged; `after_step(rank, record)` after its checkpoint."""

    def __init__(self, on_step: Callable[[dict[str, Any]], None] | None, after_step: StepHook | None) -> None:
        self.on_step_fn, self.after_step_fn = on_step, after_step

    def on_step(self, trainer: MetaTrainer, record: dict[str, Any]) -> None:
        if self.on_step_fn is not None:
            self.on_step_fn(record)

    def after_step(self, trainer: MetaTrainer, record: dict[str, Any]) -> None:
        if self.after_step_fn is not None:
            self.after_step_fn(trainer.backend.rank, record)


def standard_callbacks(
    cfg: TrainConfig,
    *,
    progress: bool,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    after_step: StepHook | None = None,
    extra: tuple[Callback, ...] = (),
) -> list[Callback]:
    """A run's callbacks, in order (validation first: its scores join the record everything else sees)."""
    shown = [Progress()] if progress else []
    return [Validation(), MetricsFile(), Tracking(), *shown, *extra, KeepCheckpoints(), StepHooks(on_step, after_step)]


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


def strict(record: dict[str, Any]) -> dict[str, Any]:
    """The record with every non-finite number as null: metrics.jsonl is strict JSON (no NaN, no Infinity)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def kept_metrics(data: bytes, start: int, where: str) -> list[str]:
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
            kept.append(json.dumps(strict(record), allow_nan=False) + "\n")
    return kept
