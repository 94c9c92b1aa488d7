"""End to end on the real assets: fetch (cached), a setting of built-in tasks, evaluate and meta-train SmolLM2-135M."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from raymeta.cli import main

pytestmark = pytest.mark.assets


def _mini(assets, out: Path, setting: dict[str, list[str]]) -> None:
    """A data folder `out` with one setting `mini` of real built-in tasks (linked, not copied)."""
    (out / "data").mkdir(parents=True)
    (out / "config" / "tasks").mkdir(parents=True)
    for task in {t for key in ("train", "test") for t in setting[key]}:
        (out / "data" / task).symlink_to(assets.builtin_data / "data" / task)
        (out / "config" / "tasks" / f"{task}.json").symlink_to(assets.builtin_data / "config" / "tasks" / f"{task}.json")
    (out / "config" / "mini.json").write_text(json.dumps(setting))


def _files(root: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_fetch_is_idempotent_and_verified(assets, tmp_path, capsys):
    from raymeta.infra.assets import _manifest_ok

    manifest = json.loads((assets.smollm2 / "raymeta_manifest.json").read_text())
    assert 2.0 < manifest["sanity_loss"] < 3.2  # PLATFORM.md: about 2.6 on "The capital of France is Paris."
    before = _files(assets.root)
    assert main(["fetch", "--quiet", "--home", str(assets.root)]) == 0
    out = capsys.readouterr().out
    assert "(verified)" in out and "downloads verified (sha256)" in out
    assert _files(assets.root) == before  # a second fetch downloads, converts and rewrites nothing
    # "verified" means the model's files are checked against the digests it recorded: one changed file fails it
    copy = tmp_path / "smollm2"
    copy.mkdir()
    for p in assets.smollm2.iterdir():
        (copy / p.name).hardlink_to(p)
    assert _manifest_ok(copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").unlink()  # a new file, not the linked one
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert not _manifest_ok(copy)


def test_smollm2_icl_on_real_builtin_tasks(assets, tmp_path, capsys):
    data = tmp_path / "data"
    tests = ["vader_tweets", "election_tweets"]
    _mini(assets, data, {"train": ["sarcasm", "crepe"], "test": tests, "unseen_domain_test": ["election_tweets"]})
    assert main(["data", "check", str(data), "--k", "4"]) == 0
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--quiet",
            "--home",
            str(assets.root),
            "--data",
            str(data),
            "--setting",
            "mini",
            "--k",
            "4",
            "--seeds",
            "100,13",
            "--max-test-examples",
            "8",
            "--out",
            str(out),
            "--no-cache",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("### mini") and (out / "results.png").stat().st_size > 1000
    runs = results["runs"]
    for run in runs.values():
        for task in run["per_task"].values():
            assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in task["seeds"].values())
            assert task["n_test"] == 8
    # in-context examples change the predictions
    assert any(runs[f"{v}/icl"]["per_task"] != runs[f"{v}/zero-shot"]["per_task"] for v in ("direct", "channel"))
    assert runs["direct/icl"]["unseen_domain"]["n_tasks"] == 1


def test_second_order_meta_step_on_smollm2(assets, tmp_path):
    """One MAML-en-LLM step (AdamW inner, shared moments) on the real model and real meta-training pools."""
    from transformers import AutoModelForCausalLM

    from raymeta.config import load_config
    from raymeta.run.api import train

    data = tmp_path / "data"
    _mini(assets, data, {"train": ["sarcasm", "crepe"], "test": ["vader_tweets"]})
    cfg = load_config(
        Path("configs/quickstart.yaml"),
        [
            f"data={data}",
            "setting=mini",
            "k=1",
            "steps=1",
            "max_length_per_example=32",
            "max_length=64",
            "distributed=false",
            f"out={tmp_path / 'run'}",
        ],
    )
    final = train(cfg, progress=False, root=assets.root)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["skipped_steps"] == 0 and math.isfinite(record["meta_loss"]) and record["grad_norm"] > 0
    assert 0.5 < record["support_loss"] < 10  # a pretrained LM on real text, not a random one
    reloaded = AutoModelForCausalLM.from_pretrained(final / "model")
    assert reloaded.config.num_hidden_layers == 30
