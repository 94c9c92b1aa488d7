"""One second-order meta-step, three implementations: raymeta, `higher` (0.2.1) and TorchOpt (0.7.3).

The step: n=2 tasks, K inner Adam steps (lr 1e-4) whose moments start from the outer optimizer's
state (m, v, step: raymeta's `moment_policy: init`), then the query loss of the adapted weights
differentiated through the inner loop back to the original weights; the meta-gradient is the mean over
the tasks. Same model, same batches (one `--tokens`-token support and query sequence per task, the
last 16 tokens scored), same outer state, and all three run SDPA's math backend (the only one with a
double backward). Adam's eps is 0 here, because `higher` adds eps before the bias correction and
torch.optim/raymeta/TorchOpt after it; the outer second moment is strictly positive, so nothing
divides by zero. Each (model, implementation) runs in two fresh processes, both after a short
warm-up step: one times `--repeats` steps with the default allocator (the median is reported), the
other measures peak memory as maximum RSS minus the RSS before one step, with glibc's mmap threshold
at 64 KiB so that RSS follows the live tensors (`bench/common.py` explains why the default allocator
hides buffers that the warm-up step had already made room for). The meta-gradients are compared
against raymeta's (relative L2 error, cosine).

What each implementation does the way its documentation shows:
- raymeta: `task_meta_gradient` (functional_call on the base model, logits at the scored positions
  only, its differentiable Adam).
- higher: `innerloop_ctx(model, torch.optim.Adam, copy_initial_weights=False)`, `diffopt.step(loss)`,
  full logits from the patched model.
- TorchOpt: the functional API, `torchopt.adam(...).update(..., inplace=False)` and
  `apply_updates(..., inplace=False)` on `torch.func.functional_call`, full logits.

Then the achieved GFLOP/s of raymeta's step (FLOPs counted by `torch.utils.flop_counter` in a
separate pass) next to this machine's fp32 matmul GFLOP/s.

    python -m bench.speed [--models tiny_gpt2,smollm2] [--tokens 256] [--inner-steps 1] [--repeats 3]
                          [--out bench/results/speed.json]

Needs `pip install higher==0.2.1 torchopt==0.7.3 graphviz` (the `bench` extra of pyproject.toml).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPLS = ("raymeta", "higher", "torchopt")
LR, BETAS, EPS, STEP0, N_TASKS, SCORED = 1e-4, (0.9, 0.999), 0.0, 10, 2, 16


def _setup(model_name: str, tokens: int):  # type: ignore[no-untyped-def]
    """Model, tasks (support, query ids) and the outer Adam state, identical in every process."""
    import torch

    from bench.common import bench_model

    model = bench_model(model_name)
    vocab = model.config.vocab_size

    def ids(seed: int, length: int) -> torch.Tensor:
        return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))

    def tasks(length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(ids(100 + 2 * i, length), ids(101 + 2 * i, length)) for i in range(N_TASKS)]

    # the outer state: m and v from a gradient on another batch; v strictly positive everywhere
    g0 = torch.autograd.grad(_full_loss(model, None, ids(7, 64)), list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]
    m = {n: 0.1 * g for n, g in zip(names, g0)}
    v = {n: 0.05 * g * g + 1e-8 for n, g in zip(names, g0)}
    return model, tasks, m, v


def _full_loss(model, params, ids):  # type: ignore[no-untyped-def]
    """Mean cross-entropy of the last SCORED tokens from full logits (what a user of higher/TorchOpt writes)."""
    import torch
    import torch.nn.functional as F

    if params is None:
        logits = model(ids, use_cache=False).logits
    else:
        logits = torch.func.functional_call(model, params, (ids,), {"use_cache": False}).logits
    n = ids.shape[1]
    return F.cross_entropy(logits[0, n - SCORED - 1 : n - 1], ids[0, n - SCORED : n])


def _meta_grad_raymeta(model, tasks, m, v, k):  # type: ignore[no-untyped-def]
    from raymeta.config import load_config
    from raymeta.core.lm import Batch, FunctionalLM
    from raymeta.core.meta import TaskBatch, task_meta_gradient
    from raymeta.core.optim import AdamState

    cfg = load_config(
        None,
        [
            "method=maml_en_llm",
            "inner.optimizer=adam",
            "moment_policy=init",
            f"inner.lr={LR}",
            f"inner.steps={k}",
            "eps=0",
            "eps_root=0",
        ],
    )
    flm = FunctionalLM(model, math_attention=True)
    params = flm.params()
    total = None
    for support, query in tasks:
        n = support.shape[1]
        tb = TaskBatch("t", Batch(support, ((n - SCORED, n),)), Batch(query, ((n - SCORED, n),)))
        grads = task_meta_gradient(flm, params, AdamState(m, v, STEP0), tb, cfg.meta).grads
        if total is None:
            total = grads
        else:
            for name, g in grads.items():
                total[name] += g
        del grads
    assert total is not None
    return [total[name] / len(tasks) for name, _ in model.named_parameters()]


def _meta_grad_higher(model, tasks, m, v, k):  # type: ignore[no-untyped-def]
    import higher
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, eps=EPS)
    total = None
    for support, query in tasks:
        for name, p in model.named_parameters():  # every task starts from the outer state
            opt.state[p] = {"step": STEP0, "exp_avg": m[name], "exp_avg_sq": v[name]}  # higher copies the state
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=True) as (fmodel, diffopt):
            for _ in range(k):
                diffopt.step(_full_loss(fmodel, None, support))
            grads = torch.autograd.grad(_full_loss(fmodel, None, query), list(model.parameters()))
        total = _add(total, grads)
        del grads
    assert total is not None
    return [g / len(tasks) for g in total]


def _add(total, grads):  # type: ignore[no-untyped-def]
    """Sum in place into the first task's gradients (one gradient-sized buffer, as raymeta does)."""
    if total is None:
        return list(grads)
    for a, b in zip(total, grads):
        a += b
    return total


def _meta_grad_torchopt(model, tasks, m, v, k):  # type: ignore[no-untyped-def]
    import torch
    import torchopt

    names = [n for n, _ in model.named_parameters()]
    params = tuple(p for _, p in model.named_parameters())
    opt = torchopt.adam(lr=LR, betas=BETAS, eps=EPS, eps_root=0.0)
    total = None
    for support, query in tasks:
        (adam_state, *rest) = opt.init(params)
        state = (
            adam_state._replace(
                mu=tuple(m[n] for n in names),  # update(inplace=False) never writes into them
                nu=tuple(v[n] for n in names),
                count=tuple(torch.tensor(STEP0) for _ in names),
            ),
            *rest,
        )
        theta = params
        for _ in range(k):
            loss = _full_loss(model, dict(zip(names, theta)), support)
            g = torch.autograd.grad(loss, theta, create_graph=True)
            updates, state = opt.update(g, state, params=theta, inplace=False)
            theta = torchopt.apply_updates(theta, updates, inplace=False)
        grads = torch.autograd.grad(_full_loss(model, dict(zip(names, theta)), query), params)
        del theta, state, g, updates, loss
        total = _add(total, grads)
        del grads
    assert total is not None
    return [g / len(tasks) for g in total]


STEPS = {"raymeta": _meta_grad_raymeta, "higher": _meta_grad_higher, "torchopt": _meta_grad_torchopt}


def one(model_name: str, impl: str, tokens: int, k: int, measure: str, repeats: int, grads_out: Path | None) -> dict:
    """`measure` "time": the median of `repeats` steps (and the meta-gradient); "memory": one step's peak."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.common import measure_step

    model, tasks, m, v = _setup(model_name, tokens)
    with sdpa_kernel([SDPBackend.MATH]):
        STEPS[impl](model, tasks(32), m, v, k)  # warm-up
        measured, grads = measure_step(lambda: STEPS[impl](model, tasks(tokens), m, v, k), measure, repeats)
    if measure == "memory":
        return measured
    flat = torch.cat([g.detach().reshape(-1) for g in grads])
    if grads_out is not None:
        torch.save(flat, grads_out)
    return {
        "model": model_name,
        "impl": impl,
        **measured,
        "grad_norm": float(flat.norm()),
        "finite": bool(torch.isfinite(flat).all()),
    }


def flops(model_name: str, tokens: int, k: int) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model, tasks, m, v = _setup(model_name, tokens)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        _meta_grad_raymeta(model, tasks(tokens), m, v, k)
    return float(counter.get_total_flops())


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny_gpt2,smollm2")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--inner-steps", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per implementation (the median is reported)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/speed.json"))
    ap.add_argument("--one", nargs=4, metavar=("MODEL", "IMPL", "MEASURE", "GRADS"), help=argparse.SUPPRESS)
    ap.add_argument("--flops", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        model, impl, measure, grads = args.one
        grads_out = Path(grads) if grads != "-" else None
        print(json.dumps(one(model, impl, args.tokens, args.inner_steps, measure, args.repeats, grads_out)))
        return
    if args.flops:
        print(json.dumps({"flops": flops(args.flops, args.tokens, args.inner_steps)}))
        return

    import torch

    from bench.common import environment, memory_env, memory_measurement
    from raymeta.infra.io import atomic_write_json

    def run(*extra: str, env: dict[str, str] | None = None) -> dict:
        cmd = [sys.executable, "-m", "bench.speed", "--tokens", str(args.tokens), "--inner-steps", str(args.inner_steps)]
        cmd += ["--repeats", str(args.repeats), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    rows, summary = [], []
    machine = matmul_gflops()
    print(f"fp32 matmul 2048x2048: {machine:.1f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            results = {}
            for impl in args.impls.split(","):
                grads = Path(tmp) / f"{model}-{impl}.pt"
                r = run("--one", model, impl, "time", str(grads))
                if "error" not in r:
                    r.update(run("--one", model, impl, "memory", "-", env=memory_env()))
                r.update(model=model, impl=impl)
                if "error" not in r and impl != "raymeta" and (Path(tmp) / f"{model}-raymeta.pt").is_file():
                    ref = torch.load(Path(tmp) / f"{model}-raymeta.pt")
                    got = torch.load(grads)
                    r["rel_error_vs_raymeta"] = float((got - ref).norm() / ref.norm())
                    r["cosine_vs_raymeta"] = float(torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=0))
                grads.unlink(missing_ok=True) if impl != "raymeta" else None
                print(json.dumps(r), flush=True)
                rows.append(r)
                results[impl] = r
            (Path(tmp) / f"{model}-raymeta.pt").unlink(missing_ok=True)
            count = run("--flops", model)
            ours = results.get("raymeta", {})
            peers = [results[p] for p in ("higher", "torchopt") if p in results and "error" not in results[p]]
            entry: dict = {"model": model, "flops_per_step": count.get("flops")}
            if "seconds" in ours and count.get("flops"):
                entry["raymeta_gflops_per_s"] = count["flops"] / ours["seconds"] / 1e9
                entry["share_of_matmul_peak"] = entry["raymeta_gflops_per_s"] / machine
            if peers and "error" not in ours and "seconds" in ours:
                fastest = min(peers, key=lambda r: r["seconds"])
                smallest = min(peers, key=lambda r: r["peak_extra_mib"])
                entry["speedup_vs_fastest_peer"] = fastest["seconds"] / ours["seconds"]
                entry["fastest_peer"] = fastest["impl"]
                entry["memory_vs_fastest_peer"] = ours["peak_extra_mib"] / fastest["peak_extra_mib"]
                entry["memory_vs_leanest_peer"] = ours["peak_extra_mib"] / smallest["peak_extra_mib"]
                entry["leanest_peer"] = smallest["impl"]
            summary.append(entry)
            print(json.dumps(entry), flush=True)
    result = {
        "benchmark": "speed",
        **environment(),
        "peer_versions": {p: _version(p) for p in ("higher", "torchopt")},
        "matmul_gflops_per_s": machine,
        "tokens": args.tokens,
        "inner_steps": args.inner_steps,
        "tasks": N_TASKS,
        "repeats": args.repeats,
        "memory_measurement": memory_measurement(),
        "runs": rows,
        "summary": summary,
        "goals": {"speedup_vs_fastest_peer": ">= 1.3", "memory_vs_fastest_peer": "<= 0.7"},
    }
    atomic_write_json(args.out, result)


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
