"""How the benchmarks measure peak memory: a process started with `memory_env()` gives freed tensors
back to the system, so "max RSS minus RSS before the step" counts every buffer the step holds, even
after a warm-up step; a memory run started without it refuses to measure."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import memory_env

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the mmap threshold is a glibc setting")

# 100 tensors of 4 MiB, the size of one SmolLM2 layer's weight, held by a warm-up between small
# tensors that stay alive, then freed; the "step" then holds 400 MiB again. With glibc's default
# settings the step reuses the warm-up's holes in the heap and RSS grows by about 120 MiB (seen here).
PROBE = """
import json, torch
from bench.common import rss_mb
def step(keep=None):
    big = []
    for _ in range(100):
        big.append(torch.ones(1 << 20))
        if keep is not None:
            keep.append(torch.ones(64))
    return big
keep = []
del step()[:]  # freeing mapped blocks raises glibc's default threshold above 4 MiB
held = step(keep)
del held
before = rss_mb()
held = step()
during = rss_mb() - before
held.clear()
print(json.dumps({"during": during, "after_free": rss_mb() - before}))
"""
ROOT = Path(__file__).resolve().parents[1]


@glibc
def test_memory_env_counts_buffers_a_warm_up_already_made_room_for():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=memory_env(), check=True, cwd=ROOT)
    r = json.loads(proc.stdout)
    assert 380 <= r["during"] <= 460, r  # the 400 MiB the step holds, though the warm-up held them too
    assert r["after_free"] < 20, r  # and they leave RSS when freed


@glibc
@pytest.mark.parametrize("bench", ["bench.speed", "bench.meta_step"])
def test_memory_run_without_memory_env_refuses_to_measure(bench):
    env = {k: v for k, v in memory_env().items() if k != "MALLOC_MMAP_THRESHOLD_"}
    args = (
        ["--one", "tiny_gpt2", "raymeta", "memory", "-"]
        if bench == "bench.speed"
        else ["--one", "tiny_gpt2", '["fomaml", false, 1, null, "local"]', "memory"]
    )
    proc = subprocess.run([sys.executable, "-m", bench, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode != 0
    assert "MALLOC_MMAP_THRESHOLD_=65536" in proc.stderr
