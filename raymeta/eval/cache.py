"""The loss cache: per-option losses on disk, keyed by the model's fingerprint, the scorer's settings and the tokens.

Many processes may share one cache (Ray evaluation workers, sweeps): entries are content-addressed and
written atomically under a name unique to the writer, so concurrent writers of one key write the same
numbers and a reader sees a whole entry or none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from raymeta.data.prompts import Scored
from raymeta.io import atomic_write_json

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
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model_id: str, settings: dict[str, Any], seqs: Sequence[Scored]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"model": model_id, **settings}, sort_keys=True).encode())
        for s in seqs:
            h.update(json.dumps([s.prefix, s.context, s.target]).encode())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str, n: int) -> list[float] | None:
        path = self._path(key)
        if path.is_file():
            try:
                losses = json.loads(path.read_text())["losses"]
            except (json.JSONDecodeError, KeyError):
                losses = None
            if isinstance(losses, list) and len(losses) == n:
                self.hits += 1
                return [float(x) for x in losses]
        self.misses += 1
        return None

    def put(self, key: str, losses: Sequence[float]) -> None:
        atomic_write_json(self._path(key), {"losses": list(losses)})
