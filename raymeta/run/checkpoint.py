"""A run folder's checkpoints: `checkpoints/step-NNNNNN/` with

    model/                   a Hugging Face folder (safetensors) with the tokenizer; under LoRA a PEFT
                             adapter folder (+ raymeta_base.json: the base model and its fingerprint)
    optimizer.safetensors    the outer optimizer's moments (m.NAME, v.NAME)
    state.json               step, optimizer step, sampler state, skipped steps, the config

Written from the weights as they are after a meta-step, read back exactly (bit for bit on CPU). The
run folder may be on object storage (`raymeta.storage.RunStore`): a checkpoint counts once its
state.json, written last, is there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raymeta.core.optim import AdamState
from raymeta.io import atomic_write_json
from raymeta.storage import RunStore, stage
from raymeta.weights import base_fingerprint, is_adapter_folder, write_base_record

__all__ = [
    "latest_checkpoint",
    "latest_step",
    "load_optimizer",
    "local_checkpoint",
    "prune_checkpoints",
    "read_state",
    "step_names",
    "write_checkpoint",
]


def step_names(store: RunStore) -> list[str]:
    """A run's checkpoint folders (`step-NNNNNN`), oldest first."""
    return [name for name in store.subdirs("checkpoints") if name.startswith("step-") and name[5:].isdigit()]


def latest_step(store: RunStore) -> str | None:
    """The newest complete checkpoint (one that has its state.json), as `checkpoints/step-NNNNNN`."""
    for name in reversed(step_names(store)):
        if store.exists(f"checkpoints/{name}/state.json"):
            return f"checkpoints/{name}"
    return None


def latest_checkpoint(out: str | Path) -> str | None:
    """Where the newest complete checkpoint of the run folder `out` is (a path or a URI), if any."""
    store = RunStore(out)
    rel = latest_step(store)
    return store.uri(rel) if rel is not None else None


def local_checkpoint(store: RunStore, rel: str) -> Path:
    """A checkpoint as a local folder: itself, or a staged copy of one on object storage."""
    return store.local / rel if store.local is not None else stage(store.uri(rel), key=store.key)


def prune_checkpoints(store: RunStore, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (by step) of a run; the newest is never deleted."""
    for old in step_names(store)[: -max(keep, 1)]:
        store.delete_dir(f"checkpoints/{old}")


def read_state(store: RunStore, rel: str) -> dict[str, Any]:
    return json.loads(store.read_text(f"{rel}/state.json"))


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
    model.save_pretrained(folder / "model")  # a PeftModel writes its adapter only
    tokenizer.save_pretrained(folder / "model")
    if is_adapter_folder(folder / "model"):
        write_base_record(folder / "model", config["model"], base_fingerprint(model))
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
