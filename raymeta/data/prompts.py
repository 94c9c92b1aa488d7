"""MetaICL's tensorization of in-context prompts, direct and channel.

direct:  x1 \\n y1 \\n\\n\\n x2 \\n y2 ... \\n\\n\\n x_q \\n y_q      loss on the y_q tokens
channel: y1 \\n x1 \\n\\n\\n y2 \\n x2 ... \\n\\n\\n y_q \\n x_q      loss on the x_q tokens

(`newlines=False` gives MetaICL's original space-separated format: `x1 y1 x2 y2 ...` with a space
before every field but the first.)

Rules, as in MetaICL's `_prepro_each_datapoint` / `prepro_sentence_pair_single`:
- every field is tokenized on its own, with its separator prefixed, and the ids are concatenated;
  no BOS/EOS is added;
- a demonstration or training example is truncated to `max_length_per_example - 2` tokens by cutting
  the end of its input (MetaICL asserts when the output alone is too long; raymeta cuts the output to
  `max_length_per_example - 3` tokens instead);
- a test example's input is cut to `max_length_per_example - 2 - (longest option)` tokens;
- the whole sequence (demonstrations + context) is left-truncated to `max_length` so that the scored
  span always survives; without demonstrations nothing is truncated beyond the per-example rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from raymeta.core.lm import Batch
from raymeta.data.layout import Example
from raymeta.errors import UserError

__all__ = ["VARIANTS", "PromptBuilder", "PromptFormat", "Scored", "default_max_length", "make_batch"]

VARIANTS = ("direct", "channel")


def default_max_length(k: int, max_length_per_example: int = 256) -> int:
    """MetaICL's total budget: `min(max_length_per_example * k, 1024)` with k demonstrations."""
    return min(max_length_per_example * k, 1024) if k > 0 else max_length_per_example


@dataclass(frozen=True)
class PromptFormat:
    variant: Literal["direct", "channel"] = "direct"
    max_length_per_example: int = 256
    max_length: int = 1024
    newlines: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise UserError(f"expected one of {', '.join(VARIANTS)}, got {self.variant!r}", key="variant")
        if self.max_length_per_example < 8:
            raise UserError(f"expected at least 8, got {self.max_length_per_example}", key="max_length_per_example")
        if self.max_length < self.max_length_per_example:
            raise UserError(
                f"expected at least max_length_per_example ({self.max_length_per_example}), got {self.max_length}",
                key="max_length",
            )


@dataclass(frozen=True)
class Scored:
    """One sequence to score: `prefix + context` conditions, `target` is scored (mean cross-entropy)."""

    prefix: tuple[int, ...]
    context: tuple[int, ...]
    target: tuple[int, ...]

    def needs_truncation(self, max_length: int) -> bool:
        return len(self.prefix) + len(self.context) + len(self.target) > max_length

    def full(self, max_length: int, allow_truncation: bool) -> tuple[list[int], int]:
        """The token ids after MetaICL's left truncation, and the index where the target starts."""
        ids1 = list(self.prefix) + list(self.context)
        excess = len(ids1) + len(self.target) - max_length
        if excess > 0:
            if not allow_truncation:
                raise ValueError(f"sequence of {len(ids1) + len(self.target)} tokens exceeds max_length={max_length}")
            ids1 = ids1[excess:]
        return ids1 + list(self.target), len(ids1)


class PromptBuilder:
    """Turns examples into token ids for one tokenizer and one `PromptFormat`."""

    def __init__(self, tokenizer: Any, fmt: PromptFormat) -> None:
        self.tokenizer = tokenizer
        self.fmt = fmt

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _decorate(self, x: str, y: str, options: Sequence[str], is_first: bool) -> tuple[str, str, list[str]]:
        """Add MetaICL's separators to the input, the output and the options of one example."""
        opts = list(options)
        if self.fmt.newlines:
            no_label = bool(opts) and all(o == "" for o in opts)
            if self.fmt.variant == "direct":
                if not is_first:
                    x = ("\n\n" if x == "" else "\n\n\n") + x
                if not no_label:
                    y = "\n" + y
                    opts = ["\n" + o for o in opts]
            else:
                if not is_first:
                    y = "\n\n\n" + y
                    opts = ["\n\n\n" + o for o in opts]
                if x != "" and not no_label:
                    x = "\n" + x
        else:
            if not is_first:
                if self.fmt.variant == "direct":
                    x = " " + x
                else:
                    y = " " + y
                    opts = [" " + o for o in opts]
            if self.fmt.variant == "direct":
                y = " " + y
                opts = [" " + o for o in opts]
            else:
                x = " " + x
        return x, y, opts

    def encode_labelled(self, ex: Example, is_first: bool) -> tuple[list[int], list[int]]:
        """A demonstration or training example: (first field, second field) in prompt order."""
        x, y, _ = self._decorate(ex.input, ex.output, (), is_first)
        x_ids, y_ids = self._ids(x), self._ids(y)
        budget = self.fmt.max_length_per_example - 2
        if len(y_ids) > budget - 1:
            y_ids = y_ids[: budget - 1]
        if len(x_ids) >= budget - len(y_ids):
            x_ids = x_ids[: budget - len(y_ids)]
        return (x_ids, y_ids) if self.fmt.variant == "direct" else (y_ids, x_ids)

    def demonstrations(self, demos: Sequence[Example]) -> list[int]:
        ids: list[int] = []
        for i, ex in enumerate(demos):
            first, second = self.encode_labelled(ex, is_first=i == 0)
            ids += first + second
        return ids

    def test_sequences(self, ex: Example, prefix: Sequence[int]) -> list[Scored]:
        """One `Scored` per option of a test example, conditioned on `prefix` (the demonstrations)."""
        if len(ex.options) < 2:
            raise UserError(f"task {ex.task!r}: a test example needs at least 2 options, got {len(ex.options)}")
        x, _, opts = self._decorate(ex.input, ex.output, ex.options, is_first=len(prefix) == 0)
        x_ids = self._ids(x)
        opt_ids = [self._ids(o) for o in opts]
        budget = self.fmt.max_length_per_example - 2 - max(len(o) for o in opt_ids)
        if len(x_ids) >= budget:
            x_ids = x_ids[: max(budget, 0)]
        pre = tuple(prefix)
        if self.fmt.variant == "direct":
            return [Scored(pre, tuple(x_ids), tuple(o)) for o in opt_ids]
        return [Scored(pre, tuple(o), tuple(x_ids)) for o in opt_ids]

    def training_sequence(self, demos: Sequence[Example], target: Example) -> Scored:
        """A MetaICL training instance: k demonstrations of a task, then one example whose label is scored."""
        prefix = self.demonstrations(demos)
        first, second = self.encode_labelled(target, is_first=len(demos) == 0)
        return Scored(tuple(prefix), tuple(first), tuple(second))


def make_batch(seqs: Sequence[Scored], max_length: int) -> Batch:
    """Training sequences as one right-padded `Batch` (MetaICL's left truncation applied)."""
    built = [s.full(max_length, allow_truncation=True) for s in seqs]
    ids = torch.zeros(len(built), max(len(b) for b, _ in built), dtype=torch.long)
    spans = []
    for row, (seq, start) in enumerate(built):
        ids[row, : len(seq)] = torch.tensor(seq)
        spans.append((max(start, 1), len(seq)))
    return Batch(ids, tuple(spans))
