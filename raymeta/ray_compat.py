"""The private Ray that raymeta relies on, in one place, checked against the Ray it was tested with.

Everything else in raymeta uses Ray's public API. Three things have no public form in Ray 2.60:

- `loopback_only()`: Ray turns a loopback node address into the host's reachable one, and binds its
  servers to the node address; it keeps loopback only where it does not run clusters (macOS, Windows),
  a switch (`ray._private.ray_constants.ENABLE_RAY_CLUSTER`) it reads when it picks the address.
  raymeta turns it off while an embedded node starts, so every server listens on 127.0.0.1.
- `drain_tune_reports()`: a Tune trial that runs Ray Train returns only once Tune has taken every
  report (see its docstring for the race it closes).
- `prepare_cluster_config(config)`: Ray's own checks of a cluster file (`ray up`'s schema and
  defaults), for `raymeta cluster check`.

`missing()` names what moved on the installed Ray; `tests/test_package.py` fails on it, so an upgrade of
Ray shows here first. At run time a moved internal degrades with a warning, never silently.
"""

from __future__ import annotations

import importlib
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["TESTED_RAY", "drain_tune_reports", "loopback_only", "missing", "prepare_cluster_config"]

TESTED_RAY = "2.60.0"  # requirements.lock's Ray

# (module, attribute) pairs raymeta reads or patches
_INTERNALS = (
    ("ray._private.ray_constants", "ENABLE_RAY_CLUSTER"),
    ("ray.train._internal.session", "get_session"),
    ("ray.autoscaler._private.util", "prepare_config"),
    ("ray.autoscaler._private.util", "translate_trivial_legacy_config"),
    ("ray.autoscaler._private.util", "validate_config"),
)


def _lookup(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def missing() -> list[str]:
    """The private Ray names raymeta uses that the installed Ray lacks (empty on the tested Ray)."""
    return [f"{m}.{n}" for m, n in _INTERNALS if _lookup(m, n) is None]


def _moved(what: str, consequence: str) -> None:
    import ray

    warnings.warn(
        f"Ray {ray.__version__} (raymeta is tested with {TESTED_RAY}) lacks {what}: {consequence}", RuntimeWarning, stacklevel=3
    )


@contextmanager
def loopback_only() -> Iterator[None]:
    """While a local Ray node starts in this context, its node address (and every server) stays on loopback."""
    constants: Any = importlib.import_module("ray._private.ray_constants")
    if not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        _moved("the switch that keeps an embedded cluster on loopback", "its servers may listen on this host's address")
        yield
        return
    saved = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved


def drain_tune_reports(timeout: float = 300.0, quiet_polls: int = 3) -> None:
    """In a Tune trial function: return only once Tune has taken every report that Ray Train forwarded.

    Ray 2.60's TuneReportCallback puts rank 0's reports on a one-slot Ray queue; the trial's main thread
    moves each one to the session's result queue when Tune asks for the next result. When the trial
    function returns, Tune's wrapper puts its end-of-trial marker straight on that result queue. If the
    final report was still on the Ray queue then, it lands behind the marker and Tune drops it: the
    trial ends one report short (seen in CI: a finished trial whose last result was step 3 of 4). So
    wait until both queues have stayed empty for a few polls."""
    get_session = _lookup("ray.train._internal.session", "get_session")
    if get_session is None:
        _moved("Tune's session queues", "a trial's last report may be lost when it ends")
        return
    session = get_session()
    relay = getattr(session, "_inter_actor_queue", None)
    results = getattr(session, "result_queue", None)
    if relay is None and results is None:
        return
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < quiet_polls and time.monotonic() < deadline:
        busy = (relay is not None and not relay.empty()) or (results is not None and not results.empty())
        quiet = 0 if busy else quiet + 1
        time.sleep(0.1)


def prepare_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """A cluster file as `ray up` reads it: legacy keys translated, defaults filled, Ray's schema checked.
    Raises what Ray raises (jsonschema.ValidationError, ValueError, ...)."""
    util = importlib.import_module("ray.autoscaler._private.util")
    util.translate_trivial_legacy_config(config)
    prepared = util.prepare_config(config)
    util.validate_config(prepared)
    return prepared
