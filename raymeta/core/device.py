"""The one device rule: `auto` is CUDA where there is one, else the CPU; `cuda[:N]` must exist.

Everything of a step (model, batches, accumulators, all-reduce buffers, optimizer state, restored
checkpoints) lives on the device this returns; checkpoints are written from CPU copies.
"""

from __future__ import annotations

import re

import torch

from raymeta.errors import UserError

__all__ = ["DEVICE_CHOICES", "is_device_spec", "resolve_device"]

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def is_device_spec(spec: str) -> bool:
    """Whether `spec` is one of the device names a config may hold (whether or not it exists here)."""
    return bool(_PATTERN.match(spec))


def resolve_device(spec: str | torch.device, key: str = "device") -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` as a `torch.device`; asking for CUDA where there is none is a
    `UserError` naming `key`."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not is_device_spec(spec):
        raise UserError(f"expected {DEVICE_CHOICES}, got {spec!r}", key=key)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise UserError(f"{spec}: {why} (torch {torch.__version__}); use device=cpu or auto", key=key)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"{spec}: only {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})", key=key)
    return device
