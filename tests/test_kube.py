"""`raymeta cluster check` on the KubeRay manifests (k8s/) and the Dockerfile: the shipped ones pass, and each
kind of mistake is one line naming the key. Offline: no Kubernetes API, no registry, no Docker."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from raymeta.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["Dockerfile", "k8s/pvc.yaml", "k8s/raycluster.yaml", "k8s/rayjob-train.yaml", "k8s/rayjob-tune.yaml"]


def test_shipped_manifests_and_dockerfile_pass(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["cluster", "check", *SHIPPED]) == 0
    out, err = capsys.readouterr()
    train = "raymeta train configs/gpu_cluster.yaml: 4 workers x (4 CPU, 1 GPU), the pods hold 4"
    assert f"k8s/rayjob-train.yaml: OK (RayJob raymeta-train: {train})" in out
    assert "k8s/rayjob-tune.yaml: OK (RayJob raymeta-tune: raymeta tune tune_configs/gpu_cluster.yaml: 2 workers" in out
    assert "error" not in err and "placeholder 'registry.example.com/XXXXXXXX/raymeta:0.1.0-cu128'" in err


def _head(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def _worker(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _set(key, value):
    def change(doc):
        doc["spec"]["rayClusterSpec"][key] = value

    return change


BROKEN = {
    "image latest": (
        lambda d: _head(d).update(image="rayproject/ray:latest"),
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].image: rayproject/ray:latest uses :latest",
    ),
    "image untagged": (
        lambda d: _worker(d).update(image="myorg/raymeta"),
        "containers[0].image: myorg/raymeta has no tag (Kubernetes pulls :latest)",
    ),
    "no cpu limit": (lambda d: _worker(d)["resources"]["limits"].pop("cpu"), "containers[0].resources.limits.cpu: missing"),
    "auth off": (
        lambda d: d["spec"]["rayClusterSpec"].pop("authOptions"),
        "spec.rayClusterSpec.authOptions.mode: Ray's token auth is off",
    ),
    "auth disabled": (_set("authOptions", {"mode": "disabled"}), "Ray's token auth is off"),
    "load balancer": (
        lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
        "spec.rayClusterSpec.headGroupSpec.serviceType: LoadBalancer exposes the dashboard and the GCS outside the cluster",
    ),
    "literal secret": (
        lambda d: _head(d)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}),
        "containers[0].env AWS_SECRET_ACCESS_KEY: a credential as a literal value; use valueFrom.secretKeyRef",
    ),
    "key in a string": (
        lambda d: d["metadata"].update(annotations={"note": "AKIAABCDEFGHIJKLMNOP"}),
        "metadata.annotations.note: looks like an AWS access key id",
    ),
    "old api": (
        lambda d: d.update(apiVersion="ray.io/v1alpha1"),
        "apiVersion: expected ray.io/v1 (KubeRay >= 1.0), got 'ray.io/v1alpha1'",
    ),
    "replicas": (
        lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas=9),
        "expected integers 0 <= minReplicas <= replicas <= maxReplicas, got 0, 9, 4",
    ),
    "too many workers": (
        lambda d: d["spec"].update(entrypoint="raymeta train configs/gpu_cluster.yaml num_workers=8"),
        "spec.entrypoint: configs/gpu_cluster.yaml needs 8 workers of 4 CPU and 1 GPU; the cluster's pods hold at most 4",
    ),
    "out on a pod's disk": (
        lambda d: d["spec"].update(entrypoint="raymeta train configs/gpu_cluster.yaml out=/tmp/run"),
        "spec.entrypoint: configs/gpu_cluster.yaml writes to /tmp/run, which not every pod mounts",
    ),
    "bad config key": (
        lambda d: d["spec"].update(entrypoint="raymeta train configs/gpu_cluster.yaml inner.lrr=1"),
        "spec.entrypoint: command line: unknown key 'inner.lrr'",
    ),
    "schema type": (
        lambda d: d["spec"].update(ttlSecondsAfterFinished="10m"),
        "spec.ttlSecondsAfterFinished: '10m' is not of type 'integer' (KubeRay v1.7.0 RayJob schema)",
    ),
    "unknown field": (
        lambda d: d["spec"].update(shutdownAfterJobFinishez=True),
        "spec.shutdownAfterJobFinishez: not a field of KubeRay's RayJob (v1.7.0); Kubernetes would drop it silently",
    ),
    "unknown pod field": (
        lambda d: _head(d).update(imagePullPolicyy="Always"),
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].imagePullPolicyy: not a field of KubeRay's RayJob",
    ),
    "no entrypoint": (lambda d: d["spec"].pop("entrypoint"), "spec.entrypoint: missing"),
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_broken_manifests_fail_with_one_line_naming_the_key(tmp_path, capsys, monkeypatch, what):
    change, message = BROKEN[what]
    doc = yaml.safe_load((ROOT / "k8s/rayjob-train.yaml").read_text())
    change(doc)
    (tmp_path / "k8s").mkdir()
    for folder in ("configs", "tune_configs"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    path = tmp_path / "k8s" / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    assert main(["cluster", "check", "k8s/job.yaml"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raymeta: error:")]
    assert len(errors) == 1 and message in errors[0], errors


def test_a_job_on_a_selected_cluster_is_checked_against_that_cluster(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["cluster", "check", "k8s/rayjob-tune.yaml"]) == 0  # alone: the cluster is unknown, a warning
    assert "RayCluster 'raymeta' is not among the files checked" in capsys.readouterr().err
    cluster = yaml.safe_load((ROOT / "k8s/raycluster.yaml").read_text())
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = 1
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = 0
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(cluster))
    assert main(["cluster", "check", "k8s/rayjob-tune.yaml", str(small)]) == 2  # the job listed first, the cluster after
    err = capsys.readouterr().err
    assert (
        "tune_configs/gpu_cluster.yaml (one trial) needs 2 workers of 4 CPU and 1 GPU; the cluster's pods hold at most 1" in err
    )


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("ARG BASE=python:3.11.13-slim-bookworm", "ARG BASE=python", "FROM python has no tag"),
        ("USER 1000\n", "", "USER: the image runs as root"),
        ("--no-deps . &&", "--no-deps -r requirements.lock . &&", None),
        ("ENV RAYMETA_HOME", "ENV HF_TOKEN=hf_abc RAYMETA_HOME", "ENV: a credential in the image"),
    ],
)
def test_broken_dockerfiles_fail_with_one_line(tmp_path, capsys, old, new, message):
    text = (ROOT / "Dockerfile").read_text()
    assert old in text
    path = tmp_path / "Dockerfile"
    path.write_text(text.replace(old, new))
    code = main(["cluster", "check", str(path)])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
        return
    assert code == 2 and err.count("raymeta: error:") == 1 and message in err, err


def test_dockerfile_install_order(tmp_path, capsys):
    text = (ROOT / "Dockerfile").read_text()
    bad = text.replace(
        'RUN python -m pip install --no-cache-dir "${TORCH}"',
        'RUN python -m pip install --no-cache-dir --no-deps . && python -m pip install --no-cache-dir "${TORCH}"',
    )
    assert bad != text
    path = tmp_path / "Dockerfile"
    path.write_text(bad)
    assert main(["cluster", "check", str(path)]) == 2
    assert "RUN: install torch first, then requirements.lock, then raymeta (--no-deps)" in capsys.readouterr().err
