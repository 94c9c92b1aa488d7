"""The geometry of MAML-en-LLM's second-order term (#49 item 6): where it is large, whether it is signal,
and how much of it reaches the outer update. `python -m bench.second_order geometry --help`.

For a fresh state (the pretrained weights, S = 0) and a warm one (after `--warm-steps` FOMAML outer steps
with shared moments), every cell of the grid (inner optimizer, lr, K, inner start S or zero, eps) is
measured over two independent draws of `--tasks` tasks (one support and one query instance each):

- rho = ‖Ḡ₂ − Ḡ₁‖ / ‖Ḡ₁‖ and cos(Ḡ₂, Ḡ₁): second order (Ḡ₂) against FOMAML (Ḡ₁), task means of a draw
- signal: cos(D_a, D_b) of the second-order terms D = Ḡ₂ − Ḡ₁ of the two draws (0: noise, 1: the same term)
- near_zero_share: the share of ‖D‖² on coordinates whose mean first support gradient is below
  10·eps in magnitude (and `near_zero_coords`, the fraction of coordinates that are), embedding_share: on
  the token embedding (tied to the head)
- meta_share: the meta-gradient's share ‖Δθ_meta‖/‖Δθ‖ of the outer Adam step (raymeta.core.meta.meta_share)
  under shared + grad_clip 1, shared + clip 0 and init + clip 0; with `inner_clip` also after an inner
  grad_clip of 1 (start S cells at K=1)
- post_step: the held-out post-adaptation query loss (a third draw, adapted with the cell's inner loop)
  at θ and after one step of equal length `--step-length` (0.01: a length of 1 raised SmolLM2's loss
  from 1.5 to 3.8 in a first try) along −Ḡ₁ and −Ḡ₂ (both draws' mean)

Every finished cell is appended to `OUT/cells.jsonl` and the warm state is saved in `OUT/warm/`, so a
run that was stopped resumes where it was (`--resume` is the default: finished cells are skipped).
`--table` prints the markdown table of what is there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import environment

LRS = (3e-5, 1e-4, 3e-4, 1e-3)
SGD_LRS = (3e-3, 1e-2, 3e-2)


def grid(lrs: tuple[float, ...] = LRS) -> list[dict[str, Any]]:
    """The cells in the order they run: K=1 first (the campaign's), then eps 1e-6 and SGD, then K=2 and K=4."""
    cells = []
    for state in ("fresh", "warm"):
        starts = ("S",) if state == "fresh" else ("S", "zero")  # a fresh S is zero: the two starts are one
        for lr in lrs:
            for start in starts:
                cells.append({"state": state, "optimizer": "adamw", "lr": lr, "K": 1, "start": start, "eps": 1e-8})
    for state in ("fresh", "warm"):
        for lr in lrs:
            cells.append({"state": state, "optimizer": "adamw", "lr": lr, "K": 1, "start": "S", "eps": 1e-6})
    for state in ("fresh", "warm"):
        for K in (1, 2):
            for lr in SGD_LRS:
                cells.append({"state": state, "optimizer": "sgd", "lr": lr, "K": K, "start": "zero", "eps": 1e-8})
    for K in (2, 4):
        for state in ("fresh", "warm"):
            for lr in lrs:
                for start in ("S",) if state == "fresh" else ("S", "zero"):
                    cells.append({"state": state, "optimizer": "adamw", "lr": lr, "K": K, "start": start, "eps": 1e-8})
    return cells


def cell_key(c: dict[str, Any]) -> str:
    return f"{c['state']}/{c['optimizer']}/lr{c['lr']:g}/K{c['K']}/start-{c['start']}/eps{c['eps']:g}"


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[n].double() * b[n].double()).sum()) for n in a)


def _norm(a: dict[str, torch.Tensor]) -> float:
    return _dot(a, a) ** 0.5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.second_order geometry", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--data", default=None, help="data folder (default: the built-in one)")
    ap.add_argument("--setting", default="class_to_class")
    ap.add_argument("--tasks", type=int, default=6, help="tasks per draw (two draws per cell)")
    ap.add_argument("--warm-steps", type=int, default=20, help="FOMAML outer steps (shared moments) before the warm state")
    ap.add_argument("--step-length", type=float, default=0.01, help="the L2 length of the equal-length outer steps")
    ap.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS), help="the Adam inner lrs of the grid")
    ap.add_argument("--max-cells", type=int, default=None, help="stop after N new cells (the rest on the next run)")
    ap.add_argument("--only", default=None, help="run only cells whose key contains this (e.g. 'K1/')")
    ap.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="exact activation checkpointing (raymeta.core.checkpointing): the same numbers to rounding, less memory at larger K",
    )
    ap.add_argument("--table", action="store_true", help="print the markdown table of OUT/cells.jsonl and exit")
    ap.add_argument("--out", type=Path, default=Path("bench/results/second_order_geometry"))
    args = ap.parse_args(argv)
    if args.table:
        print(table(read_cells(args.out)))
        return 0
    return run(args)


def read_cells(out: Path) -> list[dict[str, Any]]:
    path = out / "cells.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file, save_file

    from bench.second_order import campaign_overrides
    from raymeta.config import load_config
    from raymeta.core.inner import adapt, inner_start
    from raymeta.core.meta import MetaLearner, meta_share, task_meta_gradient
    from raymeta.core.optim import AdamState, zeros_state
    from raymeta.data.prompts import PromptBuilder, PromptFormat
    from raymeta.model.load import load_tokenizer, load_trainable
    from raymeta.run.trainer import build_sampler, tokenize

    def overrides(seed: int) -> list[str]:
        return campaign_overrides(args.model, args.setting, args.tasks, args.data, seed)

    cfg = load_config(None, overrides(1000))
    model = load_trainable(args.model, cfg.weights)
    # math attention: double backward; checkpointing (exact) is fixed here, in the FunctionalLM every cell uses
    ckpt = args.activation_checkpointing
    learner = MetaLearner(model, dataclasses.replace(cfg.meta, method="maml_en_llm", activation_checkpointing=ckpt))
    learner.state = None  # two model-sized buffers: made for the warm-up only
    flm = learner.flm
    params = flm.params()
    names = list(params)
    t = cfg.tasks
    builder = PromptBuilder(load_tokenizer(args.model), PromptFormat(t.variant, t.max_length_per_example, t.max_length))  # type: ignore[arg-type]

    def draw(seed: int) -> list[Any]:
        sampler, _ = build_sampler(load_config(None, overrides(seed)), None)
        return [tokenize(s, builder) for s in sampler.sample()]

    draws = [draw(1001), draw(1002)]
    held = draw(1003)
    args.out.mkdir(parents=True, exist_ok=True)
    pretrained = {n: p.detach().clone() for n, p in params.items()}

    def warm_state() -> AdamState:
        folder = args.out / "warm"
        if (folder / "done.json").is_file():
            w = load_file(str(folder / "weights.safetensors"))
            s = load_file(str(folder / "state.safetensors"))
            step = json.loads((folder / "done.json").read_text())["optimizer_step"]
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(w[n])
            return AdamState({n: s[f"m.{n}"] for n in names}, {n: s[f"v.{n}"] for n in names}, step)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(pretrained[n])
        learner.state = zeros_state({n: p.detach() for n, p in params.items()})
        learner.cfg = dataclasses.replace(cfg.meta, method="fomaml")
        sampler, _ = build_sampler(cfg, None)
        began = time.time()
        for i in range(args.warm_steps):
            m = learner.step([tokenize(s, builder) for s in sampler.sample()])
            print(f"warm-up {i + 1}/{args.warm_steps}: query loss {m.query_loss:.4f} ({time.time() - began:.0f} s)", flush=True)
        assert learner.state is not None
        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in params.items()}, str(folder / "weights.safetensors"))
        save_file(
            {
                **{f"m.{n}": t.contiguous() for n, t in learner.state.m.items()},
                **{f"v.{n}": t.contiguous() for n, t in learner.state.v.items()},
            },
            str(folder / "state.safetensors"),
        )
        (folder / "done.json").write_text(json.dumps({"optimizer_step": learner.state.step, "steps": args.warm_steps}))
        warm, learner.state = learner.state, None
        return warm

    def set_state(state: str) -> AdamState:
        if state == "warm":
            return warm_state()
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(pretrained[n])
        return zeros_state({n: p.detach() for n, p in params.items()})

    support_grads: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def mean_support_grad(state: str, d: int) -> dict[str, torch.Tensor]:
        if (state, d) not in support_grads:
            if any(k[0] != state for k in support_grads):
                support_grads.clear()  # one state's at a time (model-sized each)
            total: dict[str, torch.Tensor] = {}
            for b in draws[d]:
                g = torch.autograd.grad(flm.loss(params, b.support), [params[n] for n in names])
                for n, x in zip(names, g):
                    total[n] = total[n] + x if n in total else x.clone()
            support_grads[(state, d)] = {n: x / len(draws[d]) for n, x in total.items()}
        return support_grads[(state, d)]

    def meta_cfg(c: dict[str, Any], method: str, inner_clip: float = 0.0):  # type: ignore[no-untyped-def]
        inner = dataclasses.replace(cfg.meta.inner, optimizer=c["optimizer"], lr=c["lr"], steps=c["K"], grad_clip=inner_clip)
        policy = "shared" if c["start"] == "S" else "none"
        return dataclasses.replace(
            cfg.meta, method=method, inner=inner, eps=c["eps"], moment_policy=policy if c["optimizer"] != "sgd" else "none"
        )

    def shares(
        c: dict[str, Any],
        S: AdamState,
        g2: dict[str, torch.Tensor],
        m_bar: dict[str, torch.Tensor],
        v_bar: dict[str, torch.Tensor],
    ) -> dict[str, float]:
        """meta_share of the outer step under shared (clip 1, clip 0) and init (clip 0), from one draw."""
        spec = dataclasses.replace(cfg.meta, eps=c["eps"]).outer_spec()
        b1, b2 = spec.betas
        out = {}
        norm = _norm(g2)
        for label, clip, merged in (("shared_clip1", 1.0, True), ("shared_clip0", 0.0, True), ("init_clip0", 0.0, False)):
            g = {n: x * (clip / norm) for n, x in g2.items()} if clip and norm > clip else g2
            m0, v0, step = (m_bar, v_bar, S.step + c["K"]) if merged else (S.m, S.v, S.step)
            new = AdamState(
                {n: b1 * m0[n] + (1 - b1) * g[n] for n in names},
                {n: b2 * v0[n] + (1 - b2) * g[n] * g[n] for n in names},
                step + 1,
            )
            out[label] = meta_share(spec, g, new)
        return out

    def post_step_loss(c: dict[str, Any], S: AdamState | None, direction: dict[str, torch.Tensor] | None) -> float:
        """The held-out post-adaptation query loss at θ − L·d/‖d‖ (θ itself for None)."""
        mc = meta_cfg(c, "fomaml")
        spec = mc.inner_spec()
        base = {n: p.detach() for n, p in params.items()}
        if direction is not None:
            scale = args.step_length / _norm(direction)
            base = {n: base[n] - scale * direction[n] for n in names}
        losses = []
        for b in held:
            start = inner_start(spec, mc.moment_policy, base, S)
            theta, *_ = adapt(flm, dict(base), b.support, spec, start, c["K"], second_order=False)
            with torch.no_grad():
                losses.append(float(flm.loss(theta, b.query)))
        return sum(losses) / len(losses)

    done = {r["key"] for r in read_cells(args.out)}
    todo = [
        c
        for c in grid(tuple(float(x) for x in args.lrs.split(",")))
        if cell_key(c) not in done and (args.only is None or args.only in cell_key(c))
    ]
    print(f"{len(done)} cells done, {len(todo)} to run -> {args.out / 'cells.jsonl'}", flush=True)
    env = environment()
    (args.out / "environment.json").write_text(
        json.dumps({**env, "config": overrides(1000), "warm_steps": args.warm_steps}, indent=2) + "\n"
    )
    current = None
    S: AdamState = zeros_state({})
    for i, c in enumerate(todo[: args.max_cells]):
        began = time.time()
        if c["state"] != current:
            S, current = set_state(c["state"]), c["state"]
        start_state = S if c["start"] == "S" else None
        diffs, rhos, coss, near, near_coords, emb, meta_shares, inner_clip_shares = [], [], [], [], [], [], [], []
        g1_all: dict[str, torch.Tensor] = {}
        g2_all: dict[str, torch.Tensor] = {}
        for d in (0, 1):
            sums: dict[str, dict[str, torch.Tensor]] = {"g1": {}, "g2": {}, "m": {}, "v": {}}
            for b in draws[d]:
                r1 = task_meta_gradient(flm, params, start_state, b, meta_cfg(c, "fomaml"))
                r2 = task_meta_gradient(flm, params, start_state, b, meta_cfg(c, "maml_en_llm"))
                parts = [("g1", r1.grads), ("g2", r2.grads)]
                if r2.inner_state is not None:
                    parts += [("m", r2.inner_state.m), ("v", r2.inner_state.v)]
                for key, tensors in parts:
                    for n, x in tensors.items():
                        if n in sums[key]:
                            sums[key][n].add_(x.detach())
                        else:
                            sums[key][n] = x.detach().clone()
                del r1, r2
            n_t = len(draws[d])
            for part in sums.values():  # the task means, in place (no second copy)
                for x in part.values():
                    x.div_(n_t)
            g1, g2 = sums["g1"], sums["g2"]
            diff = {n: g2[n] - g1[n] for n in names}
            rhos.append(_norm(diff) / _norm(g1))
            coss.append(_dot(g1, g2) / (_norm(g1) * _norm(g2)))
            sg = mean_support_grad(c["state"], d)
            mask = {n: sg[n].abs() < 10 * c["eps"] for n in names}
            total = _dot(diff, diff)
            near.append(sum(float(diff[n][mask[n]].double().pow(2).sum()) for n in names) / total)
            near_coords.append(sum(int(mask[n].sum()) for n in names) / sum(mask[n].numel() for n in names))
            emb.append(sum(float(diff[n].double().pow(2).sum()) for n in names if "embed" in n or "wte" in n) / total)
            if c["start"] == "S":
                meta_shares.append(shares(c, S, g2, sums["m"], sums["v"]))
                sums["m"] = sums["v"] = {}  # two model-sized buffers fewer before the next pass
                if c["K"] == 1 and c["eps"] == 1e-8:
                    clipped: dict[str, dict[str, torch.Tensor]] = {"g": {}, "m": {}, "v": {}}
                    for b in draws[d]:
                        r = task_meta_gradient(flm, params, start_state, b, meta_cfg(c, "maml_en_llm", inner_clip=1.0))
                        assert r.inner_state is not None
                        for key, src in (("g", r.grads), ("m", r.inner_state.m), ("v", r.inner_state.v)):
                            for n, x in src.items():
                                if n in clipped[key]:
                                    clipped[key][n].add_(x.detach())
                                else:
                                    clipped[key][n] = x.detach().clone()
                        del r
                    for part in clipped.values():
                        for x in part.values():
                            x.div_(n_t)
                    inner_clip_shares.append(shares(c, S, clipped["g"], clipped["m"], clipped["v"]))
                    del clipped
            for n in names:
                g1_all[n] = g1_all[n] + g1[n] / 2 if n in g1_all else g1[n] / 2
                g2_all[n] = g2_all[n] + g2[n] / 2 if n in g2_all else g2[n] / 2
            diffs.append(diff)
            del sums, g1, g2
        signal = _dot(diffs[0], diffs[1]) / (_norm(diffs[0]) * _norm(diffs[1]))
        del diffs
        row: dict[str, Any] = {
            "key": cell_key(c),
            **c,
            "moment_step": S.step if c["start"] == "S" else 0,
            "rho": rhos,
            "cosine": coss,
            "signal": signal,
            "near_zero_share": near,
            "near_zero_coords": near_coords,
            "embedding_share": emb,
            "meta_share": {k: [m[k] for m in meta_shares] for k in meta_shares[0]} if meta_shares else None,
            "meta_share_inner_clip1": {k: [m[k] for m in inner_clip_shares] for k in inner_clip_shares[0]}
            if inner_clip_shares
            else None,
            "post_step": {
                "theta": post_step_loss(c, start_state, None),
                "fomaml": post_step_loss(c, start_state, g1_all),
                "maml_en_llm": post_step_loss(c, start_state, g2_all),
                "step_length": args.step_length,
            },
            "tasks": args.tasks,
            "activation_checkpointing": ckpt,
        }
        row["seconds"] = round(time.time() - began, 1)
        with (args.out / "cells.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        p = row["post_step"]
        print(
            f"[{i + 1}/{len(todo)}] {row['key']}: rho {sum(rhos) / 2:.3g} cos {sum(coss) / 2:.5f} signal {signal:.3f} "
            f"near-zero {sum(near) / 2:.2f} emb {sum(emb) / 2:.2f} post-step loss θ {p['theta']:.4f} "
            f"FO {p['fomaml']:.4f} SO {p['maml_en_llm']:.4f} ({row['seconds']} s)",
            flush=True,
        )
        del g1_all, g2_all
    return 0


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def table(rows: list[dict[str, Any]]) -> str:
    """One line per cell: the means over the two draws."""
    head = (
        "| state | inner | lr | K | start | eps | ρ = ‖G₂−G₁‖/‖G₁‖ | cos(G₂,G₁) | signal cos(D_a,D_b) "
        "| near-zero share (coords) | embedding share | meta_share shared+clip1 / shared+clip0 / init+clip0 "
        "| same, inner clip 1 | post-step loss θ / FO / SO |\n"
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|---|\n"
    )

    def shares(ms: dict[str, list[float]] | None) -> str:
        return " / ".join(f"{_mean(ms[k]):.3g}" for k in ("shared_clip1", "shared_clip0", "init_clip0")) if ms else "–"

    lines = []
    for r in rows:
        p = r["post_step"]
        cells = [
            r["state"],
            r["optimizer"],
            f"{r['lr']:g}",
            str(r["K"]),
            r["start"],
            f"{r['eps']:g}",
            f"{_mean(r['rho']):.3g}",
            f"{_mean(r['cosine']):.4f}",
            f"{r['signal']:.3f}",
            f"{_mean(r['near_zero_share']):.2f} ({_mean(r['near_zero_coords']):.3f})",
            f"{_mean(r['embedding_share']):.2f}",
            shares(r.get("meta_share")),
            shares(r.get("meta_share_inner_clip1")),
            f"{p['theta']:.4f} / {p['fomaml']:.4f} / {p['maml_en_llm']:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines)
