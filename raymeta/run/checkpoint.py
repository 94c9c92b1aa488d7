"""A run folder's checkpoints: `checkpoints/step-NNNNNN/` with

    model/                   a Hugging Face folder (safetensors) with the tokenizer
    optimizer.safetensors    the outer optimizer's moments (m.NAME, v.NAME)
    state.json               step, optimizer step, sampler state, skipped steps, the config

Written from the weights as they are after a meta-step, read back exactly (bit for bit on CPU).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raymeta.core.optim import AdamState
from raymeta.io import atomic_write_json

__all__ = ["latest_checkpoint", "load_optimizer", "prune_checkpoints", "read_state", "step_dirs", "write_checkpoint"]


def step_dirs(out: Path) -> list[Path]:
    """A run's checkpoint folders (`checkpoints/step-NNNNNN`), oldest first."""
    return sorted(p for p in (out / "checkpoints").glob("step-*") if p.is_dir() and p.name[5:].isdigit())


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint that has its state.json, if any."""
    found = [p for p in step_dirs(out) if (p / "state.json").is_file()]
    return found[-1] if found else None


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (by step) of a run; the newest is never deleted."""
    for old in step_dirs(out)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "state.json").read_text())


def write_checkpoint(
    folder: Path,
    model: Any,
    tokenizer: Any,
    state: AdamState | None,
    *,
    step: int,
    sampler_state: dict[str, Any],
    skipped: int,
    config: dict[str, Any],
) -> None:
    """Write a checkpoint's files into an existing (temporary) folder."""
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    tensors = {}
    if state is not None:  # CPU copies: a checkpoint loads on any device
        tensors = {
            **{f"m.{n}": t.detach().cpu().contiguous() for n, t in state.m.items()},
            **{f"v.{n}": t.detach().cpu().contiguous() for n, t in state.v.items()},
        }
    save_file(tensors, str(folder / "optimizer.safetensors"))
    atomic_write_json(
        folder / "state.json",
        {
            "step": step,
            "optimizer_step": state.step if state is not None else 0,
            "sampler": sampler_state,
            "skipped": skipped,
            "config": config,
        },
    )


def load_optimizer(checkpoint: Path, names: list[str], step: int, device: torch.device | str = "cpu") -> AdamState:
    """The outer optimizer's state of a checkpoint, on `device`."""
    tensors = load_file(str(checkpoint / "optimizer.safetensors"), device=str(device))
    return AdamState({n: tensors[f"m.{n}"] for n in names}, {n: tensors[f"v.{n}"] for n in names}, step)
