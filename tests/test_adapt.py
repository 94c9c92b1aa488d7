"""Adaptation evaluation: in-place adaptation on the k examples, exact restore, cached and labelled runs."""

from __future__ import annotations

import pytest
import torch

from raymeta.core.lm import FunctionalLM
from raymeta.data import DataDir
from raymeta.data.prompts import PromptBuilder, PromptFormat, make_batch
from raymeta.errors import UserError
from raymeta.eval.adapt import AdaptConfig, adapted
from raymeta.eval.icl import EvalConfig, LossCache, evaluate_setting
from tests.conftest import make_data_dir, tiny_gpt2


def test_adaptation_lowers_the_loss_on_the_examples_and_restores_the_weights(tmp_path, gpt2_tokenizer):
    data = DataDir(make_data_dir(tmp_path / "d"))
    demos = data.demonstrations("sent", 4, 100)
    model = tiny_gpt2()
    builder = PromptBuilder(gpt2_tokenizer, PromptFormat("direct", 256, 1024))
    batch = make_batch([builder.training_sequence([d for d in demos if d is not t], t) for t in demos], 1024)
    flm = FunctionalLM(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        loss_before = float(flm.loss(flm.params(), batch))
    with adapted(model, builder, demos, AdaptConfig(steps=3, lr=1e-2)) as key:
        with torch.no_grad():
            loss_inside = float(flm.loss(flm.params(), batch))
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert loss_inside < loss_before
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored exactly
    with adapted(model, builder, data.demonstrations("sent", 4, 13), AdaptConfig(steps=3, lr=1e-2)) as other:
        assert other != key
    with pytest.raises(UserError, match="^adapt.optimizer: "):
        AdaptConfig(steps=1, optimizer="lion")


def test_evaluation_after_adaptation(tmp_path, gpt2_tokenizer):
    data = DataDir(make_data_dir(tmp_path / "d"))
    model = tiny_gpt2()
    base = dict(k=4, seeds=(100, 13), variants=("direct",), modes=("icl",))
    evaluate_setting(
        model, gpt2_tokenizer, data, data.setting("toy"), EvalConfig(**base), cache=LossCache(tmp_path / "c"), progress=False
    )
    cfg = EvalConfig(**base, adapt=AdaptConfig(steps=2, lr=5e-2))
    cache = LossCache(tmp_path / "c")
    first = evaluate_setting(model, gpt2_tokenizer, data, data.setting("toy"), cfg, cache=cache, progress=False)
    assert set(first["runs"]) == {"direct/icl+adapt2"}
    assert cache.hits == 0 and cache.misses == 2 * 2  # adapted weights never reuse the plain model's losses
    again = LossCache(tmp_path / "c")
    second = evaluate_setting(model, gpt2_tokenizer, data, data.setting("toy"), cfg, cache=again, progress=False)
    assert second["runs"] == first["runs"] and again.misses == 0 and again.hits == 4
