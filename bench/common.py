"""Shared bits for benchmarks: machine and version facts recorded next to every number."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from typing import Any

__all__ = ["bench_model", "environment", "rss_mb"]


def rss_mb() -> float:
    """This process's resident set size now, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


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


def bench_model(name: str):  # type: ignore[no-untyped-def]
    """`smollm2` (the fetched SmolLM2-135M) or `tiny_gpt2` (4 layers, d=256, the full 50257-token vocabulary,
    seeded random weights), with every parameter trainable."""
    import torch

    if name == "smollm2":
        from raymeta.models import load_model

        model = load_model("builtin")
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=1024)).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model
