"""Connecting to Ray: join a cluster, or start an embedded local one that only this machine can reach.

- `--address` / `RAY_ADDRESS`: join that cluster, as it is (its own auth settings apply). A resource
  shortfall there is a warning: the autoscaler may add nodes once the run's demand reaches it, so the
  run waits, printing what it waits for. `RAY_ADDRESS` is how `ray job submit` hands its cluster to a
  driver; set together with a different `--address` it is refused (which one was meant is unknowable).
- otherwise: a new embedded local cluster (`ray.init(address="local")`), never a cluster that happens
  to be running: a bare `ray.init()` would join the head that `/tmp/ray/ray_current_cluster` names,
  anyone's `ray start --head`, without its loopback and token guarantees. Its node address is kept on
  loopback, and Ray binds its servers to the node address, so every one of them (the dashboard too)
  listens on 127.0.0.1; it runs with Ray's token auth and a random token of this process, so no other
  user or host can join it or submit work. A shortfall there is an error: a local cluster does not grow.

`describe()` is the line a run prints to say which cluster it runs on.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from raymeta.errors import UserError
from raymeta.ray_compat import loopback_only

__all__ = ["LOOPBACK", "check_resources", "connect", "describe", "joined_address", "progress_while_short", "train_settings"]

LOOPBACK = "127.0.0.1"
# how this process's Ray session came to be: "how" (embedded | --address | RAY_ADDRESS), for the session at "gcs"
_STARTED: dict[str, str] = {}


def joined_address(address: str | None) -> str | None:
    """The cluster to join: `address`, else $RAY_ADDRESS; None means a new embedded local cluster. An
    `address` that contradicts a $RAY_ADDRESS set in the environment is a `UserError`."""
    env = os.environ.get("RAY_ADDRESS") or None
    if address and env and address.rstrip("/") != env.rstrip("/"):
        raise UserError(
            f"{address} contradicts RAY_ADDRESS={env} in the environment: unset one of them",
            key="address",
        )
    return address or env


def train_settings() -> None:
    """Ray Train's settings for raymeta's runs (a user's own environment wins): workers' reports reach the
    driver in ~0.1 s instead of ~2 s."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def describe() -> str:
    """Which cluster this process's Ray session runs on, in one line (after `connect`)."""
    ctx = ray.get_runtime_context()
    gcs = ctx.gcs_address
    how = _STARTED.get("how") if _STARTED.get("gcs") == gcs else None
    if how is None:  # ray.init was called before raymeta's own connect (a user's script)
        return f"Ray: the cluster this process had already connected to, at {gcs}"
    if how == "embedded":
        url = _STARTED.get("dashboard")
        dashboard = f"; dashboard {url}" if url else ""
        return f"Ray: a new embedded cluster of this process at {gcs} (loopback only, token auth){dashboard}"
    return f"Ray: joined the cluster at {gcs} (from {how})"


def connect(
    address: str | None, *, dashboard: bool | None = None, log_to_driver: bool = True, num_cpus: int | None = None
) -> bool:
    """Initialise Ray in this process (once); returns whether it joined an existing cluster."""
    target = joined_address(address)
    if ray.is_initialized():
        if address:  # an explicit address must be the cluster this process is on, not silently another
            _check_same_cluster(address, ray.get_runtime_context().gcs_address)
        return target is not None
    if target is not None:
        _check_reachable(target)
        try:
            ray.init(address=target, log_to_driver=log_to_driver)
        except ConnectionError as e:
            raise UserError(f"{target}: cannot connect to a Ray cluster ({e})", key="address") from None
        _STARTED.clear()
        _STARTED.update(how="--address" if address else "RAY_ADDRESS", gcs=ray.get_runtime_context().gcs_address)
        return True
    # Ray turns token auth on for a new local cluster unless RAY_AUTH_MODE says otherwise; the token is
    # this process's own (its Ray processes inherit it), not a file written into the user's home
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # ray.init would turn a loopback node address into the host's reachable one (see raymeta.ray_compat)
    _hide_token_notice()
    with loopback_only():
        _start_local(num_cpus, dashboard, log_to_driver)
    return False


def _start_local(num_cpus: int | None, dashboard: bool | None, log_to_driver: bool) -> None:
    # address="local": a new cluster even where RAY_ADDRESS is unset and an address file names a running head
    context = ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host=LOOPBACK, log_to_driver=log_to_driver
    )
    _STARTED.clear()
    _STARTED.update(how="embedded", gcs=ray.get_runtime_context().gcs_address)
    if context.dashboard_url:
        _STARTED["dashboard"] = "http://" + context.dashboard_url


class _TokenNotice(logging.Filter):
    """Ray's "Token authentication is enabled ... set RAY_AUTH_MODE=disabled to opt out" warning: raymeta
    turned it on itself, with a token of this process, so the advice to opt out is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()


def _hide_token_notice() -> None:
    for handler in logging.getLogger("ray").handlers:
        if not any(isinstance(f, _TokenNotice) for f in handler.filters):
            handler.addFilter(_TokenNotice())


def _host_port(target: str) -> tuple[str, int] | None:
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", target)
    return (match.group(1), int(match.group(2))) if match else None


def _ip(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def _check_same_cluster(address: str, current: str) -> None:
    """Refuse an explicit `host:port` other than the cluster this process is already connected to (it would
    run there, not where asked). Other forms (`auto`, `ray://`, a file) are left to Ray."""
    if address.startswith("ray://"):  # Ray Client: its port is the client server's, not the GCS's
        return
    wanted, have = _host_port(address.rstrip("/")), _host_port(current)
    if wanted is None or have is None or (_ip(wanted[0]), wanted[1]) == (_ip(have[0]), have[1]):
        return
    _check_reachable(address)
    raise UserError(
        f"{address}: this process is already connected to the Ray cluster at {current}; "
        "call ray.shutdown() first, or leave the address out to run there",
        key="address",
    )


def _check_reachable(target: str, timeout: float = 5.0) -> None:
    """Refuse a `host:port` (or `ray://host:port`) nothing answers on, at once: `ray.init` would retry for
    minutes. Other forms (`auto`, a GCS address file) are left to Ray."""
    parsed = _host_port(target)
    if parsed is None:
        return
    host, port = parsed
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise UserError(f"{target}: cannot connect to a Ray cluster ({e.strerror or e})", key="address") from None


def _shortfall(cpus: float, gpus: float) -> str | None:
    have = ray.cluster_resources()
    missing = [
        f"{need:g} {name}s, but the Ray cluster has {have.get(name, 0.0):g}"
        for name, need in (("CPU", cpus), ("GPU", gpus))
        if need > have.get(name, 0.0) + 1e-9
    ]
    return "; ".join(missing) or None


def check_resources(cpus: float, gpus: float, *, joined: bool, what: str) -> bool:
    """Whether the cluster holds `cpus` and `gpus` now. On an embedded cluster a shortfall is a
    `UserError` (the run would wait forever); on a joined cluster it is a warning: the autoscaler may
    add nodes once the run's demand reaches it."""
    short = _shortfall(cpus, gpus)
    if short is None:
        return True
    if not joined:
        raise UserError(f"{what} needs {short}: the run would wait forever; lower them (fractions allowed) or add nodes")
    warnings.warn(f"{what} needs {short}; waiting for the cluster's autoscaler to add nodes", stacklevel=2)
    return False


@contextmanager
def progress_while_short(cpus: float, gpus: float, every: float = 15.0) -> Iterator[None]:
    """Around work that waits for resources: a progress line every `every` seconds until they are there."""
    if _shortfall(cpus, gpus) is None:
        yield
        return
    done = threading.Event()

    def report() -> None:
        began = time.monotonic()
        while not done.wait(every):
            missing = _shortfall(cpus, gpus)
            if missing is None:
                print(f"[raymeta] resources available after {time.monotonic() - began:.0f} s", flush=True)
                return
            print(f"[raymeta] waiting {time.monotonic() - began:.0f} s for {missing}", flush=True)

    threading.Thread(target=report, name="raymeta-wait-for-resources", daemon=True).start()
    try:
        yield
    finally:
        done.set()
