"""Cluster files (`raymeta cluster check`) and a real token-authenticated local head: `ray job submit`
of a small `raymeta train`, the dashboard's job API with and without the token, raymeta's metrics.

The head is started by this test with `ray start --head --block` in its own process group, its own
temp dir, token file and free ports, and it is stopped by killing that group (never `ray stop`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from raymeta.infra.cluster import check_cluster_file
from tests.conftest import free_port, make_data_dir, tiny_gpt2

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_shipped_cluster_files_pass(name):
    report = check_cluster_file(ROOT / name)
    assert report.errors == [], report.errors
    assert report.summary


def _variant(tmp_path: Path, change) -> Path:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    change(config)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _set_head_start(config, text):
    config["head_start_ray_commands"][-1] = text


BROKEN = [
    ("unknown top-level key", lambda c: c.update(head_nodes=1), "Additional properties are not allowed"),
    ("bad max_workers type", lambda c: c.update(max_workers="four"), "max_workers: 'four' is not of type 'integer'"),
    (
        "public dashboard",
        lambda c: _set_head_start(c, "RAY_AUTH_MODE=token ray start --head --port=6379 --dashboard-host=0.0.0.0"),
        "--dashboard-host=0.0.0.0 exposes the dashboard",
    ),
    (
        "auth disabled",
        lambda c: _set_head_start(c, "RAY_AUTH_MODE=disabled ray start --head --port=6379 --dashboard-host=127.0.0.1"),
        "disables Ray's token auth",
    ),
    (
        "aws key",
        lambda c: c["setup_commands"].append("export AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP"),
        "looks like an AWS access key id",
    ),
    ("secret value", lambda c: c["provider"].update(aws_secret_access_key="abc123"), "a credential value in the file"),
    ("token in auth", lambda c: c["auth"].update(api_token="abc123"), "a credential value in the file"),
    ("loose torch", lambda c: c.update(setup_commands=["pip install torch", "pip install -e ~/raymeta"]), "install torch pinned"),
    ("no head start", lambda c: c.update(head_start_ray_commands=["ray stop"]), "no `ray start --head` command"),
]


@pytest.mark.parametrize(("what", "change", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_cluster_files_fail_with_a_clear_line(tmp_path, what, change, message):
    report = check_cluster_file(_variant(tmp_path, change))
    assert any(message in e for e in report.errors), report.errors


def test_cluster_check_cli_exit_codes(tmp_path):
    cli = [sys.executable, "-m", "raymeta.cli", "cluster", "check"]
    good = subprocess.run([*cli, str(ROOT / "cluster.yaml"), str(ROOT / "cluster-onprem.yaml")], capture_output=True, text=True)
    assert good.returncode == 0 and good.stdout.count(": OK (") == 2, good.stderr
    bad = _variant(tmp_path, lambda c: _set_head_start(c, "ray start --head --dashboard-host=0.0.0.0"))
    result = subprocess.run([*cli, str(bad)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("raymeta: error:")]
    assert len(errors) == 1 and "--dashboard-host=0.0.0.0" in errors[0]


def _get(url: str, token: str | None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def test_token_auth_head_runs_a_submitted_job_and_shows_its_metrics(tmp_path, gpt2_tokenizer):
    tiny_gpt2().save_pretrained(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(tmp_path / "model")
    make_data_dir(tmp_path / "data", k=4)
    token = secrets.token_hex(32)
    temp_dir = Path(tempfile.mkdtemp(prefix="rmc", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    gcs, dash, metrics = free_port(), free_port(), free_port()
    # the job agent's HTTP port defaults to 52365: a Ray agent left by another run on this machine holding it
    # makes Ray disable the agent's HTTP server, and every submission then answers "No available agent"
    agent_http, agent_grpc, runtime_env, client = free_port(), free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_metrics_report_interval_ms": "500",
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `raymeta` for the job
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):  # this head's token comes from its file
        env.pop(key, None)
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--metrics-export-port={metrics}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--ray-client-server-port={client}",
            f"--temp-dir={temp_dir}",
            "--num-cpus=2",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if _get(f"{api}/api/version", token)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1)
        else:
            pytest.fail("the head's dashboard did not come up")

        status, _ = _get(f"{api}/api/jobs/", None)
        assert status in (401, 403), status  # no token, no API

        out = tmp_path / "run"
        # as the README says: the checkout as the job's working dir, a shipped config, overrides
        overrides = {
            "model": tmp_path / "model",
            "data": tmp_path / "data",
            "setting": "toy",
            "out": out,
            "k": 2,
            "steps": 6,
            "checkpoint_every": 3,
            "max_length": 256,
            "executor": "local",
            "distributed": "true",
            "validation.tasks": 0,
            "tasks_per_step": 2,
        }
        entrypoint = ["raymeta", "train", "configs/tiny.yaml", *[f"{k}={v}" for k, v in overrides.items()]]
        repo = Path(__file__).resolve().parents[1]
        for _ in range(30):  # the dashboard can answer before its job agent is up: Ray says "try again later"
            submit = subprocess.run(
                [
                    RAY,
                    "job",
                    "submit",
                    "--address",
                    api,
                    "--working-dir",
                    str(repo),
                    "--no-wait",
                    "--submission-id",
                    "raymeta-test",
                ]
                + ["--", *entrypoint],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if submit.returncode == 0 or "No available agent to submit job" not in submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stderr[-2000:]

        seen_metric = False
        state = ""
        deadline = time.time() + 400
        while time.time() < deadline:
            status, body = _get(f"{api}/api/jobs/raymeta-test", token)
            assert status == 200, body[:500]
            state = json.loads(body)["status"]
            if not seen_metric:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
                        seen_metric = "raymeta_meta_loss" in r.read().decode()
                except (urllib.error.URLError, OSError):
                    pass
            if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(1)
        status, logs = _get(f"{api}/api/jobs/raymeta-test/logs", token)
        assert state == "SUCCEEDED", (json.loads(body).get("message"), logs[-3000:])  # the message: why it failed

        status, body = _get(f"{api}/api/jobs/", token)
        assert status == 200 and "raymeta-test" in body  # the job list, with the token
        assert "[raymeta] maml_en_llm step 6/6  meta_loss" in json.loads(logs)["logs"]  # the progress line, through the API
        assert seen_metric, "raymeta_meta_loss never appeared on the head's metrics endpoint"
        assert token not in json.loads(logs)["logs"]  # no secret in the logs
        assert (out / "checkpoints" / "step-000006" / "model" / "model.safetensors").is_file()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
