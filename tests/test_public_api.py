"""raymeta as a library, through its public names only (`import raymeta`): what a user's script does."""

from __future__ import annotations

import torch

import raymeta
from tests.conftest import make_data_dir, tiny_gpt2, tiny_llama, tiny_train_overrides


def test_meta_learner_on_a_users_own_model_and_batches():
    model = tiny_llama(vocab_size=40)
    for p in model.parameters():
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = raymeta.MetaLearner(model, raymeta.MetaConfig(method="maml_en_llm", moment_policy="shared"))
    gen = torch.Generator().manual_seed(0)

    def batch() -> raymeta.Batch:
        return raymeta.Batch(torch.randint(0, 40, (2, 9), generator=gen), ((6, 9), (5, 9)))

    tasks = [raymeta.TaskBatch(f"t{i}", batch(), batch()) for i in range(2)]
    metrics = learner.step(tasks)
    assert not metrics.skipped and metrics.grad_norm > 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    # one task's meta-gradient as a pure function of the weights
    result = raymeta.task_meta_gradient(learner.flm, learner.flm.params(), learner.state, tasks[0], learner.cfg)
    assert result.finite and set(result.grads) == set(learner.flm.params())


def test_bad_meta_config_is_one_user_error_naming_the_key():
    try:
        raymeta.MetaLearner(tiny_llama(vocab_size=40), raymeta.MetaConfig(moment_policy="always"))
    except raymeta.UserError as e:
        assert str(e) == "MetaConfig: moment_policy: expected one of none, init, shared, got 'always'"
    else:
        raise AssertionError("accepted a bad moment_policy")


def test_train_then_evaluate_through_the_public_api(tmp_path, gpt2_tokenizer):
    model_dir = tmp_path / "model"
    tiny_gpt2().save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    data = make_data_dir(tmp_path / "data", k=4)
    cfg = raymeta.load_config(None, tiny_train_overrides(model_dir, data, tmp_path / "run", "distributed=false", "steps=2"))
    assert isinstance(cfg, raymeta.TrainConfig) and cfg.meta.method == "maml_en_llm"
    final = raymeta.train(cfg, progress=False)
    assert final.name == "step-000002"
    results = raymeta.evaluate(
        str(final), setting="toy", data=data, k=4, seeds=(100,), variants=("direct",), modes=("icl",), cache=False
    )
    score = results["runs"]["direct/icl"]["all"]["mean"]
    assert 0.0 <= score <= 1.0 and results["targets"] == ["sent", "mc"]
