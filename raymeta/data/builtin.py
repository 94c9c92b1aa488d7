"""The built-in settings, in MetaICL's style, on tasks that the package index serves today.

`mix_to_mix` meta-trains on 29 tasks (commonsense and science multiple choice, MMLU in four groups,
reasoning, topic and sentiment classification) and evaluates on 14 others; `class_to_class` and
`qa_to_qa` are its classification and its multiple-choice halves. Unseen-domain targets are those
whose domain no meta-train task covers. A setting never has one corpus on both sides (SST-2, the VADER
movie snippets and Pang & Lee's sentences are all Rotten Tomatoes; R8 and R52 are the same Reuters
documents): `check_corpora` refuses that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from raymeta.data.catalog import TaskSpec, convert
from raymeta.data.corpus_tasks import CORPUS_TASKS
from raymeta.data.layout import DEFAULT_SEEDS
from raymeta.data.olmo_tasks import OLMO_TASKS
from raymeta.data.sources import Archive
from raymeta.data.writer import write_task
from raymeta.errors import UserError
from raymeta.infra.io import atomic_write_json

__all__ = ["TASKS", "SETTINGS", "BUILD_VERSION", "check_corpora", "buildable", "build"]

TASKS: dict[str, TaskSpec] = {t.name: t for t in OLMO_TASKS + CORPUS_TASKS}
BUILD_VERSION = 1  # bump when a converter changes what it writes: `raymeta fetch` then rebuilds

_TRAIN = [
    "hellaswag", "piqa", "winogrande", "social_i_qa", "sciq", "arc_easy", "boolq", "medmcqa",
    "mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other",
    "sarcasm", "quartz", "logiqa", "logiqa_v2", "reclor", "corr2cause", "crepe", "pararule_plus", "tomi",
    "bias_detection", "guess_the_singer",
    "20newsgroups", "bbc_news",
    "pang_lee_reviews", "conll2010_uncertainty", "vader_amazon", "crowdflower_tweets",
]  # fmt: skip
_TEST = [
    "glue-sst2", "glue-rte", "glue-mrpc", "arc_challenge", "openbookqa", "commonsense_qa", "reuters_r8",
    "vader_nyt", "vader_tweets", "spamassassin", "election_tweets", "sciriff_yesno", "medqa_en", "qasper_yesno",
]  # fmt: skip
_UNSEEN = ["spamassassin", "election_tweets", "sciriff_yesno", "qasper_yesno", "glue-mrpc"]


def _only(kind: str) -> Callable[[Sequence[str]], list[str]]:
    return lambda names: [t for t in names if (TASKS[t].task_type == "classification") == (kind == "classification")]


_class, _qa = _only("classification"), _only("multi-choice")
SETTINGS: dict[str, dict[str, list[str]]] = {
    "mix_to_mix": {"train": _TRAIN, "test": _TEST, "unseen_domain_test": _UNSEEN},
    "class_to_class": {"train": _class(_TRAIN), "test": _class(_TEST), "unseen_domain_test": _class(_UNSEEN)},
    "qa_to_qa": {"train": _qa(_TRAIN), "test": _qa(_TEST), "unseen_domain_test": _qa(_UNSEEN)},
}


def check_corpora(name: str, spec: dict[str, list[str]]) -> None:
    """Refuse a setting whose meta-train and target tasks share underlying texts."""
    corpus = {t: TASKS[t].corpus or t for t in spec["train"] + spec["test"]}
    shared = {corpus[t] for t in spec["train"]} & {corpus[t] for t in spec["test"]}
    if shared:
        c = sorted(shared)[0]
        both = sorted(t for t in corpus if corpus[t] == c)
        raise UserError(f"setting {name}: {', '.join(both)} share the {c} texts but sit on both sides (meta-train and test)")


def buildable(available: set[str]) -> tuple[list[str], list[str]]:
    """(tasks whose packages are all available, tasks that are not) among every built-in setting's tasks."""
    names = sorted({t for spec in SETTINGS.values() for key in ("train", "test") for t in spec[key]})
    ok = [t for t in names if all(any(p in available for p in group) for group in TASKS[t].needs)]
    return ok, [t for t in names if t not in ok]


def build(
    archives: dict[str, Archive],
    out: Path,
    *,
    ks: Sequence[int] = (4, 16),
    seeds: Sequence[int] = DEFAULT_SEEDS,
    max_test: int = 1000,
    progress: bool = True,
) -> dict[str, list[str]]:
    """Convert every task the given archives allow and write each setting all of whose tasks were built.

    Returns {"tasks": built, "settings": written, "missing_settings": not written}."""
    for name, spec in SETTINGS.items():
        check_corpora(name, spec)
    names, _ = buildable(set(archives))
    converted = [convert(TASKS[t], archives) for t in tqdm(names, desc="converting tasks", disable=not progress, unit="task")]
    for task in converted:  # every task converted and checked before anything is written
        write_task(task, out, ks=ks, seeds=seeds, max_test=max_test)
    done = set(names)
    written, missing = [], []
    for name, spec in SETTINGS.items():
        if all(t in done for key in ("train", "test") for t in spec[key]):
            atomic_write_json(out / "config" / f"{name}.json", spec)
            written.append(name)
        else:
            missing.append(name)
    return {"tasks": names, "settings": written, "missing_settings": missing}
