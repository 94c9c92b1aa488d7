"""Adaptation evaluation: in-place adaptation on the k examples, exact restore, cached and labelled runs."""

from __future__ import annotations

import json
import shutil

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


def _trained_checkpoint(tmp_path, tokenizer, meta, data):
    """A float64 tiny model meta-trained for two steps with `meta`, written as a raymeta checkpoint."""
    from raymeta.config import TrainConfig, to_dict
    from raymeta.core.meta import MetaLearner, TaskBatch
    from raymeta.run.checkpoint import write_checkpoint

    model = tiny_gpt2(dtype=torch.float64)
    learner = MetaLearner(model, meta)
    builder = PromptBuilder(tokenizer, PromptFormat("direct", 256, 1024))
    pool = data.demonstrations("sent", 4, 13) + data.demonstrations("mc", 4, 100)
    for step in range(2):
        batches = []
        for i in range(2):
            ex = pool[(step + i) % len(pool) :] + pool[: (step + i) % len(pool)]
            support = make_batch([builder.training_sequence(ex[1:3], ex[0]), builder.training_sequence(ex[2:4], ex[1])], 1024)
            query = make_batch([builder.training_sequence(ex[4:6], ex[3])], 1024)
            batches.append(TaskBatch(f"t{i}", support, query))
        assert not learner.step(batches).skipped
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_checkpoint(
        folder, model, tokenizer, learner.state, step=2, sampler_state={}, skipped=0, config=to_dict(TrainConfig(meta=meta))
    )
    return model, learner, folder


@pytest.mark.parametrize("policy", ["shared", "init"])
def test_as_trained_adaptation_is_the_training_inner_loop_exactly(tmp_path, gpt2_tokenizer, policy):
    from raymeta.core.inner import adapt, inner_start
    from raymeta.core.meta import InnerConfig, MetaConfig, TaskBatch, task_meta_gradient
    from raymeta.model.load import load_model
    from raymeta.run.api import adaptation_as_trained

    data = DataDir(make_data_dir(tmp_path / "d"))
    meta = MetaConfig(
        method="maml_en_llm",
        inner=InnerConfig("adamw", 3e-3, steps=2),
        betas=(0.8, 0.99),
        eps=1e-6,
        weight_decay=0.01,
        moment_policy=policy,
    )
    model, learner, folder = _trained_checkpoint(tmp_path, gpt2_tokenizer, meta, data)
    cfg = adaptation_as_trained(folder)
    assert (cfg.source, cfg.steps, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay, cfg.moment_policy) == (
        "as-trained",
        2,
        3e-3,
        (0.8, 0.99),
        1e-6,
        0.01,
        policy,
    )
    assert cfg.state_step == learner.state.step > 0 and cfg.suffix == "+as-trained2"

    demos = data.demonstrations("sent", 4, 100)
    builder = PromptBuilder(gpt2_tokenizer, PromptFormat("direct", 256, 1024))
    support = make_batch([builder.training_sequence([d for d in demos if d is not t], t) for t in demos], 1024)
    # the training loop's own inner loop (what task_meta_gradient runs) on the same support batch
    flm = FunctionalLM(model)
    params = flm.params()
    spec = meta.inner_spec()
    expected, inner_state, *_ = adapt(
        flm, dict(params), support, spec, inner_start(spec, policy, params, learner.state), meta.inner.steps, second_order=True
    )
    if policy == "shared":  # and the final moments are the ones task_meta_gradient hands to the outer step
        result = task_meta_gradient(flm, params, learner.state, TaskBatch("t", support, support), meta)
        assert all(torch.equal(result.inner_state.m[n], inner_state.m[n]) for n in params)

    loaded = load_model(str(folder), dtype="float64")
    before = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    with adapted(loaded, builder, demos, cfg):
        got = dict(loaded.named_parameters())
        for n in params:
            assert torch.equal(got[n], expected[n].detach()), n
    assert all(torch.equal(p, before[n]) for n, p in loaded.named_parameters())

    # the explicit adaptation of the same step count is another procedure (zero moments, default settings)
    with adapted(loaded, builder, demos, AdaptConfig(steps=2, lr=3e-3)):
        assert any(not torch.equal(p, expected[n].detach()) for n, p in loaded.named_parameters())


def test_as_trained_evaluation_names_its_settings_and_refuses_what_has_no_inner_loop(tmp_path, gpt2_tokenizer):
    import raymeta
    from raymeta.core.meta import MetaConfig
    from raymeta.run.api import adaptation_as_trained

    data = DataDir(make_data_dir(tmp_path / "d"))
    _, learner, folder = _trained_checkpoint(tmp_path, gpt2_tokenizer, MetaConfig(moment_policy="shared"), data)
    res = raymeta.evaluate(
        str(folder / "model"),
        data=data,
        setting="toy",
        k=4,
        seeds=(100,),
        variants=("direct",),
        modes=("icl",),
        adapt="as-trained",
        dtype="float64",
        cache=False,
    )
    assert set(res["runs"]) == {"direct/icl+as-trained1"}
    record = res["config"]["adapt"]
    assert record["source"] == "as-trained" and record["moment_policy"] == "shared" and record["checkpoint"] == str(folder)
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert record["state_sha256"] == manifest["optimizer.safetensors"][1] and "state" not in record

    shutil.copytree(folder / "model", tmp_path / "raw")  # a model folder alone: no training state beside it
    with pytest.raises(UserError, match=r"^adapt: .*raw: not a raymeta checkpoint .*; adapt it explicitly"):
        adaptation_as_trained(tmp_path / "raw")
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "config": {**state["config"], "method": "metaicl"}}))
    with pytest.raises(UserError, match="meta-trained with method metaicl, which has no inner loop"):
        adaptation_as_trained(folder)
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "optimizer.safetensors").unlink()
    with pytest.raises(
        UserError, match="moment_policy shared starts the inner loop from the outer state S, and this checkpoint has none"
    ):
        adaptation_as_trained(folder)


def test_validation_adapts_as_trained_from_the_current_outer_state_unless_told_explicit():
    from raymeta.config import TrainConfig, apply_overrides
    from raymeta.core.optim import zeros_state
    from raymeta.run.validation import validation_adaptation

    cfg = apply_overrides(TrainConfig(), {"validation.adapt_steps": 3, "inner.lr": 3e-4, "eps": 1e-7}, "test").validate("test")
    state = zeros_state({"w": torch.ones(2)})
    state.step = 7
    got = validation_adaptation(cfg, state, 7)
    assert (got.source, got.steps, got.lr, got.eps, got.moment_policy, got.state_step) == (
        "as-trained",
        3,
        3e-4,
        1e-7,
        "shared",
        7,
    )
    assert got.state is state and got.suffix == "+as-trained3"
    apply_overrides(cfg, {"validation.adapt": "explicit", "validation.adapt_lr": 1e-3}, "test")
    explicit = validation_adaptation(cfg, state, 7)
    assert (explicit.source, explicit.lr, explicit.moment_policy, explicit.state) == ("explicit", 1e-3, "none", None)
    with pytest.raises(UserError, match="validation.adapt: expected one of as-trained, explicit"):
        apply_overrides(TrainConfig(), {"validation.adapt": "both"}, "test").validate("test")
