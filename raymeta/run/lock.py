"""One run per run folder: a lock held by the driver, stale locks of dead processes taken over, and the
temporary files and folders that killed writes left behind removed on start.

The lock is `OUT/.raymeta.lock`, created with O_EXCL and holding the owner's host, pid and start time.
A lock whose owner is a process of this host that no longer runs is stale: it is taken over with a
warning. A lock of another host cannot be checked from here: it is refused, naming the file to delete
if that run is known to be gone. Run folders on object storage are not locked (no exclusive create).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from raymeta.errors import UserError

__all__ = ["LOCK", "clean_orphans", "run_lock"]

LOCK = ".raymeta.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _owner(path: Path) -> dict[str, object] | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold the run folder's lock for the duration of the block (a local folder; created if need be, and
    removed again when the block fails before anything but the lock was written into it)."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            owner = _owner(path)
            if owner is None:  # torn while being written (its writer was killed at once), or not ours
                stale = time.time() - path.stat().st_mtime > 60
            else:
                pid = owner.get("pid")
                stale = owner.get("host") == me["host"] and isinstance(pid, int) and not _alive(pid)
            if not stale:
                who = f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}" if owner else "a process"
                raise UserError(
                    f"{folder}: another raymeta run is using this folder ({who}); wait for it, use another out, or "
                    f"delete {path} if that run is gone",
                    key="out",
                ) from None
            warnings.warn(f"{path}: a stale lock of a process that is gone ({owner}); taking it over", stacklevel=3)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(me) + "\n")
        break
    else:
        raise UserError(f"{path}: could not take the run folder's lock", key="out")
    try:
        yield
    finally:
        if (_owner(path) or {}).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()


def clean_orphans(folder: Path) -> int:
    """Remove what killed writes left in a run folder and its checkpoints (`.NAME.tmp-PID/` and
    `.NAME.old-PID/` folders, `.NAME.*.tmp` files); call it only with the lock held. Returns the bytes freed."""
    freed = 0
    for where in (folder, folder / "checkpoints"):
        if not where.is_dir():
            continue
        for p in where.iterdir():
            name = p.name
            orphan_dir = p.is_dir() and name.startswith(".") and (".tmp-" in name or ".old-" in name)
            orphan_file = p.is_file() and name.startswith(".") and name.endswith(".tmp")
            if not (orphan_dir or orphan_file):
                continue
            if orphan_dir:
                freed += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                shutil.rmtree(p, ignore_errors=True)
            else:
                freed += p.stat().st_size
                p.unlink(missing_ok=True)
    if freed:
        warnings.warn(f"{folder}: removed what interrupted writes left behind ({freed / 2**20:.1f} MiB)", stacklevel=2)
    return freed
