"""Connecting to Ray: the embedded local cluster is reachable from this machine only and needs Ray's
token; a joined cluster that lacks resources makes the run wait for its autoscaler (Ray's fake
multi-node provider launches a worker "node" as local processes when the run's demand appears)."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
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


def test_the_embedded_cluster_listens_on_loopback_only_and_needs_the_token():
    import ray

    from raymeta.run.session import connect

    assert not ray.is_initialized()
    joined = connect(None, dashboard=True, log_to_driver=False, num_cpus=2)
    try:
        assert joined is False
        assert ray.get(ray.remote(lambda: socket.gethostname()).remote())  # a task ran: the cluster is up
        sockets = _listening([psutil.Process(), *psutil.Process().children(recursive=True)])
        names = {name for name, _, _ in sockets}
        assert {"gcs_server", "raylet"} <= names, names  # the servers that matter were seen
        exposed = [s for s in sockets if not _is_loopback(s[1])]
        assert not exposed, exposed
        assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
        assert os.environ["RAY_AUTH_MODE"] == "token"  # Ray's token auth is on for the embedded cluster
        dashboard = "http://" + ray.get_runtime_context().gcs_address.split(":")[0] + ":8265"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=10)
        assert refused.value.code in (401, 403)
        request = urllib.request.Request(
            f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"}
        )
        with urllib.request.urlopen(request, timeout=10) as ok:
            assert ok.status == 200
    finally:
        ray.shutdown()


def test_a_resource_shortfall_fails_fast_on_an_embedded_cluster_and_warns_on_a_joined_one(recwarn):
    import ray

    from raymeta.errors import UserError
    from raymeta.run.session import check_resources, connect

    connect(None, log_to_driver=False, num_cpus=2)
    try:
        with pytest.raises(UserError, match=r"^training needs 3 CPUs, but the Ray cluster has 2: the run would wait forever"):
            check_resources(3, 0, joined=False, what="training")
        assert check_resources(3, 1, joined=True, what="training") is False
        assert "needs 3 CPUs, but the Ray cluster has 2; 1 GPUs, but the Ray cluster has 0" in str(recwarn.pop().message)
        assert check_resources(2, 0, joined=False, what="training") is True
    finally:
        ray.shutdown()


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
        tree = [head, *psutil.Process(head.pid).children(recursive=True)] if head.poll() is None else []
        for p in tree:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs([psutil.Process(p.pid) for p in tree if psutil.pid_exists(p.pid)], timeout=20)
        for p in tree:
            if psutil.pid_exists(p.pid):
                psutil.Process(p.pid).kill()
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
