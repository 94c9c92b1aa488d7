"""The report of `python -m bench.paper`: from the evaluations that exist, the paper's claims as paired
differences over training seeds with 95 % CIs and the protocol's verdict on each (holds, refuted, or
unresolved with the training seeds that would resolve it), the second-order question, every finished evaluation
(the raw model's first), what each finished job cost (minutes over all its attempts, from progress.json) and
the published anchors. Writes OUT/report.json, OUT/report.md and
OUT/report.png; a claim whose runs are not all done is listed as pending, with what is missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# (claim, arm of A, method A, arm of B, method B, adaptation?, threshold in points: the paper's, or None)
CLAIMS: tuple[tuple[str, str, str, str, str, bool, float | None], ...] = (
    ("MAML-en-LLM − MetaICL (ICL)", "c2c", "maml_en_llm", "c2c", "metaicl", False, 2.0),
    ("MAML-en-LLM − MetaICL, MetaICL at equal wall-clock", "c2c", "maml_en_llm", "c2c-clock", "metaicl", False, 2.0),
    ("MAML-en-LLM − MetaICL after adaptation", "c2c", "maml_en_llm", "c2c", "metaicl", True, 4.0),
    ("MAML-en-LLM − MetaICL, limited data", "c2c-limited", "maml_en_llm", "c2c-limited", "metaicl", False, 2.0),
    ("MAML-en-LLM − MetaICL, bb_hr_to_lr", "h2l", "maml_en_llm", "h2l", "metaicl", False, 2.0),
    ("MAML-en-LLM − MetaICL, channel", "c2c-channel", "maml_en_llm", "c2c-channel", "metaicl", False, 2.0),
    ("MAML-en-LLM − MetaICL, LoRA", "c2c-lora", "maml_en_llm", "c2c-lora", "metaicl", False, 2.0),
    ("MAML-en-LLM − FOMAML (does second order matter?)", "c2c", "maml_en_llm", "c2c", "fomaml", False, None),
    ("MAML-en-LLM − Reptile", "c2c", "maml_en_llm", "c2c", "reptile", False, None),
    ("MAML-en-LLM − FOMAML at equal wall-clock", "c2c", "maml_en_llm", "c2c-clock", "fomaml", False, None),
    ("MAML-en-LLM − Reptile at equal wall-clock", "c2c", "maml_en_llm", "c2c-clock", "reptile", False, None),
)
ANCHORS = (
    "MAML-en-LLM (Sinha et al., KDD 2024) claims ≥ +2 points over MetaICL on unseen-domain targets, ≥ +4 after "
    "adaptation, ≥ +2 with limited data.",
    "MetaICL (Min et al., 2022), GPT-2 Large, class_to_class: ICL 37.4 → MetaICL 43.4 (+6.0).",
)


def verdict(p: dict[str, Any], threshold: float | None) -> tuple[str, str]:
    """The protocol's verdict on one comparison (`p` from `stats.paired_over_training_seeds`; the paper's
    margin in points) and what would change it. A claim *holds* when the estimate reaches the margin and the
    interval excludes 0, is *refuted* when the interval lies below the margin, and is *unresolved*
    otherwise; then the training seeds a side that would narrow the interval enough if the estimate stays
    (`stats.training_seeds_needed`: the part from the shared test examples does not shrink with seeds)."""
    from raymeta.eval import stats

    diff, lo, hi = 100 * p["diff"], 100 * p["ci95"][0], 100 * p["ci95"][1]

    def more(room: float) -> str:
        n = stats.training_seeds_needed(p, room / 100) if room > 0 else None
        return "more test examples, not seeds," if n is None else f"about {n} training seeds a side"

    if threshold is None:
        if lo > 0 or hi < 0:
            return "differs", ""
        return f"no difference resolved (A − B within ±{max(-lo, hi):.1f})", ""
    if diff >= threshold and lo > 0:
        return "holds", ""
    if hi < threshold:
        return "refuted", ""
    if diff < threshold:  # the upper end has to come below the margin
        return "unresolved", f"{more(threshold - diff)} to refute"
    return "unresolved", f"{more(diff)} to hold"  # the lower end has to come above 0


def _run(results: dict[str, Any], variant: str, adapt: bool) -> dict[str, Any] | None:
    for name, run in results["runs"].items():
        if name.startswith(f"{variant}/icl") and ("+adapt" in name) == adapt:
            return run
    return None


def _read(path: Path, parsed: dict[Path, Any]) -> Any:
    """One evaluation file, parsed once per report (claims, agreement and rows all read the same files)."""
    if path not in parsed:
        parsed[path] = json.loads(path.read_text())
    return parsed[path]


def _load(
    out: Path, arm: str, method: str, seeds: tuple[int, ...], adapt: bool, parsed: dict[Path, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    found, missing = [], []
    for s in seeds:
        path = out / "eval" / f"{arm}-{method}-s{s}{'+adapt' if adapt else ''}.json"
        if path.is_file():
            found.append(_read(path, parsed))
        else:
            missing.append(path.stem)
    return found, missing


def _agreement(
    out: Path, a: tuple[str, str], b: tuple[str, str], seeds: tuple[int, ...], adapt: bool, parsed: dict[Path, Any]
) -> dict[str, Any] | None:
    """How often A and B make the same prediction on the same test example (every target, evaluation seed and
    training seed evaluated for both so far): two methods that differ by a point can still disagree on a
    quarter of the examples, or on almost none."""
    same = total = 0
    used = []
    for s in seeds:
        ra, _ = _load(out, *a, (s,), adapt, parsed)
        rb, _ = _load(out, *b, (s,), adapt, parsed)
        if not ra or not rb:
            continue
        run_a, run_b = _run(ra[0], _variant(a[0]), adapt), _run(rb[0], _variant(b[0]), adapt)
        if run_a is None or run_b is None:
            continue
        used.append(s)
        for task in ra[0]["targets"]:
            pa, pb = run_a["per_task"][task]["predictions"], run_b["per_task"][task]["predictions"]
            for eval_seed in pa.keys() & pb.keys():
                same += sum(x == y for x, y in zip(pa[eval_seed], pb[eval_seed], strict=True))
                total += len(pa[eval_seed])
    return {"same": same, "total": total, "fraction": same / total, "training_seeds": used} if total else None


def _variant(arm: str) -> str:
    return "channel" if arm.endswith("channel") else "direct"


def report(campaign: Any, jobs: list[Any]) -> str:
    from raymeta.eval import stats

    out: Path = campaign.out
    seeds = tuple(campaign.size["seeds"])
    claims, evaluations = [], []
    parsed: dict[Path, Any] = {}
    for name, arm_a, m_a, arm_b, m_b, adapt, threshold in CLAIMS:
        a, miss_a = _load(out, arm_a, m_a, seeds, adapt, parsed)
        b, miss_b = _load(out, arm_b, m_b, seeds, adapt, parsed)
        entry: dict[str, Any] = {"claim": name, "threshold": threshold, "a": f"{arm_a}/{m_a}", "b": f"{arm_b}/{m_b}"}
        entry["agreement"] = _agreement(out, (arm_a, m_a), (arm_b, m_b), seeds, adapt, parsed)
        if miss_a or miss_b:
            entry["pending"] = miss_a + miss_b
            claims.append(entry)
            continue
        variant = _variant(arm_a)
        runs_a = [_run(r, variant, adapt) for r in a]
        runs_b = [_run(r, variant, adapt) for r in b]
        for scope, tasks in (("all", a[0]["targets"]), ("unseen", a[0]["unseen_domain_test"])):
            p = stats.paired_over_training_seeds(runs_a, runs_b, tasks)  # type: ignore[arg-type]
            entry[scope] = {
                "diff": 100 * p["diff"],
                "ci95": [100 * x for x in p["ci95"]],
                "t_ci95": [100 * x for x in p["t_ci95"]] if p["t_ci95"] else None,
                "a": 100 * p["a"],
                "b": 100 * p["b"],
                "per_seed_a": [100 * x for x in p["per_seed"]["a"]],
                "per_seed_b": [100 * x for x in p["per_seed"]["b"]],
                "resolved": p["resolved"],
                "verdict": verdict(p, threshold),
                "reaches_threshold": threshold is not None and 100 * p["diff"] >= threshold,
                "excludes_threshold": threshold is not None and 100 * p["ci95"][1] < threshold,
            }
        claims.append(entry)
    # every finished evaluation (the raw model's reference rows first), so a partial campaign shows its runs
    for path in sorted((out / "eval").glob("*.json"), key=lambda p: (not p.stem.startswith("raw-"), p.stem)):
        r = _read(path, parsed)
        for run_name, run in r["runs"].items():
            for scope, tasks in (("all", r["targets"]), ("unseen", r["unseen_domain_test"])):
                ci = stats.summary_ci(run, tasks)
                mean = sum(run["per_task"][t]["mean"] for t in tasks) / len(tasks)
                evaluations.append(
                    {
                        "eval": path.stem,
                        "run": run_name,
                        "scope": scope,
                        "mean": 100 * mean,
                        "ci95": [100 * x for x in ci or [mean, mean]],
                    }
                )
    _curves(out)
    done = sum(j.done() for j in jobs)
    result = {
        "jobs_done": done,
        "jobs": len(jobs),
        "claims": claims,
        "evaluations": evaluations,
        "cost": _cost(campaign, jobs),
        "anchors": ANCHORS,
    }
    _write(out, result)
    return _markdown(result)


def _cost(campaign: Any, jobs: list[Any]) -> list[dict[str, Any]]:
    """Each finished job's wall time over all its attempts, as progress.json recorded it, in the campaign's order."""
    progress = campaign.read_progress()
    return [
        {
            "job": j.name,
            "minutes": progress[j.name]["seconds"] / 60,
            "finished": progress[j.name].get("finished", ""),
            "cpus": progress[j.name].get("cpus", []),
        }
        for j in jobs
        if j.name in progress
    ]


def _curves(out: Path) -> None:
    """One learning-curve plot per arm (every method and training seed overlaid) in OUT/curves/ARM.png."""
    from raymeta.run.plots import plot_runs

    by_arm: dict[str, list[Path]] = {}
    for path in sorted((out / "curves").glob("*.jsonl")):
        arm = path.stem.rsplit("-", 2)[0]
        for method in ("metaicl", "maml_en_llm", "fomaml", "reptile"):
            if f"-{method}-" in path.stem:
                arm = path.stem.split(f"-{method}-")[0]
        by_arm.setdefault(arm, []).append(path)
    for arm, paths in by_arm.items():
        plot_runs([str(p) for p in paths], out / "curves" / f"{arm}.png", smooth=5)


def _markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['jobs_done']} of {result['jobs']} jobs done.", ""]
    lines += ["| evaluation | run | targets | mean [95% CI] |", "|---|---|---|---:|"]
    for r in result["evaluations"]:
        lines.append(f"| {r['eval']} | {r['run']} | {r['scope']} | {r['mean']:.1f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}] |")
    lines += [
        "",
        "| comparison (A − B) | targets | A | B | A − B [95% CI] | Welch t CI over seeds | paper | verdict |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for c in result["claims"]:
        if "pending" in c:
            n = len(c["pending"])
            lines.append(f"| {c['claim']} | – | – | – | pending ({n} evaluation{'s' if n > 1 else ''}) | – | – | – |")
            continue
        for scope in ("all", "unseen"):
            s = c[scope]
            t = f"[{s['t_ci95'][0]:+.1f}, {s['t_ci95'][1]:+.1f}]" if s["t_ci95"] else "–"
            paper = "–" if c["threshold"] is None else f"≥ +{c['threshold']:g}"
            lines.append(
                f"| {c['claim']} | {scope} | {s['a']:.1f} | {s['b']:.1f} | {s['diff']:+.1f} [{s['ci95'][0]:+.1f}, "
                f"{s['ci95'][1]:+.1f}] | {t} | {paper} | {'; '.join(x for x in s['verdict'] if x)} |"
            )
    agree = [c for c in result["claims"] if c.get("agreement")]
    if agree:
        lines += ["", "| comparison (A vs B) | same prediction | of | training seeds |", "|---|---:|---:|---|"]
        for c in agree:
            g = c["agreement"]
            seeds = ", ".join(map(str, g["training_seeds"]))
            pct = f"{100 * g['fraction']:.1f}"
            if pct == "100.0" and g["same"] < g["total"]:  # 12715 of 12720 is not 100 %: say how many differ
                pct = f"{100 * g['fraction']:.2f}"
            lines.append(f"| {c['claim']} | {pct} % ({g['total'] - g['same']} differ) | {g['total']} | {seeds} |")
    if result.get("cost"):
        total = sum(c["minutes"] for c in result["cost"]) / 60
        n = len(result["cost"])
        lines += ["", f"What each job cost: {total:.1f} h of wall time over {n} finished jobs (CPU: where recorded).", ""]
        lines += ["| job | minutes (all attempts) | finished (UTC) | CPU |", "|---|---:|---|---|"]
        for c in result["cost"]:
            cpus = "; ".join(c["cpus"]) or "–"
            lines.append(f"| {c['job']} | {c['minutes']:.0f} | {c['finished'][:16].replace('T', ' ')} | {cpus} |")
    lines += ["", *[f"- {a}" for a in result["anchors"]]]
    return "\n".join(lines) + "\n"


def _write(out: Path, result: dict[str, Any]) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raymeta.infra.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    atomic_write_json(out / "report.json", result)
    atomic_write_text(out / "report.md", _markdown(result))
    rows = [
        (c["claim"], scope, c[scope], c["threshold"])
        for c in result["claims"]
        if "pending" not in c
        for scope in ("all", "unseen")
    ]
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(rows), 2) + 1))
    for i, (_, scope, s, threshold) in enumerate(rows):
        y = len(rows) - i
        ax.errorbar(
            s["diff"],
            y,
            xerr=[[s["diff"] - s["ci95"][0]], [s["ci95"][1] - s["diff"]]],
            fmt="o",
            color="C0" if scope == "all" else "C1",
            capsize=3,
        )
        if threshold is not None:
            ax.plot([threshold], [y], marker="|", color="red", markersize=12)
    ax.axvline(0, color="gray", linewidth=1)
    ax.set_yticks([len(rows) - i for i in range(len(rows))], [f"{n} ({s})" for n, s, _, _ in rows], fontsize=7)
    ax.set_xlabel("A − B, points (95% CI over test examples, evaluation seeds and training seeds); red: the paper's claim")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out / "report.png", buf.getvalue())
