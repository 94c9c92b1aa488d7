"""End to end on the real assets: fetch (cached), build a BIG-bench setting, evaluate SmolLM2-135M."""

from __future__ import annotations

import json
import math

import pytest

from raymeta.cli import main

pytestmark = pytest.mark.assets


def test_fetch_is_idempotent_and_verified(assets, capsys):
    manifest = json.loads((assets.smollm2 / "raymeta_manifest.json").read_text())
    assert 2.0 < manifest["sanity_loss"] < 3.2  # PLATFORM.md: about 2.6 on "The capital of France is Paris."
    assert main(["fetch", "--quiet", "--home", str(assets.root)]) == 0
    out = capsys.readouterr().out
    assert "(verified)" in out and "downloads verified (sha256)" in out


def test_smollm2_icl_on_real_bigbench_tasks(assets, tmp_path, capsys):
    data = tmp_path / "data"
    code = main(
        [
            "data",
            "bigbench",
            "--quiet",
            "--home",
            str(assets.root),
            "--out",
            str(data),
            "--k",
            "4",
            "--tasks",
            "intent_recognition,snarks,strategyqa,sports_understanding",
        ]
    )
    assert code == 0
    (data / "config" / "mini.json").write_text(
        json.dumps(
            {
                "train": ["strategyqa", "sports_understanding"],
                "test": ["intent_recognition", "snarks"],
                "unseen_domain_test": ["snarks"],
            }
        )
    )
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
    # 7-way intent recognition: chance macro-F1 is low; in-context examples change the predictions
    assert any(runs[f"{v}/icl"]["per_task"] != runs[f"{v}/zero-shot"]["per_task"] for v in ("direct", "channel"))
    assert runs["direct/icl"]["unseen_domain"]["n_tasks"] == 1
