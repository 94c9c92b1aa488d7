"""Parameter-efficient meta-training: LoRA through PEFT and `trainable` subsets (maths, checkpoints, bad input)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from raymeta.cli import main
from raymeta.config import load_config
from raymeta.core.lm import FunctionalLM
from raymeta.core.meta import MetaConfig, MetaLearner, TaskBatch, task_meta_gradient
from raymeta.model.weights import AdapterConfig, WeightsConfig, prepare
from raymeta.run.api import evaluate, train
from tests.conftest import make_data_dir, tiny_gpt2, tiny_llama, tiny_train_overrides
from tests.test_meta import V, _batch, _cfg, _outer_state, assert_matches_finite_differences


def _lora(model, r: int = 2, random_b: bool = True, target: str = "all-linear"):
    """The model with LoRA injected; B random (PEFT starts it at zero) so that every term of the meta-gradient is non-zero."""
    peft_model = prepare(model, WeightsConfig(adapter=AdapterConfig(type="lora", r=r, alpha=2 * r, target_modules=target)))
    if random_b:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return peft_model


@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_over_lora_adapters_matches_finite_differences(steps):
    # float64 central differences of the whole bi-level objective, as a function of the adapter tensors only
    model = _lora(tiny_gpt2(vocab_size=V, dtype=torch.float64))
    flm = FunctionalLM(model)
    params = flm.params()
    assert params and all(".lora_" in n for n in params)  # the base is frozen: only adapters are θ
    assert all(p.dtype == torch.float64 for p in params.values())
    cfg = _cfg(inner="adamw", policy="shared", steps=steps, weight_decay=0.01, eps=1e-4)
    outer = _outer_state(params)
    batch = TaskBatch("t", _batch(1), _batch(2))
    result = task_meta_gradient(flm, params, outer, batch, cfg)
    assert set(result.grads) == set(params) and set(result.inner_state.m) == set(params)
    assert_matches_finite_differences(flm, params, outer, batch, cfg, result, h=1e-6, rel=1e-6)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_functional_forward_equals_peft_forward(make):
    model = _lora(make(vocab_size=V, dtype=torch.float64))
    flm = FunctionalLM(model)
    batch = _batch(4, rows=3, length=9)
    ours = flm.loss(flm.params(), batch)
    logits = model(input_ids=batch.ids).logits  # PEFT's own forward (PeftModelForCausalLM)
    per_row = [F.cross_entropy(logits[b, s - 1 : e - 1], batch.ids[b, s:e]) for b, (s, e) in enumerate(batch.spans)]
    assert float(ours) == pytest.approx(float(torch.stack(per_row).mean()), rel=1e-12)


@pytest.mark.parametrize("method", ["maml_en_llm", "fomaml", "reptile", "metaicl"])
def test_a_subset_run_leaves_frozen_weights_bit_identical(method):
    model = tiny_llama(vocab_size=V)
    prepare(model, WeightsConfig(trainable=r"layers\.1\."))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = MetaConfig(method=method, moment_policy="none" if method == "metaicl" else "shared")
    cfg.inner.lr = cfg.outer.lr = 1e-2
    learner = MetaLearner(model, cfg)
    assert set(learner.flm.params()) == {n for n in before if "layers.1." in n}
    for step in range(2):
        learner.step([TaskBatch("a", _batch(step), _batch(step + 10)), TaskBatch("b", _batch(step + 20), _batch(step + 30))])
    for n, p in model.named_parameters():
        if "layers.1." not in n:
            assert torch.equal(p, before[n]), n  # frozen: bit for bit, the tied embedding and head included
    assert all(not torch.equal(p, before[n]) for n, p in learner.flm.params().items())


def test_lora_meta_step_moves_adapters_only():
    model = _lora(tiny_llama(vocab_size=V), random_b=False)
    base = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if ".lora_" not in n}
    learner = MetaLearner(model, MetaConfig(method="maml_en_llm"))
    learner.step([TaskBatch("a", _batch(1), _batch(2))])
    after = dict(model.get_base_model().named_parameters())
    assert all(torch.equal(after[n], t) for n, t in base.items())
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in after.items() if "lora_B" in n)  # B left zero


@pytest.fixture()
def tiny_setup(tmp_path, gpt2_tokenizer):
    model_dir = tmp_path / "tiny-model"
    tiny_gpt2().save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    return model_dir, make_data_dir(tmp_path / "data", k=4)


LORA = ("adapter.type=lora", "adapter.r=4", "adapter.alpha=8")


def _cfg_run(tmp_path, model_dir, data, out, *extra):
    return load_config(None, tiny_train_overrides(model_dir, data, tmp_path / out, "distributed=false", *LORA, *extra))


def test_lora_checkpoint_is_a_peft_folder_resumes_exactly_and_evaluates(tmp_path, tiny_setup, gpt2_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, data = tiny_setup
    straight = train(_cfg_run(tmp_path, model_dir, data, "a", "steps=4"), progress=False)
    train(_cfg_run(tmp_path, model_dir, data, "b", "steps=2"), progress=False)
    resumed = train(_cfg_run(tmp_path, model_dir, data, "b", "steps=4"), resume=True, progress=False)
    folder = straight / "model"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "model.safetensors").exists()  # the adapter only, not a copy of the base
    assert json.loads((folder / "raymeta_base.json").read_text())["base_model"] == str(model_dir)
    a, b = load_file(str(folder / "adapter_model.safetensors")), load_file(str(resumed / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume is exact, bit for bit
    oa, ob = load_file(str(straight / "optimizer.safetensors")), load_file(str(resumed / "optimizer.safetensors"))
    assert oa.keys() == ob.keys() and all(".lora_" in k for k in oa) and all(torch.equal(oa[k], ob[k]) for k in oa)

    # PEFT's own loader, on the base it names, scores exactly what raymeta's evaluation of the checkpoint scores
    base = AutoModelForCausalLM.from_pretrained(
        json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    opts = dict(data=data, setting="toy", k=4, seeds=(100,), variants=("direct",), modes=("icl",), cache=False)
    ours = evaluate(str(straight), **opts)
    theirs = evaluate(peft_model.get_base_model(), gpt2_tokenizer, **opts)
    merged = evaluate(str(straight), merge=True, **opts)
    assert ours["runs"] == theirs["runs"]
    assert merged["runs"]["direct/icl"]["all"]["mean"] == pytest.approx(ours["runs"]["direct/icl"]["all"]["mean"], abs=1e-9)


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("adapter.r=0", "adapter.r: expected an integer >= 1"),
        ("adapter.target_modules=no_such_proj", "adapter.target_modules:"),
        ("trainable=nothing_matches_this", "trainable: 'nothing_matches_this' matches no trainable parameter"),
        ("adapter.type=prefix", "adapter.type: expected one of none, lora"),
    ],
)
def test_bad_adapter_settings_are_one_line_before_anything_is_written(tmp_path, tiny_setup, capsys, override, fragment):
    model_dir, data = tiny_setup
    out = tmp_path / "bad"
    args = tiny_train_overrides(model_dir, data, out, "distributed=false", "adapter.type=lora", override)
    (tmp_path / "c.yaml").write_text("{}\n")
    assert main(["train", "--quiet", str(tmp_path / "c.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists()


def test_an_adapter_on_another_base_is_refused(tmp_path, tiny_setup, gpt2_tokenizer, capsys):
    model_dir, data = tiny_setup
    final = train(_cfg_run(tmp_path, model_dir, data, "a", "steps=1"), progress=False)
    other = tmp_path / "other-model"
    tiny_gpt2(seed=1).save_pretrained(other)  # same architecture and names, other weights
    gpt2_tokenizer.save_pretrained(other)
    code = main(["eval", "--model", str(final), "--base-model", str(other), "--data", str(data), "--setting", "toy"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--base-model" in err and "different weights" in err, err


def test_bf16_for_full_weight_second_order_warns_and_names_the_faithful_policy():
    import warnings

    with pytest.warns(UserWarning, match="bf16_query"):
        load_config(None, ["method=maml_en_llm", "precision=bf16"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["method=maml_en_llm", "precision=bf16_query"])
        load_config(None, ["method=maml_en_llm", "precision=bf16", "adapter.type=lora"])  # measured faithful with LoRA
        load_config(None, ["method=metaicl", "precision=bf16"])


def test_lora_run_validates_and_its_checkpoint_adapts_its_adapters(tmp_path, gpt2_tokenizer):
    from raymeta.eval.adapt import AdaptConfig
    from raymeta.eval.icl import EvalConfig

    model_dir = tmp_path / "tiny-model"
    tiny_gpt2().save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    data = make_data_dir(tmp_path / "data", k=4, n_train=3)
    extra = ("steps=1", "validation.tasks=1", "validation.k=2", "validation.adapt_steps=1", "validation.test_examples=2")
    final = train(_cfg_run(tmp_path, model_dir, data, "v", *extra), progress=False)
    record = json.loads((tmp_path / "v" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "val_score" in record and "val_adapt_score" in record  # scoring and adaptation of a PeftModel
    cfg = EvalConfig(k=4, seeds=(100,), variants=("direct",), modes=("icl",), adapt=AdaptConfig(1, "adamw", 1e-2))
    for merge in (False, True):  # adaptation adapts the adapters, or every weight once merged
        out = evaluate(str(final), data=data, setting="toy", config=cfg, cache=False, merge=merge)
        assert "direct/icl+adapt1" in out["runs"]
    # as trained: the adapters, from the run's outer state S (whose names are the adapter tensors')
    out = evaluate(
        str(final), data=data, setting="toy", k=4, seeds=(100,), variants=("direct",), modes=("icl",), adapt="as-trained"
    )
    assert "direct/icl+as-trained1" in out["runs"] and out["config"]["adapt"]["moment_policy"] == "shared"


def test_a_trainable_head_under_peft_is_the_one_the_loss_uses():
    """Under PEFT the head's name is looked up among the Hugging Face names that `params()` uses: a
    trainable head passed in `params` is the head of the loss (before, the module's own was used, so
    an adapted head never reached the query loss and got no meta-gradient through it)."""
    from raymeta.core.lm import Batch, FunctionalLM

    model = _lora(tiny_gpt2(vocab_size=V, dtype=torch.float64), target="c_attn")
    for n, p in model.named_parameters():
        if n.endswith("wte.weight"):  # GPT-2's head is tied to the token embedding
            p.requires_grad_(True)
    flm = FunctionalLM(model)
    params = flm.params()
    assert flm.head_name in params
    batch = Batch(torch.tensor([[1, 2, 3, 4, 5]]), ((2, 5),))
    zero_head = {**params, flm.head_name: torch.zeros_like(params[flm.head_name])}
    with torch.no_grad():
        assert float(flm.loss(zero_head, batch)) == pytest.approx(math.log(V), rel=1e-12)  # uniform logits


def test_batch_counts_scored_tokens_and_positions():
    from raymeta.core.lm import Batch

    batch = Batch(torch.zeros(2, 12, dtype=torch.long), ((8, 12), (3, 5)))
    assert batch.n_tokens == 4 + 2  # the scored tokens (before: the span ends, 12 + 5)
    assert batch.n_positions == 24
