"""Import a task from JSONL, CSV, Parquet or a `datasets` folder (`save_to_disk`) into MetaICL's layout.

    raymeta data import reviews.csv --out mydata --task reviews --input text --output label \
        --setting my_setting --role test

Each row becomes one example: `input` (one field, or several joined by newlines), `output` (a string;
an integer indexes the row's options or the column's `ClassLabel` names), `options` (a list, or a
string split on `--options-sep`; absent for free-form tasks). The task type is detected -- the same
options on every row: classification; options that vary: multi-choice; no options: classification
when the outputs take at most `max_classes` values (those become the options), else free-form -- or
given. A target task (`--role test`) is split as every builder splits (`raymeta.data.writer`) (a
shuffle seeded by the task's name: half, at most `max_test`, for test; the rest as the pool the k-shot
demonstrations are drawn from, one draw per seed); a meta-training task puts every row in its pool
(at most 16384). Then the setting is checked as `raymeta data check` checks a folder. Every row is
read and checked before anything is written.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymeta.data.layout import DEFAULT_SEEDS, POOL_K, TASK_TYPES, DataDir, Example, _check_name
from raymeta.data.writer import ConvertedTask, write_task
from raymeta.errors import UserError, echo
from raymeta.infra.io import atomic_write_json

__all__ = ["FORMATS", "ImportSpec", "import_task", "read_rows"]

FORMATS = ("jsonl", "csv", "parquet", "datasets")
ROLES = ("train", "test", "unseen_domain_test")


@dataclass
class ImportSpec:
    """How rows become examples (the `raymeta data import` flags)."""

    task: str
    input: tuple[str, ...] = ("input",)
    output: str = "output"
    options: str | None = None  # None: the field "options" where rows have it
    options_sep: str = "|"
    task_type: str = "auto"
    max_classes: int = 20
    split: str | None = None  # a `datasets` folder with several splits: the one to read (default: all)


def _format(path: Path, given: str | None) -> str:
    if given:
        if given not in FORMATS:
            raise UserError(f"expected one of {', '.join(FORMATS)}, got {echo(given)}", key="format")
        return given
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "datasets"
        raise UserError(f"{path}: a folder, but not one written by datasets' save_to_disk (no dataset_info.json)")
    suffix = path.suffix.lower()
    found = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(suffix)
    if found is None:
        raise UserError(f"{path}: cannot tell the format from {suffix or 'no suffix'!r}; pass --format")
    return found


def read_rows(path: Path, fmt: str | None = None, split: str | None = None) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """The file's rows as dicts, and the names of every `ClassLabel` column (datasets and Parquet
    written by datasets)."""
    if not path.exists():
        raise UserError(f"{path}: not found")
    kind = _format(path, fmt)
    labels: dict[str, list[str]] = {}
    try:
        if kind == "jsonl":
            rows = []
            for n, line in enumerate(path.read_bytes().decode("utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: not a JSON object ({e.msg})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{n}: expected a JSON object, got {echo(row)}")
                rows.append(row)
            return rows, labels
        if kind == "csv":
            with path.open(newline="", encoding="utf-8") as f:
                return [dict(r) for r in csv.DictReader(f)], labels
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist(), labels
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split is not None and split not in loaded:
                raise UserError(f"{path}: no split {split!r} (splits: {', '.join(loaded)})", key="split")
            parts = [loaded[split]] if split is not None else list(loaded.values())
        else:
            parts = [loaded]
        for name, feature in parts[0].features.items():
            if isinstance(feature, datasets.ClassLabel):
                labels[name] = list(feature.names)
        return [row for part in parts for row in part.to_list()], labels
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except (OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path}: cannot read it as {kind} ({str(e).splitlines()[0][:200]})") from None


def _text(value: Any, where: str, field: str) -> str:
    if value is None:
        raise UserError(f"{where}: field {field!r} is empty")
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value).strip()
    raise UserError(f"{where}: field {field!r}: expected text, got {echo(value)}")


def _examples(rows: list[dict[str, Any]], labels: dict[str, list[str]], spec: ImportSpec, source: Path) -> ConvertedTask:
    if not rows:
        raise UserError(f"{source}: holds no rows")
    columns = set(rows[0])
    for field in (*spec.input, spec.output, *([spec.options] if spec.options else [])):
        if field not in columns:
            raise UserError(f"{source}: no field {field!r} (fields: {', '.join(sorted(map(str, columns)))})")
    options_field = spec.options or ("options" if "options" in columns else None)
    examples, option_sets = [], []
    for n, row in enumerate(rows, start=1):
        where = f"{source}: row {n}"
        text = "\n".join(_text(row.get(f), where, f) for f in spec.input)
        options: tuple[str, ...] = ()
        if options_field is not None:
            raw = row.get(options_field)
            items = raw.split(spec.options_sep) if isinstance(raw, str) else raw
            if not isinstance(items, list | tuple) or len(items) < 2:
                raise UserError(f"{where}: field {options_field!r}: expected a list of at least 2 options, got {echo(raw)}")
            options = tuple(_text(o, where, options_field) for o in items)
        value = row.get(spec.output)
        if isinstance(value, int) and not isinstance(value, bool) and (options or spec.output in labels):
            names = options or tuple(labels[spec.output])
            if not 0 <= value < len(names):
                raise UserError(f"{where}: field {spec.output!r}: label index {value} is outside the {len(names)} options")
            value = names[value]
        output = _text(value, where, spec.output)
        if options and output not in options:
            raise UserError(f"{where}: output {echo(output)} is not one of its options {echo(list(options))}")
        examples.append(Example(spec.task, text, output, options))
        option_sets.append(options)
    task_type, task_options = _task_type(examples, option_sets, labels.get(spec.output), spec, source)
    if task_type == "classification":
        examples = [Example(e.task, e.input, e.output, tuple(task_options)) for e in examples]
    return ConvertedTask(spec.task, f"import:{source.name}", task_type, task_options, examples, 0)


def _task_type(
    examples: list[Example], option_sets: list[tuple[str, ...]], label_names: list[str] | None, spec: ImportSpec, source: Path
) -> tuple[str, list[str]]:
    distinct = list(dict.fromkeys(e.output for e in examples))
    same = len({frozenset(o) for o in option_sets}) == 1 and bool(option_sets[0])
    if spec.task_type == "auto":
        if option_sets[0]:
            kind = "classification" if same else "multi-choice"
        else:
            kind = "classification" if label_names or len(distinct) <= spec.max_classes else "free-form"
    elif spec.task_type not in TASK_TYPES:
        raise UserError(f"expected auto or one of {', '.join(TASK_TYPES)}, got {echo(spec.task_type)}", key="task_type")
    else:
        kind = spec.task_type
    if kind == "classification":
        if option_sets[0] and not same:
            raise UserError(f"{source}: --task-type classification, but the rows' options differ (a multi-choice task?)")
        options = list(option_sets[0]) if option_sets[0] else (label_names or sorted(distinct))
        if len(options) < 2:
            raise UserError(f"{source}: a classification task needs at least 2 labels; every output is {echo(distinct[0])}")
        return kind, options
    if kind == "multi-choice" and not option_sets[0]:
        raise UserError(f"{source}: --task-type multi-choice needs options on every row (--options FIELD)")
    return kind, []


def _ks(data: DataDir, task: str, seeds: Sequence[int]) -> set[int]:
    """The k of a target task's k-shot files (for every seed)."""
    found = set()
    for path in (data.root / "data" / task).glob(f"{task}_*_{seeds[0]}_train.jsonl"):
        k = path.name[len(task) + 1 :].split("_")[0]
        if k.isdigit() and int(k) != POOL_K:
            found.add(int(k))
    return found


def import_task(
    sources: Sequence[Path],
    out: Path,
    spec: ImportSpec,
    *,
    fmt: str | None = None,
    setting: str | None = None,
    role: str = "train",
    ks: Sequence[int] = (16,),
    seeds: Sequence[int] = DEFAULT_SEEDS,
    max_test: int = 1000,
) -> dict[str, Any]:
    """Read, check, write and validate one task (see the module doc); returns what was written."""
    _check_name(spec.task, "task")
    if setting is not None:
        _check_name(setting, "setting")
    if role not in ROLES:
        raise UserError(f"expected one of {', '.join(ROLES)}, got {echo(role)}", key="role")
    rows: list[dict[str, Any]] = []
    labels: dict[str, list[str]] = {}
    for source in sources:
        more, found = read_rows(source, fmt, spec.split)
        rows += more
        labels.update(found)
    task = _examples(rows, labels, spec, sources[0])
    test_role = role != "train"
    if test_role and task.task_type == "free-form":
        raise UserError(
            f"{spec.task}: a free-form task cannot be a target (MetaICL scores options); use --role train", key="role"
        )
    n_test = min(max_test, len(task.examples) // 2) if task.task_type != "free-form" else 0
    if test_role and (n_test == 0 or len(task.examples) - n_test < max(ks)):
        raise UserError(
            f"{spec.task}: {len(task.examples)} examples are too few for a target task (a test split and k={max(ks)} "
            "demonstrations); use --role train or lower --k",
            key="input",
        )
    out.mkdir(parents=True, exist_ok=True)
    data = DataDir(out)
    setting_file = data.setting_path(setting) if setting else None
    layout: dict[str, list[str]] = {"train": [], "test": [], "unseen_domain_test": []}
    if setting_file is not None and setting_file.is_file():
        existing = json.loads(setting_file.read_text())
        layout.update({k: list(v) for k, v in existing.items() if k in layout})
    # everything read and checked: now write the task, then the setting, then check the whole setting
    sizes = write_task(task, out, ks=ks, seeds=seeds, max_test=max_test if test_role else 0)  # a meta-train task: all in the pool
    result: dict[str, Any] = {"task": spec.task, "task_type": task.task_type, "examples": len(task.examples), **sizes}
    if setting_file is not None:
        roles = ("test", "unseen_domain_test") if role == "unseen_domain_test" else (role,)
        for r in roles:
            if spec.task not in layout[r]:
                layout[r].append(spec.task)
        atomic_write_json(setting_file, {k: v for k, v in layout.items() if v or k != "unseen_domain_test"})
        result["setting"] = setting
        common = set.intersection(*(_ks(data, t, seeds) for t in layout["test"])) if layout["test"] else set()
        if layout["train"] and common:  # a whole setting (both roles): checked as `data check` does, at a k all targets have
            result["checked"] = data.check([str(setting)], k=max(common), seeds=seeds)
    return result
