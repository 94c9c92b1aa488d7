"""Convert BIG-bench tasks (from the `bigbench==1.0.0` sdist tarball) into MetaICL's layout.

A BIG-bench task is `benchmark_tasks/<task>[/<subtask>]/task.json`. Examples with `target_scores`
become scored examples: the option with the highest score is the output; when every example has the
same option set the task is `classification` (options = the label set), otherwise `multi-choice`
(options per example). Examples with only `target` are `free-form` (training pools only). The task
name in the layout is the BIG-bench path with "/" replaced by "-" (MetaICL's naming style).

Splits are deterministic (`raymeta.data.writer`: a shuffle seeded by the task's name, half and at
most `max_test` for test, k demonstrations per seed from the rest).
Inputs are the raw `input` (no task prefix), as MetaICL uses raw inputs.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from raymeta.data.layout import DEFAULT_SEEDS, Example
from raymeta.data.writer import ConvertedTask, write_task
from raymeta.errors import UserError
from raymeta.infra.io import atomic_write_json

__all__ = ["SETTINGS", "TARBALL", "SHA256", "layout_name", "read_tasks", "convert_task", "build"]

_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
# The package index no longer serves this file (since early December 2026); it is accepted by
# `raymeta fetch --bigbench PATH` from users who hold a copy, checked against the hash it had there.
TARBALL = "bigbench-1.0.0.tar.gz"
SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"

# The settings of docs/results.md's campaign, in the spirit of MetaICL's class_to_class and hr_to_lr: disjoint meta-train
# and target tasks; `unseen_domain_test` are targets whose domain no meta-train task covers.
SETTINGS: dict[str, dict[str, list[str]]] = {
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
