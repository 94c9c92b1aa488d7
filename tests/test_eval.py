"""The evaluation protocol on a hand-made data folder and a tiny model: structure, cache, subsampling."""

from __future__ import annotations

import copy

import torch

from raymeta.data import DataDir
from raymeta.eval.icl import EvalConfig, LossCache, evaluate_setting, markdown_table, model_fingerprint
from tests.conftest import make_data_dir, tiny_gpt2


def test_protocol_structure_and_cache_hits_give_identical_scores(tmp_path, gpt2_tokenizer):
    data = DataDir(make_data_dir(tmp_path / "d"))
    setting = data.setting("toy")
    cfg = EvalConfig(k=4, seeds=(100, 13))
    model = tiny_gpt2()
    cache = LossCache(tmp_path / "cache")
    fresh = evaluate_setting(model, gpt2_tokenizer, data, setting, cfg, cache=cache, progress=False)
    # zero-shot sees the same test examples for every seed: the second seed's zero-shot runs are cache hits
    assert cache.hits == 2 * 2  # (2 variants) x (2 tasks) x (1 repeated seed)
    first_misses = cache.misses
    again = LossCache(tmp_path / "cache")
    cached = evaluate_setting(model, gpt2_tokenizer, data, setting, cfg, cache=again, progress=False)
    assert again.misses == 0 and again.hits == first_misses + cache.hits
    assert cached["runs"] == fresh["runs"]  # bit-identical scores from the cache
    assert set(fresh["runs"]) == {"direct/zero-shot", "direct/icl", "channel/zero-shot", "channel/icl"}
    run = fresh["runs"]["direct/icl"]
    assert run["per_task"]["sent"]["metric"] == "macro_f1" and run["per_task"]["mc"]["metric"] == "accuracy"
    for task in ("sent", "mc"):
        t = run["per_task"][task]
        assert set(t["seeds"]) == {"100", "13"}
        assert t["worst"] == min(t["seeds"].values()) and abs(t["mean"] - sum(t["seeds"].values()) / 2) < 1e-12
    assert run["unseen_domain"]["mean"] == run["per_task"]["mc"]["mean"]
    assert abs(run["all"]["mean"] - (run["per_task"]["sent"]["mean"] + run["per_task"]["mc"]["mean"]) / 2) < 1e-12
    assert "| direct/icl |" in markdown_table(fresh)


def test_cache_misses_when_a_weight_changes(tmp_path, gpt2_tokenizer):
    data = DataDir(make_data_dir(tmp_path / "d"))
    cfg = EvalConfig(k=4, seeds=(100,), variants=("direct",), modes=("icl",))
    model = tiny_gpt2()
    cache = LossCache(tmp_path / "cache")
    evaluate_setting(model, gpt2_tokenizer, data, data.setting("toy"), cfg, cache=cache, progress=False)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1e-3
    assert model_fingerprint(other) != model_fingerprint(model)
    cache2 = LossCache(tmp_path / "cache")
    evaluate_setting(other, gpt2_tokenizer, data, data.setting("toy"), cfg, cache=cache2, progress=False)
    assert cache2.hits == 0


def test_subsample_is_seeded_and_shared_across_seeds(tmp_path, gpt2_tokenizer):
    data = DataDir(make_data_dir(tmp_path / "d", n_test=8))
    cfg = EvalConfig(k=4, seeds=(100, 13), variants=("direct",), modes=("zero-shot",), max_test_examples=3)
    res = evaluate_setting(tiny_gpt2(), gpt2_tokenizer, data, data.setting("toy"), cfg, cache=None, progress=False)
    t = res["runs"]["direct/zero-shot"]["per_task"]["sent"]
    assert t["n_test"] == 3
    assert t["seeds"]["100"] == t["seeds"]["13"]  # zero-shot on the same subset: same score for every seed
