"""Scoring sequences by the mean cross-entropy of their target tokens, with prefix caching.

The k demonstrations of a (task, seed) are the same for every test example and option, so their
keys/values are computed once (`prefix_cache=True`) and reused for every continuation. The rule:

- a sequence that fits in `max_length` is scored as `cache(prefix[:-1])` + `prefix[-1:] + context +
  target` (the last prefix token is recomputed so that the first target token always has its logit);
- sequences that also share their context (the options of one test example with direct prompts:
  same demonstrations, same x_q) encode `prefix[-1:] + context` once on top of the cached prefix; the
  first target token is predicted from that pass and the rest of each option from a second, batched
  pass over the options;
- a sequence that needs MetaICL's left truncation is scored in full, exactly as the naive way does,
  because its truncated prefix differs from the shared one.

So cached and naive scoring see the same tokens at the same positions in every case; they differ only
by floating-point summation order (about 1e-5 in the loss in float32).

Logits are computed only at the scored positions (`lm_head` on gathered hidden states): models whose
head does more than a linear map (logit soft-capping, scaling) are not supported by this shortcut.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from raymeta.core.lm import hf_model, sequence_losses, span_positions
from raymeta.data.prompts import Scored

__all__ = ["OptionScorer"]


class OptionScorer:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_length: int,
        allow_truncation: bool = True,
        prefix_cache: bool = True,
        max_batch_tokens: int = 16384,
    ) -> None:
        self.model = model
        self.max_length = max_length
        self.allow_truncation = allow_truncation
        self.prefix_cache = prefix_cache
        self.max_batch_tokens = max_batch_tokens
        self.device = next(model.parameters()).device
        hf: Any = hf_model(model)  # a Hugging Face causal LM (inside a PeftModel): body and output head
        self._base = hf.base_model
        self._head = hf.get_output_embeddings()

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
            cache = self._base(input_ids=torch.tensor([prefix[:-1]], device=self.device), use_cache=True).past_key_values
            by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for i in idx:
                by_context[seqs[i].context].append(i)
            single = [i for group in by_context.values() if len(group) == 1 for i in group]
            for context, group in by_context.items():
                if len(group) > 1:
                    self._score_shared_context(prefix, cache, context, [seqs[i].target for i in group], group, losses)
            if single:
                self._score_cached(prefix, cache, [seqs[i] for i in single], single, losses)
        return losses

    def _losses(self, hidden: torch.Tensor, ids: torch.Tensor, spans: list[tuple[int, int]]) -> list[float]:
        """Mean CE of ids[b, start:end] predicted from hidden[b, start-1:end-1], for each row b."""
        rows, cols = span_positions(spans, ids.device)
        return sequence_losses(hidden[rows, cols - 1], ids[rows, cols], [e - s for s, e in spans], self._head).tolist()

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
            for j, loss in zip(batch, self._losses(hidden, ids, spans)):
                losses[idx[j]] = loss

    def _score_cached(self, prefix: tuple[int, ...], cache: Any, seqs: list[Scored], idx: list[int], losses: list[float]) -> None:
        offset = len(prefix) - 1
        conts = [[prefix[-1], *s.context, *s.target] for s in seqs]
        for batch in self._batches([len(c) for c in conts], extra=offset):
            width = max(len(conts[j]) for j in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            spans = []
            for row, j in enumerate(batch):
                ids[row, : len(conts[j])] = torch.tensor(conts[j])
                spans.append((1 + len(seqs[j].context), len(conts[j])))
            ids = ids.to(self.device)
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(batch))
            positions = torch.arange(offset, offset + width, device=self.device).expand(len(batch), -1)
            hidden = self._base(
                input_ids=ids, past_key_values=batch_cache, position_ids=positions, use_cache=True
            ).last_hidden_state
            for j, loss in zip(batch, self._losses(hidden, ids, spans)):
                losses[idx[j]] = loss

    def _score_shared_context(
        self,
        prefix: tuple[int, ...],
        cache: Any,
        context: tuple[int, ...],
        targets: list[tuple[int, ...]],
        idx: list[int],
        losses: list[float],
    ) -> None:
        stem = torch.tensor([[prefix[-1], *context]], device=self.device)
        offset = len(prefix) - 1
        stem_cache = copy.deepcopy(cache)
        positions = torch.arange(offset, offset + stem.shape[1], device=self.device)[None]
        last = self._base(input_ids=stem, past_key_values=stem_cache, position_ids=positions, use_cache=True).last_hidden_state[
            0, -1
        ]
        # hidden[j][t] predicts targets[j][t]: t = 0 from the stem's last position, t > 0 from the options pass
        hidden = [[last] for _ in targets]
        longer = [j for j, t in enumerate(targets) if len(t) > 1]
        if longer:
            width = max(len(targets[j]) - 1 for j in longer)
            ids = torch.zeros(len(longer), width, dtype=torch.long)
            for row, j in enumerate(longer):
                ids[row, : len(targets[j]) - 1] = torch.tensor(targets[j][:-1])
            stem_cache.batch_repeat_interleave(len(longer))
            start = offset + stem.shape[1]
            positions = torch.arange(start, start + width, device=self.device).expand(len(longer), -1)
            out = self._base(
                input_ids=ids.to(self.device), past_key_values=stem_cache, position_ids=positions, use_cache=True
            ).last_hidden_state
            for row, j in enumerate(longer):
                hidden[j].extend(out[row, : len(targets[j]) - 1])
        flat_hidden = torch.stack([h for hs in hidden for h in hs])
        flat_targets = torch.tensor([tok for t in targets for tok in t], device=self.device)
        for j, loss in zip(idx, sequence_losses(flat_hidden, flat_targets, [len(t) for t in targets], self._head).tolist()):
            losses[j] = loss
