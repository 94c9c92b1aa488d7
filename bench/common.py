"""Shared bits for benchmarks: machine and version facts recorded next to every number."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raymeta.infra import provenance
from raymeta.infra.provenance import cpu_model_and_flags

__all__ = [
    "bench_model",
    "check_memory_env",
    "cpu_model_and_flags",
    "environment",
    "evaluate_to_file",
    "measure_step",
    "memory_env",
    "memory_measurement",
    "peak_rss_mb",
    "rss_mb",
]

# glibc keeps a freed chunk below its mmap threshold in the heap (the threshold starts at 128 KiB and
# rises, up to 32 MiB, each time a mapped chunk is freed), and the process's RSS keeps it. After a
# warm-up step the heap then already holds room for every buffer the measured step will reuse
# (model-sized gradients, moments, optimizer intermediates), and "max RSS minus RSS before the step"
# misses them. With the threshold fixed at 64 KiB every larger tensor gets its own mapping, which is
# returned to the system when the tensor is freed: RSS follows the live tensors. Measured on SmolLM2:
# TorchOpt's second-order step showed 3613 MiB without this and 7880 MiB with it (raymeta 3185 vs
# 3717), so the old measure hid most of the peers' model-sized buffers. Allocation through mmap is
# slower, so the time of a step is measured in another process, with the default allocator.
MMAP_THRESHOLD = "65536"


def memory_env() -> dict[str, str]:
    """The environment of a child process that measures peak memory (see MMAP_THRESHOLD)."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}


def memory_measurement() -> str:
    """How peak memory was measured here (recorded next to the numbers)."""
    if platform.libc_ver()[0] != "glibc":
        return "max RSS minus RSS before the step; not glibc, so freed memory may stay resident (an underestimate)"
    return f"max RSS minus RSS before the step, glibc mmap threshold {MMAP_THRESHOLD} bytes (RSS follows live tensors)"


def check_memory_env() -> None:
    """Refuse to measure memory in a process started without `memory_env()` (its numbers would be low)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD and platform.libc_ver()[0] == "glibc":
        raise SystemExit("memory runs need MALLOC_MMAP_THRESHOLD_=" + MMAP_THRESHOLD + " (bench.common.memory_env)")


def measure_step(step: Callable[[], Any], measure: str, repeats: int) -> tuple[dict[str, Any], Any]:
    """Run `step` after the caller's warm-up. "memory": once, its peak above the RSS before it (the process
    must have been started with `memory_env()`); "time": `repeats` times, the median and every time.
    Returns the measurement and the last step's result (None for memory)."""
    if measure == "memory":
        check_memory_env()
        before = rss_mb()
        step()
        return {"peak_extra_mib": peak_rss_mb() - before, "rss_before_mib": before}, None
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "seconds_all": times}, result


def peak_rss_mb() -> float:
    """This process's maximum resident set size so far, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's resident set size now, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def environment() -> dict[str, Any]:
    """raymeta's provenance record (versions, git commit, machine), with the command as the benchmark was run."""
    env = provenance.environment()
    env["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    return env


def bench_model(name: str):  # type: ignore[no-untyped-def]
    """`smollm2` (the fetched SmolLM2-135M) or `tiny_gpt2` (4 layers, d=256, the full 50257-token vocabulary,
    seeded random weights), with every parameter trainable."""
    import torch

    if name == "smollm2":
        from raymeta.model.load import load_model

        model = load_model("builtin")
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=1024)).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def evaluate_to_file(
    path: Path,
    label: str,
    model_spec: str,
    data_dir: str | None,
    setting_name: str,
    cfg: Any,
    workers: int = 0,
    cache_dir: Path | None = None,
    before_unit: Any = None,
) -> dict:
    """Evaluate `model_spec` on a setting with an `EvalConfig` and write the results (with every prediction)
    to `path` atomically; an existing file is reused only for the very same weights, setting and protocol.
    With `workers` the units run on that many Ray actors; the loss cache (`cache_dir`, default the user's)
    is shared either way. `before_unit`: see `evaluate_setting` (in-process runs only)."""
    import json

    from raymeta.data import open_data
    from raymeta.eval.icl import LossCache, config_record, evaluate_setting, model_fingerprint
    from raymeta.infra.io import atomic_write_json
    from raymeta.infra.paths import paths
    from raymeta.model.load import load_model, load_tokenizer

    data = open_data(data_dir)
    setting = data.setting(setting_name)
    model = load_model(model_spec)
    fingerprint = model_fingerprint(model)
    if path.is_file():
        cached = json.loads(path.read_text())
        same = (cached.get("model_fingerprint"), cached.get("setting"), cached.get("config"))
        if same == (fingerprint, setting.name, config_record(cfg)) and "ci95_method" in cached:  # with predictions
            return cached
    began = time.time()
    cache_dir = cache_dir or paths().loss_cache
    if workers:
        from raymeta.eval.on_ray import ModelSource, evaluate_parallel

        del model
        source = ModelSource(model_spec, device="cpu")
        results = evaluate_parallel(source, data, setting, cfg, model_id=fingerprint, workers=workers, cache_dir=cache_dir)
    else:
        cache = LossCache(cache_dir)
        tokenizer = load_tokenizer(model_spec)
        results = evaluate_setting(
            model, tokenizer, data, setting, cfg, model_id=fingerprint, cache=cache, before_unit=before_unit
        )
    results["model"] = label
    results["eval_seconds"] = round(time.time() - began, 1)
    atomic_write_json(path, results)
    return results
