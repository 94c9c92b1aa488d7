"""What each `raymeta` command does, once `raymeta.cli` has parsed its arguments.

Each command imports what it needs when it runs: `raymeta --help` and bad arguments answer at once,
without loading torch, transformers or Ray.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from raymeta.errors import UserError

__all__ = [
    "cmd_cluster_check",
    "cmd_compare",
    "cmd_data_bigbench",
    "cmd_data_check",
    "cmd_eval",
    "cmd_fetch",
    "cmd_table",
    "cmd_train",
    "cmd_tune",
]


def _quiet_libraries() -> None:
    from raymeta.model.load import quiet_libraries  # deferred: it loads torch

    quiet_libraries()


def cmd_fetch(args: argparse.Namespace) -> int:
    from raymeta.infra import assets

    if args.check:
        return 1 if assets.check() else 0
    _quiet_libraries()
    assets.fetch(args.home, progress=not args.quiet, bigbench_tarball=args.bigbench)
    return 0


def cmd_data_bigbench(args: argparse.Namespace) -> int:
    from raymeta.data import bigbench

    converted = bigbench.build(
        args.tarball, args.tasks, args.out, ks=args.k, seeds=args.seeds, max_test=args.max_test, progress=not args.quiet
    )
    for t in converted:
        note = f", {t.dropped} dropped (no single best option)" if t.dropped else ""
        print(f"{t.name}: {t.task_type}, {len(t.examples)} examples{note}")
    print(f"wrote {len(converted)} task(s) to {args.out}")
    return 0


def cmd_data_import(args: argparse.Namespace) -> int:
    from raymeta.data.importer import ImportSpec, import_task

    spec = ImportSpec(
        task=args.task,
        input=args.input,
        output=args.output,
        options=args.options,
        options_sep=args.options_sep,
        task_type=args.task_type,
        max_classes=args.max_classes,
        split=args.split,
    )
    done = import_task(
        args.sources,
        args.out,
        spec,
        fmt=args.format,
        setting=args.setting,
        role=args.role,
        ks=args.k,
        seeds=args.seeds,
        max_test=args.max_test,
    )
    print(
        f"{args.out}: task {done['task']} ({done['task_type']}, {done['examples']} examples: {done.get('test', 0)} test, "
        f"{done['pool']} in the pool)" + (f", in setting {done['setting']}" if "setting" in done else "")
    )
    if "checked" in done:
        c = done["checked"]
        print(
            f"setting {done['setting']}: OK - {c['train_tasks']} meta-train and {c['test_tasks']} target task(s), "
            f"{c['files']} files"
        )
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from raymeta.data import DataDir

    counts = DataDir(args.dir).check(args.setting, k=args.k, seeds=args.seeds)
    print(
        f"{args.dir}: OK - {counts['settings']} setting(s), {counts['train_tasks']} meta-train and "
        f"{counts['test_tasks']} target task(s), {counts['files']} files, {counts['examples']} examples"
    )
    return 0


def _adaptation(args: argparse.Namespace) -> Any:
    """`--adapt as-trained` (the checkpoint's inner loop) or the explicit `--adapt-*` settings, or None."""
    from raymeta.eval.adapt import AdaptConfig

    if args.adapt is None:
        if not args.adapt_steps:
            given = [f for f, v in (("--adapt-lr", args.adapt_lr), ("--adapt-optimizer", args.adapt_optimizer)) if v is not None]
            if given:
                raise UserError(f"{given[0]} sets explicit adaptation: give --adapt-steps N too", key="--adapt-steps")
            return None
        return AdaptConfig(
            args.adapt_steps, args.adapt_optimizer or "adamw", args.adapt_lr if args.adapt_lr is not None else 1e-5
        )
    if args.adapt != "as-trained":
        raise UserError(f"expected as-trained, got {args.adapt!r} (explicit adaptation: --adapt-steps N)", key="--adapt")
    for flag, value in (("--adapt-lr", args.adapt_lr), ("--adapt-optimizer", args.adapt_optimizer)):
        if value is not None:
            raise UserError(
                f"{flag}: --adapt as-trained takes the checkpoint's inner optimizer and lr; drop {flag}", key="--adapt"
            )
    if args.merge:
        raise UserError("--merge: --adapt as-trained adapts the weights the checkpoint trained (its adapters)", key="--adapt")
    from raymeta.run.api import adaptation_as_trained

    return adaptation_as_trained(args.model, steps=args.adapt_steps or None, root=args.home)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from raymeta.core.device import resolve_device
    from raymeta.data import open_data
    from raymeta.eval.icl import EvalConfig, model_fingerprint
    from raymeta.eval.report import markdown_table, plot_results
    from raymeta.infra.io import atomic_write_json, atomic_write_text
    from raymeta.infra.paths import paths
    from raymeta.infra.provenance import environment
    from raymeta.model.load import load_model

    _quiet_libraries()
    cfg = EvalConfig(
        k=args.k,
        seeds=args.seeds,
        variants=args.variants,
        modes=args.modes,
        max_test_examples=args.max_test_examples,
        newlines=not args.spaces,
        prefix_cache=not args.naive,
        truncation=args.truncation,
        adapt=_adaptation(args),
    )
    data = open_data(args.data, args.home)
    setting = data.setting(args.setting)
    out = args.out or Path("runs") / f"eval-{setting.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder", key="out")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cache_dir = None if args.no_cache else paths(args.home).loss_cache
    samples: list[dict] | None = [] if args.log_samples else None
    started = time.time()
    if args.workers is None:
        from raymeta.run.api import evaluate

        results = evaluate(
            args.model,
            setting=setting.name,
            data=data,
            config=cfg,
            cache=not args.no_cache,
            progress=not args.quiet,
            root=args.home,
            device=str(device),
            dtype=args.dtype,
            base_model=args.base_model,
            merge=args.merge,
            samples=samples,
        )
    else:
        from raymeta.eval.on_ray import ModelSource, evaluate_parallel

        # the driver loads the model on the CPU once, for its fingerprint (the loss cache's key), and lets it go
        model_id = model_fingerprint(
            load_model(args.model, dtype=args.dtype, device="cpu", root=args.home, base_model=args.base_model, merge=args.merge)
        )
        source = ModelSource(
            args.model, args.dtype, args.device, str(args.home) if args.home else None, args.base_model, args.merge
        )
        results = evaluate_parallel(
            source,
            data,
            setting,
            cfg,
            model_id=model_id,
            workers=args.workers,
            address=args.address,
            cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker,
            cache_dir=cache_dir,
            progress=not args.quiet,
            samples=samples,
        )
    results["model"] = args.model
    results["seconds"] = round(time.time() - started, 1)
    results["provenance"] = environment(device)
    results["provenance"]["command"] = shlex.join(["raymeta", *args.argv])
    table = markdown_table(results, title=f"{setting.name} — {args.model}")
    out.mkdir(parents=True, exist_ok=True)
    if samples is not None:
        import json

        atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", table)
    plot_results(results, out / "results.png")
    print(table)
    extra = f", {out / 'samples.jsonl'}" if samples is not None else ""
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}{extra} ({results['seconds']} s)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from raymeta.config import load_config
    from raymeta.run.api import train
    from raymeta.run.curves import all_steps_skipped, metrics_table

    _quiet_libraries()
    cfg = load_config(args.config, args.overrides)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    final = train(
        cfg,
        resume=args.resume,
        progress=not args.quiet,
        root=args.home,
        address=args.address,
        allow_changes=args.allow_changes,
        ray_logs=args.ray_logs,
    )
    print(metrics_table(cfg.run.out))
    if all_steps_skipped(cfg.run.out):
        import warnings

        warnings.warn(
            "every meta-step was skipped (a non-finite loss or meta-gradient), so the checkpoint holds the "
            "starting weights; lower inner.lr / outer.lr or check the data",
            stacklevel=1,
        )
        return 1
    print(f"final checkpoint: {final}  (evaluate it with: raymeta eval --model {final})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from raymeta.infra.storage import is_uri
    from raymeta.run.plots import plot_runs

    out = args.out
    if out is None:
        one_local = len(args.runs) == 1 and not is_uri(str(args.runs[0]))
        out = Path(args.runs[0]) / "curves.png" if one_local else Path("curves.png")
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: expected a .png file", key="out")
    print(f"learning curves: {plot_runs([str(r) for r in args.runs], out, smooth=args.smooth)}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """The resolved config (defaults, then the file, then the overrides), validated, as YAML."""
    import yaml

    from raymeta.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    print(f"# {args.config or 'defaults'}" + (" with " + " ".join(args.overrides) if args.overrides else ""))
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import json

    from raymeta.tune.run import run_sweep
    from raymeta.tune.sweep import load_sweep

    _quiet_libraries()
    sweep = load_sweep(args.sweep, num_samples=args.num_samples, out=args.out)
    summary = run_sweep(sweep, resume=args.resume, address=args.address, root=args.home, verbose=0 if args.quiet else 1)
    print(json.dumps(summary, indent=2))
    print(f"trials: {sweep.out / 'trials.csv'}  plots: {sweep.out}/{{objective,importance,parallel,slice}}.png")
    print(f"live study: optuna-dashboard sqlite:///{(sweep.out / 'study.db').resolve()}")
    if sweep.remote:
        print(f"(a local copy of {sweep.remote}: the trials' runs and the experiment state are there)")
    if summary["best"] is not None:
        print(f"best config: {sweep.out / 'best_config.yaml'}  (run it with: raymeta train {sweep.out / 'best_config.yaml'})")
    return 0


def cmd_cluster_check(args: argparse.Namespace) -> int:
    from raymeta.infra.cluster import Report, check_cluster_file
    from raymeta.infra.io import read_yaml
    from raymeta.infra.kube import check_dockerfile, check_manifest, is_manifest

    docs: dict[Path, Any] = {}
    for path in args.files:  # every file read first: a RayJob may select a RayCluster of a later file
        if not path.name.startswith("Dockerfile"):
            docs[path] = read_yaml(path, "cluster file")
    clusters: dict = {}
    reports: dict[Path, Report] = {}
    firsts = [p for p, d in docs.items() if is_manifest(d) and d.get("kind") == "RayCluster"]
    for path in firsts + [p for p in args.files if p not in firsts]:
        doc = docs.get(path)
        if path.name.startswith("Dockerfile"):
            if not path.is_file():
                raise UserError(f"{path}: Dockerfile not found")
            reports[path] = check_dockerfile(path)
        elif is_manifest(doc):
            reports[path] = check_manifest(doc, path, clusters)  # type: ignore[arg-type]
        else:
            reports[path] = check_cluster_file(path)
    worst = 0
    for path in args.files:
        report = reports[path]
        for line in report.errors:
            print(f"raymeta: error: {path}: {line}", file=sys.stderr)
        for line in report.warnings:
            print(f"raymeta: warning: {path}: {line}", file=sys.stderr)
        if report.errors:
            worst = 2
        else:
            print(f"{path}: OK ({report.summary})")
    return worst


def cmd_table(args: argparse.Namespace) -> int:
    from raymeta.eval.report import comparison_table, load_results

    named = [(path.name if path.is_dir() else path.parent.name, load_results(path)) for path in args.results]
    print(comparison_table(named))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from raymeta.eval.report import compare, compare_table, load_results

    label_a = args.a.name if args.a.is_dir() else args.a.parent.name
    label_b = args.b.name if args.b.is_dir() else args.b.parent.name
    if label_a == label_b:
        label_a, label_b = "A", "B"
    comparison = compare(label_a, load_results(args.a), label_b, load_results(args.b), half_width=args.half_width / 100)
    print(compare_table(comparison))
    if args.json:
        from raymeta.infra.io import atomic_write_json

        atomic_write_json(args.json, comparison)
        print(f"comparison: {args.json}")
    return 0
