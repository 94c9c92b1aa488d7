"""Meta-training end to end on a tiny model folder: checkpoints, exact resume (bad configs: tests/test_bad_input.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from raymeta.cli import main
from raymeta.config import load_config
from raymeta.eval.metrics import accuracy, macro_f1
from raymeta.run.api import train
from tests.conftest import make_data_dir, tiny_gpt2, tiny_train_overrides


@pytest.fixture()
def tiny_setup(tmp_path, gpt2_tokenizer):
    model_dir = tmp_path / "tiny-model"
    tiny_gpt2().save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    data = make_data_dir(tmp_path / "data", k=4)
    return model_dir, data


def _cfg(tmp_path: Path, model_dir: Path, data: Path, out: str, *extra: str):
    return load_config(None, tiny_train_overrides(model_dir, data, tmp_path / out, "distributed=false", *extra))


def test_resume_continues_the_exact_trajectory(tmp_path, tiny_setup):
    model_dir, data = tiny_setup
    straight = train(_cfg(tmp_path, model_dir, data, "a", "steps=4"), progress=False)
    train(_cfg(tmp_path, model_dir, data, "b", "steps=2"), progress=False)
    resumed = train(_cfg(tmp_path, model_dir, data, "b", "steps=4"), resume=True, progress=False)
    assert straight.name == resumed.name == "step-000004"
    a, b = load_file(str(straight / "model" / "model.safetensors")), load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit for bit
    before = load_file(str(model_dir / "model.safetensors"))
    assert any(not (a[k] == before[k]).all() for k in a)  # and training did move the weights
    oa, ob = load_file(str(straight / "optimizer.safetensors")), load_file(str(resumed / "optimizer.safetensors"))
    assert all((oa[k] == ob[k]).all() for k in oa)
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    assert [r["meta_loss"] for r in la] == [r["meta_loss"] for r in lb]


def test_keep_checkpoints_deletes_all_but_the_newest_and_resume_still_works(tmp_path, tiny_setup):
    model_dir, data = tiny_setup
    cfg = _cfg(tmp_path, model_dir, data, "k", "steps=4", "checkpoint_every=1", "keep_checkpoints=2")
    train(cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    more = _cfg(tmp_path, model_dir, data, "k", "steps=6", "checkpoint_every=1", "keep_checkpoints=2")
    assert train(more, resume=True, progress=False).name == "step-000006"
    assert sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir()) == ["step-000005", "step-000006"]


def _eval_samples(model: Path, data: Path, out: Path) -> tuple[float, list[dict]]:
    argv = ["eval", "--quiet", "--model", str(model), "--data", str(data), "--setting", "toy", "--k", "4", "--seeds", "100"]
    argv += ["--variants", "direct", "--modes", "icl", "--no-cache", "--log-samples", "--out", str(out)]
    assert main(argv) == 0
    score = json.loads((out / "results.json").read_text())["runs"]["direct/icl"]["all"]["mean"]
    return score, [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["metaicl", "fomaml", "reptile", "maml_en_llm"])
def test_every_method_trains_and_its_checkpoint_evaluates(tmp_path, tiny_setup, capsys, method):
    model_dir, data = tiny_setup
    extra = ["steps=1", f"method={method}", "inner.steps=2"]
    final = train(_cfg(tmp_path, model_dir, data, method, *extra), progress=False)
    record = json.loads((tmp_path / method / "metrics.jsonl").read_text().splitlines()[0])
    assert record["skipped_steps"] == 0 and record["grad_norm"] > 0 and record["tokens"] > 0
    score, samples = _eval_samples(final, data, tmp_path / "ev")
    _, before = _eval_samples(model_dir, data, tmp_path / "ev-start")
    assert len(samples) == len(before) == 12  # 6 test examples of each of the 2 targets
    for s in samples:
        assert s["prediction"] == s["options"][min(range(len(s["options"])), key=s["option_losses"].__getitem__)]
    # the score is the targets' mean metric (macro-F1 for classification, accuracy else) of these very predictions ...
    sent, mc = ([s for s in samples if s["task"] == t] for t in ("sent", "mc"))
    expected = macro_f1([s["prediction"] for s in sent], [s["gold"] for s in sent]) + accuracy(
        [s["prediction"] for s in mc], [s["gold"] for s in mc]
    )
    assert score == pytest.approx(expected / 2)
    # ... of the trained weights, not the ones it started from
    assert any(a["option_losses"] != b["option_losses"] for a, b in zip(samples, before))


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(tmp_path, tiny_setup, capsys):
    model_dir, data = tiny_setup
    train(_cfg(tmp_path, model_dir, data, "r", "steps=1"), progress=False)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"model: {model_dir}\ndata: {data}\nsetting: toy\nout: {tmp_path / 'r'}\nk: 2\nsteps: 1\n")
    assert main(["train", "--quiet", str(cfg_file)]) == 2
    assert "holds checkpoints of an earlier run; pass --resume" in capsys.readouterr().err
    assert main(["train", "--quiet", str(cfg_file), f"out={tmp_path / 'fresh'}", "--resume"]) == 2
    assert "--resume: no checkpoint" in capsys.readouterr().err


def test_yaml_exponent_floats_and_nested_mappings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 3e-5\n  steps: 2\nouter:\n  lr: 1E-4\nbetas: [0.9, 0.95]\n")
    cfg = load_config(path, ["inner.optimizer=adam", "grad_clip=0"])
    assert (cfg.meta.inner.lr, cfg.meta.inner.steps, cfg.meta.outer.lr, cfg.meta.betas) == (3e-5, 2, 1e-4, (0.9, 0.95))
    assert cfg.meta.inner.optimizer == "adam" and cfg.meta.grad_clip == 0.0


@pytest.mark.parametrize("name", ["tiny", "quickstart", "main", "gpu_cluster", "lora", "gpu_lora"])
def test_shipped_configs_load_and_validate(name):
    cfg = load_config(Path("configs") / f"{name}.yaml")
    assert cfg.meta.method == "maml_en_llm" and cfg.meta.moment_policy == "shared"


def test_resume_compares_model_and_data_as_absolute_paths(tmp_path, monkeypatch):
    """A distributed run records the absolute paths it shipped to Ray; resuming with the relative ones the user
    typed is the same config, and another data folder is still refused."""
    from raymeta.config import to_dict, with_absolute_paths
    from raymeta.errors import UserError
    from raymeta.run.api import check_resume_config

    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    wanted = to_dict(load_config(None, ["model=model", "data=data"]))
    saved = with_absolute_paths(wanted)
    assert saved["model"] == str(tmp_path / "model") and saved["data"] == str(tmp_path / "data")
    check_resume_config(saved, wanted, False, "ckpt")
    with pytest.raises(UserError, match="data: "):
        check_resume_config(saved, to_dict(load_config(None, ["model=model", "data=other"])), False, "ckpt")


class _Stop(Exception):
    pass


def _stop_at(step: int):
    def hook(record: dict) -> None:
        if record["step"] == step:
            raise _Stop

    return hook


def test_resume_covers_the_outer_schedule_exactly(tmp_path, tiny_setup):
    """outer.schedule and warm-up: an interrupted run resumed from its step-2 checkpoint ends bit for bit
    where the straight run ends, and the logged outer lr follows Hugging Face's linear schedule."""
    model_dir, data = tiny_setup
    extra = ("steps=4", "outer.schedule=linear", "outer.warmup_steps=1", "weight_decay=0.01", "no_decay=true")
    straight = train(_cfg(tmp_path, model_dir, data, "a", *extra), progress=False)
    with pytest.raises(_Stop):
        train(_cfg(tmp_path, model_dir, data, "b", *extra), progress=False, on_step=_stop_at(3))
    resumed = train(_cfg(tmp_path, model_dir, data, "b", *extra), resume=True, progress=False)
    a, b = load_file(str(straight / "model" / "model.safetensors")), load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit for bit
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["outer_lr"] for r in la] == pytest.approx([0.0, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])  # warm-up from 0, then to 0 at 4
    assert [r["outer_lr"] for r in lb][-2:] == [r["outer_lr"] for r in la][-2:]
    assert all(r["meta_share"] >= 0 and r["support_grad_norm"] > 0 for r in la)
