"""The evaluation protocol on a hand-made data folder and a tiny model: structure, cache, subsampling."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from raymeta.data import DataDir, Example
from raymeta.errors import UserError
from raymeta.eval.icl import EvalConfig, LossCache, evaluate_setting, model_fingerprint
from raymeta.eval.report import markdown_table
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


def _scored(monkeypatch) -> list:
    """Every (max_length, sequence) an OptionScorer is given from now on."""
    from raymeta.eval import icl

    seen: list = []
    real = icl.OptionScorer.score
    monkeypatch.setattr(
        icl.OptionScorer, "score", lambda self, seqs: seen.extend((self.max_length, s) for s in seqs) or real(self, seqs)
    )
    return seen


def test_shared_truncation_fits_every_sequence_and_equals_metaicl_when_nothing_is_cut(tmp_path, gpt2_tokenizer, monkeypatch):
    root = make_data_dir(tmp_path / "d")
    for path in (root / "data").rglob("*.jsonl"):  # inputs of about 12 tokens: 4 demonstrations and a test example pass 64
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "input": " ".join([r["input"]] * 3)}) + "\n" for r in rows))
    data = DataDir(root)
    model = tiny_gpt2()
    base = dict(k=4, seeds=(100, 13), variants=("direct", "channel"), modes=("icl",))

    def run(**kw):  # type: ignore[no-untyped-def]
        seen = _scored(monkeypatch)
        res = evaluate_setting(
            model, gpt2_tokenizer, data, data.setting("toy"), EvalConfig(**base, **kw), cache=None, progress=False
        )
        return res, seen

    # 256 tokens per example: the toy prompts fit whole, and the two rules agree
    exact, seen = run()
    assert seen and not any(s.needs_truncation(n) for n, s in seen)
    shared, seen = run(truncation="shared")
    assert shared["runs"] == exact["runs"]
    # 16 tokens per example (64 in all): MetaICL's rule cuts sequences one by one; the shared rule scores only
    # sequences that fit, every option of a test example behind the same demonstrations
    exact, seen = run(max_length_per_example=16)
    assert sum(s.needs_truncation(n) for n, s in seen) > len(seen) // 2
    shared, seen = run(max_length_per_example=16, truncation="shared")
    assert seen and not any(s.needs_truncation(n) for n, s in seen)
    assert shared["runs"] != exact["runs"]


def test_shared_truncation_cuts_the_demonstrations_once(gpt2_tokenizer, monkeypatch):
    from raymeta.data.prompts import PromptBuilder, PromptFormat
    from raymeta.eval import icl

    demos = [Example("t", f"word {i} " * 6, "positive", ("positive", "negative")) for i in range(4)]
    tests = [
        Example("t", "short", "positive", ("positive", "negative")),
        Example("t", "a much longer input " * 3, "negative", ("positive", "negative")),
    ]
    builder = PromptBuilder(gpt2_tokenizer, PromptFormat("direct", 64, 64))
    full_prefix = builder.demonstrations(demos)
    assert len(full_prefix) > 64  # the demonstrations alone exceed max_length
    scored: list = []
    real_score = icl.OptionScorer.score
    monkeypatch.setattr(icl.OptionScorer, "score", lambda self, seqs: scored.extend(seqs) or real_score(self, seqs))
    losses = icl._score_task_seed(tiny_gpt2(), builder, demos, tests, EvalConfig(k=4, truncation="shared"), "m", None)
    assert len(losses) == 4 and len(scored) == 4
    prefixes = {s.prefix for s in scored}
    assert len(prefixes) == 1  # one shared, cacheable prefix
    (prefix,) = prefixes
    longest = max(len(s.context) + len(s.target) for s in scored)
    assert len(prefix) + longest == 64 and tuple(full_prefix[-len(prefix) :]) == prefix  # cut from the left, once
    assert not any(s.needs_truncation(64) for s in scored)
    with pytest.raises(UserError, match="^truncation: "):
        EvalConfig(truncation="middle")


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: b"\xff\xfe not utf-8",
        lambda e: b'{"losses": [1.0, ',  # a torn write
        lambda e: json.dumps({**e, "losses": [0.0] * len(e["losses"])}).encode(),  # plausible, wrong
        lambda e: json.dumps({**e, "losses": [float("-inf")] + e["losses"][1:]}).encode(),
        lambda e: json.dumps({**e, "losses": e["losses"][:-1]}).encode(),
        lambda e: json.dumps({"losses": e["losses"]}).encode(),  # no checksum (an older entry)
        lambda e: b"[]",
    ],
    ids=["not-utf8", "torn", "zeros", "-inf", "short", "no-checksum", "not-an-object"],
)
def test_a_bad_cache_entry_is_recomputed_never_trusted(tmp_path, gpt2_tokenizer, damage):
    data = DataDir(make_data_dir(tmp_path / "d"))
    cfg = EvalConfig(k=4, seeds=(100,), variants=("direct",), modes=("icl",))
    model = tiny_gpt2()
    fresh = evaluate_setting(
        model, gpt2_tokenizer, data, data.setting("toy"), cfg, cache=LossCache(tmp_path / "c"), progress=False
    )
    entries = sorted((tmp_path / "c").rglob("*.json"))
    assert len(entries) == 2
    entries[0].write_bytes(damage(json.loads(entries[0].read_text())))
    cache = LossCache(tmp_path / "c")
    again = evaluate_setting(model, gpt2_tokenizer, data, data.setting("toy"), cfg, cache=cache, progress=False)
    assert again["runs"] == fresh["runs"]
    assert (cache.bad, cache.hits, cache.misses) == (1, 1, 1)
    repaired = LossCache(tmp_path / "c")
    evaluate_setting(model, gpt2_tokenizer, data, data.setting("toy"), cfg, cache=repaired, progress=False)
    assert (repaired.bad, repaired.hits) == (0, 2)  # the fresh losses replaced the bad entry
