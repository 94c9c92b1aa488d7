"""Option scoring: the naive path against a hand-written loss, and prefix caching against naive."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from raymeta.data.prompts import Scored
from raymeta.eval.scoring import OptionScorer
from tests.conftest import tiny_gpt2, tiny_llama


def _random_seqs(n: int, prefix_len: int, vocab: int, seed: int = 0) -> list[Scored]:
    rng = random.Random(seed)
    prefix = tuple(rng.randrange(vocab) for _ in range(prefix_len))
    out = []
    for _ in range(n):
        ctx = tuple(rng.randrange(vocab) for _ in range(rng.randint(1, 9)))
        tgt = tuple(rng.randrange(vocab) for _ in range(rng.randint(1, 5)))
        out.append(Scored(prefix, ctx, tgt))
    return out


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_naive_loss_is_mean_ce_over_target_tokens(make):
    model = make(vocab_size=101, dtype=torch.float64)
    s = Scored((5, 6, 7), (8, 9), (10, 11, 12))
    (loss,) = OptionScorer(model, max_length=64, prefix_cache=False).score([s])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    logits = model(ids).logits[0]
    expected = F.cross_entropy(logits[4:7], ids[0, 5:8]).item()  # positions 4..6 predict tokens 5..7
    assert loss == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_prefix_cached_equals_naive(make):
    model = make(vocab_size=97, dtype=torch.float64)
    seqs = _random_seqs(23, prefix_len=40, vocab=97)
    cached = OptionScorer(model, max_length=128, prefix_cache=True, max_batch_tokens=300).score(seqs)
    naive = OptionScorer(model, max_length=128, prefix_cache=False, max_batch_tokens=300).score(seqs)
    assert cached == pytest.approx(naive, abs=1e-10)
    assert len(set(round(x, 6) for x in naive)) > 20  # the losses really differ between sequences


def test_truncated_sequences_fall_back_to_full_scoring():
    model = tiny_llama(vocab_size=97, dtype=torch.float64)
    seqs = _random_seqs(12, prefix_len=40, vocab=97, seed=3)
    max_length = 47  # some sequences (40 + ctx + tgt) need left truncation, others do not
    assert any(s.needs_truncation(max_length) for s in seqs) and not all(s.needs_truncation(max_length) for s in seqs)
    cached = OptionScorer(model, max_length=max_length, prefix_cache=True).score(seqs)
    naive = OptionScorer(model, max_length=max_length, prefix_cache=False).score(seqs)
    assert cached == pytest.approx(naive, abs=1e-10)


def test_float32_cached_scoring_gives_the_same_predictions():
    model = tiny_gpt2(vocab_size=211)
    seqs = _random_seqs(60, prefix_len=100, vocab=211, seed=7)
    cached = OptionScorer(model, max_length=256).score(seqs)
    naive = OptionScorer(model, max_length=256, prefix_cache=False).score(seqs)
    assert max(abs(a - b) for a, b in zip(cached, naive)) < 1e-4
    groups = [range(i, i + 4) for i in range(0, 60, 4)]  # 4 "options" per example
    assert [min(g, key=cached.__getitem__) for g in groups] == [min(g, key=naive.__getitem__) for g in groups]


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_options_sharing_their_context_equal_naive(make):
    """Direct prompts: the options of one example share demonstrations and x_q (the two-level cache)."""
    model = make(vocab_size=89, dtype=torch.float64)
    rng = random.Random(11)
    prefix = tuple(rng.randrange(89) for _ in range(30))
    seqs = []
    for _ in range(6):
        ctx = tuple(rng.randrange(89) for _ in range(rng.randint(1, 8)))
        for length in (1, 2, 4, 3):  # options of different lengths, one of a single token
            seqs.append(Scored(prefix, ctx, tuple(rng.randrange(89) for _ in range(length))))
    seqs.append(Scored(prefix, (5, 6), (7, 8)))  # an example with a context of its own
    cached = OptionScorer(model, max_length=128).score(seqs)
    naive = OptionScorer(model, max_length=128, prefix_cache=False).score(seqs)
    assert cached == pytest.approx(naive, abs=1e-10)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"row_tokens": 16, "max_batch_tokens": 120},
        {"batch_examples": False},
        {"batch_examples": False, "max_batch_tokens": 120},
    ],
    ids=["packed", "packed-small-rows", "per-example", "per-example-small-budget"],
)
def test_batched_examples_equal_naive(make, attn, kw):
    """Many test examples (stems of different lengths with options of 1-5 tokens) packed into rows on
    the prefix's keys/values under a block mask; small rows and budgets cut them into several passes."""
    model = make(vocab_size=89, dtype=torch.float64)
    model.config._attn_implementation = attn
    rng = random.Random(5)
    prefix = tuple(rng.randrange(89) for _ in range(20))
    seqs = []
    for _ in range(9):
        ctx = tuple(rng.randrange(89) for _ in range(rng.randint(1, 12)))
        for _ in range(rng.randint(2, 4)):
            seqs.append(Scored(prefix, ctx, tuple(rng.randrange(89) for _ in range(rng.randint(1, 5)))))
    seqs += _random_seqs(5, prefix_len=20, vocab=89, seed=2)  # another prefix, one sequence per context
    rng.shuffle(seqs)
    scorer = OptionScorer(model, max_length=128, **kw)
    assert scorer._packable
    cached = scorer.score(seqs)
    naive = OptionScorer(model, max_length=128, prefix_cache=False).score(seqs)
    # Llama's eager attention takes its softmax in float32 even for a float64 model
    assert cached == pytest.approx(naive, abs=1e-7 if (attn, make) == ("eager", tiny_llama) else 1e-10)


def test_sliding_window_models_score_one_example_per_pass():
    model = tiny_llama(vocab_size=89, dtype=torch.float64)
    model.config.sliding_window = 4096  # a custom block mask would bypass the window: not packed
    assert not OptionScorer(model, max_length=128)._packable
    seqs = _random_seqs(6, prefix_len=20, vocab=89, seed=4)
    cached = OptionScorer(model, max_length=128).score(seqs)
    assert cached == pytest.approx(OptionScorer(model, max_length=128, prefix_cache=False).score(seqs), abs=1e-10)
