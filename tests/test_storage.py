"""Run folders on object storage: a real S3-compatible server (moto, in server mode) on 127.0.0.1.

The endpoint and credentials reach raymeta, pyarrow and Ray's workers only through the standard AWS
environment variables, as they would on a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raymeta.cli import main
from tests.conftest import free_port, tiny_run_folder, tiny_train_overrides, wait_for_port

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port; the AWS variables point at it for this module."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*AWS, "AWS_ENDPOINT_URL"]}
    os.environ.update({**AWS, "AWS_ENDPOINT_URL": endpoint})
    try:
        wait_for_port(port, 60, "moto's S3 server")
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="runs")
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    """One Ray cluster for this module's Ray tests, started once the AWS variables point at the server."""
    from tests.conftest import fresh_shared_ray

    with fresh_shared_ray() as ray:
        yield ray


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gpt2_tokenizer):
    return tiny_run_folder(tmp_path_factory.mktemp("tiny-s3"), gpt2_tokenizer)


def _objects(prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=prefix)
    return sorted(o["Key"][len(prefix) :] for page in pages for o in page.get("Contents", []))


def test_a_run_writes_its_folder_to_s3_resumes_from_there_and_evaluates_from_there(
    s3_server, tiny, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # no local folder may appear here
    uri = "s3://runs/single"
    args = tiny_train_overrides(tiny / "model", tiny / "data", uri, "distributed=false", "steps=2", "checkpoint_every=2")
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    assert main(["train", "--quiet", str(config), *args]) == 0
    stored = _objects("single/")
    assert {"config.yaml", "metrics.jsonl", "checkpoints/step-000002/state.json"} <= set(stored), stored
    assert "checkpoints/step-000002/model/model.safetensors" in stored
    assert "final checkpoint: s3://runs/single/checkpoints/step-000002" in capsys.readouterr().out

    more = [a if not a.startswith("steps=") else "steps=4" for a in args]
    assert main(["train", "--quiet", str(config), *more, "--resume"]) == 0
    from raymeta.infra.storage import RunStore

    store = RunStore(uri)
    steps = [json.loads(line)["step"] for line in store.read_text("metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3, 4]
    assert "checkpoints/step-000004/state.json" in _objects("single/")

    out = tmp_path / "eval"
    code = main(
        ["eval", "--quiet", "--model", f"{uri}/checkpoints/step-000004", "--data", str(tiny / "data"), "--setting", "toy"]
        + ["--k", "4", "--seeds", "100", "--variants", "direct", "--modes", "icl", "--no-cache", "--out", str(out)]
    )
    assert code == 0 and (out / "results.json").is_file()
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())


def test_ray_train_stores_checkpoints_on_s3_and_resumes_from_them(s3_ray, tiny, tmp_path, monkeypatch):
    from raymeta.config import load_config
    from raymeta.run.api import train

    monkeypatch.chdir(tmp_path)
    uri = "s3://runs/ray"
    cfg = load_config(None, tiny_train_overrides(tiny / "model", tiny / "data", uri, "steps=2", "executor=local"))
    assert train(cfg, progress=False) == f"{uri}/checkpoints/step-000002"
    cfg = load_config(None, tiny_train_overrides(tiny / "model", tiny / "data", uri, "steps=4", "executor=local"))
    assert train(cfg, resume=True, progress=False) == f"{uri}/checkpoints/step-000004"
    stored = _objects("ray/")
    assert {"checkpoints/step-000002/state.json", "checkpoints/step-000004/state.json", "placement/rank-0.json"} <= set(stored)
    from raymeta.infra.storage import RunStore

    steps = [json.loads(line)["step"] for line in RunStore(uri).read_text("metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3, 4]
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())


def test_unreachable_or_missing_storage_is_one_line_before_anything(s3_server, tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    args = tiny_train_overrides(tiny / "model", tiny / "data", "s3://no-such-bucket/x", "distributed=false")
    assert main(["train", "--quiet", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raymeta: error: out: s3://no-such-bucket/x: cannot write to this storage") and err.count("\n") == 1
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the real AWS, which this machine cannot reach
    args = tiny_train_overrides(tiny / "model", tiny / "data", "s3://unreachable-bucket/x", "distributed=false")
    assert main(["train", "--quiet", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raymeta: error: out: s3://unreachable-bucket/x: cannot") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # no local `s3:` folder, nothing written
    assert not Path("s3:").exists()


def test_a_sweep_on_s3_keeps_its_trials_and_experiment_there(s3_ray, tmp_path, gpt2_tokenizer, monkeypatch):
    import yaml

    from raymeta.infra.storage import RunStore
    from raymeta.tune import load_sweep, run_sweep

    monkeypatch.setenv("RAYMETA_HOME", str(tmp_path / "home"))  # the sweep's local staging folder
    tiny_run_folder(tmp_path, gpt2_tokenizer, n_train=4)
    spec = {
        "name": "s3sweep",
        "config": {
            **{"model": str(tmp_path / "model"), "data": str(tmp_path / "data"), "setting": "toy", "k": 2},
            **{"tasks_per_step": 2, "max_length": 256, "steps": 2},
            "validation": {"tasks": 1, "every": 1, "k": 2, "test_examples": 6},
        },
        "metric": "val_loss",
        "num_samples": 2,
        "scheduler": {"type": "none"},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "executor": "local"},
        "space": {"outer.lr": {"loguniform": [1.0e-4, 0.3]}},
        "out": "s3://runs/sweep",
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(path)
    summary = run_sweep(sweep, verbose=0)
    assert summary["completed"] == 2
    stored = _objects("sweep/")
    assert {"trials.csv", "best_config.yaml", "study.db", "objective.png"} <= set(stored), stored
    assert any(k.startswith("experiment/") for k in stored)
    trials = {k.split("/")[1] for k in stored if k.startswith("trials/") and k.split("/")[1]}
    assert len(trials) == 2
    for trial in trials:
        store = RunStore(f"s3://runs/sweep/trials/{trial}")
        assert [json.loads(x)["step"] for x in store.read_text("metrics.jsonl").splitlines()] == [1, 2]
        assert store.exists("checkpoints/step-000002/state.json") and store.exists("starts.log")
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())


def test_a_relative_local_run_folder_is_an_absolute_storage_path(tmp_path, monkeypatch):
    """`out=runs/main/x` (as configs/main.yaml has it) reaches Ray Train as an absolute path: pyarrow's
    `FileSystem.from_uri`, which Ray Train's storage calls, refuses a relative one ("URI has empty scheme")."""
    import pyarrow.fs

    from raymeta.infra.storage import RunStore

    monkeypatch.chdir(tmp_path)
    store = RunStore("runs/main/x")
    assert store.uri() == str(tmp_path / "runs" / "main" / "x") and store.uri("a.json") == str(tmp_path / "runs/main/x/a.json")
    fs, path = pyarrow.fs.FileSystem.from_uri(store.uri())
    assert isinstance(fs, pyarrow.fs.LocalFileSystem) and path == str(tmp_path / "runs" / "main" / "x")
    with pytest.raises(pyarrow.ArrowInvalid, match="empty scheme"):
        pyarrow.fs.FileSystem.from_uri("runs/main/x")  # what Ray Train was given before
