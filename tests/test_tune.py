"""Ray Tune + Optuna sweeps: a real 4-trial sweep with ASHA on a tiny model, kill-and-resume of the
driver, held-out validation, and bad sweep files (one line, exit 2, before any trial starts).

The suite's shared embedded cluster (2 CPUs, with the dashboard: Ray Train's placement-group cleaner asks
the state API it serves whether a stopped trial's controller is dead; without it, an ASHA-stopped trial's
workers' CPUs leak); the kill test's `raymeta tune` starts its own process group and cluster and kills
only that.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raymeta.config import load_config
from raymeta.errors import UserError
from raymeta.run.api import train
from raymeta.tune import load_sweep, run_sweep
from tests.conftest import make_data_dir, tiny_gpt2


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("tune")
    tiny_gpt2().save_pretrained(root / "model")
    gpt2_tokenizer.save_pretrained(root / "model")
    make_data_dir(root / "data", k=4, n_train=4)
    return root


def _sweep_file(root: Path, name: str, steps: int = 4, **changes) -> Path:
    spec = {
        "name": name,
        "config": {
            "model": str(root / "model"),
            "data": str(root / "data"),
            "setting": "toy",
            "method": "maml_en_llm",
            "k": 2,
            "tasks_per_step": 2,
            "max_length": 256,
            "steps": steps,
            "validation": {"tasks": 1, "every": 1, "k": 2, "test_examples": 6},
            "tracking": "tensorboard",
        },
        "metric": "val_loss",
        "num_samples": 4,
        "max_concurrent_trials": 2,
        "seed": 0,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "executor": "local"},
        "space": {
            "outer.lr": {"loguniform": [1.0e-4, 0.3]},
            "inner.lr": {"loguniform": [1.0e-4, 1.0e-2]},
            "inner.steps": {"int": [1, 2]},
            "inner.optimizer+moment_policy": {"choice": [["sgd", "none"], ["adamw", "shared"]]},
        },
        "out": str(root / "runs" / name),
    }
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_validation_holds_tasks_out_and_reports_scores(tiny_folder, tmp_path):
    root = tiny_folder
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"model={root / 'model'}",
            f"data={root / 'data'}",
            "setting=toy",
            f"out={out}",
            "k=2",
            "max_length=256",
            "steps=2",
            "distributed=false",
            "validation.tasks=2",
            "validation.every=1",
            "validation.k=2",
            "validation.test_examples=6",
            "validation.seeds=2",
        ],
    )
    from raymeta.run.trainer import build_sampler as _sampler

    sampler, held = _sampler(cfg, None)
    assert held is not None
    held_tasks = set(held.setting.test)
    assert len(held_tasks) == 2 and held_tasks <= {"train_a", "train_b", "train_c", "train_d"}
    assert not held_tasks & set(sampler.pools)  # never meta-trained on
    assert not {"sent", "mc"} & held_tasks  # the setting's targets are never validation tasks
    for task in held_tasks:  # demonstrations and test examples are disjoint
        tests = {e.input for e in held.tests[task]}
        assert all(not ({e.input for e in held.demos[task, s]} & tests) for s in held.seeds)
    train(cfg, progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for x in lines:
        assert 0.0 <= x["val_score"] <= 1.0 and math.isfinite(x["val_loss"]) and x["val_loss"] > 0
    assert json.loads((out / "validation.json").read_text())["tasks"] == sorted(held_tasks)


def test_validation_leaves_every_module_in_the_mode_it_found_it(tiny_folder, tmp_path):
    """Validation evaluates in eval mode and then restores each module's own `training` flag: copying the root's
    flag onto every submodule undid per-layer settings (a layer in training mode under an eval-mode root)."""
    from raymeta.model.load import load_model, load_tokenizer
    from raymeta.run.trainer import build_sampler
    from raymeta.run.validation import validate

    root = tiny_folder
    overrides = [f"model={root / 'model'}", f"data={root / 'data'}", "setting=toy", f"out={tmp_path / 'run'}", "k=2"]
    overrides += ["max_length=256", "validation.tasks=1", "validation.k=2", "validation.test_examples=6", "validation.seeds=1"]
    cfg = load_config(None, overrides)
    _, held = build_sampler(cfg, None)
    model, tokenizer = load_model(str(root / "model")), load_tokenizer(str(root / "model"))
    model.eval()
    layer = next(m for m in model.modules() if m is not model and any(True for _ in m.children()))
    layer.train()
    before = {name: m.training for name, m in model.named_modules()}
    assert held is not None and validate(model, tokenizer, held, cfg)["val_loss"] > 0
    assert {name: m.training for name, m in model.named_modules()} == before


def test_sweep_runs_trials_in_the_space_stops_some_early_and_its_best_config_trains(ray_local, tiny_folder):
    root = tiny_folder
    sweep = load_sweep(_sweep_file(root, "s4"))
    summary = run_sweep(sweep, verbose=0)
    assert summary["trials"] == 4 and summary["errors"] == 0
    assert summary["stopped_early"] >= 1, summary  # ASHA cut at least one trial at an early rung

    with (sweep.out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for row in rows:  # every suggestion lies in the declared space
        assert 1e-4 <= float(row["outer.lr"]) <= 0.3
        assert 1e-4 <= float(row["inner.lr"]) <= 1e-2
        assert row["inner.steps"] in ("1", "2")
        assert row["inner.optimizer+moment_policy"] in ("sgd,none", "adamw,shared")
        assert row["status"] in ("completed", "stopped_early")
        trial_cfg = yaml.safe_load((sweep.out / "trials" / row["trial_id"] / "config.yaml").read_text())
        assert trial_cfg["outer"]["lr"] == pytest.approx(float(row["outer.lr"]))
        assert trial_cfg["inner"]["optimizer"] == row["inner.optimizer+moment_policy"].split(",")[0]
        reports = int(row["reports"])
        assert (row["status"] == "completed") == (int(row["step"]) == trial_cfg["steps"] == 4 == reports)
        metrics = [json.loads(x) for x in (sweep.out / "trials" / row["trial_id"] / "metrics.jsonl").read_text().splitlines()]
        assert reports <= len(metrics) <= reports + 1  # a stopped trial really stopped (at most one step in flight)
        assert float(row["val_loss"]) == pytest.approx(metrics[reports - 1]["val_loss"])  # the last report Tune saw
        if row["status"] == "completed":  # a report at every validation, checkpoints on the trial's own schedule
            kept = sorted(p.name for p in (sweep.out / "trials" / row["trial_id"] / "checkpoints").glob("step-*"))
            every = trial_cfg["checkpoint_every"]
            assert kept == [f"step-{s:06d}" for s in range(1, 5) if s % every == 0 or s == 4], (kept, every)

    best = summary["best"]
    completed = [r for r in rows if r["status"] == "completed"]
    assert best["val_loss"] == pytest.approx(min(float(r["val_loss"]) for r in completed))
    for name in ("objective.png", "importance.png", "parallel.png", "slice.png", "study.db", "best_config.yaml"):
        assert (sweep.out / name).is_file() and (sweep.out / name).stat().st_size > 0, name
    from tests.test_ecosystem import scalars

    for row in rows:  # tracking: tensorboard in the base config: every trial's curve, as its metrics.jsonl holds it
        curve = scalars(sweep.out / "trials" / row["trial_id"] / "tensorboard")["meta_loss"]
        metrics = [json.loads(x) for x in (sweep.out / "trials" / row["trial_id"] / "metrics.jsonl").read_text().splitlines()]
        # a trial Tune stopped can be killed with its step in flight logged to metrics.jsonl but not yet flushed to
        # the event file (flushed at each report and checkpoint): then the curve holds every step Tune saw and may lack that one
        kept = metrics if row["status"] == "completed" else metrics[: max(len(curve), int(row["reports"]))]
        assert curve == {m["step"]: pytest.approx(m["meta_loss"]) for m in kept}

    import optuna

    study = optuna.load_study(study_name="s4", storage=f"sqlite:///{sweep.out / 'study.db'}")
    assert len(study.trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)

    cfg = load_config(sweep.out / "best_config.yaml", [f"out={root / 'best-run'}", "steps=2", "distributed=false"])
    assert cfg.meta.outer.lr == pytest.approx(float(best["params"]["outer.lr"]))
    final = train(cfg, progress=False)
    assert (final / "model" / "model.safetensors").is_file()


def test_killed_driver_resumes_without_rerunning_finished_trials(tiny_folder, tmp_path):
    root = tiny_folder
    path = _sweep_file(root, "kill", num_samples=2, max_concurrent_trials=1, scheduler={"type": "none"})
    out = root / "runs" / "kill"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "raymeta.cli", "tune", str(path), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        finished: list[Path] = []
        while time.time() < deadline and proc.poll() is None:
            finished = [p.parent.parent.parent for p in (out / "trials").glob("*/checkpoints/step-000004/state.json")]
            if finished:
                break
            time.sleep(0.5)
        assert finished, "no trial finished before the deadline"
        time.sleep(4)  # the experiment state is saved every second
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = {p.name for p in (out / "trials").glob("*") if (p / "checkpoints" / "step-000004" / "state.json").is_file()}
    assert 0 < len(done_before) < 2  # one trial finished, one left to the resumed driver

    result = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "completed" and r["step"] == "4" for r in rows), rows
    for name in done_before:  # finished trials were not run again
        assert len((out / "trials" / name / "starts.log").read_text().splitlines()) == 1, name


BAD = [
    ({"spce": {}}, "unknown key 'spce'"),
    ({"space": {"inner.lrr": {"loguniform": [1e-5, 1e-3]}}}, "unknown key 'inner.lrr'"),
    ({"space": {"inner.lr": {"loguniform": [1e-3, 1e-5]}}}, "space.inner.lr: loguniform: empty range"),
    ({"space": {"inner.lr": {"log_uniform": [1e-5, 1e-3]}}}, "space.inner.lr: unknown distribution 'log_uniform'"),
    ({"space": {"inner.optimizer": {"choice": []}}}, "space.inner.optimizer: choice: expected a non-empty list"),
    ({"space": {"inner.steps": {"int": [1, "two"]}}}, "space.inner.steps: expected a number"),
    ({"space": {"inner.optimizer+moment_policy": {"choice": [["sgd", "shared"]]}}}, "moment_policy"),
    ({"metric": "accuracy"}, "metric: expected one of val_score"),
    ({"num_samples": 0}, "num_samples: expected an integer >= 1"),
    ({"resources": {"gpus": 1}}, "resources: unknown key 'gpus'"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_sweep_files_fail_in_one_line(tiny_folder, change, message):
    path = _sweep_file(tiny_folder, "bad", **change)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_sweep(path)


def test_sweep_without_validation_tasks_is_refused(tiny_folder):
    spec = yaml.safe_load(_sweep_file(tiny_folder, "noval").read_text())
    spec["config"]["validation"]["tasks"] = 0
    path = tiny_folder / "noval.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match="config.validation.tasks: a sweep needs held-out validation tasks"):
        load_sweep(path)


def test_impossible_resources_fail_before_any_trial(ray_local, tiny_folder):
    sweep = load_sweep(_sweep_file(tiny_folder, "big", resources={"num_workers": 3, "cpus_per_worker": 1.0}))
    with pytest.raises(UserError, match="resources: a trial needs 3.5 CPUs, but the Ray cluster has 2"):
        run_sweep(sweep, verbose=0)
    assert not (sweep.out / "experiment").exists()


def test_cli_bad_sweep_exits_2_with_one_line(tiny_folder, capsys):
    from raymeta.cli import main

    path = _sweep_file(tiny_folder, "badcli", space={"inner.lr": {"loguniform": [0, 1]}})
    capsys.readouterr()
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "space.inner.lr: loguniform: the range must be positive" in err
    assert not (tiny_folder / "runs" / "badcli").exists()


@pytest.mark.parametrize("path", sorted(Path("tune_configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweeps_load_and_their_spaces_fit_the_config(path, tmp_path):
    """Points drawn through Optuna (its corners and 24 random ones) become valid trial configs holding them."""
    import optuna

    from raymeta.config import to_dict
    from raymeta.tune.sweep import trial_config

    def get_key(cfg, dotted: str):  # type: ignore[no-untyped-def]
        value = to_dict(cfg)
        for part in dotted.split("."):
            value = value[part]
        return value

    sweep = load_sweep(path)
    assert sweep.space and sweep.num_samples >= 1
    dists = {p.name: p.distribution() for p in sweep.space}

    def corner(end: int) -> dict:
        return {n: d.choices[end] if hasattr(d, "choices") else (d.low, d.high)[end] for n, d in dists.items()}

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    points = [corner(0), corner(-1), *(study.ask(dists).params for _ in range(24))]
    for n, d in dists.items():  # every choice at least once
        points += [{**corner(0), n: c} for c in getattr(d, "choices", ())]
    for params in points:
        cfg = trial_config(sweep, params, tmp_path / "trial")
        cfg.validate(f"{path} at {params}")
        for p in sweep.space:
            for key, value in p.decode(params[p.name]).items():
                assert get_key(cfg, key) == (pytest.approx(value) if isinstance(value, float) else value), (key, params)
