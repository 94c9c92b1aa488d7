"""bench/quality.py end to end at its smoke size on a tiny model: every method trains at the same
budget, every evaluation lands in the table, and the claims are computed from the table's numbers."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_data_dir, tiny_gpt2


@pytest.fixture
def smoke_args(tmp_path, gpt2_tokenizer) -> list[str]:
    """bench.quality's arguments for the smoke size on a tiny model and a hand-made data folder."""
    tiny_gpt2().save_pretrained(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(tmp_path / "model")
    make_data_dir(tmp_path / "data", k=4, n_train=3)
    return ["--size", "smoke", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--setting", "toy"]


def test_quality_smoke_runs_every_method_and_checks_claims_from_its_own_numbers(tmp_path, smoke_args):
    from bench import quality

    out = tmp_path / "q"
    args = smoke_args
    quality.main([*args, "--out", str(out)])
    result = json.loads((out / "quality.json").read_text())
    models = {(r["model"], r["variant"], r["mode"]) for r in result["rows"]}
    for variant in ("direct", "channel"):
        assert ("raw", variant, "zero-shot") in models and ("raw", variant, "icl") in models
        for m in ("metaicl", "maml_en_llm", "fomaml", "reptile", "metaicl-limited", "maml_en_llm-limited"):
            assert (m, variant, "icl") in models, m
        assert ("maml_en_llm", variant, "icl+adapt") in models and ("metaicl", variant, "icl+adapt") in models
    for method in ("metaicl", "maml_en_llm", "fomaml", "reptile"):  # equal budget: same steps and tasks
        lines = (out / "runs" / method / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2
    assert len(result["claims"]) == 6
    by_key = {(r["model"], r["variant"], r["mode"]): r for r in result["rows"]}
    for c in result["claims"]:
        cand, base = c["claim"].split(" >= ")[0], c["claim"].split(" >= ")[1].split(" + ")[0]
        mode = "icl+adapt" if "adaptation" in c["claim"] else "icl"
        diff = by_key[cand, c["variant"], mode]["unseen_mean"] - by_key[base, c["variant"], mode]["unseen_mean"]
        assert abs(c["difference_points"] - diff) < 1e-9
    assert (out / "quality.md").read_text().startswith("### toy") and (out / "quality.png").stat().st_size > 0
    # a rerun reuses every finished training and evaluation
    before = {p: p.stat().st_mtime for p in (out / "eval").glob("*.json")}
    quality.main([*args, "--out", str(out)])
    assert {p: p.stat().st_mtime for p in (out / "eval").glob("*.json")} == before


def test_quality_overrides_reach_every_run_and_core_only_skips_adaptation_and_limited_data(tmp_path, smoke_args):
    import yaml

    from bench import quality
    from raymeta.errors import UserError

    out = tmp_path / "q"
    args = smoke_args
    sets = ["--set", "inner.lr=0.5", "--set", "outer.lr=0.25"]
    quality.main([*args, "--methods", "metaicl,maml_en_llm", "--core-only", *sets, "--out", str(out)])
    result = json.loads((out / "quality.json").read_text())
    assert {r["model"] for r in result["rows"]} == {"raw", "metaicl", "maml_en_llm"}
    assert {r["mode"] for r in result["rows"] if r["model"] != "raw"} == {"icl"}
    assert result["train"]["inner.lr"] == 0.5 and result["train"]["outer.lr"] == 0.25
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["maml_en_llm", "metaicl"]
    for method in ("metaicl", "maml_en_llm"):
        cfg = yaml.safe_load((out / "runs" / method / "config.yaml").read_text())
        assert cfg["inner"]["lr"] == 0.5 and cfg["outer"]["lr"] == 0.25
    # a cached evaluation of other weights is not reused: it is recomputed for the model at hand
    stale = out / "eval" / "maml_en_llm.json"
    right = json.loads(stale.read_text())["model_fingerprint"]
    stale.write_text((out / "eval" / "metaicl.json").read_text())
    quality.main([*args, "--methods", "metaicl,maml_en_llm", "--core-only", *sets, "--out", str(out)])
    assert json.loads(stale.read_text())["model_fingerprint"] == right
    assert json.loads((out / "quality.json").read_text())["rows"] == result["rows"]

    # the same folder with other settings is refused before any work, naming the keys that differ
    before = {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"runs/metaicl/config.yaml: this run was trained with other settings \(outer.lr\)"):
        quality.main([*args, "--methods", "metaicl,maml_en_llm", "--core-only", "--set", "inner.lr=0.5", "--out", str(out)])
    assert {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file()} == before

    with pytest.raises(UserError, match="--set: unknown key 'inner.lrr'"):
        quality.main([*args, "--set", "inner.lrr=1", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
