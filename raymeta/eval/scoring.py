"""Scoring sequences by the mean cross-entropy of their target tokens, with prefix caching and batching.

The k demonstrations of a (task, seed) are the same for every test example and option, so their
keys/values are computed once (`prefix_cache=True`) and reused for every continuation. The rule:

- a sequence that fits in `max_length` is scored on `cache(prefix[:-1])`: the last prefix token is
  recomputed so that the first target token always has its logit;
- the sequences that share a prefix form *stems*: the options of one test example with direct
  prompts share their context (same demonstrations, same x_q), so their stem is `prefix[-1] + context`,
  the first target token is predicted from the stem's last position and the rest of each option from a
  second pass (the *tails*) on top of the stem's keys/values; a sequence that shares its context with
  no other is one stem `prefix[-1] + context + target`;
- many stems (the test examples of a (task, seed)) go through the model in one pass
  (`batch_examples=True`): stems and their options' tails are packed into rows of about `row_tokens`
  tokens on the prefix's keys/values, with a block mask (each stem sees the prefix and itself, each
  tail the prefix, its stem and itself) and each token at the position it has in its own sequence; no
  padding, no copy of keys/values per option. Models with sliding-window attention or an attention
  implementation that takes no custom mask score one test example per pass instead;
- a sequence that needs MetaICL's left truncation is scored in full, exactly as the naive way does,
  because its truncated prefix differs from the shared one.

So cached and naive scoring see the same tokens at the same positions in every case; they differ only
by floating-point summation order (about 1e-5 in the loss in float32, below 1e-10 in float64).

Logits are computed only at the scored positions (`lm_head` on gathered hidden states): models whose
head does more than a linear map (logit soft-capping, scaling) are not supported by this shortcut.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raymeta.core.lm import hf_model, sequence_losses, span_positions
from raymeta.data.prompts import Scored

__all__ = ["OptionScorer"]


@dataclass
class _Stem:
    """Tokens after the cached prefix that several sequences share, and where their targets are scored."""

    ids: list[int]
    targets: list[tuple[int, ...]]
    out: list[int]  # each target's index in the scorer's output

    @property
    def single(self) -> bool:  # one sequence: its target is part of the stem
        return len(self.targets) == 1


class OptionScorer:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_length: int,
        allow_truncation: bool = True,
        prefix_cache: bool = True,
        batch_examples: bool = True,
        max_batch_tokens: int = 16384,
        row_tokens: int = 256,
    ) -> None:
        self.model = model
        self.max_length = max_length
        self.allow_truncation = allow_truncation
        self.prefix_cache = prefix_cache
        self.batch_examples = batch_examples
        self.max_batch_tokens = max_batch_tokens
        self.row_tokens = row_tokens
        self.device = next(model.parameters()).device
        hf: Any = hf_model(model)  # a Hugging Face causal LM (inside a PeftModel): body and output head
        self._base = hf.base_model
        self._head = hf.get_output_embeddings()
        config = hf.config
        self._packable = getattr(config, "sliding_window", None) is None and config._attn_implementation in ("sdpa", "eager")

    @torch.no_grad()
    def score(self, seqs: Sequence[Scored]) -> list[float]:
        """Mean cross-entropy over each sequence's target tokens, in input order."""
        losses: list[float] = [float("nan")] * len(seqs)
        by_prefix: dict[tuple[int, ...], list[int]] = defaultdict(list)
        full: list[int] = []
        for i, s in enumerate(seqs):
            if not s.target:
                raise ValueError("a sequence to score needs at least one target token")
            if self.prefix_cache and len(s.prefix) >= 2 and not s.needs_truncation(self.max_length):
                by_prefix[s.prefix].append(i)
            else:
                full.append(i)
        if full:
            self._score_full(seqs, full, losses)
        for prefix, idx in by_prefix.items():
            by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for i in idx:
                by_context[seqs[i].context].append(i)
            stems = []
            for context, group in by_context.items():
                ids = [prefix[-1], *context]
                if len(group) == 1:
                    ids += seqs[group[0]].target
                stems.append(_Stem(ids, [seqs[i].target for i in group], group))
            cache = self._base(input_ids=torch.tensor([prefix[:-1]], device=self.device), use_cache=True).past_key_values
            offset = len(prefix) - 1
            if self.batch_examples and self._packable:
                self._score_packed(offset, cache, stems, losses)
                continue
            # one test example per pass (sequences of their own are still batched together)
            singles = [s for s in stems if s.single]
            batches = [[s] for s in stems if not s.single]
            batches += [[singles[j] for j in b] for b in self._batches([len(s.ids) for s in singles], extra=offset)]
            for batch in batches:
                self._score_stems(offset, cache, batch, losses)
        return losses

    def _batches(self, lengths: list[int], extra: int = 0) -> list[list[int]]:
        """Indices sorted by length (longest first) cut into batches of about max_batch_tokens."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        cur: list[int] = []
        width = 0
        for i in order:
            w = max(width, lengths[i])
            if cur and (len(cur) + 1) * (w + extra) > self.max_batch_tokens:
                batches.append(cur)
                cur, w = [], lengths[i]
            cur.append(i)
            width = w
        if cur:
            batches.append(cur)
        return batches

    def _score_full(self, seqs: Sequence[Scored], idx: list[int], losses: list[float]) -> None:
        built = [seqs[i].full(self.max_length, self.allow_truncation) for i in idx]
        for batch in self._batches([len(ids) for ids, _ in built]):
            width = max(len(built[j][0]) for j in batch)
            # Right padding needs no attention mask: causal attention never looks at later positions.
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            spans = []
            for row, j in enumerate(batch):
                seq, start = built[j]
                ids[row, : len(seq)] = torch.tensor(seq)
                spans.append((max(start, 1), len(seq)))
            ids = ids.to(self.device)
            hidden = self._base(input_ids=ids, use_cache=False).last_hidden_state
            rows, cols = span_positions(spans, ids.device)
            batch_losses = sequence_losses(hidden[rows, cols - 1], ids[rows, cols], [e - s for s, e in spans], self._head)
            for j, loss in zip(batch, batch_losses.tolist()):
                losses[idx[j]] = loss

    def _score_packed(self, offset: int, prefix_cache: Any, stems: list[_Stem], losses: list[float]) -> None:
        """All stems with their tails, packed into rows (first fit, longest first) under a block mask."""
        segments = [s.ids + [tok for t in s.targets if not s.single for tok in t[:-1]] for s in stems]
        width = max(self.row_tokens, max(len(seg) for seg in segments))
        rows: list[list[int]] = []  # stem indices per row
        room: list[int] = []
        for j in sorted(range(len(stems)), key=lambda j: -len(segments[j])):
            r = next((r for r in range(len(rows)) if room[r] >= len(segments[j])), None)
            if r is None:
                rows.append([])
                room.append(width)
                r = len(rows) - 1
            rows[r].append(j)
            room[r] -= len(segments[j])
        per_pass = max(1, self.max_batch_tokens // (offset + width))
        for first in range(0, len(rows), per_pass):
            self._packed_pass(offset, prefix_cache, stems, segments, rows[first : first + per_pass], losses)

    def _packed_pass(
        self,
        offset: int,
        prefix_cache: Any,
        stems: list[_Stem],
        segments: list[list[int]],
        rows: list[list[int]],
        losses: list[float],
    ) -> None:
        width = max(sum(len(segments[j]) for j in row) for row in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        segment = torch.full((len(rows), width), -1, dtype=torch.long)  # which stem a token belongs to (-1: padding)
        branch = torch.zeros(len(rows), width, dtype=torch.long)  # 0: the stem, b > 0: the tail of its b-th option
        where: list[list[int]] = []  # per target: (row, column) of the hidden states that predict its tokens, flattened
        targets: list[tuple[int, ...]] = []
        out: list[int] = []
        for r, row in enumerate(rows):
            at = 0
            for j in row:
                s = stems[j]
                n = len(s.ids)
                ids[r, at : at + len(segments[j])] = torch.tensor(segments[j])
                segment[r, at : at + len(segments[j])] = j
                positions[r, at : at + n] = torch.arange(offset, offset + n)
                if s.single:
                    start = at + n - len(s.targets[0])
                    where.append([r, *range(start - 1, at + n - 1)])
                else:
                    tail_at = at + n
                    for b, t in enumerate(s.targets, start=1):
                        tail = len(t) - 1
                        positions[r, tail_at : tail_at + tail] = torch.arange(offset + n, offset + n + tail)
                        branch[r, tail_at : tail_at + tail] = b
                        where.append([r, at + n - 1, *range(tail_at, tail_at + tail)])
                        tail_at += tail
                targets += s.targets
                out += s.out
                at += len(segments[j])
        same = segment[:, :, None] == segment[:, None, :]
        causal = positions[:, None, :] <= positions[:, :, None]
        bq, bk = branch[:, :, None], branch[:, None, :]
        allowed = same & (((bk == 0) & ((bq != 0) | causal)) | ((bk == bq) & causal))
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(len(rows), 1, width, offset + width, dtype=dtype)  # additive: 0 attends, min does not
        mask[:, 0, :, offset:].masked_fill_(~allowed, torch.finfo(dtype).min)
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(rows))
        hidden = self._base(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            past_key_values=cache,
            position_ids=positions.to(self.device),
            use_cache=True,
        ).last_hidden_state
        row_idx = torch.tensor([w[0] for w in where for _ in w[1:]], device=self.device)
        col_idx = torch.tensor([c for w in where for c in w[1:]], device=self.device)
        flat_targets = torch.tensor([tok for t in targets for tok in t], device=self.device)
        batch_losses = sequence_losses(hidden[row_idx, col_idx], flat_targets, [len(t) for t in targets], self._head)
        for i, loss in zip(out, batch_losses.tolist()):
            losses[i] = loss

    def _score_stems(self, offset: int, prefix_cache: Any, stems: list[_Stem], losses: list[float]) -> None:
        """One pass over a batch of stems on the prefix's keys/values (offset = its length), then one
        over the tails of the options longer than a token; writes every target's loss."""
        width = max(len(s.ids) for s in stems)
        ids = torch.zeros(len(stems), width, dtype=torch.long)
        for row, s in enumerate(stems):
            ids[row, : len(s.ids)] = torch.tensor(s.ids)
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(stems))
        positions = torch.arange(offset, offset + width, device=self.device).expand(len(stems), -1)
        hidden = self._base(
            input_ids=ids.to(self.device), past_key_values=cache, position_ids=positions, use_cache=True
        ).last_hidden_state
        tails = [(row, t) for row, s in enumerate(stems) if not s.single for t in s.targets if len(t) > 1]
        tail_hidden = self._tails(offset, width, cache, stems, tails) if tails else None
        # predictors[j]: the hidden states that predict target j's tokens, in order
        predictors: list[torch.Tensor] = []
        targets: list[tuple[int, ...]] = []
        out: list[int] = []
        at = 0
        for row, s in enumerate(stems):
            if s.single:
                start = len(s.ids) - len(s.targets[0])
                predictors.append(hidden[row, start - 1 : len(s.ids) - 1])
            else:
                last = hidden[row, len(s.ids) - 1 : len(s.ids)]
                for t in s.targets:
                    if len(t) > 1:
                        assert tail_hidden is not None
                        predictors.append(torch.cat([last, tail_hidden[at, : len(t) - 1]]))
                        at += 1
                    else:
                        predictors.append(last)
            targets += s.targets
            out += s.out
        flat_targets = torch.tensor([tok for t in targets for tok in t], device=self.device)
        batch_losses = sequence_losses(torch.cat(predictors), flat_targets, [len(t) for t in targets], self._head)
        for i, loss in zip(out, batch_losses.tolist()):
            losses[i] = loss

    def _tails(
        self, offset: int, width: int, cache: Any, stems: list[_Stem], tails: list[tuple[int, tuple[int, ...]]]
    ) -> torch.Tensor:
        """Hidden states of the options' tokens but the last, each on its own stem's keys/values (the
        stem's right padding masked out), in chunks of about max_batch_tokens."""
        tail_width = max(len(t) - 1 for _, t in tails)
        per_row = offset + width + tail_width
        chunk = max(1, self.max_batch_tokens // per_row)
        parts = []
        for first in range(0, len(tails), chunk):
            part = tails[first : first + chunk]
            ids = torch.zeros(len(part), tail_width, dtype=torch.long)
            mask = torch.ones(len(part), per_row, dtype=torch.long)
            positions = torch.empty(len(part), tail_width, dtype=torch.long)
            for r, (row, t) in enumerate(part):
                ids[r, : len(t) - 1] = torch.tensor(t[:-1])
                stem_len = len(stems[row].ids)
                mask[r, offset + stem_len : offset + width] = 0
                positions[r] = torch.arange(offset + stem_len, offset + stem_len + tail_width)
            part_cache = cache if len(part) == len(tails) else copy.deepcopy(cache)
            part_cache.batch_select_indices(torch.tensor([row for row, _ in part], device=self.device))
            parts.append(
                self._base(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    past_key_values=part_cache,
                    position_ids=positions.to(self.device),
                    use_cache=True,
                ).last_hidden_state
            )
        return torch.cat(parts) if len(parts) > 1 else parts[0]
