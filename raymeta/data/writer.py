"""Write a converted task into MetaICL's layout: the meta-training pool, k-shot files per seed, metadata.

Shared by every builder (BIG-bench, the built-in settings, `raymeta data import`). A task without its
own test split is split deterministically: its examples are shuffled with a seed derived from its name;
the first `min(max_test, n // 2)` are the test set, the rest the train portion. A task that comes with a
real test split (`ConvertedTask.test`) keeps it whole as the test set and draws from all its other
examples. The train portion (capped at 16384) is the meta-training pool `{task}_16384_100_train.jsonl`;
for each seed the k demonstrations are `random.Random(seed).sample(train portion, k)`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymeta.data.layout import DEFAULT_SEEDS, POOL_K, POOL_SEED, Example
from raymeta.infra.io import atomic_write_json, atomic_write_text

__all__ = ["ConvertedTask", "write_task"]


@dataclass
class ConvertedTask:
    name: str
    source: str
    task_type: str
    options: list[str]
    examples: list[Example]
    dropped: int  # examples left out in conversion (ties, duplicates, unparseable rows)
    test: list[Example] | None = None  # a real test split; None: split `examples` by the rule above
    meta: dict[str, Any] = field(default_factory=dict)  # extra metadata (licence, domain, ...)


def _jsonl(examples: Sequence[Example]) -> str:
    return "".join(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in examples)


def write_task(
    task: ConvertedTask, out: Path, *, ks: Sequence[int] = (16,), seeds: Sequence[int] = DEFAULT_SEEDS, max_test: int = 1000
) -> dict[str, int]:
    """Write one converted task's split files and metadata; returns split sizes."""
    order = list(range(len(task.examples)))
    name_seed = int.from_bytes(hashlib.sha256(task.name.encode()).digest()[:8], "little")
    random.Random(name_seed).shuffle(order)
    shuffled = [task.examples[i] for i in order]
    folder = out / "data" / task.name
    sizes: dict[str, int] = {}
    if task.task_type == "free-form":
        test: list[Example] = []
        train = shuffled
    elif task.test is not None:
        test, train = list(task.test), shuffled
    else:
        n_test = min(max_test, len(shuffled) // 2)
        test, train = shuffled[:n_test], shuffled[n_test:]
    pool = train[:POOL_K]
    atomic_write_text(folder / f"{task.name}_{POOL_K}_{POOL_SEED}_train.jsonl", _jsonl(pool))
    sizes["pool"] = len(pool)
    if test:
        for k in ks:
            if len(train) < k:
                continue  # too small to be a k-shot target; it can still be a meta-train task
            for seed in seeds:
                demos = random.Random(seed).sample(train, k)
                atomic_write_text(folder / f"{task.name}_{k}_{seed}_train.jsonl", _jsonl(demos))
                atomic_write_text(folder / f"{task.name}_{k}_{seed}_test.jsonl", _jsonl(test))
        sizes["test"] = len(test)
    meta = {
        "task_type": task.task_type,
        "options": task.options,
        "source": task.source,
        "n_examples": len(task.examples) + (len(task.test) if task.test is not None else 0),
        "n_dropped": task.dropped,
        "split": {"test": len(test), "train": len(train)},
        **task.meta,
    }
    atomic_write_json(out / "config" / "tasks" / f"{task.name}.json", meta)
    return sizes
