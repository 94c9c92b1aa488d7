"""Which weights meta-training changes: every one, a subset by name (`trainable`), or LoRA adapters (PEFT).

    trainable: "layers\\.(28|29)\\."      # a regex over parameter names: the rest stay frozen
    adapter: {type: lora, r: 16, alpha: 32, target_modules: all-linear}

With `adapter.type: lora` the base weights are frozen and PEFT's LoRA layers are injected (dropout 0,
so the inner loop stays deterministic); every method then meta-trains the adapter tensors only, and a
checkpoint's `model/` folder is a PEFT adapter folder (`adapter_config.json`,
`adapter_model.safetensors`) that `PeftModel.from_pretrained(base, folder)` loads. raymeta also writes
`raymeta_base.json` there: the base model it was trained on and a fingerprint of its weights, so that an
adapter is never silently evaluated on another base.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raymeta.core.lm import hf_model
from raymeta.errors import UserError

__all__ = [
    "ADAPTER_TYPES",
    "BASE_FILE",
    "AdapterConfig",
    "WeightsConfig",
    "base_fingerprint",
    "is_adapter_folder",
    "load_adapter",
    "prepare",
    "restrict",
    "write_base_record",
]

ADAPTER_TYPES = ("none", "lora")
BASE_FILE = "raymeta_base.json"


@dataclass
class AdapterConfig:
    type: str = "none"  # none | lora
    r: int = 16
    alpha: int = 32  # scaling alpha / r (PEFT's lora_alpha)
    target_modules: str = "all-linear"  # all-linear, or module names separated by commas (q_proj,v_proj)

    def modules(self) -> str | list[str]:
        if self.target_modules == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


@dataclass
class WeightsConfig:
    """The weights meta-training changes (config keys `trainable` and `adapter.*`)."""

    trainable: str | None = None  # regex over parameter names (re.search); None: all (or all adapter tensors)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    def validate(self, where: str) -> None:
        a = self.adapter
        if a.type not in ADAPTER_TYPES:
            raise UserError(f"expected one of {', '.join(ADAPTER_TYPES)}, got {a.type!r}", key="adapter.type", where=where)
        if a.r < 1:
            raise UserError(f"expected an integer >= 1, got {a.r!r}", key="adapter.r", where=where)
        if not a.alpha > 0:
            raise UserError(f"expected a positive number, got {a.alpha!r}", key="adapter.alpha", where=where)
        if not a.modules():
            raise UserError("expected all-linear or module names separated by commas", key="adapter.target_modules", where=where)
        if self.trainable is not None:
            try:
                re.compile(self.trainable)
            except re.error as e:
                raise UserError(
                    f"expected a regular expression ({e}), got {self.trainable!r}", key="trainable", where=where
                ) from None


def _lora_config(a: AdapterConfig) -> Any:
    from peft import LoraConfig  # deferred: PEFT loads only for adapters

    return LoraConfig(r=a.r, lora_alpha=a.alpha, target_modules=a.modules(), lora_dropout=0.0, bias="none")


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, raised inside PEFT
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")  # GPT-2's Conv1D: PEFT sets it
        yield


def prepare(model: torch.nn.Module, cfg: WeightsConfig, *, seed: int = 0, where: str = "config") -> torch.nn.Module:
    """Set which weights train: inject LoRA (returns the PeftModel; its A matrices drawn from `seed`, B
    zero, as PEFT does) and/or freeze what `trainable` does not match."""
    if cfg.adapter.type == "lora":
        from peft import get_peft_model

        try:
            # a run's initial adapters depend on its seed alone
            with _quiet_peft(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = get_peft_model(model, _lora_config(cfg.adapter))  # type: ignore[arg-type]
        except ValueError as e:  # PEFT's "Target modules {...} not found in the base model"
            raise UserError(str(e).strip().splitlines()[0], key="adapter.target_modules", where=where) from None
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    restrict(model, cfg.trainable, where=where)
    return model


def restrict(model: torch.nn.Module, trainable: str | None, *, where: str = "config") -> None:
    """Freeze every trainable parameter whose name (in the Hugging Face model) `trainable` does not match."""
    if trainable is None:
        return
    pattern = re.compile(trainable)
    named = [(n, p) for n, p in hf_model(model).named_parameters() if p.requires_grad]
    kept = [n for n, _ in named if pattern.search(n)]
    if not kept:
        sample = ", ".join(n for n, _ in named[:3])
        raise UserError(
            f"{trainable!r} matches no trainable parameter (names look like: {sample}, ...)", key="trainable", where=where
        )
    for n, p in named:
        if not pattern.search(n):
            p.requires_grad_(False)


def base_fingerprint(model: torch.nn.Module) -> str:
    """A fingerprint of a base model's weights: names, shapes and a strided sample of every tensor's values."""
    h = hashlib.sha256()
    for name, t in sorted(hf_model(model).state_dict().items()):
        if ".lora_" in name:  # the adapter's own tensors: the fingerprint is the base's alone
            continue
        name = name.replace(".base_layer.", ".")  # a LoRA-wrapped layer's frozen weight, under its base name
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.float64).cpu().numpy()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def is_adapter_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def write_base_record(folder: Path, spec: str, fingerprint: str) -> None:
    (folder / BASE_FILE).write_text(json.dumps({"base_model": spec, "fingerprint": fingerprint}, indent=2) + "\n")


def load_adapter(base: torch.nn.Module, folder: Path, *, base_spec: str, trainable: bool, merge: bool = False) -> torch.nn.Module:
    """A PEFT adapter folder on `base`, after checking that `base` is the model it was trained on."""
    from peft import PeftModel

    record_file = folder / BASE_FILE
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record["fingerprint"] != base_fingerprint(base):
            raise UserError(
                f"{folder}: this adapter was trained on base model {record['base_model']!r} (fingerprint "
                f"{record['fingerprint']}); {base_spec!r} has different weights",
                key="base_model",
            )
    with _quiet_peft():
        model: Any = PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)
    return model.merge_and_unload() if merge else model
