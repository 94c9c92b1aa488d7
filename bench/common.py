"""Shared bits for benchmarks: machine and version facts recorded next to every number."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from typing import Any

__all__ = ["environment"]


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for pkg in ("raymeta", "torch", "transformers", "ray", "datasets", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": versions,
    }
