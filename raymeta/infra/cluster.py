"""`raymeta cluster check FILE`: validate a `ray up` cluster file offline, and check it is safe.

Ray's own checks run first, exactly as `ray up` runs them before contacting a cloud
(`prepare_config` fills in the provider's defaults, `validate_config` applies Ray's JSON schema).
Then raymeta's safety rules: token auth never disabled, the dashboard bound to the head's loopback,
no credential in the file, torch installed pinned before raymeta, and placeholders left to replace.
Each problem is one line naming the key.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymeta.errors import UserError
from raymeta.infra.io import read_yaml

__all__ = ["Report", "check_cluster_file"]

_SECRET_PATTERNS = [
    (re.compile(r"AKIA[0-9A-Z]{16}"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"(?i)(aws_secret_access_key|secret_key|password|passwd)\s*[=:]\s*\S+"), "a secret assignment"),
    (re.compile(r"(?i)RAY_AUTH_TOKEN\s*=\s*\S+"), "a Ray auth token value"),
    (re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}"), "a GitHub token"),
]
_SECRET_KEYS = re.compile(r"(?i)(secret|password|passwd|access_key|api_key|token)$")


@dataclass
class Report:
    path: Path
    provider: str = ""
    summary: str = ""
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _walk(node: Any, where: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key path, last key, value) for every scalar in the document."""
    out: list[tuple[str, str, Any]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            out += (
                _walk(v, f"{where}.{k}" if where else str(k))
                if isinstance(v, dict | list)
                else [(f"{where}.{k}" if where else str(k), str(k), v)]
            )
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _walk(v, f"{where}[{i}]") if isinstance(v, dict | list) else [(f"{where}[{i}]", where.rsplit(".", 1)[-1], v)]
    return out


def _ray_checks(config: dict[str, Any], report: Report) -> dict[str, Any] | None:
    import logging  # deferred with the two below: Ray's autoscaler modules load only to check a file

    import jsonschema

    from raymeta.ray_compat import prepare_cluster_config

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # prepare_config logs its defaults at INFO
    try:
        return prepare_cluster_config(copy.deepcopy(config))
    except jsonschema.ValidationError as e:
        key = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        report.errors.append(f"{key}: {e.message} (Ray's cluster schema)")
    except (ValueError, KeyError, TypeError, RuntimeError, AssertionError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        report.errors.append(f"{text} (Ray's cluster config checks)")
    except Exception as e:  # a provider's default-filling code failing on a malformed section
        report.errors.append(f"Ray could not read the config: {type(e).__name__}: {str(e).strip()[:200]}")
    return None


def _commands(config: dict[str, Any], key: str) -> list[str]:
    value = config.get(key) or []
    return [str(c) for c in value] if isinstance(value, list) else [str(value)]


def _safety_checks(config: dict[str, Any], report: Report) -> None:
    for where, last, value in _walk(config):
        if not isinstance(value, str):
            continue
        for pattern, what in _SECRET_PATTERNS:
            if pattern.search(value):
                report.errors.append(
                    f"{where}: looks like {what}; keep credentials out of cluster files "
                    "(use your cloud profile, an SSH key file, ~/.ray/auth_token)"
                )
                break
        else:
            if _SECRET_KEYS.search(last) and value and not value.startswith(("~", "/", ".")):
                report.errors.append(f"{where}: a credential value in the file; point to a file or use the environment instead")
        for word in re.findall(r"\S*X{6,}\S*", value):
            report.warnings.append(f"{where}: placeholder {word!r} to replace before `ray up`")

    all_commands = [
        c
        for key in (
            "setup_commands",
            "head_setup_commands",
            "worker_setup_commands",
            "head_start_ray_commands",
            "worker_start_ray_commands",
        )
        for c in _commands(config, key)
    ]
    for c in all_commands:
        if re.search(r"RAY_AUTH_MODE\s*=\s*disabled", c):
            report.errors.append(f"commands: {c.strip()!r} disables Ray's token auth; keep RAY_AUTH_MODE=token")
    head = _commands(config, "head_start_ray_commands")
    starts = [c for c in head if "ray start" in c and "--head" in c]
    if not starts:
        report.errors.append("head_start_ray_commands: no `ray start --head` command")
    for c in starts:
        m = re.search(r"--dashboard-host[= ](\S+)", c)
        if m and m.group(1) not in ("127.0.0.1", "localhost"):
            report.errors.append(
                f"head_start_ray_commands: --dashboard-host={m.group(1)} exposes the dashboard; "
                "bind it to 127.0.0.1 and use `ray dashboard FILE`"
            )
        if "RAY_AUTH_MODE=token" not in c:
            report.warnings.append(
                "head_start_ray_commands: set RAY_AUTH_MODE=token on `ray start --head` to make token auth explicit"
            )
    setup = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands") for c in _commands(config, key)]
    torch_at = next((i for i, c in enumerate(setup) if re.search(r"pip install[^\n]*\btorch==\d", c)), None)
    raymeta_at = next((i for i, c in enumerate(setup) if re.search(r"pip install[^\n]*(raymeta|-e \S*raymeta)", c)), None)
    if raymeta_at is None:
        report.errors.append("setup_commands: no `pip install` of raymeta (e.g. `pip install -e ~/raymeta` after a file mount)")
    if torch_at is None:
        report.errors.append(
            "setup_commands: install torch pinned (torch==2.13.0) before raymeta; a loose torch pulls an unpinned build"
        )
    elif raymeta_at is not None and torch_at > raymeta_at:
        report.errors.append(
            "setup_commands: torch==... must be installed before raymeta (raymeta's install would pull a loose torch)"
        )
    mounts = config.get("file_mounts") or {}
    if not any("auth_token" in str(k) for k in mounts):
        report.warnings.append("file_mounts: ~/.ray/auth_token is not synced; every node needs the same Ray token")


def check_cluster_file(path: Path) -> Report:
    """Run Ray's validator and raymeta's safety checks; raises `UserError` only for an unreadable file."""
    config = read_yaml(path, "cluster file")
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a mapping (a Ray cluster config)")
    report = Report(path)
    report.provider = str((config.get("provider") or {}).get("type", "?")) if isinstance(config.get("provider"), dict) else "?"
    prepared = _ray_checks(config, report)
    _safety_checks(config, report)
    if prepared is not None:
        types = prepared.get("available_node_types", {})
        head = prepared.get("head_node_type")
        if report.provider == "local":
            hosts = len((config.get("provider") or {}).get("worker_ips") or [])
            workers = [f"{hosts} worker host(s)"]
        else:
            workers = [f"{n} x{t.get('min_workers', 0)}..{t.get('max_workers', 0)}" for n, t in types.items() if n != head]
        report.summary = f"provider {report.provider}, head {head}, workers: {', '.join(workers) or 'none'}"
    return report
