"""The differentiable Adam step alone, forward and backward, on a model's weights, by chunk size.

raymeta's Adam step (`raymeta/core/optim/adam.py`, `_AdamStep`) runs its elementwise passes in chunks of
`_CHUNK` elements on a CPU. This times one step over every weight tensor of the model (fresh p and
g, moments from step 10, eps 0) and its backward when only p' reaches the loss (a task's last inner
step), for each chunk size, including one chunk per tensor (no chunking). Each chunk size runs
`--repeats` times after one warm-up, interleaved with the others; the median is reported.

    python -m bench.adam_step [--model smollm2] [--repeats 3] [--out bench/results/adam_step.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CHUNKS = {"one per tensor": 1 << 62, "2^16": 1 << 16, "2^18 (default)": 1 << 18, "2^20": 1 << 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny_gpt2"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/adam_step.json"))
    args = ap.parse_args()

    import torch

    import raymeta.core.optim.adam as adam
    from bench.common import bench_model, environment
    from raymeta.core import optim
    from raymeta.infra.io import atomic_write_json

    params = {n: p.detach() for n, p in bench_model(args.model).named_parameters()}
    gen = torch.Generator().manual_seed(0)
    spec = optim.OptimizerSpec("adam", 1e-4, eps=0.0, eps_root=0.0)
    m = {n: 0.01 * torch.randn(p.shape, generator=gen) for n, p in params.items()}
    v = {n: 1e-4 * torch.rand(p.shape, generator=gen) + 1e-6 for n, p in params.items()}

    def once() -> tuple[float, float]:
        p = {n: t.clone().requires_grad_() for n, t in params.items()}
        g = {n: (0.01 * torch.randn(t.shape, generator=gen)).requires_grad_() for n, t in params.items()}
        start = time.perf_counter()
        new, _ = optim.optimizer_step(spec, p, g, optim.AdamState(m, v, 10))
        mid = time.perf_counter()
        torch.autograd.grad(list(new.values()), [*p.values(), *g.values()], [torch.ones_like(t) for t in new.values()])
        return mid - start, time.perf_counter() - mid

    times: dict[str, list[tuple[float, float]]] = {label: [] for label in CHUNKS}
    for chunk in CHUNKS.values():  # warm-up
        adam._CHUNK = chunk
        once()
    for _ in range(args.repeats):
        for label, chunk in CHUNKS.items():
            adam._CHUNK = chunk
            times[label].append(once())
    adam._CHUNK = CHUNKS["2^18 (default)"]
    rows = [
        {
            "chunk": label,
            "elements": chunk,
            "forward_s": statistics.median(f for f, _ in times[label]),
            "backward_s": statistics.median(b for _, b in times[label]),
            "all": times[label],
        }
        for label, chunk in CHUNKS.items()
    ]
    for r in rows:
        print(f"{r['chunk']:16s} forward {r['forward_s']:.3f} s  backward {r['backward_s']:.3f} s", flush=True)
    result = {
        "benchmark": "adam_step",
        **environment(),
        "model": args.model,
        "elements": sum(p.numel() for p in params.values()),
        "repeats": args.repeats,
        "rows": rows,
    }
    atomic_write_json(args.out, result)
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()
