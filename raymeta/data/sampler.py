"""The meta-batch sampler: n tasks a step, each with a support and a separate query batch of ICL instances.

An ICL instance is MetaICL's training instance: k demonstrations of a task followed by one target
example of the same task whose label is scored; the target is never among its own demonstrations,
and a task's support and query targets are distinct examples. Sampling is seeded; the sampler's
state (a `random.Random` state) goes into checkpoints so that a resumed run draws the same batches.
With `max_examples_per_task` each pool is first cut to a fixed, seeded subset (the limited-data setting).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from raymeta.data.layout import Example
from raymeta.errors import UserError

__all__ = ["Instance", "TaskSample", "MetaBatchSampler"]


@dataclass(frozen=True)
class Instance:
    demonstrations: tuple[Example, ...]
    target: Example


@dataclass(frozen=True)
class TaskSample:
    task: str
    support: tuple[Instance, ...]
    query: tuple[Instance, ...]


class MetaBatchSampler:
    def __init__(
        self,
        pools: Mapping[str, Sequence[Example]],
        *,
        k: int,
        tasks_per_step: int,
        support_size: int,
        query_size: int,
        seed: int,
        max_examples_per_task: int | None = None,
    ) -> None:
        if tasks_per_step > len(pools):
            raise UserError(f"tasks_per_step: expected at most the {len(pools)} meta-train tasks, got {tasks_per_step}")
        need = k + support_size + query_size
        self.pools: dict[str, list[Example]] = {}
        for task in sorted(pools):
            pool = list(pools[task])
            if max_examples_per_task is not None and len(pool) > max_examples_per_task:
                digest = hashlib.sha256(f"{seed}:{task}".encode()).digest()
                pool = random.Random(int.from_bytes(digest[:8], "little")).sample(pool, max_examples_per_task)
            if len(pool) < need:
                raise UserError(
                    f"task {task!r}: {len(pool)} training examples, need at least k + support_size + query_size = {need}"
                )
            self.pools[task] = pool
        self.k, self.tasks_per_step = k, tasks_per_step
        self.support_size, self.query_size = support_size, query_size
        self.rng = random.Random(seed)

    def _instance(self, pool: list[Example], target: int) -> Instance:
        others = self.rng.sample([i for i in range(len(pool)) if i != target], self.k)
        return Instance(tuple(pool[i] for i in others), pool[target])

    def sample(self) -> list[TaskSample]:
        out = []
        for task in self.rng.sample(sorted(self.pools), self.tasks_per_step):
            pool = self.pools[task]
            targets = self.rng.sample(range(len(pool)), self.support_size + self.query_size)
            instances = [self._instance(pool, t) for t in targets]
            out.append(TaskSample(task, tuple(instances[: self.support_size]), tuple(instances[self.support_size :])))
        return out

    def state(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))
