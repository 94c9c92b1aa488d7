"""Evaluation at scale: bootstrap CIs, paired comparisons and the power figure, per-example samples,
provenance, Ray workers (identical to in-process) and the commands' refusals."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from raymeta.cli import main
from raymeta.data import DataDir
from raymeta.eval import stats
from raymeta.eval.icl import EvalConfig, LossCache, evaluate_setting, model_fingerprint
from raymeta.eval.metrics import accuracy, macro_f1
from raymeta.eval.on_ray import ModelSource, evaluate_parallel
from raymeta.model.load import load_model
from tests.conftest import make_data_dir, tiny_gpt2, tiny_run_folder


def _record(metric: str, n: int = 30, seeds=("1", "2", "3"), labels: int = 3, seed: int = 0) -> dict:
    rng = random.Random(seed)
    gold = [rng.randrange(labels) for _ in range(n)]
    preds = {s: [g if rng.random() < 0.6 else rng.randrange(labels) for g in gold] for s in seeds}
    f = macro_f1 if metric == "macro_f1" else accuracy
    scores = {s: f([str(p) for p in preds[s]], [str(g) for g in gold]) for s in seeds}
    return {
        "metric": metric,
        "n_test": n,
        "seeds": scores,
        "mean": sum(scores.values()) / len(scores),
        "worst": min(scores.values()),
        "predictions": preds,
        "gold": {s: gold for s in seeds},
    }


@pytest.mark.parametrize("metric", ["macro_f1", "accuracy"])
def test_bootstrap_metric_equals_the_metric_on_resampled_examples(metric):
    """The vectorised replicate (weights = how often each example was drawn) is the protocol's metric
    (MetaICL's macro-F1 over the gold labels present) recomputed on the drawn examples."""
    rec = _record(metric)
    d = stats.draws("t", rec["n_test"], 3, replicates=20)
    m = stats._metric(rec, d.examples)
    rng = np.random.default_rng(1)
    for b in range(20):
        drawn = [i for i in range(rec["n_test"]) for _ in range(int(d.examples[b, i]))]
        rng.shuffle(drawn)
        for j, s in enumerate(rec["seeds"]):
            f = macro_f1 if metric == "macro_f1" else accuracy
            expected = f([str(rec["predictions"][s][i]) for i in drawn], [str(rec["gold"][s][i]) for i in drawn])
            assert m[b, j] == pytest.approx(expected, abs=1e-12)
    ones = stats._metric(rec, np.ones((1, rec["n_test"])))
    assert ones[0] == pytest.approx(list(rec["seeds"].values()), abs=1e-12)


def test_intervals_are_seeded_contain_the_mean_and_narrow_with_more_examples():
    small, large = _record("accuracy", n=20), _record("accuracy", n=400)
    run = {"per_task": {"t": small}}
    ci = stats.summary_ci(run, ["t"])
    assert ci == stats.summary_ci(run, ["t"])  # reproducible
    assert ci[0] <= small["mean"] <= ci[1]
    wide = ci[1] - ci[0]
    big = stats.summary_ci({"per_task": {"t": large}}, ["t"])
    assert big[1] - big[0] < wide / 2


def test_paired_difference_of_a_run_with_itself_is_zero_and_a_clear_gap_is_resolved():
    rec = _record("accuracy", n=200)
    run = {"per_task": {"t": rec}}
    same = stats.paired(run, run, ["t"])
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0] and not same["resolved"]
    better = json.loads(json.dumps(rec))
    for s in better["predictions"]:
        better["predictions"][s] = list(better["gold"][s])  # always right
        better["seeds"][s] = 1.0
    better["mean"] = 1.0
    gap = stats.paired({"per_task": {"t": better}}, run, ["t"])
    assert gap["resolved"] and gap["ci95"][0] > 0 and gap["diff"] == pytest.approx(1 - rec["mean"])


def test_examples_needed_scales_the_example_variance():
    rec = _record("accuracy", n=50, seeds=("1",))  # one seed: no variance from seeds
    run = {"per_task": {"t": rec}}
    p = stats.examples_needed(run, None, ["t"], half_width=0.02)
    assert p["var_seeds"] == 0 and p["n_test_now"] == 50 and p["test_set_scale"] > 1
    target = (0.02 / 1.96) ** 2
    assert p["n_test_needed"] == int(np.ceil(50 * p["var_examples"] / target))
    assert p["n_test_needed"] > 50  # 50 examples leave about ±13 points


def test_paired_over_training_seeds_holds_the_spread_between_runs():
    runs_a = [{"per_task": {"t": _record("accuracy", n=200, seed=i)}} for i in (1, 2, 3)]
    same = stats.paired_over_training_seeds(runs_a, runs_a, ["t"])
    assert same["diff"] == 0 and same["ci95"][0] < 0 < same["ci95"][1]  # the same runs, drawn apart
    assert same["per_seed"]["a"] == [r["per_task"]["t"]["mean"] for r in runs_a]
    one = stats.paired(runs_a[0], runs_a[1], ["t"])
    over = stats.paired_over_training_seeds(runs_a[:1], runs_a[1:2], ["t"])
    assert over["diff"] == pytest.approx(one["diff"]) and over["ci95"] == pytest.approx(one["ci95"])  # one run a side: `paired`
    assert over["t_ci95"] is None
    lo, hi = same["t_ci95"]
    assert lo < 0 < hi and hi == pytest.approx(-lo)  # Welch: symmetric about a zero difference


def test_training_seeds_needed_shrinks_only_the_part_from_the_runs():
    runs_a = [{"per_task": {"t": _record("accuracy", n=200, seed=i)}} for i in (1, 2, 3)]
    runs_b = [{"per_task": {"t": _record("accuracy", n=200, seed=i)}} for i in (4, 5, 6)]
    p = stats.paired_over_training_seeds(runs_a, runs_b, ["t"])
    assert p["var_runs"] > 0 and p["var_common"] > 0
    now = 1.96 * np.sqrt(p["var_runs"] + p["var_common"])  # about the interval's half-width today
    assert stats.training_seeds_needed(p, now * 1.001) == 3  # today's width: today's 3 runs
    narrower = 1.96 * np.sqrt(p["var_runs"] / 2 + p["var_common"])
    assert stats.training_seeds_needed(p, narrower * 1.001) == 6  # half the runs' variance: twice the runs
    assert stats.training_seeds_needed(p, 0.99 * 1.96 * np.sqrt(p["var_common"])) is None  # the examples alone are wider
    one = stats.paired_over_training_seeds(runs_a[:1], runs_b[:1], ["t"])
    assert one["var_runs"] == 0 and one["var_common"] > 0  # one run a side: nothing to draw but examples and seeds


@pytest.fixture(scope="module")
def toy(tmp_path_factory, gpt2_tokenizer):
    return tiny_run_folder(tmp_path_factory.mktemp("toy"), gpt2_tokenizer)


def test_results_carry_intervals_predictions_and_samples(toy, gpt2_tokenizer):
    data = DataDir(toy / "data")
    samples: list = []
    cfg = EvalConfig(k=4, seeds=(100, 13), modes=("icl",))
    res = evaluate_setting(tiny_gpt2(), gpt2_tokenizer, data, data.setting("toy"), cfg, progress=False, samples=samples)
    assert "bootstrap" in res["ci95_method"]
    for run in res["runs"].values():
        lo, hi = run["all"]["ci95"]
        assert lo <= run["all"]["mean"] <= hi and run["unseen_domain"]["ci95"] is not None
        for _task, t in run["per_task"].items():
            assert t["ci95"][0] <= t["mean"] <= t["ci95"][1]
            f = macro_f1 if t["metric"] == "macro_f1" else accuracy
            for seed, score in t["seeds"].items():  # the stored predictions give the stored score
                assert f([str(p) for p in t["predictions"][seed]], [str(g) for g in t["gold"][seed]]) == pytest.approx(score)
    assert len(samples) == 2 * 2 * (6 + 6)  # variants x seeds x (test examples of 2 tasks)
    s = samples[0]
    assert set(s) >= {"run", "task", "seed", "index", "input", "options", "option_losses", "prediction", "gold", "correct"}
    assert s["prediction"] == s["options"][int(np.argmin(s["option_losses"]))]


def test_ray_workers_give_the_in_process_results(toy, gpt2_tokenizer, tmp_path, ray_local):
    """Two Ray workers, each loading the model once, on an embedded local cluster; the loss cache is
    shared by them and the second run is all hits."""
    data = DataDir(toy / "data")
    setting = data.setting("toy")
    cfg = EvalConfig(k=4, seeds=(100, 13))
    model = load_model(str(toy / "model"))
    local = evaluate_setting(model, gpt2_tokenizer, data, setting, cfg, progress=False)
    source = ModelSource(str(toy / "model"), device="cpu")
    kw = {"model_id": model_fingerprint(model), "workers": 2, "cache_dir": tmp_path / "cache", "progress": False}
    remote = evaluate_parallel(source, data, setting, cfg, **kw)
    again = evaluate_parallel(source, data, setting, cfg, **kw)
    assert remote["runs"] == local["runs"]
    assert remote["workers"]["n"] == 2 and not remote["workers"]["joined_cluster"]
    total = remote["loss_cache"]["hits"] + remote["loss_cache"]["misses"]
    assert remote["loss_cache"]["misses"] > 0 and again["loss_cache"] == {"hits": total, "misses": 0}
    assert again["runs"] == local["runs"]
    assert LossCache(tmp_path / "cache").folder.is_dir()


def _eval(toy, out, *extra):
    return main(
        ["eval", "--model", str(toy / "model"), "--data", str(toy / "data"), "--setting", "toy", "--k", "4", "--seeds", "100,13"]
        + ["--no-cache", "--quiet", "--out", str(out), *extra]
    )


def test_eval_compare_and_table_commands(toy, tmp_path, capsys):
    assert _eval(toy, tmp_path / "a", "--log-samples") == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    prov = res["provenance"]
    assert prov["versions"]["torch"] and prov["device"] == "cpu" and prov["command"].startswith("raymeta eval")
    assert "git_commit" in prov and prov["machine"]["cpu_count"]
    assert (tmp_path / "a" / "samples.jsonl").read_text().count("\n") == 4 * 2 * 12
    assert "[" in (tmp_path / "a" / "results.md").read_text()  # intervals in the table
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "a" / "results.json"), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "+0.0 [+0.0, +0.0] | no |" in out and "test examples per task" in out
    c = json.loads((tmp_path / "c.json").read_text())
    assert {r["run"] for r in c["rows"]} == {"direct/zero-shot", "direct/icl", "channel/zero-shot", "channel/icl"}
    assert main(["table", str(tmp_path / "a"), str(tmp_path / "a")]) == 0


def _refusal(capsys, argv) -> str:
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_mismatched_results_are_refused(toy, tmp_path, capsys):
    assert _eval(toy, tmp_path / "a", "--variants", "direct", "--modes", "icl") == 0
    assert _eval(toy, tmp_path / "b", "--variants", "direct", "--modes", "icl", "--max-test-examples", "3") == 0
    err = _refusal(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert "max_test_examples=3" in err
    err = _refusal(capsys, ["table", str(tmp_path / "a"), str(tmp_path / "b")])
    assert "another evaluation protocol" in err
    # the same protocol on other test examples (a changed test file) cannot be paired
    other = make_data_dir(tmp_path / "d2", n_test=6)
    test_file = other / "data" / "sent" / "sent_4_100_test.jsonl"
    rows = [json.loads(x) for x in test_file.read_text().splitlines()]
    rows[0]["input"] = "changed"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["eval", "--model", str(toy / "model"), "--data", str(other), "--setting", "toy", "--k", "4", "--seeds", "100,13"]
    assert main([*argv, "--variants", "direct", "--modes", "icl", "--no-cache", "--quiet", "--out", str(tmp_path / "c")]) == 0
    err = _refusal(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "c")])
    assert "other test examples" in err and "'sent'" in err
    (tmp_path / "bad.json").write_text('{"runs": 3}')
    assert "not a raymeta eval results.json" in _refusal(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "bad.json")])
    assert "not a readable results.json" in _refusal(capsys, ["table", str(tmp_path / "missing")])


def test_bad_worker_arguments_are_refused(toy, tmp_path, capsys, no_ray):  # --address: no session to fall back on
    assert "--workers" in _refusal(capsys, ["eval", "--workers", "0"])
    assert "--gpus-per-worker" in _refusal(capsys, ["eval", "--gpus-per-worker", "-1"])
    err = _refusal(
        capsys,
        ["eval", "--model", str(toy / "model"), "--data", str(toy / "data"), "--setting", "toy", "--k", "4", "--seeds", "100"]
        + ["--workers", "2", "--address", "127.0.0.1:1", "--quiet", "--out", str(tmp_path / "x")],
    )
    assert "--address" in err and "cannot connect" in err
    assert not (tmp_path / "x").exists()
