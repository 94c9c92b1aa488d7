"""A causal LM as a function of its weights, and MetaICL's loss over scored spans.

One loss, used by training (`FunctionalLM.loss`) and by evaluation (`raymeta.eval.scoring`): for each
sequence the mean cross-entropy of its scored tokens. Logits are computed at the scored positions only
(the output head applied to the gathered hidden states) and in at least float32; float64 stays
float64 (Hugging Face's own loss would upcast float64 down to float32, which breaks float64
finite-difference checks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from raymeta.errors import UserError

__all__ = ["Batch", "FunctionalLM", "hf_model", "sequence_losses", "span_positions"]

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids and, per row, the [start, end) span of scored tokens (start >= 1)."""

    ids: torch.Tensor
    spans: tuple[tuple[int, int], ...]

    @property
    def n_tokens(self) -> int:
        """The scored tokens: what the loss averages over (Σ end − start)."""
        return sum(e - s for s, e in self.spans)

    @property
    def n_positions(self) -> int:
        """The token positions a forward pass runs: rows × width, padding included."""
        return int(self.ids.numel())


def span_positions(spans: Sequence[tuple[int, int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every scored token, spans in order; token (b, c) is predicted from position c - 1."""
    rows = torch.cat([torch.full((e - s,), b, dtype=torch.long, device=device) for b, (s, e) in enumerate(spans)])
    cols = torch.cat([torch.arange(s, e, device=device) for s, e in spans])
    return rows, cols


def sequence_losses(
    hidden: torch.Tensor, targets: torch.Tensor, lengths: Sequence[int], head: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Mean cross-entropy of each sequence's scored tokens.

    `hidden[t]` is the hidden state that predicts `targets[t]`; the tokens of sequence j are the
    `lengths[j]` consecutive rows after those of sequence j - 1. `head` maps hidden states to logits.
    """
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up to fp32; fp64 stays
    token_loss = F.cross_entropy(logits, targets, reduction="none")
    return torch.stack([part.mean() for part in token_loss.split(list(lengths))])


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a `peft.PeftModel` (its LoRA layers in place), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class FunctionalLM:
    """A Hugging Face causal LM called with an explicit dict of weights (`torch.func.functional_call`).

    The loss is MetaICL's: per sequence the mean cross-entropy of its scored tokens, then the mean over
    sequences (`sequence_losses`).

    The weights passed to `loss` are the trainable ones (`requires_grad`); frozen weights (a `trainable`
    subset, or the base under LoRA) are the module's own. A PEFT model is called through the Hugging
    Face model inside it (its LoRA layers in place), so names are the Hugging Face ones
    (`model.layers.0.self_attn.q_proj.lora_A.default.weight`).
    """

    def __init__(self, model: torch.nn.Module, *, math_attention: bool = True, checkpointing: int = 0) -> None:
        hf: Any = hf_model(model)
        self.model: torch.nn.Module = hf
        self.base: torch.nn.Module = hf.base_model
        self.prefix = hf.base_model_prefix + "."
        named = dict(hf.named_parameters())  # the Hugging Face names, as `params()` (not a PeftModel's own)
        head = hf.get_output_embeddings()
        by_id = {id(p): n for n, p in named.items()}
        if id(head.weight) not in by_id:
            raise UserError("its output head's weight is not one of its parameters; unsupported model", key="model")
        self.head_name = by_id[id(head.weight)]
        self.head_weight = head.weight
        self.head_bias = head.bias
        self.names = [n for n, p in named.items() if p.requires_grad]
        self.math_attention = math_attention
        # `checkpointing` n > 0: exact activation checkpointing, n decoder layers per checkpoint
        self.checkpointing: Any = None
        if checkpointing:
            from raymeta.core.checkpointing import LayerCheckpointing

            self.checkpointing = LayerCheckpointing(hf, self.names, checkpointing, self.attention)

    def no_decay_names(self) -> frozenset[str]:
        """The trainable weights that `no_decay: true` exempts from weight decay: biases, and the weights
        of embeddings and normalisation layers (any module whose class name has "Norm": LayerNorm,
        RMSNorm, ...), as Hugging Face's Trainer leaves them out. A head tied to the embedding is one."""
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        out = {n for n in trainable if n.endswith("bias")}
        for prefix, module in self.model.named_modules():
            if isinstance(module, torch.nn.Embedding) or "Norm" in type(module).__name__:
                out |= {f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)}
        return frozenset(out & trainable)

    @property
    def device(self) -> torch.device:
        return self.head_weight.device

    def params(self) -> Tensors:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def attention(self) -> Iterator[None]:
        """SDPA restricted to the math backend: the flash/efficient kernels have no double backward."""
        if self.math_attention:
            with sdpa_kernel([SDPBackend.MATH]):
                yield
        else:
            yield

    def loss(self, params: Tensors, batch: Batch) -> torch.Tensor:
        if self.checkpointing is None:
            return self._loss(params, batch, None)
        with self.checkpointing.running(params, record=False):  # checkpointed forwards, exact
            return self._loss(params, batch, None)

    def _loss(self, params: Tensors, batch: Batch, aliases: dict[str, list[torch.Tensor]] | None) -> torch.Tensor:
        """The loss; with `aliases` (checkpointed second order) every trainable weight outside the decoder
        layers enters as a fresh view of itself, listed there (the head apart from a tied embedding)."""

        def use(name: str, t: torch.Tensor) -> torch.Tensor:
            if aliases is None or name not in self.checkpointing.outside:
                return t
            view = t.view_as(t)
            aliases.setdefault(name, []).append(view)
            return view

        base_params = {n[len(self.prefix) :]: use(n, t) for n, t in params.items() if n.startswith(self.prefix)}
        ids = batch.ids.to(self.device)
        with self.attention():
            hidden = functional_call(self.base, base_params, (ids,), {"use_cache": False}).last_hidden_state
        rows, cols = span_positions(batch.spans, ids.device)
        weight = use(self.head_name, params[self.head_name]) if self.head_name in params else self.head_weight
        losses = sequence_losses(
            hidden[rows, cols - 1],
            ids[rows, cols],
            [e - s for s, e in batch.spans],
            lambda h: F.linear(h, weight, self.head_bias),
        )
        return losses.sum() / len(batch.spans)

    def loss_and_grads(self, params: Tensors, batch: Batch, *, create_graph: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The loss and its gradient with respect to `params` (in their order); with `create_graph` the
        gradient is differentiable (second order). Under activation checkpointing the layers are
        recomputed from the weights they ran with, and second order takes the layer-wise checkpointed
        inner backward (raymeta.core.checkpointing)."""
        names = list(params)
        ckpt = self.checkpointing
        if ckpt is None:
            loss = self.loss(params, batch)
            return loss, list(torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph))
        with ckpt.running(params, record=create_graph) as tape:
            aliases: dict[str, list[torch.Tensor]] | None = {} if create_graph else None
            loss = self._loss(params, batch, aliases)
        if not create_graph:  # first order: plain autograd through the checkpointed forwards
            return loss, list(torch.autograd.grad(loss, [params[n] for n in names]))
        assert aliases is not None
        return loss, ckpt.grads(loss, tape, aliases, names)

    def check_double_backward(self) -> None:
        """Fail clearly at start-up when the attention implementation cannot do second order."""
        params = self.params()
        batch = Batch(torch.tensor([[1, 2, 3, 4]]), ((1, 4),))
        try:
            loss = self.loss(params, batch)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
            total = sum((g.pow(2).sum() for g in grads if g is not None), torch.zeros((), device=batch.ids.device))
            torch.autograd.grad(total, list(params.values()), allow_unused=True)
        except RuntimeError as e:
            impl = getattr(getattr(self.model, "config", None), "_attn_implementation", "?")
            first = str(e).splitlines()[0]
            raise UserError(
                f"attention implementation {impl!r} has no double backward ({first}); load it with "
                "attn_implementation='eager' or use SDPA's math backend",
                key="model",
            ) from None
