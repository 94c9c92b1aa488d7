"""A run folder's checkpoints: `checkpoints/step-NNNNNN/` with

    model/                   a Hugging Face folder (safetensors) with the tokenizer; under LoRA a PEFT
                             adapter folder (+ raymeta_base.json: the base model and its fingerprint)
    optimizer.safetensors    the outer optimizer's moments (m.NAME, v.NAME)
    state.json               step, optimizer step, sampler state, skipped steps, the config
    manifest.json            every other file's size and sha256, written last

Written from the weights as they are after a meta-step, read back exactly (bit for bit on CPU). The
run folder may be on object storage (`raymeta.infra.storage.RunStore`): a checkpoint counts once its
state.json is there, and is trusted for a resume once every file matches its manifest
(`usable_checkpoint` falls back to the newest one that does, with a warning). Checkpoints written
before manifests existed (no `format` in state.json) are checked for their files only.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raymeta.core.optim import AdamState
from raymeta.errors import UserError
from raymeta.infra.io import atomic_write_json, sha256_file
from raymeta.infra.storage import RunStore, stage
from raymeta.model.weights import base_fingerprint, is_adapter_folder, write_base_record

__all__ = [
    "latest_checkpoint",
    "latest_step",
    "load_optimizer",
    "local_checkpoint",
    "prune_checkpoints",
    "read_state",
    "step_names",
    "usable_checkpoint",
    "verify_checkpoint",
    "write_checkpoint",
]

MANIFEST = "manifest.json"
FORMAT = 2  # state.json's `format`: 2 = with a manifest


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
            "format": FORMAT,
        },
    )
    atomic_write_json(folder / MANIFEST, {"files": _file_records(folder)})


def _file_records(folder: Path) -> dict[str, list[Any]]:
    """[size, sha256] of every file of a checkpoint folder but the manifest, by relative path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, sha256_file(p)] for p in files}


def verify_checkpoint(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (a torn or corrupt write), or None when it is whole."""
    try:
        state = json.loads((folder / "state.json").read_bytes().decode("utf-8"))
        step = state["step"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return "state.json is missing or unreadable"
    if not isinstance(step, int):
        return "state.json has no step"
    if state.get("format", 1) < FORMAT:  # an older checkpoint: its files must at least be there
        missing = [f for f in ("optimizer.safetensors", "model") if not (folder / f).exists()]
        return f"{', '.join(missing)} missing" if missing else None
    try:
        expected = json.loads((folder / MANIFEST).read_bytes().decode("utf-8"))["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is missing or unreadable (an interrupted write)"
    for rel, (size, digest) in sorted(expected.items()):
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, its manifest says {size} (truncated?)"
        if sha256_file(path) != digest:
            return f"{rel} does not match its sha256 in the manifest (corrupt)"
    return None


def usable_checkpoint(store: RunStore) -> tuple[str, Path] | None:
    """The newest checkpoint that verifies, as (`checkpoints/step-N`, a local folder); None when the run
    has no checkpoint. Each newer one that does not verify is set aside (renamed `corrupt-step-N` in a
    local run folder, deleted on object storage) with a warning naming what is wrong, so that the
    resumed run's checkpoints and pruning never mix with it. When none verifies, nothing is touched
    and the error names what is wrong with each."""
    bad: list[tuple[str, str]] = []
    for name in reversed(step_names(store)):
        rel = f"checkpoints/{name}"
        if not store.exists(f"{rel}/state.json"):
            continue  # an interrupted write that never finished: not a checkpoint
        folder = local_checkpoint(store, rel)
        problem = verify_checkpoint(folder)
        if problem is not None:
            bad.append((name, problem))
            continue
        for name_bad, why in bad:
            _set_aside(store, name_bad, why)
        return rel, folder
    if bad:
        shown = "; ".join(f"{n}: {why}" for n, why in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"{store.uri('checkpoints')}: no checkpoint verifies ({shown})", key="resume")
    return None


def _set_aside(store: RunStore, name: str, why: str) -> None:
    rel = f"checkpoints/{name}"
    if store.local is not None:
        aside = store.local / "checkpoints" / f"corrupt-{name}"
        if aside.exists():
            shutil.rmtree(aside)
        (store.local / rel).rename(aside)
        what = f"moved to {aside.name}"
    else:
        store.delete_dir(rel)
        what = "deleted"
    warnings.warn(f"{store.uri(rel)}: {why}; {what}, falling back to an earlier checkpoint", stacklevel=3)


def load_optimizer(checkpoint: Path, names: list[str], step: int, device: torch.device | str = "cpu") -> AdamState:
    """The outer optimizer's state of a checkpoint, on `device`."""
    tensors = load_file(str(checkpoint / "optimizer.safetensors"), device=str(device))
    return AdamState({n: tensors[f"m.{n}"] for n in names}, {n: tensors[f"v.{n}"] for n in names}, step)
