"""The loss cache: per-option losses on disk, keyed by the model's fingerprint, the scorer's settings and the tokens.

Many processes may share one cache (Ray evaluation workers, sweeps): entries are content-addressed and
written atomically under a name unique to the writer, so concurrent writers of one key write the same
numbers and a reader sees a whole entry or none.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from raymeta.data.prompts import Scored
from raymeta.infra.io import atomic_write_json

__all__ = ["LossCache", "model_fingerprint"]


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's class, config and every parameter and buffer (so a changed weight is a miss)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class LossCache:
    """Per-option losses on disk, keyed by everything that changes them.

    The key hashes the model fingerprint, the scorer's settings and the exact token ids of every
    sequence (which covers task, seed, k, variant, truncation and tokenizer). Losses are stored as
    JSON floats, which round-trip exactly, so a hit returns the very numbers a fresh run computed.

    Each entry carries a checksum of its key and losses. An entry that is unreadable, malformed,
    of the wrong length, not finite or not matching its checksum (a torn write, a disk error, an edit
    by hand) is never used: it counts as `bad`, is recomputed, and the fresh losses replace it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.hits = 0
        self.misses = 0
        self.bad = 0

    @staticmethod
    def key(model_id: str, settings: dict[str, Any], seqs: Sequence[Scored]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"model": model_id, **settings}, sort_keys=True).encode())
        for s in seqs:
            h.update(json.dumps([s.prefix, s.context, s.target]).encode())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    @staticmethod
    def checksum(key: str, losses: Sequence[float]) -> str:
        return hashlib.sha256(json.dumps([key, list(losses)]).encode()).hexdigest()

    def get(self, key: str, n: int) -> list[float] | None:
        path = self._path(key)
        if path.is_file():
            losses = self._read(path, key, n)
            if losses is not None:
                self.hits += 1
                return losses
            self.bad += 1
        self.misses += 1
        return None

    def _read(self, path: Path, key: str, n: int) -> list[float] | None:
        """The entry's losses when it is whole and checks out, else None."""
        try:
            entry = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        losses = entry.get("losses") if isinstance(entry, dict) else None
        if not isinstance(losses, list) or len(losses) != n:
            return None
        if not all(isinstance(x, float) and math.isfinite(x) for x in losses):
            return None
        return losses if entry.get("checksum") == self.checksum(key, losses) else None

    def put(self, key: str, losses: Sequence[float]) -> None:
        values = [float(x) for x in losses]
        atomic_write_json(self._path(key), {"losses": values, "checksum": self.checksum(key, values)})
