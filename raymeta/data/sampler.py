"""The meta-batch sampler: n tasks a step, each with a support and a separate query batch of ICL instances.

An ICL instance is MetaICL's training instance: k demonstrations of a task followed by one target
example of the same task whose label is scored; the target is never among its own demonstrations.

No leakage from query to support (rule 2): within one step and task, the query targets are drawn
first; no support target and no demonstration of a support instance is a query target (compared as
examples, input and output, so a pool holding an example twice cannot leak it either). The inner loop
therefore never trains on a query answer before the query loss is taken. Query instances draw their
demonstrations from the rest of the pool, as MetaICL's training instances do.

Rule 1 (before raymeta 0.2) drew support and query targets together and every instance's
demonstrations from the whole pool, so a query target could sit, with its label, in a support prompt
of the same step. A checkpoint written under rule 1 resumes under rule 1 (bit for bit), with a warning.

Sampling is seeded; the sampler's state (a `random.Random` state and the rule) goes into checkpoints so
that a resumed run draws the same batches. With `max_examples_per_task` each pool is first cut to a
fixed, seeded subset (the limited-data setting).
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from raymeta.data.layout import Example
from raymeta.errors import UserError

__all__ = ["RULE", "Instance", "TaskSample", "MetaBatchSampler"]

RULE = 2  # how support and query are drawn (see above); checkpoints record it


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
        self.rule = RULE

    def _instance(self, pool: list[Example], target: int, allowed: Sequence[int] | None = None) -> Instance:
        candidates = range(len(pool)) if allowed is None else allowed
        others = self.rng.sample([i for i in candidates if i != target], self.k)
        return Instance(tuple(pool[i] for i in others), pool[target])

    def _task(self, task: str) -> TaskSample:
        pool = self.pools[task]
        if self.rule == 1:
            targets = self.rng.sample(range(len(pool)), self.support_size + self.query_size)
            instances = [self._instance(pool, t) for t in targets]
            return TaskSample(task, tuple(instances[: self.support_size]), tuple(instances[self.support_size :]))
        query = self.rng.sample(range(len(pool)), self.query_size)
        answers = {(pool[i].input, pool[i].output) for i in query}
        allowed = [i for i, e in enumerate(pool) if (e.input, e.output) not in answers]  # never a query answer
        if len(allowed) < max(self.support_size, self.k + 1):
            raise UserError(
                f"task {task!r}: only {len(allowed)} examples differ from this step's query targets; support needs "
                f"support_size = {self.support_size} targets and k = {self.k} demonstrations besides each "
                "(duplicates in the pool?)"
            )
        support = self.rng.sample(allowed, self.support_size)
        return TaskSample(
            task,
            tuple(self._instance(pool, t, allowed) for t in support),
            tuple(self._instance(pool, t) for t in query),
        )

    def sample(self) -> list[TaskSample]:
        return [self._task(task) for task in self.rng.sample(sorted(self.pools), self.tasks_per_step)]

    def state(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss, "rule": self.rule}

    def load_state(self, state: Mapping[str, Any], where: str = "checkpoint") -> None:
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))
        self.rule = int(state.get("rule", 1))
        if self.rule == 1:
            warnings.warn(
                f"{where}: its sampler draws under rule 1 (a support prompt may hold a query answer of the same step); "
                "the resumed run keeps that rule to stay bit-exact. A new run uses rule 2",
                stacklevel=2,
            )
        elif self.rule != RULE:
            raise UserError(f"{where}: sampler rule {self.rule} is unknown to this raymeta (it knows 1 and {RULE})", key="resume")
