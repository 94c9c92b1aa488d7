"""Run folders on object storage: a real S3-compatible server (moto, in server mode) on 127.0.0.1.

The endpoint and credentials reach raymeta, pyarrow and Ray's workers only through the standard AWS
environment variables, as they would on a cluster.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raymeta.cli import main
from tests.conftest import make_data_dir, tiny_gpt2, tiny_train_overrides

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port; the AWS variables point at it for this module."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*AWS, "AWS_ENDPOINT_URL"]}
    os.environ.update({**AWS, "AWS_ENDPOINT_URL": endpoint})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("moto's S3 server did not start")
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
def tiny(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("tiny-s3")
    tiny_gpt2().save_pretrained(root / "model")
    gpt2_tokenizer.save_pretrained(root / "model")
    make_data_dir(root / "data", k=4)
    return root


def _objects(prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    listed = s3.list_objects_v2(Bucket="runs", Prefix=prefix)
    return sorted(o["Key"][len(prefix) :] for o in listed.get("Contents", []))


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
    from raymeta.storage import RunStore

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


def test_ray_train_stores_checkpoints_on_s3_and_resumes_from_them(s3_server, tiny, tmp_path, monkeypatch):
    from raymeta.config import load_config
    from raymeta.run.api import train
    from tests.conftest import local_ray

    monkeypatch.chdir(tmp_path)
    uri = "s3://runs/ray"
    with local_ray(dashboard=False):
        cfg = load_config(None, tiny_train_overrides(tiny / "model", tiny / "data", uri, "steps=2", "executor=local"))
        assert train(cfg, progress=False) == f"{uri}/checkpoints/step-000002"
        cfg = load_config(None, tiny_train_overrides(tiny / "model", tiny / "data", uri, "steps=4", "executor=local"))
        assert train(cfg, resume=True, progress=False) == f"{uri}/checkpoints/step-000004"
    stored = _objects("ray/")
    assert {"checkpoints/step-000002/state.json", "checkpoints/step-000004/state.json", "placement/rank-0.json"} <= set(stored)
    from raymeta.storage import RunStore

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
