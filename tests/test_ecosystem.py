"""The ecosystem around a run: tracking (TensorBoard, MLflow), `config show`, `plot`, `data import` and hub ids.

No network: MLflow writes a SQLite store in the run folder, hub ids resolve from a hub-cache layout
built here with $HF_HUB_OFFLINE set, the importer reads a real task of the built-in data.
"""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
import yaml

from raymeta.cli import main
from raymeta.config import load_config, to_dict
from raymeta.run.api import train
from tests.conftest import tiny_run_folder, tiny_train_overrides


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """What TensorBoard shows from the event files in `folder`: tag -> {step: value}, a file's purge
    (a session START at step s, written by a resumed run) dropping the steps >= s logged before it."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                for curve in out.values():
                    for step in [s for s in curve if s >= event.step]:
                        del curve[step]
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, gpt2_tokenizer):
    return tiny_run_folder(tmp_path_factory.mktemp("tiny"), gpt2_tokenizer, n_train=3)


def _cfg(root: Path, out: str, *extra: str):
    return load_config(None, tiny_train_overrides(root / "model", root / "data", root / out, "distributed=false", *extra))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_logs_the_metrics_and_a_resumed_run_purges_what_it_redoes(tiny_folder):
    out = tiny_folder / "tb"
    train(
        _cfg(tiny_folder, "tb", "steps=4", "tracking=tensorboard", "validation.tasks=1", "validation.test_examples=4"),
        progress=False,
    )
    first = scalars(out / "tensorboard")
    assert set(first["meta_loss"]) == {1, 2, 3, 4} and set(first["val_score"]) == {4}
    # a run killed after step 4 but before its checkpoint: resumed from step 2, it redoes 3 and 4
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-000004")
    train(
        _cfg(tiny_folder, "tb", "steps=4", "tracking=tensorboard", "validation.tasks=1", "validation.test_examples=4"),
        resume=True,
        progress=False,
    )
    seen = scalars(out / "tensorboard")
    for key in ("meta_loss", "support_loss", "grad_norm", "tokens_per_s"):
        assert seen[key] == {m["step"]: pytest.approx(m[key]) for m in _metrics(out)}, key
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_mlflow_logs_params_and_metrics_and_a_resumed_run_continues_the_same_mlflow_run(tiny_folder):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tiny_folder / "ml"
    train(_cfg(tiny_folder, "ml", "steps=2", "tracking=mlflow", "tracking_experiment=tiny"), progress=False)
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    train(_cfg(tiny_folder, "ml", "steps=3", "tracking=mlflow", "tracking_experiment=tiny"), resume=True, progress=False)
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "ml"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    assert run.data.params["inner.lr"] == "0.001" and run.data.params["method"] == "maml_en_llm"
    history = {m.step: m.value for m in client.get_metric_history(run_id, "meta_loss")}
    assert history == {m["step"]: pytest.approx(m["meta_loss"]) for m in _metrics(out)}
    assert len(client.search_runs([run.info.experiment_id])) == 1


def _crash(rank: int, record: dict) -> None:
    raise RuntimeError("the run broke at step 1")


def test_a_crashed_run_is_failed_in_mlflow_not_finished(tiny_folder):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tiny_folder / "ml-crash"
    with pytest.raises(RuntimeError, match="broke"):
        train(_cfg(tiny_folder, "ml-crash", "steps=2", "tracking=mlflow"), progress=False, after_step=_crash)
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").get_run(run_id).info.status == "FAILED"


def test_mlflow_store_on_object_storage_needs_a_tracking_uri(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tmp_path / "c.yaml"
    config.write_text("tracking: mlflow\nout: s3://bucket/run\n")
    assert main(["train", str(config)]) == 2  # refused before it reaches for the bucket
    assert capsys.readouterr().err == (
        "raymeta: error: tracking_uri: s3://bucket/run: an MLflow store cannot live on object storage; set tracking_uri "
        "(e.g. sqlite:///runs/mlflow.db or http://mlflow-server:5000) or $MLFLOW_TRACKING_URI\n"
    )
    assert main(["config", "show", str(config), "tracking=wandb"]) == 2
    assert (
        capsys.readouterr().err == f"raymeta: error: {config}: tracking: expected one of none, tensorboard, mlflow, got 'wandb'\n"
    )


def test_config_show_prints_the_resolved_config_that_loads_back(tmp_path, capsys):
    assert main(["config", "show", "configs/tiny.yaml", "steps=7", "inner.lr=3e-5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# configs/tiny.yaml with steps=7 inner.lr=3e-5\n")
    shown = tmp_path / "shown.yaml"
    shown.write_text(text)
    again = load_config(shown)
    assert to_dict(again) == to_dict(load_config("configs/tiny.yaml", ["steps=7", "inner.lr=3e-5"]))
    assert again.run.steps == 7 and again.meta.inner.lr == 3e-5 and yaml.safe_load(text)["tracking"] == "none"
    assert main(["config", "show", "configs/tiny.yaml", "inner.lrr=1"]) == 2
    assert "unknown key 'inner.lrr'" in capsys.readouterr().err


def test_plot_draws_several_runs_and_refuses_a_folder_without_metrics(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        lines = [
            {"step": s, "meta_loss": scale / s, "support_loss": scale, "grad_norm": 10.0 * s, "val_score": None}
            for s in (1, 2, 3)
        ]
        lines[-1]["val_score"] = 0.5
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "meta')
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "both.png"), "--smooth", "2"]) == 0
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "curves.png").is_file()
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "none"), "--out", str(tmp_path / "x.png")]) == 2
    assert (
        capsys.readouterr().err
        == f"raymeta: error: run: {tmp_path / 'none' / 'metrics.jsonl'}: not found (expected a run folder of raymeta train)\n"
    )
    assert not (tmp_path / "x.png").exists()
    assert main(["plot", str(tmp_path / "a"), "--out", str(tmp_path / "x.jpg")]) == 2


# --- data import ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows(assets):
    """A real true/false classification task of the built-in data, as rows."""
    task = "pararule_plus"
    path = assets.builtin_data / "data" / task / f"{task}_16384_100_train.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()][:400]


@pytest.mark.assets
def test_import_parquet_csv_and_a_datasets_folder_give_the_same_task(rows, tmp_path, capsys):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"claim": r["input"], "verdict": r["output"], "choices": r["options"]} for r in rows]),
        tmp_path / "f.parquet",
    )
    with (tmp_path / "f.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["claim", "verdict", "choices"])
        w.writerows([r["input"], r["output"], "|".join(r["options"])] for r in rows)
    names = ["false", "true"]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_list([{"text": r["input"], "label": names.index(r["output"])} for r in rows], features=features)
    datasets.DatasetDict({"train": ds.select(range(300)), "validation": ds.select(range(300, 400))}).save_to_disk(
        str(tmp_path / "ds")
    )

    out = tmp_path / "mine"
    common = ["--out", str(out), "--k", "4", "--seeds", "100,13", "--setting", "mine"]
    assert (
        main(
            [
                "data",
                "import",
                str(tmp_path / "f.parquet"),
                "--task",
                "pq",
                "--input",
                "claim",
                "--output",
                "verdict",
                "--options",
                "choices",
                "--role",
                "test",
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "data",
                "import",
                str(tmp_path / "f.csv"),
                "--task",
                "csv",
                "--input",
                "claim",
                "--output",
                "verdict",
                "--options",
                "choices",
                *common,
            ]
        )
        == 0
    )
    assert main(["data", "import", str(tmp_path / "ds"), "--task", "hf", "--input", "text", "--output", "label", *common]) == 0
    assert "setting mine: OK - 2 meta-train and 1 target task(s)" in capsys.readouterr().out
    assert main(["data", "check", str(out), "--k", "4", "--seeds", "100,13"]) == 0

    from raymeta.data import DataDir

    data = DataDir(out)
    original = {(r["input"], r["output"]) for r in rows}
    for task in ("pq", "csv", "hf"):
        meta = data.task_meta(task)
        assert meta["task_type"] == "classification" and sorted(meta["options"]) == names
        pool = data.pool_examples(task)
        test = data.test_examples(task, 4, 100) if task == "pq" else []
        assert {(e.input, e.output) for e in [*pool, *test]} == original  # every row, nothing changed
    assert data.demonstrations("pq", 4, 13) != data.demonstrations("pq", 4, 100)  # one draw per seed ...
    again = tmp_path / "again"
    assert (
        main(
            [
                "data",
                "import",
                str(tmp_path / "f.parquet"),
                "--task",
                "pq",
                "--input",
                "claim",
                "--output",
                "verdict",
                "--options",
                "choices",
                "--out",
                str(again),
                "--role",
                "test",
                "--k",
                "4",
                "--seeds",
                "100,13",
            ]
        )
        == 0
    )
    assert DataDir(again).demonstrations("pq", 4, 13) == data.demonstrations("pq", 4, 13)  # ... and deterministic


def test_import_detects_task_types_and_refuses_bad_rows_before_writing(tmp_path, capsys):
    rows = [{"q": f"question {i}", "a": f"answer {i}", "opts": [f"answer {i}", f"wrong {i}"]} for i in range(40)]
    src = tmp_path / "mc.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert (
        main(
            [
                "data",
                "import",
                str(src),
                "--out",
                str(out),
                "--task",
                "mc",
                "--input",
                "q",
                "--output",
                "a",
                "--options",
                "opts",
                "--k",
                "4",
            ]
        )
        == 0
    )
    assert json.loads((out / "config" / "tasks" / "mc.json").read_text())["task_type"] == "multi-choice"
    assert (
        main(["data", "import", str(src), "--out", str(out), "--task", "gen", "--input", "q", "--output", "a", "--k", "4"]) == 0
    )
    assert json.loads((out / "config" / "tasks" / "gen.json").read_text())["task_type"] == "free-form"  # 40 distinct outputs > 20
    capsys.readouterr()

    bad = tmp_path / "bad.jsonl"
    cases = [
        (
            [{"q": "x", "a": "maybe", "opts": ["yes", "no"]}],
            "bad.jsonl: row 1: output 'maybe' is not one of its options ['yes', 'no']",
        ),
        ([{"q": "x"}], "bad.jsonl: no field 'a' (fields: q)"),
        ([{"q": None, "a": "y"}], "bad.jsonl: row 1: field 'q' is empty"),
    ]
    fresh = tmp_path / "fresh"
    for rows_, message in cases:
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows_))
        flags = ["--options", "opts"] if "opts" in rows_[0] else []
        assert (
            main(["data", "import", str(bad), "--out", str(fresh), "--task", "t", "--input", "q", "--output", "a", *flags]) == 2
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    bad.write_text('{"q": "x", "a": "y"}\n{"q": \n')
    assert main(["data", "import", str(bad), "--out", str(fresh), "--task", "t", "--input", "q", "--output", "a"]) == 2
    assert f"{bad}:2: not a JSON object" in capsys.readouterr().err
    assert main(["data", "import", str(tmp_path / "nope.csv"), "--out", str(fresh), "--task", "t"]) == 2
    assert main(["data", "import", str(src), "--out", str(fresh), "--task", "../t", "--input", "q", "--output", "a"]) == 2
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"q": f"{i}", "a": "yes" if i % 2 else "no"}) + "\n" for i in range(6)))
    assert (
        main(
            ["data", "import", str(small), "--out", str(fresh), "--task", "t", "--input", "q", "--output", "a", "--role", "test"]
        )
        == 2
    )
    assert "too few for a target task" in capsys.readouterr().err
    assert not fresh.exists()  # nothing half-written


# --- hub ids ----------------------------------------------------------------------------------------


def _hub_cache(cache: Path, repo: str, model_dir: Path, commit: str, *, bin_only: bool = False) -> Path:
    """The layout huggingface_hub leaves in its cache after a download: blobs, a snapshot of links, refs/main."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (folder / "blobs").mkdir()
    for f in model_dir.iterdir():
        name = "pytorch_model.bin" if bin_only and f.suffix == ".safetensors" else f.name
        blob = folder / "blobs" / f"{abs(hash((commit, name))):x}"
        blob.write_bytes(f.read_bytes())
        (snap / name).symlink_to(Path("../../blobs") / blob.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snap


def test_hub_ids_resolve_offline_from_the_hub_cache_with_revision_pinning(tiny_folder, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from raymeta.model.load import load_model, load_tokenizer, resolve_model_dir

    cache = tmp_path / "hub"
    main_commit, old_commit = "a" * 40, "b" * 40
    snap = _hub_cache(cache, "someorg/tiny-gpt2", tiny_folder / "model", main_commit)
    old = cache / "models--someorg--tiny-gpt2" / "snapshots" / old_commit
    old.mkdir()
    for f in snap.iterdir():
        (old / f.name).symlink_to(f.resolve())
    _hub_cache(cache, "someorg/pickled", tiny_folder / "model", main_commit, bin_only=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local folder named someorg/

    assert resolve_model_dir("someorg/tiny-gpt2") == snap
    assert resolve_model_dir(f"someorg/tiny-gpt2@{old_commit}") == old  # a pinned commit
    model = load_model("someorg/tiny-gpt2")
    assert sum(p.numel() for p in model.parameters()) > 0 and load_tokenizer("someorg/tiny-gpt2") is not None
    cfg = load_config(
        None, tiny_train_overrides(Path("x"), tiny_folder / "data", tmp_path / "run", "distributed=false", "steps=1")
    )
    cfg.run.model = "someorg/tiny-gpt2"
    assert (train(cfg, progress=False) / "model" / "model.safetensors").is_file()  # a run starts from a hub id

    for spec, message in (
        (
            "someorg/missing",
            "someorg/missing: not a local folder; as a hub id: offline (HF_HUB_OFFLINE=1), and someorg/missing is not in",
        ),
        ("someorg/tiny-gpt2@v9", "someorg/tiny-gpt2@v9: not a local folder; as a hub id: offline"),
        ("someorg/pickled", "someorg/pickled: the hub repository has no safetensors weights (raymeta loads no pickled *.bin)"),
    ):
        assert main(["eval", "--model", spec, "--data", str(tiny_folder / "data"), "--setting", "toy", "--k", "4"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"raymeta: error: --model: {message}") and err.count("\n") == 1, err


def test_sweep_trials_share_one_mlflow_store_named_after_the_sweep(tmp_path, monkeypatch):
    from raymeta.tune.sweep import load_sweep, trial_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "lrs",
                "config": {"tracking": "mlflow", "validation": {"tasks": 2}},
                "metric": "val_score",
                "space": {"outer.lr": {"loguniform": [1e-5, 1e-3]}},
                "out": str(tmp_path / "sweep"),
            }
        )
    )
    sweep = load_sweep(path)
    cfg = trial_config(sweep, {"outer.lr": 1e-4}, tmp_path / "sweep" / "trials" / "t1")
    assert cfg.run.tracking_uri == f"sqlite:///{(tmp_path / 'sweep').resolve() / 'mlflow.db'}"
    assert cfg.run.tracking_experiment == "lrs"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # the user's own server wins
    assert trial_config(sweep, {"outer.lr": 1e-4}, tmp_path / "t2").run.tracking_uri is None
