"""MetaICL layout reading, the overlap warning and the BIG-bench builder (bad data folders: tests/test_bad_input.py)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from raymeta.cli import main
from raymeta.data import DataDir
from raymeta.data.bigbench import layout_name
from tests.conftest import make_data_dir


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_accepts_a_good_folder_and_reads_arrow(tmp_path, capsys):
    root = make_data_dir(tmp_path / "d", k=4, seeds=(100, 13))
    code, out, _ = run_cli(capsys, "data", "check", str(root), "--k", "4", "--seeds", "100,13")
    assert code == 0 and "OK - 1 setting(s), 2 meta-train and 2 target task(s)" in out
    pool = DataDir(root).pool("train_a")
    assert pool.num_rows == 12 and pool.column_names == ["task", "input", "output", "options"]


def test_train_test_overlap_is_warned(tmp_path, capsys):
    root = make_data_dir(tmp_path / "d", k=4, seeds=(100, 13))
    (root / "config" / "toy.json").write_text(json.dumps({"train": ["train_a", "sent"], "test": ["sent", "mc"]}))
    code, _, err = run_cli(capsys, "data", "check", str(root), "--k", "4", "--seeds", "100,13")
    assert code == 0 and "raymeta: warning:" in err and "both meta-train and test tasks: sent" in err


# --- the BIG-bench builder on a synthetic tarball with BIG-bench's structure ---------------------------------


def _tarball(path: Path, tasks: dict[str, dict]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, content in tasks.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _bb_tasks() -> dict[str, dict]:
    cls = [{"input": f"text {i}", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}} for i in range(60)]
    cls.append({"input": "tie", "target_scores": {"yes": 1, "no": 1}})  # no single best option: dropped, and counted
    mc = [{"input": f"q {i}", "target_scores": {f"a{i}": 1, f"b{i}": 0, f"c{i}": 0}} for i in range(40)]
    gen = [{"input": f"say {i}", "target": [f"word {i}"]} for i in range(30)]
    return {"fam/cls_task": {"examples": cls}, "mc_task": {"examples": mc}, "gen_task": {"examples": gen}}


def test_bigbench_builder_layout_types_and_determinism(tmp_path, capsys):
    tar = _tarball(tmp_path / "bb.tar.gz", _bb_tasks())
    tasks = "fam/cls_task,mc_task,gen_task"
    for out in ("a", "b"):
        code, stdout, err = run_cli(
            capsys,
            "data",
            "bigbench",
            "--tasks",
            tasks,
            "--out",
            str(tmp_path / out),
            "--tarball",
            str(tar),
            "--k",
            "4",
            "--quiet",
        )
        assert code == 0, err
    assert "fam-cls_task: classification, 60 examples, 1 dropped" in stdout
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    d = DataDir(tmp_path / "a")
    assert d.task_meta("fam-cls_task")["task_type"] == "classification" and d.task_meta("fam-cls_task")["options"] == [
        "yes",
        "no",
    ]
    assert d.task_meta("mc_task")["task_type"] == "multi-choice" and d.task_meta("gen_task")["task_type"] == "free-form"
    test = d.test_examples("fam-cls_task", 4, 100)
    demos = {seed: d.demonstrations("fam-cls_task", 4, seed) for seed in (100, 13, 21, 42, 87)}
    assert len(test) == 30 and len(d.pool("fam-cls_task")) == 30
    pool_inputs = set(d.pool("fam-cls_task")["input"])
    assert not {e.input for e in test} & pool_inputs  # test and train portions are disjoint
    assert all({e.input for e in demo} <= pool_inputs for demo in demos.values())
    assert len({tuple(e.input for e in demo) for demo in demos.values()}) == 5  # each seed draws its own demonstrations
    assert all(e.output == ("yes" if int(e.input.split()[1]) % 2 == 0 else "no") for e in test)
    assert not (tmp_path / "a" / "data" / "gen_task" / "gen_task_4_100_test.jsonl").exists()  # free-form: pool only
    assert layout_name("fact_checker/fever") == "fact_checker-fever"


def test_bigbench_unknown_task(tmp_path, capsys):
    tar = _tarball(tmp_path / "bb.tar.gz", _bb_tasks())
    code, _, err = run_cli(
        capsys, "data", "bigbench", "--tasks", "mc_task,nope/sub", "--out", str(tmp_path / "o"), "--tarball", str(tar)
    )
    assert code == 2 and "unknown BIG-bench task 'nope/sub'" in err
    assert not (tmp_path / "o").exists()


def test_missing_builtin_data_says_to_fetch(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", "--home", str(tmp_path / "empty-home"))
    assert code == 2 and err.count("\n") == 1
    assert "the built-in settings are not built yet" in err and "run `raymeta fetch` first" in err
