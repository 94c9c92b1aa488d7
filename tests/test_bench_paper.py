"""bench/paper.py end to end at its smoke size on a tiny model: sweeps pick a learning rate per method on
held-out meta-train tasks, every job's outputs land, the equal-wall-clock budget comes from the measured
step times, a rerun does nothing, and the report's paired differences come from the evaluations."""

from __future__ import annotations

import json

from tests.conftest import make_data_dir, tiny_gpt2


def test_paper_campaign_smoke(tmp_path, gpt2_tokenizer, capsys, ray_local):  # its sweep runs on the shared cluster
    from bench import paper

    tiny_gpt2().save_pretrained(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(tmp_path / "model")
    make_data_dir(tmp_path / "data", k=4, n_train=4)
    args = [
        "--size", "smoke", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"),
        "--setting", "toy", "--setting2", "toy", "--arms", "c2c,c2c-clock,c2c-limited",
        "--methods", "metaicl,maml_en_llm", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    out = tmp_path / "out"
    assert paper.main(["plan", *args]) == 0
    plan = capsys.readouterr().out
    assert "0 of 13 jobs done" in plan and plan.index("sweep-c2c-metaicl") < plan.index("raw-toy-direct") < plan.index(
        "c2c-metaicl-s0"
    )
    (out / "partial" / "raw-toy-direct").mkdir(parents=True)
    (out / "partial" / "raw-toy-direct" / "elapsed.json").write_text('{"seconds": 1000.0}')  # a killed attempt's
    assert paper.main(["run", *args, "--lr", "maml_en_llm=0.01"]) == 0  # MetaICL's is swept
    assert json.loads((out / "progress.json").read_text())["raw-toy-direct"]["seconds"] > 1000  # its time is added
    assert not list((out / "partial").iterdir())  # every job done: no attempt left over
    assert paper.main(["plan", *args]) == 0
    assert "13 of 13 jobs done" in capsys.readouterr().out

    sweep = json.loads((out / "sweeps" / "c2c-metaicl.json").read_text())
    assert [t["lr"] for t in sweep["trials"]] == [1e-3, 1e-2] and sweep["best_lr"] in (1e-3, 1e-2)
    best = max(sweep["trials"], key=lambda t: (t["val_score"], -t["val_loss"]))
    assert sweep["best_lr"] == best["lr"]  # the best validation score on the held-out tasks
    cfg = (tmp_path / "runs" / "c2c-metaicl-s1" / "config.yaml").read_text()
    assert f"lr: {sweep['best_lr']}" in cfg and "seed: 1" in cfg
    assert json.loads((out / "sweeps" / "c2c-maml_en_llm.json").read_text()) == {"given": True, "trials": [], "best_lr": 0.01}
    assert not (tmp_path / "runs" / "c2c-maml_en_llm-s1" / "checkpoints").exists()  # evaluated, then deleted
    curve = (out / "curves" / "c2c-metaicl-s0.jsonl").read_text().splitlines()
    assert len(curve) == 2
    clock = (out / "curves" / "c2c-clock-metaicl-s0.jsonl").read_text().splitlines()
    assert len(clock) >= 2  # at least the equal-step budget
    assert (out / "eval" / "c2c-maml_en_llm-s0+adapt.json").is_file() and (out / "eval" / "c2c-limited-metaicl-s1.json").is_file()

    before = {p: p.stat().st_mtime for p in out.rglob("*.json")}
    assert paper.main(["run", *args]) == 0  # everything done: nothing reruns
    assert {p: p.stat().st_mtime for p in out.rglob("*.json") if p.name != "report.json"} == before

    assert paper.main(["report", *args]) == 0
    report = json.loads((out / "report.json").read_text())
    first = next(c for c in report["claims"] if c["claim"] == "MAML-en-LLM − MetaICL (ICL)")
    means = {}
    for method in ("maml_en_llm", "metaicl"):
        per_seed = []
        for s in (0, 1):
            r = json.loads((out / "eval" / f"c2c-{method}-s{s}.json").read_text())
            tasks = r["unseen_domain_test"]
            per_seed.append(100 * sum(r["runs"]["direct/icl"]["per_task"][t]["mean"] for t in tasks) / len(tasks))
        means[method] = per_seed
    assert first["unseen"]["per_seed_a"] == means["maml_en_llm"] and first["unseen"]["per_seed_b"] == means["metaicl"]
    assert abs(first["unseen"]["diff"] - (sum(means["maml_en_llm"]) - sum(means["metaicl"])) / 2) < 1e-9
    assert first["unseen"]["ci95"][0] <= first["unseen"]["diff"] <= first["unseen"]["ci95"][1]
    # the agreement counts, example by example, where the two methods' saved predictions match
    same = total = 0
    for s in (0, 1):
        runs = [json.loads((out / "eval" / f"c2c-{m}-s{s}.json").read_text())["runs"]["direct/icl"] for m in means]
        for task, a in runs[0]["per_task"].items():
            for eval_seed, pred in a["predictions"].items():
                same += sum(x == y for x, y in zip(pred, runs[1]["per_task"][task]["predictions"][eval_seed], strict=True))
                total += len(pred)
    assert first["agreement"] == {"same": same, "total": total, "fraction": same / total, "training_seeds": [0, 1]}
    # every finished evaluation is listed once per scope, the raw model's first
    rows = report["evaluations"]
    evals = sorted(p.stem for p in (out / "eval").glob("*.json"))
    assert rows[0]["eval"].startswith("raw-") and sorted({r["eval"] for r in rows}) == evals
    row = next(r for r in rows if r["eval"] == "c2c-maml_en_llm-s0" and r["scope"] == "unseen")
    assert abs(row["mean"] - means["maml_en_llm"][0]) < 1e-9 and row["ci95"][0] <= row["mean"] <= row["ci95"][1]
    pending = {c["claim"] for c in report["claims"] if "pending" in c}
    assert "MAML-en-LLM − MetaICL, LoRA" in pending and "MAML-en-LLM − MetaICL, limited data" not in pending
    assert (out / "curves" / "c2c.png").is_file() and (out / "curves" / "c2c-clock.png").is_file()  # every run's curve
    assert (out / "report.png").stat().st_size > 0 and "pending" in (out / "report.md").read_text()
    # what each job cost: every finished job once, in the campaign's order, its minutes from progress.json
    progress = json.loads((out / "progress.json").read_text())
    order = [line.split()[1] for line in plan.splitlines() if line.startswith(("pending", "done"))]
    assert len(order) == 13 and [c["job"] for c in report["cost"]] == [n for n in order if n in progress]
    assert all(abs(c["minutes"] - progress[c["job"]]["seconds"] / 60) < 1e-9 for c in report["cost"])
    assert "| raw-toy-direct |" in (out / "report.md").read_text()


def test_paper_plan_runs_each_sweep_just_before_the_first_arm_that_needs_it(tmp_path, capsys):
    from bench import paper

    args = ["--arms", "c2c,h2l,c2c-lora", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    assert paper.main(["plan", *args]) == 0
    names = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("pending")]
    assert names[:4] == [f"sweep-c2c-{m}" for m in paper.METHODS]  # all four methods train in arm c2c
    lora = names.index("sweep-lora-metaicl")
    assert names[lora : lora + 2] == ["sweep-lora-metaicl", "sweep-lora-maml_en_llm"]
    assert names.index("h2l-maml_en_llm-s2") < lora < names.index("c2c-lora-metaicl-s0")  # a cut campaign ran h2l
    assert not (tmp_path / "out").exists()  # a plan writes nothing


def test_paper_verdict_follows_the_protocol():
    from bench.paper_report import verdict

    def p(diff, lo, hi, var_runs=1e-4, var_common=2e-5):  # points in, fractions out, as paired_over_training_seeds
        return {
            "diff": diff / 100,
            "ci95": [lo / 100, hi / 100],
            "per_seed": {"a": [0] * 3},
            "var_runs": var_runs,
            "var_common": var_common,
        }

    assert verdict(p(2.5, 0.3, 4.7), 2.0) == ("holds", "")  # reaches the margin, excludes 0
    assert verdict(p(0.7, -1.4, 2.9), 4.0) == ("refuted", "")  # the whole interval below the margin
    # unresolved below the margin: the interval has to narrow to ±1.8 points: 3 * 1e-4 / ((0.018 / 1.96)^2 - 2e-5) = 4.7
    assert verdict(p(0.2, -2.1, 2.6), 2.0) == ("unresolved", "about 5 training seeds a side to refute")
    assert verdict(p(3.0, -1.0, 7.0), 2.0) == ("unresolved", "about 3 training seeds a side to hold")  # ±3: 3 * 1e-4 / 2.1e-4
    assert verdict(p(0.2, -2.1, 2.6, var_common=1e-4), 2.0) == ("unresolved", "more test examples, not seeds, to refute")
    assert verdict(p(-0.0, -1.4, 1.4), None)[0] == "no difference resolved (A − B within ±1.4)"
    assert verdict(p(-2.0, -3.0, -1.0), None)[0] == "differs"


def test_paper_clock_keeps_the_time_of_killed_attempts(tmp_path, capsys):
    """A job cut by a session's end and finished by a later one records its whole time: each attempt's
    time is written every so often under partial/ (committed with the results), added by the next attempt,
    and shown by plan."""
    import argparse
    import time

    import pytest
    import torch

    from bench import paper
    from raymeta.infra.provenance import cpu_model_and_flags

    runs, out = tmp_path / "runs", tmp_path / "out"
    args = ["--arms", "c2c", "--methods", "metaicl", "--runs", str(runs), "--out", str(out)]
    path = out / "partial" / "c2c-metaicl-s0" / "elapsed.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"seconds": 1200.0, "cpus": ["Other CPU: avx2 fma"]}))  # an attempt killed after 20 min
    assert paper.main(["plan", *args]) == 0
    assert "pending  c2c-metaicl-s0  (20 min spent so far)" in capsys.readouterr().out
    fields = dict(size="cpu", model="builtin", data=None, setting="bb_class_to_class", setting2="bb_hr_to_lr", lr=None)
    campaign = paper.Campaign(argparse.Namespace(**fields, arms="c2c", methods="metaicl", runs=str(runs), out=str(out)))
    job = next(j for j in campaign.jobs() if j.name == "c2c-metaicl-s0")
    with pytest.raises(RuntimeError, match="killed"), campaign._clock(job, every=0.05):
        time.sleep(0.3)
        assert 1200.0 < json.loads(path.read_text())["seconds"] < 1201.0  # the heartbeat wrote it meanwhile
        raise RuntimeError("killed")
    assert json.loads(path.read_text())["seconds"] >= 1200.3  # a failed attempt keeps its time for the next
    with campaign._clock(job) as spent:
        pass
    assert spent() >= 1200.3 and not path.parent.exists()  # done: the whole time, and the job's partial/ goes
    done = json.loads((out / "progress.json").read_text())["c2c-metaicl-s0"]
    assert done["seconds"] >= 1200.3 and done["cpus"][0] == "Other CPU: avx2 fma" and len(done["cpus"]) == 2
    assert done["cpus"][1].startswith(f"{cpu_model_and_flags()['cpu_model']}: ")  # and this machine's,
    assert done["cpus"][1].endswith(f" (kernels {torch.backends.cpu.get_cpu_capability()})")  # with its kernels


def test_paper_pins_cpu_kernels_to_avx2():
    """`python -m bench.paper` pins PyTorch's, MKL's and oneDNN's CPU kernels to AVX2 (keeping a value the user
    set), so a job retrained on another session's machine (AVX-512 or AMX) gets the same weights bit for bit
    and its kept evaluation units still apply."""
    import os
    import platform
    import subprocess
    import sys

    from bench import paper

    env = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    paper.pin_cpu_kernels(env)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert env == {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}  # nothing to pin elsewhere
        return
    assert env == {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    full = {k: v for k, v in os.environ.items() if k not in paper.PINNED_KERNELS}
    paper.pin_cpu_kernels(full)
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    got = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "AVX2"  # every CI and session machine so far has had AVX2


def test_paper_stop_by_judges_a_unit_by_the_longest_of_its_kind(tmp_path, monkeypatch):
    """--stop-by judges the next evaluation unit by the longest unit of its kind (variant, modes, target) seen
    in any attempt, and a kind not seen yet by the longest unit of any kind: a channel evaluation's first
    target took ~21 min a unit, its later ones 3-5, so judging all by the first wasted ~17 min a session."""
    import argparse
    from types import SimpleNamespace

    import pytest

    from bench import paper

    runs, out = tmp_path / "runs", tmp_path / "out"
    fields = dict(size="cpu", model="builtin", data=None, setting="bb_class_to_class", setting2="bb_hr_to_lr", lr=None)
    campaign = paper.Campaign(argparse.Namespace(**fields, arms="c2c", methods="metaicl", runs=str(runs), out=str(out)))
    job = next(j for j in campaign.jobs() if j.name == "raw-bb_class_to_class-direct")
    record = tmp_path / "unit.json"
    record.write_text('{"longest_seconds": 1320.0}')  # an earlier attempt (no kinds recorded): 22 min
    clock = [0.0]
    monkeypatch.setattr(paper.time, "time", lambda: clock[0])
    campaign.stop_by = 1800.0  # 30 min from the start of this attempt
    check = campaign._stop_between_units(job, record)

    def unit(task, seed):
        return SimpleNamespace(variant="channel", modes=("icl",), task=task, seed=seed)

    check(unit("a", 100))  # 22 min of 30 left: runs
    clock[0] = 1200.0  # task a's unit took 20 min
    with pytest.raises(paper.StopBy, match="before channel/icl b seed 100: units take up to 22 min"):
        check(unit("b", 100))  # b not seen yet, judged by the longest of any kind; 10 min are left
    kept = {"longest_seconds": 1320.0, "by_kind": {"channel/icl a": 1200.0}, "scored": [": channel/icl a seed 100"]}
    assert json.loads(record.read_text()) == kept
    clock[0] = 0.0
    check = campaign._stop_between_units(job, record)  # the next attempt
    check(unit("b", 100))
    clock[0] = 240.0  # b took 4 min
    check(unit("b", 13))
    clock[0] = 1500.0  # a third attempt, started 25 min into this clock: 5 min left
    check = campaign._stop_between_units(job, record)
    check(unit("b", 21))  # a b unit takes 4 min: runs (the longest of any kind, 22 min, stopped here)
    clock[0] = 1570.0  # it took 70 s; 3.8 min are left
    with pytest.raises(paper.StopBy, match="before channel/icl b seed 42: units like it take up to 4 min"):
        check(unit("b", 42))
    clock[0] = 1500.0
    check = campaign._stop_between_units(job, record)
    with pytest.raises(paper.StopBy, match="before channel/icl c seed 100: units take up to 22 min"):
        check(unit("c", 100))
    assert json.loads(record.read_text())["by_kind"] == {"channel/icl a": 1200.0, "channel/icl b": 240.0}
    clock[0] = 0.0  # units found in the loss cache (well under a second each) are no measure of their kind
    check = campaign._stop_between_units(job, record)
    check(unit("d", 100))
    clock[0] = 0.3
    check(unit("d", 13))
    clock[0] = 0.6
    check(unit("d", 21))
    assert "channel/icl d" not in json.loads(record.read_text())["by_kind"]
    clock[0], campaign.stop_by = 0.0, 1000.0  # the next attempt: 16.7 min; d is judged by the longest of any
    check = campaign._stop_between_units(job, record)
    with pytest.raises(paper.StopBy, match="before channel/icl d seed 42: units take up to 22 min"):
        check(unit("d", 42))


def test_paper_stop_by_does_not_judge_units_an_earlier_attempt_scored(tmp_path, monkeypatch):
    """Units an earlier attempt finished are in the loss cache and replay in well under a second, so --stop-by
    lets them run whatever is left: judged at their kind's time (15 min), a restart with 10 min left stopped
    before replaying them. Each evaluation of a job keeps its own list (ICL, and ICL after adaptation)."""
    import argparse
    from types import SimpleNamespace

    import pytest

    from bench import paper

    runs, out = tmp_path / "runs", tmp_path / "out"
    fields = dict(size="cpu", model="builtin", data=None, setting="bb_class_to_class", setting2="bb_hr_to_lr", lr=None)
    campaign = paper.Campaign(argparse.Namespace(**fields, arms="c2c", methods="metaicl", runs=str(runs), out=str(out)))
    job = next(j for j in campaign.jobs() if j.name == "c2c-metaicl-s0")
    record = tmp_path / "unit.json"
    clock = [0.0]
    monkeypatch.setattr(paper.time, "time", lambda: clock[0])

    def unit(seed):
        return SimpleNamespace(variant="channel", modes=("icl",), task="a", seed=seed)

    campaign.stop_by = 3600.0
    check = campaign._stop_between_units(job, record, "icl")
    check(unit(100))
    clock[0] = 900.0  # 15 min a unit
    check(unit(13))
    clock[0] = 1800.0
    check(unit(21))  # the session ends while seed 21 is scored: it is not kept as finished
    assert json.loads(record.read_text())["scored"] == ["icl: channel/icl a seed 100", "icl: channel/icl a seed 13"]
    clock[0], campaign.stop_by = 0.0, 600.0  # a restart with 10 min left
    check = campaign._stop_between_units(job, record, "icl")
    check(unit(100))
    clock[0] = 0.2
    check(unit(13))
    clock[0] = 0.4
    with pytest.raises(paper.StopBy, match="before channel/icl a seed 21: units like it take up to 15 min"):
        check(unit(21))
    clock[0] = 0.0
    check = campaign._stop_between_units(job, record, "icl+adapt")  # the same units after adaptation: not scored yet
    with pytest.raises(paper.StopBy, match="before channel/icl a seed 100: units like it take up to 15 min"):
        check(unit(100))


def test_paper_stop_by_judges_a_new_job_by_the_finished_jobs_of_its_arm(tmp_path, monkeypatch):
    """A finished job's unit times stay in progress.json, and a later job of the same arm judges a kind it has
    not timed yet by them: judged by the longest of any kind (a channel evaluation's first target, ~16 min),
    a job's first attempt stopped up to ~15 min early at every session's end. Other arms' times do not count."""
    import argparse
    from types import SimpleNamespace

    import pytest

    from bench import paper

    runs, out = tmp_path / "runs", tmp_path / "out"
    fields = dict(size="cpu", model="builtin", data=None, setting="bb_class_to_class", setting2="bb_hr_to_lr", lr=None)
    ns = argparse.Namespace(**fields, arms="c2c,c2c-channel", methods="metaicl,maml_en_llm", runs=str(runs), out=str(out))
    campaign = paper.Campaign(ns)
    jobs = {j.name: j for j in campaign.jobs()}
    first, second = jobs["c2c-channel-metaicl-s0"], jobs["c2c-channel-maml_en_llm-s0"]
    record = campaign.partial(first) / "unit.json"
    record.parent.mkdir(parents=True)
    times = {"channel/icl a": 960.0, "channel/icl b": 120.0}
    record.write_text(json.dumps({"longest_seconds": 960.0, "by_kind": times}))
    with campaign._clock(first):
        pass  # done: its unit times go to progress.json with its time
    assert json.loads((out / "progress.json").read_text())[first.name]["unit_seconds"] == times
    progress = json.loads((out / "progress.json").read_text())
    progress["c2c-metaicl-s0"] = {"seconds": 60.0, "unit_seconds": {"channel/icl b": 1200.0}}  # another arm
    (out / "progress.json").write_text(json.dumps(progress))

    clock = [0.0]
    monkeypatch.setattr(paper.time, "time", lambda: clock[0])
    campaign.stop_by = 600.0  # 10 min left
    check = campaign._stop_between_units(second, campaign.partial(second) / "unit.json")

    def unit(task, seed):
        return SimpleNamespace(variant="channel", modes=("icl",), task=task, seed=seed)

    check(unit("b", 100))  # 2 min in the first job (20 in another arm's): runs
    with pytest.raises(paper.StopBy, match="before channel/icl a seed 100: units like it take up to 16 min"):
        check(unit("a", 100))
    clock[0] = 0.0
    check = campaign._stop_between_units(second, campaign.partial(second) / "unit.json")
    with pytest.raises(paper.StopBy, match="before channel/icl c seed 100: units take up to 16 min"):
        check(unit("c", 100))  # timed nowhere: the longest of any kind in this arm's jobs


def test_paper_run_stop_by_starts_no_job_that_would_end_after_it(tmp_path, capsys):
    """--stop-by: a job whose estimate (the longest finished run of another seed) ends after the deadline is
    not started, so a session that ends does not kill it half-way; plan shows the estimates; a bad value is
    one argparse line and exit code 2."""
    import time

    import pytest

    from bench import paper

    out = tmp_path / "out"
    out.mkdir()
    (out / "progress.json").write_text(json.dumps({"c2c-metaicl-s0": {"seconds": 1800.0}, "c2c-metaicl-s1": {"seconds": 600.0}}))
    args = ["--arms", "c2c,h2l", "--methods", "metaicl", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert paper.main(["plan", *args]) == 0
    plan = capsys.readouterr().out
    assert "c2c-metaicl-s2  ~30 min (another seed)" in plan and "h2l-metaicl-s0  ~30 min (c2c, a rough guess)" in plan
    assert "about 3.0 h or more (3 without an estimate)" in plan  # 6 model runs; the sweep and 2 raw evaluations have none
    c2c = [*args[2:], "--arms", "c2c"]  # with the sweep and raw evaluation done, every pending job has an estimate
    made = [p for j in paper.Campaign(paper.parser().parse_args(["plan", *c2c])).jobs() if j.kind != "model" for p in j.outputs]
    for path in made:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    assert paper.main(["plan", *c2c]) == 0
    assert capsys.readouterr().out.endswith("2 of 5 jobs done; the pending ones take about 1.5 h\n")
    for path in made:
        path.unlink()
    assert paper.main(["run", *args, "--only", "c2c-metaicl-s2", "--stop-by", "29m"]) == 0
    assert "stopping before c2c-metaicl-s2: it takes about 30 min, 29 min are left" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # nothing started
    started = []  # --start-long starts it anyway (here with the training and evaluation left out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(paper.Campaign, "run", lambda self, job: started.append(job.name))
        assert paper.main(["run", *args, "--only", "c2c-metaicl-s2", "--stop-by", "29m", "--start-long"]) == 0
    assert started == ["c2c-metaicl-s2"]
    assert "c2c-metaicl-s2: takes about 30 min, 29 min are left; --start-long" in capsys.readouterr().out
    # a job that earlier attempts spent 20 of its 30 min on: only the 10 left count, in run and in plan
    partial = out / "partial" / "c2c-metaicl-s2"
    partial.mkdir(parents=True)
    (partial / "elapsed.json").write_text(json.dumps({"seconds": 1200.0}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(paper.Campaign, "run", lambda self, job: started.append(job.name))
        assert paper.main(["run", *args, "--only", "c2c-metaicl-s2", "--stop-by", "12m"]) == 0
        assert started == ["c2c-metaicl-s2"] * 2
        assert paper.main(["run", *args, "--only", "c2c-metaicl-s2", "--stop-by", "9m"]) == 0
    assert "stopping before c2c-metaicl-s2: it takes about 30 min (10 more), 9 min are left" in capsys.readouterr().out
    assert paper.main(["plan", *args]) == 0
    plan = capsys.readouterr().out
    assert "c2c-metaicl-s2  ~30 min (another seed)  (20 min spent so far)" in plan and "about 2.7 h or more" in plan
    (partial / "elapsed.json").unlink()
    with pytest.raises(SystemExit) as exit_:
        paper.main(["run", *args, "--start-long"])
    assert exit_.value.code == 2 and "--start-long needs --stop-by" in capsys.readouterr().err
    # another arm's method with no run yet: c2c's, scaled by how this arm's other method compares with c2c's
    seconds = {"c2c-metaicl-s0": 1800, "c2c-maml_en_llm-s0": 3600, "h2l-metaicl-s0": 1200}
    (out / "progress.json").write_text(json.dumps({k: {"seconds": v} for k, v in seconds.items()}))
    assert paper.main(["plan", *args[:2], "--methods", "metaicl,maml_en_llm", *args[4:]]) == 0
    assert "h2l-maml_en_llm-s0  ~40 min (c2c scaled by this arm's metaicl)" in capsys.readouterr().out
    # a channel arm with no run yet: no estimate before the raw model's channel evaluation has run (hours more
    # than a direct one here), then c2c's plus how much longer that took than the direct one
    assert paper.main(["plan", "--arms", "c2c,c2c-channel", "--methods", "metaicl,maml_en_llm", *args[4:]]) == 0
    assert "pending  c2c-channel-maml_en_llm-s0\n" in capsys.readouterr().out
    assert paper.main(["plan", "--arms", "c2c-channel", "--methods", "metaicl,maml_en_llm", *args[4:]]) == 0
    assert capsys.readouterr().out.endswith("0 of 9 jobs done; none of the 9 pending has an estimate yet\n")
    seconds |= {"raw-bb_class_to_class-direct": 600, "raw-bb_class_to_class-channel": 6600}
    (out / "progress.json").write_text(json.dumps({k: {"seconds": v} for k, v in seconds.items()}))
    assert paper.main(["plan", "--arms", "c2c,c2c-channel", "--methods", "metaicl,maml_en_llm", *args[4:]]) == 0
    plan = capsys.readouterr().out
    assert "c2c-channel-maml_en_llm-s0  ~160 min (c2c plus the raw channel evaluation's extra time)" in plan
    # once the channel arm's MetaICL has run: its time plus c2c's difference (the prompt changes only the
    # evaluation, which a ratio would scale too: 240 min here)
    seconds["c2c-channel-metaicl-s0"] = 7200
    (out / "progress.json").write_text(json.dumps({k: {"seconds": v} for k, v in seconds.items()}))
    assert paper.main(["plan", "--arms", "c2c,c2c-channel", "--methods", "metaicl,maml_en_llm", *args[4:]]) == 0
    assert "c2c-channel-maml_en_llm-s0  ~150 min (this arm's metaicl plus c2c's difference)" in capsys.readouterr().out

    assert abs(paper._deadline("1h2m3s") - time.time() - 3723) < 5 and abs(paper._deadline("90m") - time.time() - 5400) < 5
    for bad in ("25:00", "2 hours", ""):
        with pytest.raises(SystemExit) as exit_:
            paper.main(["run", *args, "--stop-by", bad])
        assert exit_.value.code == 2
    assert "--stop-by" in capsys.readouterr().err


def test_paper_evaluation_stops_between_units_and_keeps_them(tmp_path, gpt2_tokenizer, capsys, monkeypatch):
    """An evaluation cut between units (--stop-by, or a session's end) keeps its finished units' losses under
    partial/<job>/ with the results, so a rerun, even after ~/.cache and runs/ are wiped, scores only the rest
    and gets the same numbers; --stop-by stops before a unit as long as the longest one seen in any attempt
    (of its kind, else of any)."""
    import shutil

    from bench import paper
    from raymeta.eval.cache import LossCache

    tiny_gpt2().save_pretrained(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(tmp_path / "model")
    make_data_dir(tmp_path / "data", k=4)
    out, runs = tmp_path / "out", tmp_path / "runs"
    args = [
        "--size", "smoke", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--setting", "toy",
        "--arms", "c2c", "--methods", "metaicl", "--runs", str(runs), "--out", str(out), "--only", "raw-",
    ]  # fmt: skip
    partial = out / "partial" / "raw-toy-direct"
    partial.mkdir(parents=True)
    (partial / "unit.json").write_text('{"longest_seconds": 7200.0}')  # an earlier attempt's longest unit: 2 h
    assert paper.main(["run", *args, "--stop-by", "1h"]) == 0
    said = capsys.readouterr().out
    assert "stopping raw-toy-direct before direct/zero-shot sent seed 100: units take up to 120 min" in said
    assert not (out / "eval").exists() and (partial / "elapsed.json").is_file()  # nothing half-written

    campaign = paper.Campaign(paper.parser().parse_args(["run", *args]))
    job = next(j for j in campaign.jobs() if j.name == "raw-toy-direct")
    seen = []

    def cut_after_four(unit):  # a session's end after the fourth unit
        seen.append(unit)
        if len(seen) == 5:
            raise paper.StopBy("the session ended")

    campaign._stop_between_units = lambda job, record, evaluation: cut_after_four
    try:
        campaign.run(job)
    except paper.StopBy:
        pass
    # target sent, seeds 100 and 13, zero-shot and ICL: 3 scorings, as both seeds' zero-shot units score the same sequences
    assert campaign.units_kept(job) == 3 and not job.done()
    assert paper.main(["plan", *args]) == 0
    assert "3 scored units kept" in capsys.readouterr().out
    shutil.rmtree(runs, ignore_errors=True)  # a wiped session: only what is committed remains
    hits = []
    real_get = LossCache.get

    def counting_get(self, key, n):
        got = real_get(self, key, n)
        hits.append(got is not None)
        return got

    monkeypatch.setattr(LossCache, "get", counting_get)
    assert paper.main(["run", *args]) == 0
    assert hits[:4] == [True] * 4 and job.done() and not partial.exists()
    fresh = tmp_path / "fresh"
    assert paper.main(["run", *args[:-6], "--runs", str(tmp_path / "runs2"), "--out", str(fresh), "--only", "raw-"]) == 0
    a, b = (json.loads((d / "eval" / "raw-toy-direct.json").read_text())["runs"] for d in (out, fresh))
    assert a == b  # the kept units give the very numbers a run in one go gives
