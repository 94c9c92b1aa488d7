"""`raymeta cluster check` for KubeRay manifests (RayCluster, RayJob) and the Dockerfile, offline.

Manifests: KubeRay's own CRD schema (v1.7.0, vendored: types, enums, required fields) and the fields it
does not know (the API server would drop them silently); then the fields KubeRay needs (apiVersion
ray.io/v1, names, a head, worker groups with sane replica bounds, an image and CPU/memory limits on
every container), images pinned (a version tag or a digest, never `latest`), no credential values
(literal secrets in env, keys, tokens), Ray's token auth on (`authOptions.mode: token`, or
RAY_AUTH_MODE=token with the token from a Secret on every container), the dashboard internal (a
ClusterIP head service, no ingress). A RayJob that runs `raymeta train` or `raymeta tune` has its config
(or sweep) loaded and checked as those commands would, and its resources compared with the worker
groups: the workers (and a trial) must fit the pods, and the run folder must lie on a volume every pod
mounts or on object storage. Dockerfile: a pinned base, torch installed before the lock file and
raymeta after it, a non-root user, no secrets.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path
from typing import Any

from raymeta.errors import UserError
from raymeta.infra.cluster import _SECRET_PATTERNS, Report, _walk
from raymeta.infra.storage import is_uri

__all__ = ["check_dockerfile", "check_manifest", "is_manifest"]

SCHEMA_VERSION = "v1.7.0"  # KubeRay's CRD schemas (ray.io/v1), vendored from ray-project/kuberay (Apache-2.0)
_SECRET_ENV = re.compile(r"(?i)(secret|password|passwd|token|access_key|api_key|credentials)")
_KINDS = ("RayCluster", "RayJob")


def _schema(kind: str) -> dict[str, Any]:
    import gzip
    import json

    path = Path(__file__).parent / "schemas" / f"kuberay-{SCHEMA_VERSION}-{kind.lower()}.json.gz"
    return dict(json.loads(gzip.decompress(path.read_bytes())))


def _schema_checks(doc: dict[str, Any], kind: str, report: Report) -> None:
    """KubeRay's own CRD schema (types, enums, required fields), and fields it does not know: the API
    server would drop those silently (a typo such as `shutdownAfterJobFinishez` switches a feature off)."""
    import jsonschema

    schema = _schema(kind)
    for e in sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))[:10]:
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        report.errors.append(f"{where}: {e.message[:200]} (KubeRay {SCHEMA_VERSION} {kind} schema)")

    def unknown(node: Any, sch: dict[str, Any], where: str) -> None:
        if isinstance(node, dict) and "properties" in sch and not sch.get("x-kubernetes-preserve-unknown-fields"):
            for key, value in node.items():
                if key not in sch["properties"]:
                    report.errors.append(
                        f"{where}{key}: not a field of KubeRay's {kind} ({SCHEMA_VERSION}); Kubernetes would drop it silently"
                    )
                else:
                    unknown(value, sch["properties"][key], f"{where}{key}.")
        elif isinstance(node, list) and isinstance(sch.get("items"), dict):
            for i, value in enumerate(node):
                unknown(value, sch["items"], f"{where.rstrip('.')}[{i}].")

    unknown({k: v for k, v in doc.items() if k != "metadata"}, schema, "")


def is_manifest(doc: Any) -> bool:
    return isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc


def _pinned(image: str) -> str | None:
    """Why `image` is not pinned (None when it is)."""
    if "@sha256:" in image:
        return None
    name = image.rsplit("/", 1)[-1]
    if ":" not in name:
        return "has no tag (Kubernetes pulls :latest)"
    if name.rsplit(":", 1)[1] in ("latest", ""):
        return "uses :latest"
    return None


def _quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _containers(template: Any, where: str, report: Report) -> list[dict[str, Any]]:
    containers = (((template or {}).get("spec") or {}).get("containers")) if isinstance(template, dict) else None
    if not isinstance(containers, list) or not containers:
        report.errors.append(f"{where}.template.spec.containers: missing (expected the Ray container)")
        return []
    for i, c in enumerate(containers):
        at = f"{where}.template.spec.containers[{i}]"
        if not isinstance(c, dict) or not c.get("image"):
            report.errors.append(f"{at}.image: missing")
            continue
        why = _pinned(str(c["image"]))
        if why:
            report.errors.append(f"{at}.image: {c['image']} {why}; pin a version tag or a @sha256 digest")
        limits = (c.get("resources") or {}).get("limits") or {}
        for key in ("cpu", "memory"):
            if key not in limits:
                report.errors.append(f"{at}.resources.limits.{key}: missing (Ray sizes the node from the container's limits)")
        for e in c.get("env") or []:
            if isinstance(e, dict) and _SECRET_ENV.search(str(e.get("name", ""))) and "value" in e:
                report.errors.append(
                    f"{at}.env {e.get('name')}: a credential as a literal value; use valueFrom.secretKeyRef "
                    "(or authOptions for Ray's token)"
                )
    return [c for c in containers if isinstance(c, dict)]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {str(e.get("name")): e for e in container.get("env") or [] if isinstance(e, dict)}


class _Pods:
    """A cluster spec's pods as Ray sees them: (group, max pods, CPUs, GPUs, mounted paths)."""

    def __init__(self) -> None:
        self.groups: list[tuple[str, int, float, float, set[str]]] = []
        self.unknown = False  # a pod's CPUs are not stated (an error of its own): its capacity is not judged

    def add(self, name: str, count: int, params: dict[str, Any], container: dict[str, Any]) -> None:
        limits = (container.get("resources") or {}).get("limits") or {}
        if "cpu" not in limits and "num-cpus" not in params:
            self.unknown = True
        try:
            cpus = _quantity(params["num-cpus"]) if "num-cpus" in params else _quantity(limits.get("cpu", 0))
            gpus = _quantity(params["num-gpus"]) if "num-gpus" in params else _quantity(limits.get("nvidia.com/gpu", 0))
        except ValueError:
            return
        mounts = {str(m.get("mountPath", "")).rstrip("/") for m in container.get("volumeMounts") or [] if isinstance(m, dict)}
        self.groups.append((name, count, cpus, gpus, mounts))

    def capacity(self, cpus: float, gpus: float) -> int:
        """How many Ray Train workers of (cpus, gpus) the pods can hold at most."""
        total = 0
        for _, count, have_cpu, have_gpu, _ in self.groups:
            fit = math.floor(have_cpu / cpus + 1e-9) if cpus > 0 else 10**6
            if gpus > 0:
                fit = min(fit, math.floor(have_gpu / gpus + 1e-9))
            total += count * fit
        return total

    def shared(self, path: str) -> bool:
        return all(any(path == m or path.startswith(m + "/") for m in mounts) for *_, mounts in self.groups)


def _cluster_spec(spec: Any, where: str, report: Report) -> _Pods:
    pods = _Pods()
    if not isinstance(spec, dict):
        report.errors.append(f"{where}: missing (expected the cluster's spec)")
        return pods
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        report.errors.append(f"{where}.headGroupSpec: missing")
        return pods
    auth = (spec.get("authOptions") or {}).get("mode")
    head_containers = _containers(head.get("template"), f"{where}.headGroupSpec", report)
    groups = spec.get("workerGroupSpecs") or []
    worker_containers: list[dict[str, Any]] = []
    if not isinstance(groups, list):
        report.errors.append(f"{where}.workerGroupSpecs: expected a list of worker groups")
        groups = []
    for i, g in enumerate(groups):
        at = f"{where}.workerGroupSpecs[{i}]"
        if not isinstance(g, dict) or not g.get("groupName"):
            report.errors.append(f"{at}.groupName: missing")
            continue
        lo: Any = g.get("minReplicas", 0)
        hi: Any = g.get("maxReplicas")
        n: Any = g.get("replicas", lo)
        if not all(isinstance(x, int) for x in (lo, hi, n)) or not 0 <= lo <= n <= hi:
            report.errors.append(f"{at}: expected integers 0 <= minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
            hi = n if isinstance(n, int) else 0
        containers = _containers(g.get("template"), at, report)
        worker_containers += containers
        if containers:
            pods.add(str(g["groupName"]), int(hi), g.get("rayStartParams") or {}, containers[0])
    if head_containers:
        pods.add("head", 1, head.get("rayStartParams") or {}, head_containers[0])
    if auth != "token":
        unsafe = [
            c.get("name", "?")
            for c in head_containers + worker_containers
            if (_env(c).get("RAY_AUTH_MODE") or {}).get("value") != "token"
            or "secretKeyRef" not in str((_env(c).get("RAY_AUTH_TOKEN") or {}).get("valueFrom"))
        ]
        if auth == "disabled" or unsafe:
            report.errors.append(
                f"{where}.authOptions.mode: Ray's token auth is off; set authOptions: {{mode: token}} (KubeRay >= 1.5.1), "
                "or RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a Secret on every container"
            )
    service = head.get("serviceType", "ClusterIP")
    if service != "ClusterIP":
        report.errors.append(
            f"{where}.headGroupSpec.serviceType: {service} exposes the dashboard and the GCS outside the cluster; "
            "keep ClusterIP and use kubectl port-forward"
        )
    if head.get("enableIngress"):
        report.errors.append(f"{where}.headGroupSpec.enableIngress: an ingress exposes the dashboard; keep it internal")
    return pods


def _entry_command(entrypoint: str) -> tuple[str, str, list[str]] | None:
    """(train|tune, config or sweep file, KEY=VALUE overrides) of the entrypoint's raymeta command."""
    text = re.sub(r"\$\([^)]*\)", " ", entrypoint)
    for part in re.split(r"&&|\|\||;", text):
        try:
            tokens = shlex.split(part)
        except ValueError:
            continue
        if len(tokens) >= 3 and tokens[0] == "raymeta" and tokens[1] in ("train", "tune"):
            return tokens[1], tokens[2], [t for t in tokens[3:] if "=" in t and not t.startswith("-")]
    return None


def _check_job(doc: dict[str, Any], path: Path, pods: _Pods | None, report: Report) -> str:
    """The RayJob's raymeta command checked; returns what it runs, for the summary."""
    from raymeta.config import load_config
    from raymeta.tune.run import _trial_placement
    from raymeta.tune.sweep import load_sweep

    command = _entry_command(str(doc["spec"].get("entrypoint", "")))
    if command is None:
        report.warnings.append("spec.entrypoint: runs no `raymeta train` or `raymeta tune`; its resources are not checked")
        return "no raymeta command"
    kind, name, overrides = command
    file = next((p for p in (path.parent.parent / name, Path(name)) if p.is_file()), path.parent.parent / name)
    try:
        if kind == "train":
            cfg = load_config(file, overrides)
            placement, out, what = cfg.placement, cfg.run.out, f"{name}"
        else:
            sweep = load_sweep(file)
            placement, out, what = _trial_placement(sweep), sweep.location, f"{name} (one trial)"
    except UserError as e:
        report.errors.append(f"spec.entrypoint: {e}")
        return f"raymeta {kind} {name}"
    need = f"{placement.num_workers} workers x ({placement.cpus_per_worker:g} CPU" + (", 1 GPU)" if placement.use_gpu else ")")
    if pods is None or not pods.groups or pods.unknown:
        return f"raymeta {kind} {name}: {need}"
    need_gpu = 1.0 if placement.use_gpu else 0.0
    fits = pods.capacity(placement.cpus_per_worker, need_gpu)
    if fits < placement.num_workers:
        report.errors.append(
            f"spec.entrypoint: {what} needs {placement.num_workers} workers of {placement.cpus_per_worker:g} CPU"
            + (" and 1 GPU" if need_gpu else "")
            + f"; the cluster's pods hold at most {fits} (raise maxReplicas or the pods' limits, or lower num_workers)"
        )
    if not is_uri(out) and not pods.shared(str(Path(out)).rstrip("/")):
        report.errors.append(
            f"spec.entrypoint: {what} writes to {out}, which not every pod mounts (a pod's own disk vanishes with it); "
            "put it under a shared volume's mountPath or on object storage (s3://...)"
        )
    return f"raymeta {kind} {name}: {need}, the pods hold {fits}"


def check_manifest(doc: dict[str, Any], path: Path, clusters: dict[str, _Pods] | None = None) -> Report:
    """Check one KubeRay manifest (a parsed YAML document); `clusters` are the RayClusters checked
    alongside, by name, for a RayJob that selects one."""
    report = Report(path, provider="kuberay")
    for where, _, value in _walk(doc):
        if isinstance(value, str):
            for pattern, what in _SECRET_PATTERNS:
                if pattern.search(value):
                    report.errors.append(f"{where}: looks like {what}; keep credentials in Secrets, not manifests")
                    break
            for word in re.findall(r"\S*X{6,}\S*", value):
                report.warnings.append(f"{where}: placeholder {word!r} to replace before kubectl apply")
    kind = doc.get("kind")
    if kind not in _KINDS and not str(doc.get("apiVersion", "")).startswith("ray.io"):
        report.summary = f"{kind} {(doc.get('metadata') or {}).get('name', '')}: not a Ray resource, not checked further"
        return report
    if doc.get("apiVersion") != "ray.io/v1":
        report.errors.append(f"apiVersion: expected ray.io/v1 (KubeRay >= 1.0), got {doc.get('apiVersion')!r}")
    kind = doc.get("kind")
    if kind not in _KINDS:
        report.errors.append(f"kind: expected one of {', '.join(_KINDS)}, got {kind!r}")
        return report
    if doc.get("apiVersion") == "ray.io/v1":
        _schema_checks(doc, str(kind), report)
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    if not name:
        report.errors.append("metadata.name: missing")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        report.errors.append("spec: missing")
        return report
    pods: _Pods | None
    if kind == "RayCluster":
        pods = _cluster_spec(spec, "spec", report)
        if clusters is not None and name:
            clusters[str(name)] = pods
    else:
        if not spec.get("entrypoint"):
            report.errors.append("spec.entrypoint: missing (the command the job runs)")
        selector = (spec.get("clusterSelector") or {}).get("ray.io/cluster")
        if spec.get("rayClusterSpec") is not None:
            pods = _cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec", report)
        elif selector:
            pods = (clusters or {}).get(str(selector))
            if pods is None:
                report.warnings.append(
                    f"spec.clusterSelector: RayCluster {selector!r} is not among the files checked; "
                    "its resources are not compared"
                )
        else:
            report.errors.append(
                "spec: expected rayClusterSpec (a cluster of the job's own) or clusterSelector (an existing one)"
            )
            return report
        report.summary = f"{kind} {name}: " + _check_job(doc, path, pods, report)
        return report
    groups = (clusters or {}).get(str(name)) if kind == "RayCluster" else None
    report.summary = f"{kind} {name}" + (
        ": " + ", ".join(f"{g} x{n} ({c:g} CPU, {gp:g} GPU)" for g, n, c, gp, _ in groups.groups) if groups else ""
    )
    return report


def check_dockerfile(path: Path) -> Report:
    """A Dockerfile's base pinned, torch before the lock file before raymeta, a non-root user, no secrets."""
    report = Report(path, provider="docker")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = re.sub(r"\\\n", " ", text).splitlines()
    args = dict(re.findall(r"^\s*ARG\s+(\w+)=(\S+)", text, flags=re.M))
    order: dict[str, int | None] = {"torch": None, "lock": None, "raymeta": None}
    user = None
    n = 0
    for line in lines:
        word = line.strip().split(" ", 1)[0].upper()
        if word == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), line.split()[1])
            why = _pinned(image)
            if why:
                report.errors.append(f"FROM {image} {why}; pin a version tag or a @sha256 digest")
        elif word == "USER":
            user = line.split()[1]
        elif word == "ENV" and re.search(r"(?i)(secret|password|token|access_key|api_key)\w*[= ]\S+", line):
            report.errors.append("ENV: a credential in the image; pass it at run time (a Kubernetes Secret)")
        if word != "RUN":
            continue
        for command in line.split("&&"):  # in the order they run
            n += 1000
            if "pip install" not in command:
                continue
            if re.search(r"\$\{?TORCH\}?|torch==", command) and order["torch"] is None:
                order["torch"] = n
            if "requirements.lock" in command and order["lock"] is None:
                order["lock"] = n
            if re.search(r"--no-deps \.|install[^&]* \.(\s|$)|-e \.", command) and order["raymeta"] is None:
                order["raymeta"] = n
    if order["torch"] is None or order["lock"] is None or order["raymeta"] is None:
        missing = [k for k, v in order.items() if v is None]
        report.errors.append(
            f"RUN: no pip install of {', '.join(missing)} (expected torch, then requirements.lock, then raymeta)"
        )
    elif not order["torch"] < order["lock"] < order["raymeta"]:
        report.errors.append("RUN: install torch first, then requirements.lock, then raymeta (--no-deps)")
    if user in (None, "root", "0"):
        report.errors.append("USER: the image runs as root; end with a non-root USER (Ray's images use 1000)")
    base = args.get("BASE", "?")
    report.summary = f"base {base}"
    return report
