"""MetaICL layout reading, the BIG-bench builder, and every kind of bad input: one line, exit code 2."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

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


def _break(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.write_text(text)
    return path


BAD_FILES = [
    # (file, content, expected fragment of the one-line message)
    (
        "data/sent/sent_4_100_test.jsonl",
        '{"task": "sent", "input": "x", "output": "positive", "options": ["positive", "negative"]}\n{not json\n',
        "sent_4_100_test.jsonl:2: invalid JSON",
    ),
    (
        "data/sent/sent_4_100_test.jsonl",
        '{"task": "sent", "input": "x", "options": ["positive", "negative"]}\n',
        ":1: missing key 'output'",
    ),
    (
        "data/sent/sent_4_100_test.jsonl",
        '{"task": "sent", "input": "x", "output": "meh", "options": ["positive", "negative"]}\n',
        ":1: 'output' 'meh' is not one of 'options'",
    ),
    (
        "data/sent/sent_4_100_test.jsonl",
        '{"task": "sent", "input": "x", "output": "positive", "options": ["positive"]}\n',
        ":1: a test example needs at least 2 options, got 1",
    ),
    (
        "data/sent/sent_4_100_train.jsonl",
        '{"task": "sent", "input": "x", "output": "positive", "options": ["positive", "negative"]}\n',
        "sent_4_100_train.jsonl: has 1 examples, expected at least k=4",
    ),
    ("data/sent/sent_4_100_test.jsonl", "", "sent_4_100_test.jsonl: no examples (the file is empty)"),
    (
        "data/sent/sent_4_100_test.jsonl",
        '{"task": "other", "input": "x", "output": "a", "options": ["a", "b"]}\n',
        ":1: 'task' is 'other', expected 'sent'",
    ),
    (
        "data/sent/sent_4_100_test.jsonl",
        '{"task": "sent", "input": 3, "output": "a", "options": ["a", "b"]}\n',
        ":1: 'input' must be a string, got int",
    ),
    ("config/toy.json", '{"train": ["train_a"], "test": ["nope"]}', "unknown task 'nope'"),
    (
        "config/toy.json",
        '{"train": ["train_a"], "test": ["sent"], "unseen_domain_test": ["mc"]}',
        "'unseen_domain_test' lists 'mc'",
    ),
    ("config/toy.json", '{"train": ["train_a"],\n "test": [}', "toy.json:2: invalid JSON"),
    (
        "config/tasks/sent.json",
        '{"task_type": "regression"}',
        "'task_type' must be one of classification, multi-choice, free-form",
    ),
]


@pytest.mark.parametrize("rel,content,fragment", BAD_FILES)
def test_bad_data_gives_one_line_and_exit_2(tmp_path, capsys, rel, content, fragment):
    root = make_data_dir(tmp_path / "d", k=4, seeds=(100, 13))
    _break(root, rel, content)
    code, out, err = run_cli(capsys, "data", "check", str(root), "--k", "4", "--seeds", "100,13")
    assert code == 2, err
    assert fragment in err
    assert err.count("\n") == 1 and err.startswith("raymeta: error: ") and "Traceback" not in err


def test_missing_folder_and_unknown_setting(tmp_path, capsys):
    code, _, err = run_cli(capsys, "data", "check", str(tmp_path / "nowhere"))
    assert code == 2 and "data folder not found" in err
    root = make_data_dir(tmp_path / "d")
    code, _, err = run_cli(capsys, "data", "check", str(root), "--setting", "absent")
    assert code == 2 and "unknown setting 'absent'" in err and "(settings in" in err


def test_train_test_overlap_is_warned(tmp_path, capsys):
    root = make_data_dir(tmp_path / "d", k=4, seeds=(100, 13))
    (root / "config" / "toy.json").write_text(json.dumps({"train": ["train_a", "sent"], "test": ["sent", "mc"]}))
    code, _, err = run_cli(capsys, "data", "check", str(root), "--k", "4", "--seeds", "100,13")
    assert code == 0 and "raymeta: warning:" in err and "both meta-train and test tasks: sent" in err


def test_bad_arguments_exit_2_without_traceback(tmp_path):
    for argv in (["eval", "--k", "zero"], ["eval", "--seeds", "a,b"], ["data", "bigbench", "--out", str(tmp_path)], ["nope"]):
        proc = subprocess.run([sys.executable, "-m", "raymeta.cli", *argv], capture_output=True, text=True)
        assert proc.returncode == 2, argv
        assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_eval_refuses_an_unreadable_model_folder(tmp_path, capsys):
    root = make_data_dir(tmp_path / "d")
    (tmp_path / "m").mkdir()
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path / "m"), "--data", str(root), "--setting", "toy", "--k", "4")
    assert code == 2 and "not a Hugging Face model folder" in err
    (tmp_path / "m" / "config.json").write_text("{broken")
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path / "m"), "--data", str(root), "--setting", "toy", "--k", "4")
    assert code == 2 and err.startswith("raymeta: error: --model") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


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
