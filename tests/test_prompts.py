"""MetaICL's tensorization, checked on token ids worked out by hand with the real GPT-2 BPE."""

from __future__ import annotations

import pytest

from raymeta.data.layout import Example
from raymeta.data.prompts import PromptBuilder, PromptFormat, Scored, default_max_length
from raymeta.errors import UserError

DEMOS = [
    Example("t", "good movie", "positive", ("positive", "negative")),
    Example("t", "bad film", "negative", ("positive", "negative")),
]
QUERY = Example("t", "fine plot", "positive", ("positive", "negative"))

# GPT-2 ids: 'good movie' [11274, 3807]; '\npositive' [198, 24561]; '\n\n\nbad film' [628, 198, 14774, 2646];
# '\nnegative' [198, 31591]; '\n\n\nfine plot' [628, 198, 38125, 7110]; 'positive' [24561];
# '\ngood movie' [198, 11274, 3807]; '\n\n\nnegative' [628, 198, 31591]; '\nbad film' [198, 14774, 2646];
# '\n\n\npositive' [628, 198, 24561]; '\nfine plot' [198, 38125, 7110]; 'fine plot' [38125, 7110].


def test_gpt2_tokenizer_is_the_real_bpe(gpt2_tokenizer):
    assert gpt2_tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_direct_with_demonstrations(gpt2_tokenizer):
    b = PromptBuilder(gpt2_tokenizer, PromptFormat("direct"))
    prefix = b.demonstrations(DEMOS)
    # x1 \n y1 \n\n\n x2 \n y2
    assert prefix == [11274, 3807] + [198, 24561] + [628, 198, 14774, 2646] + [198, 31591]
    seqs = b.test_sequences(QUERY, prefix)
    assert [s.context for s in seqs] == [(628, 198, 38125, 7110)] * 2  # \n\n\n x_q
    assert [s.target for s in seqs] == [(198, 24561), (198, 31591)]  # \n y  -- the scored span
    ids, start = seqs[0].full(1024, allow_truncation=True)
    assert ids == prefix + [628, 198, 38125, 7110, 198, 24561]
    assert start == len(ids) - 2  # loss mask covers exactly the option tokens


def test_channel_with_demonstrations(gpt2_tokenizer):
    b = PromptBuilder(gpt2_tokenizer, PromptFormat("channel"))
    prefix = b.demonstrations(DEMOS)
    # y1 \n x1 \n\n\n y2 \n x2
    assert prefix == [24561] + [198, 11274, 3807] + [628, 198, 31591] + [198, 14774, 2646]
    seqs = b.test_sequences(QUERY, prefix)
    assert [s.context for s in seqs] == [(628, 198, 24561), (628, 198, 31591)]  # \n\n\n option
    assert [s.target for s in seqs] == [(198, 38125, 7110)] * 2  # \n x_q is scored


def test_zero_shot_has_no_leading_separator(gpt2_tokenizer):
    direct = PromptBuilder(gpt2_tokenizer, PromptFormat("direct")).test_sequences(QUERY, [])
    assert (direct[0].prefix, direct[0].context, direct[0].target) == ((), (38125, 7110), (198, 24561))
    channel = PromptBuilder(gpt2_tokenizer, PromptFormat("channel")).test_sequences(QUERY, [])
    assert (channel[1].context, channel[1].target) == ((31591,), (198, 38125, 7110))


def test_training_instance_scores_the_label_of_the_last_example(gpt2_tokenizer):
    b = PromptBuilder(gpt2_tokenizer, PromptFormat("direct"))
    s = b.training_sequence(DEMOS, QUERY)
    assert s.context == (628, 198, 38125, 7110) and s.target == (198, 24561)
    assert list(s.prefix) == b.demonstrations(DEMOS)


def test_per_example_truncation_cuts_the_input_end(gpt2_tokenizer):
    long = Example("t", "one two three four five six seven eight nine ten", "positive", ("positive", "negative"))
    b = PromptBuilder(gpt2_tokenizer, PromptFormat("direct", max_length_per_example=8, max_length=8))
    # demonstration: input cut to 8 - 2 - len('\npositive')=2 -> 4 tokens
    first, second = b.encode_labelled(long, is_first=True)
    assert first == [505, 734, 1115, 1440] and second == [198, 24561]
    # test example (not first): '\n\n\none two ...' cut to 8 - 2 - longest option (2) = 4 tokens
    seqs = b.test_sequences(long, [1, 2, 3])
    assert seqs[0].context == (628, 198, 505, 734)


def test_total_length_is_left_truncated_and_target_survives(gpt2_tokenizer):
    b = PromptBuilder(gpt2_tokenizer, PromptFormat("direct", max_length_per_example=256, max_length=256))
    prefix = b.demonstrations(DEMOS)  # 10 tokens
    s = b.test_sequences(QUERY, prefix)[1]
    ids, start = s.full(9, allow_truncation=True)
    # 10 + 4 + 2 = 16 tokens, 7 cut from the left of demonstrations+context; the target stays whole
    assert ids == (prefix + [628, 198, 38125, 7110])[7:] + [198, 31591]
    assert start == 7 and len(ids) == 9
    with pytest.raises(ValueError):
        s.full(9, allow_truncation=False)
    assert s.needs_truncation(15) and not s.needs_truncation(16)


def test_space_separated_format(gpt2_tokenizer):
    b = PromptBuilder(gpt2_tokenizer, PromptFormat("direct", newlines=False))
    prefix = b.demonstrations(DEMOS)
    assert (
        prefix
        == gpt2_tokenizer("good movie")["input_ids"]
        + gpt2_tokenizer(" positive")["input_ids"]
        + gpt2_tokenizer(" bad film")["input_ids"]
        + gpt2_tokenizer(" negative")["input_ids"]
    )


def test_no_bos_or_eos_with_smollm2_tokenizer(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.smollm2)
    b = PromptBuilder(tok, PromptFormat("direct"))
    prefix = b.demonstrations(DEMOS)
    assert tok.bos_token_id not in prefix and tok.eos_token_id not in prefix
    assert prefix[:2] == tok("good movie", add_special_tokens=False)["input_ids"]


def test_default_max_length_and_bad_format():
    assert default_max_length(16) == 1024 and default_max_length(2) == 512 and default_max_length(0) == 256
    with pytest.raises(UserError, match="variant"):
        PromptFormat("sideways")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="at least 2 options"):
        PromptBuilder(None, PromptFormat()).test_sequences(Example("t", "x", "y", ("y",)), [])
    assert Scored((1,), (2,), (3,)).full(3, False) == ([1, 2, 3], 2)
