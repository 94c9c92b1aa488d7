"""Convert BIG-bench tasks (from the `bigbench==1.0.0` sdist tarball) into MetaICL's layout.

A BIG-bench task is `benchmark_tasks/<task>[/<subtask>]/task.json`. Examples with `target_scores`
become scored examples: the option with the highest score is the output; when every example has the
same option set the task is `classification` (options = the label set), otherwise `multi-choice`
(options per example). Examples with only `target` are `free-form` (training pools only). The task
name in the layout is the BIG-bench path with "/" replaced by "-" (MetaICL's naming style).

Splits are deterministic: each task's examples are shuffled with a seed derived from its name; the
first `min(max_test, n // 2)` are the test set, the rest the train portion. The train portion
(capped at 16384) is the meta-training pool `{task}_16384_100_train.jsonl`; for each seed the k
demonstrations are `random.Random(seed).sample(train portion, k)`, and the test file is the test set.
Inputs are the raw `input` (no task prefix), as MetaICL uses raw inputs.
"""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from raymeta.data.layout import DEFAULT_SEEDS, POOL_K, POOL_SEED, Example
from raymeta.errors import UserError
from raymeta.io import atomic_write_json, atomic_write_text

__all__ = ["BUILTIN_SETTINGS", "ConvertedTask", "layout_name", "read_tasks", "convert_task", "write_task", "build"]

_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"

# Built-in settings, in the spirit of MetaICL's class_to_class and hr_to_lr: disjoint meta-train
# and target tasks; `unseen_domain_test` are targets whose domain no meta-train task covers.
BUILTIN_SETTINGS: dict[str, dict[str, list[str]]] = {
    "bb_class_to_class": {
        "train": [
            "multiemo/hotels_sentence_en",
            "multiemo/medicine_sentence_en",
            "multiemo/products_sentence_en",
            "multiemo/reviews_sentence_en",
            "vitaminc_fact_verification",
            "movie_dialog_same_or_different",
            "formal_fallacies_syllogisms_negation",
            "fact_checker/fever",
            "epistemic_reasoning",
            "sports_understanding",
            "navigate",
            "strategyqa",
            "hyperbaton",
            "winowhy",
            "logical_fallacy_detection",
            "play_dialog_same_or_different",
            "cs_algorithms/valid_parentheses",
            "salient_translation_error_detection",
            "metaphor_boolean",
            "moral_permissibility",
            "anachronisms",
            "analogical_similarity",
            "fantasy_reasoning",
            "color/rgb",
        ],
        "test": [
            "presuppositions_as_nli",
            "intent_recognition",
            "social_support",
            "implicatures",
            "fact_checker/politifact",
            "hinglish_toxicity",
            "irony_identification",
            "snarks",
            "entailed_polarity",
            "analytic_entailment",
        ],
        "unseen_domain_test": [
            "intent_recognition",
            "social_support",
            "hinglish_toxicity",
            "irony_identification",
            "snarks",
        ],
    },
    "bb_hr_to_lr": {
        "train": [
            "multiemo/all_sentence_en",
            "vitaminc_fact_verification",
            "movie_dialog_same_or_different",
            "hyperbaton",
            "formal_fallacies_syllogisms_negation",
            "fact_checker/fever",
            "play_dialog_same_or_different",
            "winowhy",
            "logical_fallacy_detection",
            "strategyqa",
            "epistemic_reasoning",
            "sports_understanding",
            "navigate",
            "language_identification",
            "elementary_math_qa/question_only",
            "goal_step_wikihow/step_ordering",
            "goal_step_wikihow/step_inference",
            "goal_step_wikihow/goal_inference",
            "unit_conversion/unit_identification",
            "social_iqa",
            "temporal_sequences",
            "abstract_narrative_understanding/4_distractors",
            "cs_algorithms/valid_parentheses",
            "color/rgb",
        ],
        "test": [
            "presuppositions_as_nli",
            "intent_recognition",
            "metaphor_boolean",
            "implicatures",
            "hinglish_toxicity",
            "irony_identification",
            "date_understanding",
            "disambiguation_qa",
            "ruin_names",
            "movie_recommendation",
            "physics",
            "logical_deduction/three_objects",
        ],
        "unseen_domain_test": [
            "intent_recognition",
            "hinglish_toxicity",
            "irony_identification",
            "ruin_names",
            "movie_recommendation",
        ],
    },
}


def layout_name(bigbench_path: str) -> str:
    """`fact_checker/fever` -> `fact_checker-fever`."""
    return bigbench_path.strip("/").replace("/", "-")


@dataclass
class ConvertedTask:
    name: str
    source: str
    task_type: str
    options: list[str]
    examples: list[Example]
    dropped: int  # examples with no single best option (ties in target_scores)


def read_tasks(tarball: Path, paths: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Stream the tarball once and return the parsed task.json of each requested task path."""
    wanted = {p.strip("/"): None for p in paths}
    found: dict[str, dict[str, Any]] = {}
    if not tarball.is_file():
        raise UserError(f"{tarball}: BIG-bench tarball not found (run `raymeta fetch` first)")
    try:
        with tarfile.open(tarball, "r|gz") as tf:
            for member in tf:
                if not (member.name.startswith(_PREFIX) and member.name.endswith("/task.json")):
                    continue
                path = member.name[len(_PREFIX) : -len("/task.json")]
                if path in wanted:
                    f = tf.extractfile(member)
                    assert f is not None
                    found[path] = json.load(f)
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{tarball}: cannot read the BIG-bench tarball ({e}); run `raymeta fetch` again") from None
    missing = [p for p in wanted if p not in found]
    if missing:
        raise UserError(f"unknown BIG-bench task {missing[0]!r} (no benchmark_tasks/{missing[0]}/task.json)", key="tasks")
    return found


def convert_task(path: str, task_json: dict[str, Any]) -> ConvertedTask:
    name = layout_name(path)
    raw = task_json.get("examples")
    if not isinstance(raw, list) or not raw:
        raise UserError(f"BIG-bench task {path!r} has no examples (it may only group subtasks)", key="tasks")
    scored = [e for e in raw if isinstance(e.get("target_scores"), dict) and e["target_scores"]]
    examples: list[Example] = []
    dropped = 0
    if scored:
        option_sets = {tuple(e["target_scores"]) for e in scored}
        is_class = len({frozenset(s) for s in option_sets}) == 1
        label_set = [str(o) for o in scored[0]["target_scores"]]
        for e in scored:
            scores = {str(k): float(v) for k, v in e["target_scores"].items()}
            best = max(scores.values())
            winners = [o for o, s in scores.items() if s == best]
            if len(winners) != 1:
                dropped += 1
                continue
            options = label_set if is_class else list(dict.fromkeys(scores))
            examples.append(Example(name, str(e["input"]).strip(), winners[0], tuple(options)))
        task_type, options = ("classification", label_set) if is_class else ("multi-choice", [])
    else:
        for e in raw:
            target = e.get("target")
            target = target[0] if isinstance(target, list) and target else target
            if not isinstance(target, str):
                dropped += 1
                continue
            examples.append(Example(name, str(e["input"]).strip(), target, ()))
        task_type, options = "free-form", []
    if not examples:
        raise UserError(f"BIG-bench task {path!r} has no usable examples", key="tasks")
    return ConvertedTask(name, f"bigbench:{path}", task_type, options, examples, dropped)


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
        "n_examples": len(task.examples),
        "n_dropped": task.dropped,
        "split": {"test": len(test), "train": len(train)},
    }
    atomic_write_json(out / "config" / "tasks" / f"{task.name}.json", meta)
    return sizes


def build(
    tarball: Path,
    paths: Sequence[str],
    out: Path,
    *,
    settings: dict[str, dict[str, list[str]]] | None = None,
    ks: Sequence[int] = (16,),
    seeds: Sequence[int] = DEFAULT_SEEDS,
    max_test: int = 1000,
    progress: bool = True,
) -> list[ConvertedTask]:
    """Convert BIG-bench tasks into a MetaICL-layout folder; also write the given settings."""
    raw = read_tasks(tarball, paths)
    converted = [convert_task(path, raw[path]) for path in raw]  # every task is checked before anything is written
    for task in tqdm(converted, desc="writing tasks", disable=not progress, unit="task"):
        write_task(task, out, ks=ks, seeds=seeds, max_test=max_test)
    for name, spec in (settings or {}).items():
        atomic_write_json(out / "config" / f"{name}.json", {key: [layout_name(p) for p in spec[key]] for key in spec})
    return converted
