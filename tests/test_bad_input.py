"""Bad input, table-driven: every case is one line on stderr naming the file, line, key or flag and what
was expected, exit code 2, no traceback, and nothing half-written (no run or output folder left behind).

Each case builds its input in a fresh folder from a shared tiny model and data folder, runs one
`raymeta` command and checks the error line for a fragment."""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from raymeta.cli import main
from raymeta.errors import MAX_LINE
from tests.conftest import tiny_run_folder, tiny_train_overrides


@pytest.fixture(scope="module")
def base(tmp_path_factory, gpt2_tokenizer) -> Path:
    return tiny_run_folder(tmp_path_factory.mktemp("bad-input"), gpt2_tokenizer)


Case = Callable[[Path, Path], list[str]]  # (a fresh folder, the shared tiny folder) -> argv


def _train(config_text: str | bytes, *extra: str) -> Case:
    """`raymeta train CONFIG` on the tiny model and data, the config holding `config_text`."""

    def case(tmp: Path, base: Path) -> list[str]:
        config = tmp / "c.yaml"
        config.write_bytes(config_text if isinstance(config_text, bytes) else config_text.encode())
        args = tiny_train_overrides(base / "model", base / "data", tmp / "run", "distributed=false", "steps=1")
        return ["train", "--quiet", str(config), *args, *extra]

    return case


def _data(edit: Callable[[Path], None], *check: str) -> Case:
    """`raymeta data check` on a copy of the tiny data folder after `edit(copy)`."""

    def case(tmp: Path, base: Path) -> list[str]:
        shutil.copytree(base / "data", tmp / "data")
        edit(tmp / "data")
        return ["data", "check", str(tmp / "data"), "--k", "4", "--seeds", "100,13", *check]

    return case


def _eval(*args: str, model: Callable[[Path], None] | None = None) -> Case:
    """`raymeta eval` on the tiny data (and a copy of the tiny model after `model(copy)`)."""

    def case(tmp: Path, base: Path) -> list[str]:
        folder = base / "model"
        if model is not None:
            shutil.copytree(base / "model", tmp / "model")
            model(tmp / "model")
            folder = tmp / "model"
        common = ["eval", "--quiet", "--model", str(folder), "--data", str(base / "data"), "--setting", "toy"]
        return [*common, "--k", "4", "--seeds", "100", "--no-cache", "--out", str(tmp / "out"), *args]

    return case


def _cli(*argv: str) -> Case:
    return lambda tmp, base: list(argv)


def _rows(rel: str, edit: Callable[[list[dict]], None]) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        path = data / rel
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        edit(rows)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    return apply


def _write(rel: str, content: str | bytes) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return apply


def _truncate(rel: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])

    return apply


def _pickle_only(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    # the weights next to an object that only unpickling arbitrary code could read
    torch.save({**load_file(str(folder / "model.safetensors")), "obj": Path("x")}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _set(key: str, value: object) -> Callable[[list[dict]], None]:
    def edit(rows: list[dict]) -> None:
        rows[0][key] = value

    return edit


SEND = "sent/sent_4_100_test.jsonl"
POOL = "train_a/train_a_16384_100_train.jsonl"
# a YAML "billion laughs" under one key: 9^8 ones, anchors defined inline (its repr would be ~130 MB)
BOMB = (
    "steps: [&a [1, 1, 1, 1, 1, 1, 1, 1, 1], "
    + ", ".join(f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefg", "bcdefgh"))
    + "]\n"
)

CASES: dict[str, tuple[Case, str]] = {
    # --- config files and overrides -------------------------------------------------------------
    "inf inner.lr": (_train("inner:\n  lr: .inf\n"), "inner.lr: expected a finite number, got inf"),
    "nan outer.lr": (_train("outer:\n  lr: .nan\n"), "outer.lr: expected a finite number, got nan"),
    "huge outer.lr": (_train("{}\n", "outer.lr=1e300"), "outer.lr: expected a positive number <= 1e+06"),
    "nan eps": (_train("eps: .nan\n"), "eps: expected a finite number"),
    "inf weight_decay": (_train("weight_decay: .inf\n"), "weight_decay: expected a finite number"),
    "nan grad_clip": (_train("grad_clip: .nan\n"), "grad_clip: expected a finite number"),
    "nan in betas": (_train("betas: [0.9, .nan]\n"), "betas: expected a finite number"),
    "nan adapt_lr": (_train("validation:\n  adapt_lr: .nan\n"), "validation.adapt_lr: expected a finite number"),
    "unknown validation.adapt": (
        _train("validation:\n  adapt: both\n"),
        "validation.adapt: expected one of as-trained, explicit",
    ),
    "unknown outer.schedule": (_train("outer:\n  schedule: step\n"), "outer.schedule: expected one of constant, linear, cosine"),
    "warm-up past the run": (_train("steps: 2\nouter:\n  warmup_steps: 3\n"), "outer.warmup_steps: expected at most steps ("),
    "negative inner.grad_clip": (_train("inner:\n  grad_clip: -1\n"), "inner.grad_clip: expected a number >= 0"),
    "inner.betas of one": (_train("inner:\n  betas: [0.9]\n"), "inner.betas: expected a list of 2 numbers"),
    "inf override": (_train("{}\n", "inner.lr=inf"), "inner.lr: expected a finite number"),
    "duplicate key": (_train("k: 2\nsteps: 1\nk: 4\n"), "c.yaml:3: invalid YAML (key 'k' given twice"),
    "second inner block": (_train("inner:\n  lr: 0.1\ninner:\n  steps: 2\n"), "key 'inner' given twice"),
    "duplicate nested key": (_train("inner:\n  lr: 0.1\n  lr: 0.2\n"), "c.yaml:3: invalid YAML (key 'lr' given twice"),
    "not UTF-8": (_train(b"k: 4\nsetting: \xff\xfe\n"), "c.yaml: not UTF-8 text (byte 14)"),
    "bad indentation": (_train("inner:\n  lr: 1\n bad: 2\n"), "c.yaml:3: invalid YAML"),
    "not a mapping": (_train("- 1\n- 2\n"), "expected a mapping of config keys"),
    "unknown key": (_train("lerning_rate: 1\n"), "unknown key 'lerning_rate'"),
    "unknown nested key": (_train("inner:\n  rate: 1\n"), "unknown key 'inner.rate'"),
    "alias bomb echo is capped": (_train(BOMB), "steps: expected an integer, got [[1, 1, 1, 1, 1, 1, ...]"),
    "steps 0": (_train("{}\n", "steps=0"), "steps: expected an integer >= 1, got 0"),
    "k a word": (_train("k: four\n"), "k: expected an integer, got 'four'"),
    "method unknown": (_train("method: maml2\n"), "method"),
    "num_workers 0": (_train("num_workers: 0\n"), "num_workers: expected an integer >= 1"),
    "cpus_per_worker 0": (_train("cpus_per_worker: 0\n"), "cpus_per_worker: expected a positive number of CPUs"),
    "device tpu": (_train("device: tpu\n"), "device"),
    "adapter.r 0": (_train("adapter:\n  type: lora\n  r: 0\n"), "adapter.r: expected an integer >= 1"),
    "setting leaves the data folder": (_train("{}\n", "setting=../../x"), "setting name '../../x': expected a plain name"),
    "override without =": (_train("{}\n", "inner.lr"), "expected key=value"),
    "out is a file": (lambda tmp, base: [*_train("{}\n")(tmp, base), f"out={_a_file(tmp)}"], "exists and is not a folder"),
    "resume with nothing": (_train("{}\n", "--resume"), "--resume: no checkpoint in"),
    "config file missing": (_cli("train", "/nonexistent/c.yaml"), "/nonexistent/c.yaml: config file not found"),
    "method unknown, in full": (
        _train("method: maml\n"),
        "c.yaml: method: expected one of maml_en_llm, fomaml, reptile, metaicl, got 'maml'",
    ),
    "inner.optimizer unknown": (
        _train("inner:\n  optimizer: lion\n"),
        "inner.optimizer: expected one of sgd, adam, adamw, got 'lion'",
    ),
    "negative outer.lr": (
        lambda tmp, base: ["train", "--quiet", str(_write_file(tmp / "c.yaml", b"outer:\n  lr: -0.001\n"))],
        "outer.lr: expected a positive number <= 1e+06 (larger ones overflow the float32 update), got -0.001",
    ),
    "inner.steps 0": (_train("inner:\n  steps: 0\n"), "inner.steps: expected an integer >= 1, got 0"),
    "flat inner_lr": (_train("inner_lr: 0.1\n"), "unknown key 'inner_lr'"),
    "keep_checkpoints -1": (_train("keep_checkpoints: -1\n"), "keep_checkpoints: expected a number >= 0, got -1"),
    "unknown key lists the known ones": (
        _train("inner:\n  momentum: 0.9\n"),
        "unknown key 'inner.momentum' (known: inner.betas, inner.eps, inner.grad_clip, inner.lr, inner.optimizer, inner.steps, "
        "inner.weight_decay)",
    ),
    "tasks_per_step a word": (_train("tasks_per_step: two\n"), "tasks_per_step: expected an integer, got 'two'"),
    "activation_checkpointing 1": (
        _train("activation_checkpointing: 1\n"),
        "activation_checkpointing: expected true or false, got 1",
    ),
    "shared moments with sgd": (
        _train("inner:\n  optimizer: sgd\n"),
        "moment_policy: expected 'none' unless inner.optimizer and outer.optimizer are both adam or adamw",
    ),
    "unclosed list": (_train("method: [unclosed\n"), "c.yaml:2: invalid YAML (expected ',' or ']'"),
    "negative override": (
        _train("{}\n", "inner.lr=-1"),
        "inner.lr: expected a positive number <= 1e+06 (larger ones overflow the float32 update), got -1.0",
    ),
    "override not key=value": (_train("{}\n", "nonsense"), "override 'nonsense': expected key=value"),
    "override outer.optimizer unknown": (
        _train("{}\n", "outer.optimizer=adagrad"),
        "outer.optimizer: expected one of sgd, adam, adamw, got 'adagrad'",
    ),
    "seed -1": (_train("{}\n", "seed=-1"), "seed: expected an integer >= 0, got -1"),
    "max_length_per_example 0": (_train("{}\n", "max_length_per_example=0"), "max_length_per_example: expected an integer >= 1"),
    # --- data folders ---------------------------------------------------------------------------
    "test file not UTF-8": (_data(_write(f"data/{SEND}", b'{"task": "sent", "input": "\xff"}\n')), f"{SEND}:1: not UTF-8 text"),
    "lone surrogate in a pool": (
        _data(_write(f"data/{POOL}", '{"task": "train_a", "input": "\\ud800", "output": "a", "options": []}\n')),
        "'input' holds a lone UTF-16 surrogate",
    ),
    "invalid JSON line": (_data(_write(f"data/{SEND}", '{"task": "sent",\n')), f"{SEND}:1: invalid JSON"),
    "invalid JSON on line 2": (
        _data(
            _write(
                f"data/{SEND}", '{"task": "sent", "input": "x", "output": "positive", "options": ["positive", "negative"]}\n{no\n'
            )
        ),
        f"{SEND}:2: invalid JSON",
    ),
    "missing output": (_data(_rows(f"data/{SEND}", lambda rows: rows[0].pop("output"))), f"{SEND}:1: missing key 'output'"),
    "demonstrations fewer than k": (
        _data(
            _write(
                "data/sent/sent_4_100_train.jsonl",
                '{"task": "sent", "input": "x", "output": "positive", "options": ["positive", "negative"]}\n',
            )
        ),
        "sent_4_100_train.jsonl: has 1 examples, expected at least k=4",
    ),
    "setting file invalid JSON on line 2": (
        _data(_write("config/toy.json", '{"train": ["train_a"],\n "test": [}')),
        "toy.json:2: invalid JSON",
    ),
    "data check of an unknown setting": (
        _cli("data", "check", "DATA", "--setting", "absent"),
        "config/absent.json not found (settings in",
    ),
    "missing key": (_data(_rows(f"data/{SEND}", lambda rows: rows[0].pop("options"))), "missing key 'options'"),
    "output not an option": (_data(_rows(f"data/{SEND}", _set("output", "maybe"))), "'output' 'maybe' is not one of"),
    "one option": (
        _data(_rows(f"data/{SEND}", lambda rows: rows[0].update(options=["positive"], output="positive"))),
        "a test example needs at least 2 options",
    ),
    "task mismatch": (_data(_rows(f"data/{SEND}", _set("task", "other"))), "'task' is 'other', expected 'sent'"),
    "options not strings": (_data(_rows(f"data/{SEND}", _set("options", [1, 2]))), "'options' must be a list of strings"),
    "input not a string": (_data(_rows(f"data/{SEND}", _set("input", 3))), "'input' must be a string"),
    "empty test file": (_data(_write(f"data/{SEND}", "")), "no examples (the file is empty)"),
    "not a JSON object": (_data(_write(f"data/{SEND}", "[1, 2]\n")), "expected a JSON object"),
    "setting file not UTF-8": (_data(_write("config/toy.json", b"\xff{}")), "toy.json: not UTF-8 text"),
    "setting file invalid JSON": (_data(_write("config/toy.json", "{")), "toy.json:1: invalid JSON"),
    "setting lists a path": (
        _data(_write("config/toy.json", json.dumps({"train": ["train_a"], "test": ["../../etc"]}))),
        "task name '../../etc': expected a plain name",
    ),
    "setting without test": (_data(_write("config/toy.json", json.dumps({"train": ["train_a"]}))), "'test' is empty or missing"),
    "unknown task in setting": (
        _data(_write("config/toy.json", json.dumps({"train": ["train_a"], "test": ["nope"]}))),
        "unknown task 'nope'",
    ),
    "unseen not in test": (
        _data(_write("config/toy.json", json.dumps({"train": ["train_a"], "test": ["sent"], "unseen_domain_test": ["mc"]}))),
        "'unseen_domain_test' lists 'mc', which is not in 'test'",
    ),
    "task meta missing": (_data(lambda d: (d / "config" / "tasks" / "sent.json").unlink()), "task metadata for 'sent' not found"),
    "task_type unknown": (_data(_write("config/tasks/sent.json", '{"task_type": "regression"}')), "'task_type' must be one of"),
    "k the data lacks": (_cli("data", "check", "DATA", "--k", "16"), "file not found (this task has k = 4: pass --k 4)"),
    "seed the data lacks": (_cli("data", "check", "DATA", "--k", "4", "--seeds", "7"), "(its k=4 files have seeds 100, 13)"),
    "data folder missing": (_cli("data", "check", "/nonexistent/data"), "/nonexistent/data: data folder not found"),
    "eval setting leaves the folder": (_eval("--setting", "../../x"), "setting name '../../x': expected a plain name"),
    "eval unknown setting": (_eval("--setting", "nope"), "unknown setting 'nope'"),
    # --- command-line flags ---------------------------------------------------------------------
    "eval --workers 0": (_cli("eval", "--workers", "0"), "argument --workers: expected a positive integer, got 0"),
    "eval --k 0": (_cli("eval", "--k", "0"), "argument --k: expected a positive integer"),
    "eval --seeds words": (_cli("eval", "--seeds", "a,b"), "argument --seeds: expected comma-separated integers"),
    "eval --k a word": (_cli("eval", "--k", "zero"), "argument --k: expected a positive integer, got 'zero'"),
    "data bigbench without --tasks": (_cli("data", "bigbench", "--out", "OUT"), "the following arguments are required"),
    "unknown command": (_cli("nope"), "invalid choice: 'nope'"),
    "eval --gpus-per-worker nan": (_cli("eval", "--gpus-per-worker", "nan"), "expected a number >= 0, got nan"),
    "eval --variants unknown": (_eval("--variants", "sideways"), "unknown variant 'sideways'"),
    "eval --modes unknown": (_eval("--modes", "few-shot"), "unknown mode 'few-shot'"),
    "eval --truncation unknown": (_eval("--truncation", "middle"), "--truncation: expected one of metaicl, shared"),
    "eval --dtype unknown": (_eval("--dtype", "float8"), "--dtype: expected one of"),
    "eval --adapt unknown": (_eval("--adapt", "sideways"), "--adapt: expected as-trained, got 'sideways'"),
    "eval --adapt as-trained raw model": (_eval("--adapt", "as-trained"), "not a raymeta checkpoint (no state.json"),
    "eval --adapt as-trained --adapt-lr": (
        _eval("--adapt", "as-trained", "--adapt-lr", "1e-3"),
        "--adapt-lr: --adapt as-trained",
    ),
    "eval --adapt-lr alone": (_eval("--adapt-lr", "1e-3"), "--adapt-lr sets explicit adaptation: give --adapt-steps N"),
    "eval --address unreachable": (_eval("--workers", "2", "--address", "127.0.0.1:9"), "--address: 127.0.0.1:9: cannot connect"),
    "data bigbench --k -1": (
        _cli("data", "bigbench", "--tasks", "x", "--out", "OUT", "--k", "-1"),
        "expected positive integers, got -1",
    ),
    "data bigbench --k 0": (
        _cli("data", "bigbench", "--tasks", "x", "--out", "OUT", "--k", "4,0"),
        "expected positive integers, got 0",
    ),
    "train --threads 0": (_cli("train", "x.yaml", "--threads", "0"), "argument --threads: expected a positive integer"),
    "table of a non-JSON file": (
        lambda tmp, base: ["table", str(_write_file(tmp / "r.json", b"\xff"))],
        "not a readable results.json",
    ),
    "table of a JSON without runs": (
        lambda tmp, base: ["table", str(_write_file(tmp / "r.json", b"{}"))],
        "expected 'setting' and 'runs'",
    ),
    "compare a missing folder": (_cli("compare", "/nonexistent/a", "/nonexistent/b"), "not a readable results.json"),
    # --- model folders --------------------------------------------------------------------------
    "model folder missing": (_eval(model=lambda m: shutil.rmtree(m)), "--model"),
    "empty model folder": (_eval(model=lambda m: [p.unlink() for p in m.iterdir()]), "not a Hugging Face model folder"),
    "truncated weights": (_eval(model=_truncate("model.safetensors")), "cannot load a causal LM"),
    "garbage config.json": (_eval(model=_write("config.json", "{not json")), "--model"),
    "garbage tokenizer file": (_eval(model=_write("tokenizer.json", b"\x00garbage")), "cannot load the tokenizer"),
    "pickle-only weights": (_eval(model=_pickle_only), "cannot load a causal LM"),
}


def _a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("not a folder")
    return tmp / "file"


def _write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _numeric_keys() -> list[str]:
    from raymeta.config import TrainConfig, to_dict

    def flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
        return [kv for k, v in d.items() for kv in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)])]

    return [k for k, v in flat(to_dict(TrainConfig())) if isinstance(v, (int, float)) and not isinstance(v, bool)]


def test_every_numeric_config_key_refuses_nan_inf_and_a_value_below_its_range():
    """Drawn from the config itself, not from the table above: a key added without a range check fails here."""
    from raymeta.config import load_config
    from raymeta.errors import UserError

    keys = _numeric_keys()
    assert {"inner.lr", "outer.lr", "steps", "seed", "max_length_per_example", "validation.seed", "max_failures"} <= set(keys)
    accepted = []
    for key in keys:
        for bad in ("nan", "inf", "-2"):
            try:
                load_config(None, [f"{key}={bad}"]).validate()
            except UserError as e:
                assert key in e.render() or key.rsplit(".", 1)[-1] in e.render(), (key, bad, e.render())
            else:
                accepted.append(f"{key}={bad}")
    assert not accepted, accepted


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(name, base, tmp_path, capsys):
    case, fragment = CASES[name]
    argv = [
        base.as_posix() + "/data" if a == "DATA" else (str(tmp_path / "out") if a == "OUT" else a) for a in case(tmp_path, base)
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if not line.startswith("raymeta: warning:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    assert len(lines[0]) <= MAX_LINE + 40
    for made in ("run", "out"):
        assert made in before or not (tmp_path / made).exists(), f"{made} was written"


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_earlier_checkpoint(base, tmp_path, capsys, monkeypatch):
    """ENOSPC injected into the second checkpoint's optimizer file (the real write path otherwise)."""
    from raymeta.run import checkpoint

    real = checkpoint.save_file
    calls = []

    def full_disk(tensors, filename, *a, **kw):  # type: ignore[no-untyped-def]
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    (tmp_path / "c.yaml").write_text("{}\n")
    args = tiny_train_overrides(
        base / "model", base / "data", tmp_path / "run", "distributed=false", "steps=2", "checkpoint_every=1"
    )
    capsys.readouterr()
    assert main(["train", "--quiet", str(tmp_path / "c.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "optimizer.safetensors" in err
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-000001"]  # the earlier one intact, no temporary folder left
    assert checkpoint.verify_checkpoint(tmp_path / "run" / "checkpoints" / "step-000001") is None


def test_the_real_process_exits_2_with_one_line_and_no_traceback():
    """The table above calls `main` in this process; here once as a user runs it, for the exit status itself."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "raymeta.cli", "eval", "--k", "zero"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "argument --k: expected a positive integer" in proc.stderr
    assert "Traceback" not in proc.stderr
