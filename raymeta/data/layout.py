"""MetaICL's data layout, read unchanged and validated line by line.

    DIR/data/{task}/{task}_{k}_{seed}_{split}.jsonl   one example a line:
        {"task": str, "input": str, "output": str, "options": [str, ...]}
    DIR/config/{setting}.json                          {"train": [...], "test": [...], "unseen_domain_test": [...]}
    DIR/config/tasks/{task}.json                       {"task_type": "classification" | "multi-choice" | "free-form",
                                                        "options": [...]}

Target tasks use k=16 and seeds 100, 13, 21, 42, 87 (splits train = the k demonstrations, test = the
evaluation set); meta-training pools are `{task}_16384_100_train.jsonl`. Every problem is raised as a
`UserError` naming the file (and line) and what was expected.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from raymeta.errors import UserError
from raymeta.infra.paths import paths

__all__ = [
    "DEFAULT_SEEDS",
    "POOL_K",
    "POOL_SEED",
    "TASK_TYPES",
    "Example",
    "Setting",
    "DataDir",
    "open_data",
    "read_examples",
    "to_dataset",
]

DEFAULT_SEEDS: tuple[int, ...] = (100, 13, 21, 42, 87)
POOL_K = 16384
POOL_SEED = 100
TASK_TYPES = ("classification", "multi-choice", "free-form")
_KEYS = ("task", "input", "output", "options")


@dataclass(frozen=True)
class Example:
    task: str
    input: str
    output: str
    options: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "input": self.input, "output": self.output, "options": list(self.options)}


@dataclass(frozen=True)
class Setting:
    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    unseen_domain_test: tuple[str, ...] = field(default=())


def read_examples(path: Path, *, task: str | None = None, for_test: bool = False) -> list[Example]:
    """Read and validate one jsonl file of examples.

    `for_test`: each example must have at least 2 options and its output among them (it is scored by
    ranking the options). Elsewhere `options` may be empty (free-form, training only), but when it is
    not, `output` must be one of them.
    """
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    examples: list[Example] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not UTF-8 text (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            examples.append(_parse_example(obj, where, task=task, for_test=for_test))
    if not examples:
        raise UserError(f"{path}: no examples (the file is empty)")
    return examples


def _parse_example(obj: Any, where: str, *, task: str | None, for_test: bool) -> Example:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with keys {', '.join(_KEYS)}")
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        raise UserError(f"{where}: missing key {', '.join(repr(k) for k in missing)}")
    for key in ("task", "input", "output"):
        if not isinstance(obj[key], str):
            raise UserError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    options = obj["options"]
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise UserError(f"{where}: 'options' must be a list of strings")
    for key, text in [("task", obj["task"]), ("input", obj["input"]), ("output", obj["output"])] + [
        ("options", o) for o in options
    ]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (\ud800 in the JSON): no tokenizer takes it
            raise UserError(f"{where}: {key!r} holds a lone UTF-16 surrogate, which is not text") from None
    if task is not None and obj["task"] != task:
        raise UserError(f"{where}: 'task' is {obj['task']!r}, expected {task!r} (the folder's task)")
    if for_test and len(options) < 2:
        raise UserError(f"{where}: a test example needs at least 2 options, got {len(options)}")
    if options and obj["output"] not in options:
        raise UserError(f"{where}: 'output' {obj['output']!r} is not one of 'options' {options!r}")
    return Example(task=obj["task"], input=obj["input"], output=obj["output"], options=tuple(options))


def to_dataset(examples: Sequence[Example]) -> datasets.Dataset:
    """The examples as an Arrow-backed `datasets.Dataset` (columns task, input, output, options)."""
    return datasets.Dataset.from_dict(
        {
            "task": [e.task for e in examples],
            "input": [e.input for e in examples],
            "output": [e.output for e in examples],
            "options": [list(e.options) for e in examples],
        }
    )


def open_data(folder: str | Path | None, root: Path | None = None) -> DataDir:
    """The data folder given by the user, or (None) the built-in settings built by `raymeta fetch`."""
    if folder is not None:
        return DataDir(folder)
    builtin = paths(root).builtin_data
    if not (builtin / "config").is_dir():
        raise UserError(f"data: the built-in settings are not built yet ({builtin}); run `raymeta fetch` first")
    return DataDir(builtin)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); expected a JSON {what}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _check_name(name: str, what: str) -> None:
    """A setting or task name is a file name inside the data folder: never a path out of it."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise UserError(f"{what} name {name!r}: expected a plain name (no '/', '\\' or leading '.'), not a path")


class DataDir:
    """A data folder in MetaICL's layout."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{self.root}: data folder not found")

    # --- paths -------------------------------------------------------------------------------
    def split_path(self, task: str, k: int, seed: int, split: str) -> Path:
        _check_name(task, "task")
        return self.root / "data" / task / f"{task}_{k}_{seed}_{split}.jsonl"

    def setting_path(self, name: str) -> Path:
        _check_name(name, "setting")
        return self.root / "config" / f"{name}.json"

    def task_meta_path(self, task: str) -> Path:
        _check_name(task, "task")
        return self.root / "config" / "tasks" / f"{task}.json"

    def settings(self) -> list[str]:
        folder = self.root / "config"
        return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []

    # --- readers -------------------------------------------------------------------------------
    def setting(self, name: str) -> Setting:
        path = self.setting_path(name)
        if not path.is_file():
            known = ", ".join(self.settings()) or "none"
            raise UserError(f"unknown setting {name!r}: {path} not found (settings in {self.root}: {known})")
        obj = _read_json(path, "setting file")
        if not isinstance(obj, dict):
            raise UserError(f"{path}: expected an object with keys 'train', 'test', 'unseen_domain_test'")
        lists: dict[str, tuple[str, ...]] = {}
        for key in ("train", "test", "unseen_domain_test"):
            value = obj.get(key, [])
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise UserError(f"{path}: {key!r} must be a list of task names")
            lists[key] = tuple(value)
        for key in ("train", "test"):
            if not lists[key]:
                raise UserError(f"{path}: {key!r} is empty or missing; expected a list of task names")
        extra = sorted(set(lists["unseen_domain_test"]) - set(lists["test"]))
        if extra:
            raise UserError(f"{path}: 'unseen_domain_test' lists {extra[0]!r}, which is not in 'test'")
        for task in lists["train"] + lists["test"]:
            _check_name(task, "task")
            if not (self.root / "data" / task).is_dir():
                raise UserError(f"{path}: unknown task {task!r} (no folder {self.root / 'data' / task})")
        overlap = sorted(set(lists["train"]) & set(lists["test"]))
        if overlap:
            warnings.warn(
                f"{path}: {len(overlap)} task(s) are both meta-train and test tasks: {', '.join(overlap)}",
                stacklevel=2,
            )
        return Setting(name=name, train=lists["train"], test=lists["test"], unseen_domain_test=lists["unseen_domain_test"])

    def task_meta(self, task: str) -> dict[str, Any]:
        path = self.task_meta_path(task)
        obj = _read_json(path, f"task metadata for {task!r}")
        if not isinstance(obj, dict):
            raise UserError(f"{path}: expected a JSON object with 'task_type' and 'options'")
        if obj.get("task_type") not in TASK_TYPES:
            raise UserError(f"{path}: 'task_type' must be one of {', '.join(TASK_TYPES)}, got {obj.get('task_type')!r}")
        return obj

    def _split_file(self, task: str, k: int, seed: int, split: str) -> Path:
        """A target task's k-shot file; a missing one names the k and seeds the task does have."""
        path = self.split_path(task, k, seed, split)
        if not path.is_file():
            have = sorted(
                {p.name.split("_")[-3] for p in path.parent.glob(f"{task}_*_*_{split}.jsonl")} - {str(POOL_K)},
                key=lambda x: int(x) if x.isdigit() else 0,
            )
            hint = f" (this task has k = {', '.join(have)}: pass --k {have[0]})" if have and str(k) not in have else ""
            if str(k) in have:
                seeds = sorted({p.name.split("_")[-2] for p in path.parent.glob(f"{task}_{k}_*_{split}.jsonl")})
                hint = f" (its k={k} files have seeds {', '.join(seeds)})"
            raise UserError(f"{path}: file not found{hint}")
        return path

    def demonstrations(self, task: str, k: int, seed: int) -> list[Example]:
        """The k labelled examples of a target task for one seed (`{task}_{k}_{seed}_train.jsonl`)."""
        path = self._split_file(task, k, seed, "train")
        examples = read_examples(path, task=task)
        if len(examples) < k:
            raise UserError(f"{path}: has {len(examples)} examples, expected at least k={k}")
        return examples[:k]

    def test_examples(self, task: str, k: int, seed: int) -> list[Example]:
        return read_examples(self._split_file(task, k, seed, "test"), task=task, for_test=True)

    def pool_examples(self, task: str) -> list[Example]:
        """A meta-training pool (`{task}_16384_100_train.jsonl`), validated."""
        return read_examples(self.split_path(task, POOL_K, POOL_SEED, "train"), task=task)

    def pool(self, task: str) -> datasets.Dataset:
        """A meta-training pool as an Arrow dataset."""
        return to_dataset(self.pool_examples(task))

    # --- whole-folder check ---------------------------------------------------------------------
    def check(self, settings: Iterable[str] | None = None, k: int = 16, seeds: Sequence[int] = DEFAULT_SEEDS) -> dict[str, int]:
        """Validate settings and every file they reference; raise on the first problem.

        Returns counts of what was checked.
        """
        names = list(settings) if settings is not None else self.settings()
        if not names:
            raise UserError(f"{self.root / 'config'}: no setting files (config/{{setting}}.json) found")
        counts = {"settings": 0, "train_tasks": 0, "test_tasks": 0, "files": 0, "examples": 0}
        seen: set[tuple[str, str]] = set()
        for name in names:
            setting = self.setting(name)
            counts["settings"] += 1
            for task in setting.train:
                if ("train", task) in seen:
                    continue
                seen.add(("train", task))
                self.task_meta(task)
                counts["examples"] += len(self.pool(task))
                counts["files"] += 1
                counts["train_tasks"] += 1
            for task in setting.test:
                if ("test", task) in seen:
                    continue
                seen.add(("test", task))
                self.task_meta(task)
                for seed in seeds:
                    counts["examples"] += len(self.demonstrations(task, k, seed)) + len(self.test_examples(task, k, seed))
                    counts["files"] += 2
                counts["test_tasks"] += 1
        return counts
