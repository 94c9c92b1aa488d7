"""Where a number came from: versions, the git commit of the raymeta source, the command, the machine and device.

Recorded in every `raymeta eval` results.json and every benchmark's JSON.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["cpu_model_and_flags", "environment", "git_commit"]

PACKAGES = ("raymeta", "torch", "transformers", "peft", "ray", "datasets", "numpy")


def cpu_model_and_flags() -> dict[str, Any]:
    """The CPU's model name and the flags that decide matmul speed (AVX2, AVX-512, AMX-BF16), from /proc/cpuinfo."""
    model: str | None = None
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu_model": model or platform.processor() or None, "cpu_flags": [f for f in wanted if f in flags]}


def git_commit() -> str | None:
    """The commit of the raymeta source tree this process runs (with `+dirty` for uncommitted changes),
    or None when raymeta is not run from a git checkout (an installed wheel)."""
    source = Path(__file__).resolve().parents[2]
    if not (source / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: Any = None) -> dict[str, Any]:
    import torch  # deferred: the package's top level imports nothing heavy

    versions: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([os.path.basename(sys.argv[0]) or "python", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": {
            "platform": platform.platform(),
            **cpu_model_and_flags(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": cuda,
        },
        "device": str(device) if device is not None else ("cuda" if cuda else "cpu"),
        "versions": versions,
    }
