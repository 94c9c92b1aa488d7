"""Connecting to Ray: the embedded local cluster is reachable from this machine only and needs Ray's
token; a joined cluster that lacks resources makes the run wait for its autoscaler (Ray's fake
multi-node provider launches a worker "node" as local processes when the run's demand appears)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port, tiny_run_folder, tiny_train_overrides, wait_for_port

RAY = str(Path(sys.executable).with_name("ray"))
RAYMETA = str(Path(sys.executable).with_name("raymeta"))


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _listening(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    found = []
    for p in processes:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.append((p.name(), c.laddr.ip, c.laddr.port))
        except psutil.NoSuchProcess:
            continue
    return found


def test_the_embedded_cluster_listens_on_loopback_only_and_needs_the_token(ray_local):
    """The suite's shared cluster is one that `connect(None)` started, as every embedded raymeta run starts one."""
    from raymeta.infra.ray_session import connect, describe

    ray = ray_local
    assert connect(None) is False  # this process's own cluster, not a joined one
    assert ray.get(ray.remote(lambda: socket.gethostname()).remote())  # a task ran: the cluster is up
    sockets = _listening([psutil.Process(), *psutil.Process().children(recursive=True)])
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, names  # the servers that matter were seen
    exposed = [s for s in sockets if not _is_loopback(s[1])]
    assert not exposed, exposed
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    assert os.environ["RAY_AUTH_MODE"] == "token"  # Ray's token auth is on for the embedded cluster
    line = describe()
    gcs = ray.get_runtime_context().gcs_address
    assert line.startswith(
        f"Ray: a new embedded cluster of this process at {gcs} (loopback only, token auth); dashboard http://127.0.0.1:"
    )
    dashboard = line.rsplit(" ", 1)[1]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    request = urllib.request.Request(
        f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"}
    )
    with urllib.request.urlopen(request, timeout=10) as ok:
        assert ok.status == 200


def test_a_resource_shortfall_fails_fast_on_an_embedded_cluster_and_warns_on_a_joined_one(ray_local, recwarn):
    from raymeta.errors import UserError
    from raymeta.infra.ray_session import check_resources

    with pytest.raises(UserError, match=r"^training needs 3 CPUs, but the Ray cluster has 2: the run would wait forever"):
        check_resources(3, 0, joined=False, what="training")
    assert check_resources(3, 1, joined=True, what="training") is False
    assert "needs 3 CPUs, but the Ray cluster has 2; 1 GPUs, but the Ray cluster has 0" in str(recwarn.pop().message)
    assert check_resources(2, 0, joined=False, what="training") is True


def _stop(head: subprocess.Popen) -> None:
    """Stop a `ray start --head --block` and every process it started (never `ray stop`, which would stop
    every Ray of this user)."""
    tree = [head, *psutil.Process(head.pid).children(recursive=True)] if head.poll() is None else []
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs([psutil.Process(p.pid) for p in tree if psutil.pid_exists(p.pid)], timeout=5)
    for p in tree:
        if psutil.pid_exists(p.pid):
            psutil.Process(p.pid).kill()


def test_an_explicit_address_other_than_the_connected_cluster_is_refused(ray_local):
    """A process already on a cluster (a user's ray.init(), the suite's shared one) asked for another address:
    refused in one line, as a fresh process would be, instead of running where it was not asked."""
    from raymeta.errors import UserError
    from raymeta.infra.ray_session import connect

    gcs = ray_local.get_runtime_context().gcs_address
    assert connect(gcs) is True  # the cluster it is on: fine
    with pytest.raises(UserError, match=r"^address: 127\.0\.0\.1:9: cannot connect to a Ray cluster"):
        connect("127.0.0.1:9")
    with socket.socket() as other:  # something listens there, but it is not this process's cluster
        other.bind(("127.0.0.1", 0))
        other.listen()
        address = f"127.0.0.1:{other.getsockname()[1]}"
        refused = rf"^address: {address}: this process is already connected to the Ray cluster at {gcs}"
        with pytest.raises(UserError, match=refused):
            connect(address)
    assert ray_local.get_runtime_context().gcs_address == gcs


def test_an_embedded_run_starts_its_own_cluster_beside_a_head_left_running(tmp_path, gpt2_tokenizer):
    """A user's leftover `ray start --head` (no token, its address in Ray's temp folder, RAY_ADDRESS unset):
    `raymeta train` without --address runs on a new loopback cluster with its own token and says so; no
    driver ever connects to the stray head."""
    temp = Path(tempfile.mkdtemp(prefix="rms-", dir="/tmp"))  # the shell's Ray temp folder (short: socket paths)
    shell = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    shell["RAY_TMPDIR"] = str(temp)
    port = free_port()
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env={**shell, "RAY_AUTH_MODE": "disabled"},
        stdout=(tmp_path / "head.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        address_file = temp / "ray" / "ray_current_cluster"
        for _ in range(180):
            if address_file.is_file() and address_file.read_text().strip():
                break
            time.sleep(0.5)
        stray = address_file.read_text().strip()
        assert stray.endswith(f":{port}"), stray  # what a bare ray.init() would have joined
        stray_session = (temp / "ray" / "session_latest").resolve()
        tiny_run_folder(tmp_path, gpt2_tokenizer)
        out = tmp_path / "run"
        # this process's loop, its tasks as Ray tasks: the cheapest run that starts Ray as `raymeta train` does
        overrides = tiny_train_overrides(tmp_path / "model", tmp_path / "data", out, "steps=1", "executor=ray")
        (tmp_path / "train.yaml").write_text("distributed: false\n")
        run = subprocess.run(
            [RAYMETA, "train", str(tmp_path / "train.yaml"), *overrides], env=shell, capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stderr[-3000:]
        line = next(x for x in run.stdout.splitlines() if x.startswith("[raymeta] Ray: "))
        match = re.fullmatch(
            r"\[raymeta\] Ray: a new embedded cluster of this process at 127\.0\.0\.1:(\d+) \(loopback only, token auth\).*", line
        )
        assert match and int(match.group(1)) != port, line
        assert (out / "checkpoints" / "step-000001" / "state.json").is_file()
        drivers = list((stray_session / "logs").glob("python-core-driver-*"))
        assert not drivers, drivers  # nothing joined the stray head
    finally:
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)


def test_an_address_that_contradicts_ray_address_is_refused_in_one_line(tmp_path, gpt2_tokenizer, monkeypatch, capsys):
    from raymeta.cli import main

    tiny_run_folder(tmp_path, gpt2_tokenizer)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6380")
    (tmp_path / "c.yaml").write_text("distributed: true\n")
    args = tiny_train_overrides(tmp_path / "model", tmp_path / "data", tmp_path / "run")
    capsys.readouterr()
    assert main(["train", "--quiet", "--address", "127.0.0.1:6379", str(tmp_path / "c.yaml"), *args]) == 2
    assert capsys.readouterr().err == (
        "raymeta: error: --address: 127.0.0.1:6379 contradicts RAY_ADDRESS=127.0.0.1:6380 in the environment: unset one of them\n"
    )
    assert not (tmp_path / "run").exists()


@pytest.fixture()
def autoscaling_head(tmp_path):
    """A Ray head with 0 CPUs and Ray's fake multi-node autoscaler: one worker type of 2 CPUs, min 0, max 1.

    Started with its own temp folder, ports and token; stopped by killing the processes it started
    (never `ray stop`, which would stop every Ray of this user)."""
    port = free_port()
    config = {
        "cluster_name": "raymeta-autoscaling-test",
        "max_workers": 1,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{port}",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        "file_mounts": {},
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")},
        **{key: [] for key in ("head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files")},
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }
    path = tmp_path / "autoscaling.json"
    path.write_text(json.dumps(config))
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="raymeta-ray-")  # short: Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=0",
            f"--autoscaling-config={path}",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=(tmp_path / "head.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, 90, "the Ray head")
        yield f"127.0.0.1:{port}", env
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_training_on_a_cluster_with_no_cpu_makes_the_autoscaler_add_a_node_and_finishes(
    autoscaling_head, tmp_path, gpt2_tokenizer
):
    address, env = autoscaling_head
    tiny_run_folder(tmp_path, gpt2_tokenizer)
    model_dir, data = tmp_path / "model", tmp_path / "data"
    out = tmp_path / "run"
    overrides = tiny_train_overrides(model_dir, data, out, "steps=2", "num_workers=1", "cpus_per_worker=1", "executor=local")
    config = tmp_path / "train.yaml"
    config.write_text("distributed: true\n")
    run = subprocess.run(
        [RAYMETA, "train", "--quiet", "--address", address, str(config), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "needs 1 CPUs, but the Ray cluster has 0; waiting for the cluster's autoscaler" in run.stderr
    assert (out / "checkpoints" / "step-000002" / "state.json").is_file()
    placement = json.loads((out / "placement" / "rank-0.json").read_text())
    nodes = subprocess.run(
        [sys.executable, "-c", f"import ray, json; ray.init(address='{address}'); print(json.dumps(ray.nodes()))"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    alive = [n for n in json.loads(nodes.stdout.strip().splitlines()[-1]) if n["Alive"]]
    assert len(alive) == 2  # the head and the node the autoscaler launched
    worker_node = next(n for n in alive if n["Resources"].get("CPU", 0) == 2)
    assert placement["node_id"] == worker_node["NodeID"]  # the Train worker ran on the launched node
