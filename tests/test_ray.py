"""Ray placement: Ray-task executor vs local, task retries, 1 vs 2 Train workers, worker failure recovery.

The suite's shared embedded cluster (2 CPUs; `ray_local` in conftest): the tests start and stop only
their own Ray processes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raymeta.config import load_config
from raymeta.core.meta import MetaLearner, TaskBatch
from raymeta.errors import UserError
from raymeta.run.api import train
from raymeta.run.executor import LocalExecutor, RayExecutor
from tests.conftest import CrashOnce, tiny_run_folder, tiny_train_overrides
from tests.test_meta import _batch


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, gpt2_tokenizer):
    return tiny_run_folder(tmp_path_factory.mktemp("tiny"), gpt2_tokenizer)


def _cfg(root, out: str, *extra: str):
    return load_config(None, tiny_train_overrides(root / "model", root / "data", root / out, "steps=4", *extra))


def _weights(final) -> dict[str, torch.Tensor]:
    return load_file(str(final / "model" / "model.safetensors"))


def _learner(root):
    from raymeta.model.load import load_model

    model = load_model(str(root / "model"))
    for p in model.parameters():
        p.requires_grad_(True)
    cfg = load_config(None, ["method=maml_en_llm", "moment_policy=shared", "inner.steps=2"])
    return MetaLearner(model, cfg.meta), cfg


def _tasks() -> list[TaskBatch]:
    return [TaskBatch(f"t{i}", _batch(2 * i, length=9), _batch(2 * i + 1, length=9)) for i in range(3)]


@pytest.fixture()
def one_thread():
    """Ray workers run one BLAS thread. Second-order AdamW meta-gradients amplify summation-order
    differences (1 vs 2 threads: up to 3e-3 on this model in an ad-hoc check), so the driver matches them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ray_executor_gives_the_local_meta_gradient(ray_local, tiny_folder, tmp_path, one_thread):
    learner, cfg = _learner(tiny_folder)
    local = LocalExecutor().accumulate(learner, _tasks())
    marker = tmp_path / "task-crashed"
    remote = RayExecutor(str(tiny_folder / "model"), cfg, before_task=CrashOnce(marker))  # the first task to run dies once
    ray_acc = remote.accumulate(learner, _tasks())
    assert marker.exists()  # one task's process died and Ray retried it
    assert ray_acc.n == local.n == 3 and ray_acc.finite
    for name in local.grads:
        torch.testing.assert_close(ray_acc.grads[name], local.grads[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(ray_acc.m[name], local.m[name], rtol=0, atol=1e-6)
    assert ray_acc.query_loss == pytest.approx(local.query_loss, abs=1e-6)


def test_a_task_process_keeps_one_model_however_many_runs_it_serves(ray_local, tiny_folder, tmp_path, one_thread):
    """A Ray worker process outlives runs (and restarts, whose checkpoint folders differ): its model cache holds
    the newest model only, not one more per folder it was ever sent."""
    import shutil

    from raymeta.run import executor

    learner, cfg = _learner(tiny_folder)
    params = executor._numpy(learner.flm.params())
    executor._MODELS.clear()
    for i in range(3):
        folder = shutil.copytree(tiny_folder / "model", tmp_path / f"model-{i}")
        out = executor._run_task(str(folder), params, None, _tasks()[0], cfg.meta, cfg.weights, 1.0, None)
        assert math.isfinite(out["query_loss"])
        assert len(executor._MODELS) == 1
    executor._MODELS.clear()


def test_two_workers_follow_the_single_process_trajectory(ray_local, tiny_folder, one_thread):
    """Two Ray Train workers (a shard of the tasks each, their sums all-reduced) against the same run in this
    process (one BLAS thread, as each worker has)."""
    one = _weights(train(_cfg(tiny_folder, "one", "distributed=false"), progress=False))
    two = _weights(train(_cfg(tiny_folder, "two", "num_workers=2"), progress=False))
    start = load_file(str(tiny_folder / "model" / "model.safetensors"))
    assert any(not torch.equal(one[n], start[n]) for n in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6)


def test_a_killed_worker_is_restarted_and_the_run_ends_where_an_uninterrupted_one_does(
    ray_local, tiny_folder, tmp_path, one_thread
):
    # the uninterrupted run: in this process, its tasks as Ray tasks too (one BLAS thread, as a Train worker has)
    straight = _weights(train(_cfg(tiny_folder, "straight", "distributed=false", "executor=ray"), progress=False))
    marker = tmp_path / "worker-crashed"
    crashed = _cfg(tiny_folder, "crashed", "num_workers=1", "executor=ray", "max_failures=1", "keep_checkpoints=1")
    final = train(
        crashed, progress=False, after_step=CrashOnce(marker, step=3)
    )  # rank 0 dies after step 3, between the checkpoints at 2 and 4
    assert marker.exists()
    assert [p.name for p in (tiny_folder / "crashed" / "checkpoints").glob("step-*")] == ["step-000004"]
    recovered = _weights(final)
    for name in straight:
        assert torch.equal(recovered[name], straight[name]), name
    steps = [line for line in (tiny_folder / "crashed" / "metrics.jsonl").read_text().splitlines() if line]
    assert len(steps) == 4  # step 3 was redone from the checkpoint at step 2, and logged once


class RefuseInWorker:
    """An after-step hook that finds bad input where only a worker can (picklable: it travels to Ray Train)."""

    def __init__(self, calls: Path) -> None:
        self.calls = str(calls)

    def __call__(self, rank: int, record: dict) -> None:
        with open(self.calls, "a") as f:
            f.write(f"{rank} {record['step']}\n")
        raise UserError("found only in a worker", key="validation.k")


def test_a_user_error_in_a_worker_is_its_one_line_and_spends_no_restart(ray_local, tiny_folder, tmp_path):
    calls = tmp_path / "calls"
    cfg = _cfg(tiny_folder, "refused", "num_workers=1", "executor=local", "max_failures=2")
    with pytest.raises(UserError) as e:
        train(cfg, progress=False, after_step=RefuseInWorker(calls))
    assert str(e.value) == "validation.k: found only in a worker"
    assert calls.read_text() == "0 1\n"  # called once: Ray Train restarted nothing


def test_bad_setup_fails_on_the_driver_in_one_line_before_ray_starts(tiny_folder, capsys):
    from raymeta.cli import main

    cfg = tiny_folder / "c.yaml"
    cfg.write_text(
        f"model: {tiny_folder / 'model'}\ndata: {tiny_folder / 'data'}\nsetting: toy\nout: {tiny_folder / 'bad'}\nk: 2\n"
        "tasks_per_step: 5\n"
    )
    assert main(["train", "--quiet", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err == "raymeta: error: tasks_per_step: expected at most the 2 meta-train tasks, got 5\n"


def test_too_few_cpus_for_workers_and_tasks_is_refused(ray_local, tiny_folder):
    from raymeta.errors import UserError

    with pytest.raises(UserError, match="needs 2.5 CPUs, but the Ray cluster has 2: the run would wait forever"):
        train(_cfg(tiny_folder, "greedy", "num_workers=2", "cpus_per_worker=1", "executor=ray"), progress=False)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_lora_tasks_ship_adapters_only_and_give_the_local_meta_gradient(ray_local, tiny_folder, one_thread, checkpointed):
    # checkpointed: the Ray tasks run with activation checkpointing (layer-wise inner backward), the local
    # reference without it
    from raymeta.model.load import load_trainable

    args = ["method=maml_en_llm", "moment_policy=shared", "adapter.type=lora", "adapter.r=2"]
    cfg = load_config(None, args)
    model = load_trainable(str(tiny_folder / "model"), cfg.weights)
    learner = MetaLearner(model, cfg.meta)
    local = LocalExecutor().accumulate(learner, _tasks())
    ray_cfg = load_config(None, [*args, "activation_checkpointing=true"]) if checkpointed else cfg
    ray_acc = RayExecutor(str(tiny_folder / "model"), ray_cfg).accumulate(learner, _tasks())
    assert set(ray_acc.grads) == set(learner.flm.params()) and all(".lora_" in n for n in ray_acc.grads)
    for name in local.grads:
        torch.testing.assert_close(ray_acc.grads[name], local.grads[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(ray_acc.v[name], local.v[name], rtol=0, atol=1e-9)


def test_two_lora_workers_follow_the_single_process_trajectory(ray_local, tiny_folder):
    lora = ("adapter.type=lora", "adapter.r=2", "trainable=h\\.1\\..*lora_")  # the adapters of layer 1
    one = train(_cfg(tiny_folder, "lora-one", "distributed=false", *lora), progress=False)
    two = train(_cfg(tiny_folder, "lora-two", "num_workers=2", *lora), progress=False)
    a = load_file(str(one / "model" / "adapter_model.safetensors"))
    b = load_file(str(two / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    frozen_b = [n for n in a if ".h.0." in n and "lora_B" in n]
    assert frozen_b and all(not a[n].any() for n in frozen_b)  # layer 0's adapters stay at PEFT's zero B
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


def test_the_driver_prints_one_progress_line_per_meta_step(ray_local, tiny_folder, capfd, monkeypatch):
    """...with the run given by relative paths, as configs/main.yaml gives `out`: the workers resolve them where
    the user ran raymeta (Ray Train starts them in its own artifacts folder, where metrics.jsonl once went)."""
    monkeypatch.chdir(tiny_folder)
    train(
        load_config(None, tiny_train_overrides(Path("model"), Path("data"), Path("progress"), "steps=3", "num_workers=1")),
        progress=True,
    )
    assert len((tiny_folder / "progress" / "metrics.jsonl").read_text().splitlines()) == 3
    out = capfd.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[raymeta] ")]
    gcs = ray_local.get_runtime_context().gcs_address
    assert lines[0].startswith(f"[raymeta] Ray: a new embedded cluster of this process at {gcs} (loopback only, token auth)")
    assert [line.split("  ")[0] for line in lines[1:]] == [f"[raymeta] maml_en_llm step {s}/3" for s in (1, 2, 3)], out
    assert "Loading weights" not in out
