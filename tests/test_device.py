"""The one device rule, checked without a GPU, and the real CUDA paths where there is one (marked `gpu`).

Without a GPU: the model goes to PyTorch's `meta` device (shapes, no data) and a dispatch mode records
every operation whose tensors are elsewhere. A tensor built on the CPU in the middle of a meta-step
(a buffer, an index, an all-reduce payload) shows up there, as it would cost a copy on a GPU or fail
under NCCL. Only the host reads of a step (`item`, `all_finite`, `host_values`: a loss, a norm, a
finiteness check, and one in Hugging Face's mask code) are replaced, since a meta tensor has no value.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from raymeta.core.device import resolve_device
from raymeta.core.lm import Batch
from raymeta.core.meta import MetaConfig, MetaLearner, TaskBatch
from raymeta.errors import UserError
from tests.conftest import tiny_llama

V = 40
MOVES = {"aten._to_copy.default", "aten.copy_.default"}  # a batch's CPU ids moving to the device: by design


class DeviceAudit(TorchDispatchMode):
    """Every operation that reads or makes a tensor (other than a 0-dim scalar) away from `device`."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.strays: list[str] = []
        self.collectives: list[tuple[str, torch.device]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        inputs = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name.startswith("c10d."):
            self.collectives += [(name, t.device) for t in inputs]
        checked = outputs if name in MOVES else inputs + outputs
        self.strays += [f"{name} on {t.device}" for t in checked if t.device != self.device and t.dim() > 0]
        return out


@pytest.fixture()
def host_reads_on_meta(monkeypatch):
    """A meta tensor has no value: its host reads return a stand-in (1.0, finite)."""
    import raymeta.core.meta as meta
    import raymeta.run.ray_train as distributed

    def item(t):
        return 1.0 if t.is_meta else float(t.detach())

    monkeypatch.setattr(meta, "item", item)
    # Hugging Face's mask code also reads the position ids on the host (a check for packed sequences)
    from transformers import masking_utils

    packed = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda pos: None if pos.is_meta else packed(pos))
    monkeypatch.setattr(meta, "all_finite", lambda ts: True)
    values = lambda t: [1.0] * t.numel() if t.is_meta else t.tolist()  # noqa: E731
    monkeypatch.setattr(distributed, "host_values", values)
    monkeypatch.setattr(meta, "host_values", values)


def _tasks() -> list[TaskBatch]:
    gen = torch.Generator().manual_seed(0)

    def batch() -> Batch:  # built on the CPU, as the sampler builds them
        return Batch(torch.randint(0, V, (2, 9), generator=gen), ((6, 9), (5, 9)))

    return [TaskBatch(f"t{i}", batch(), batch()) for i in range(2)]


@pytest.mark.parametrize("method", ["maml_en_llm", "fomaml", "reptile", "metaicl"])
def test_a_meta_step_keeps_every_tensor_on_the_models_device(host_reads_on_meta, method):
    model = tiny_llama(vocab_size=V).to("meta")
    for p in model.parameters():
        p.requires_grad_(True)
    policy = "shared" if method != "metaicl" else "none"
    learner = MetaLearner(model, MetaConfig(method=method, moment_policy=policy))
    tasks = _tasks()
    with DeviceAudit("meta") as audit:
        learner.step(tasks)
    assert not audit.strays, sorted(set(audit.strays))[:10]
    assert all(p.is_meta for p in model.parameters())
    assert learner.state is not None and all(t.is_meta for t in [*learner.state.m.values(), *learner.state.v.values()])


def test_the_all_reduce_sends_device_tensors_only(host_reads_on_meta):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from raymeta.run.ray_train import all_reduce

    model = tiny_llama(vocab_size=V).to("meta")
    for p in model.parameters():
        p.requires_grad_(True)
    learner = MetaLearner(model, MetaConfig(method="maml_en_llm", moment_policy="shared"))
    acc = learner.accumulate(_tasks())
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        with DeviceAudit("meta") as audit:
            out = all_reduce(acc, learner)
    finally:
        dist.destroy_process_group()
    assert audit.collectives and all(device.type == "meta" for _, device in audit.collectives), audit.collectives
    assert not audit.strays, sorted(set(audit.strays))[:10]
    assert all(g.is_meta for g in out.grads.values()) and set(out.m) == set(out.grads)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_asking_for_cuda_without_it_is_one_line():
    with pytest.raises(UserError, match=r"^device: cuda: (this torch has no CUDA support|no CUDA device is visible)"):
        resolve_device("cuda")
    with pytest.raises(UserError, match=r"^device: expected auto, cpu, cuda or cuda:N, got 'gpu'$"):
        resolve_device("gpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_train_with_device_cuda_on_a_cpu_machine_exits_2_before_anything(tmp_path, capsys):
    from raymeta.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    code = main(["train", "--quiet", "configs/tiny.yaml", "device=cuda", f"out={out}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("raymeta: error: device: cuda: "), err
    assert not out.exists()
    code = main(["train", "--quiet", "configs/tiny.yaml", "device=cuda", "distributed=true", f"out={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "device: expected auto or cpu for Ray Train workers without use_gpu" in err


# --- the real CUDA paths (skipped without CUDA) ------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
def test_gpu_meta_gradient_matches_the_cpu_one():
    from raymeta.core.meta import task_meta_gradient

    results = {}
    for device in ("cpu", "cuda"):
        model = tiny_llama(vocab_size=V).to(device)
        for p in model.parameters():
            p.requires_grad_(True)
        learner = MetaLearner(model, MetaConfig(method="maml_en_llm", moment_policy="shared"))
        r = task_meta_gradient(learner.flm, learner.flm.params(), learner.state, _tasks()[0], learner.cfg)
        results[device] = torch.cat([g.detach().cpu().reshape(-1) for g in r.grads.values()])
    rel = float((results["cuda"] - results["cpu"]).norm() / results["cpu"].norm())
    assert rel <= 1e-3, rel


@pytest.mark.gpu
@gpu
def test_gpu_single_process_run_trains_and_its_checkpoint_loads_on_the_cpu(tmp_path, gpt2_tokenizer):
    from safetensors.torch import load_file

    from raymeta.config import load_config
    from raymeta.run.api import train
    from tests.conftest import make_data_dir, tiny_gpt2, tiny_train_overrides

    model_dir = tmp_path / "model"
    tiny_gpt2().save_pretrained(model_dir)
    gpt2_tokenizer.save_pretrained(model_dir)
    data = make_data_dir(tmp_path / "data", k=4)
    cfg = load_config(
        None, tiny_train_overrides(model_dir, data, tmp_path / "run", "distributed=false", "device=cuda", "steps=2")
    )
    final = train(cfg, progress=False)
    moments = load_file(str(final / "optimizer.safetensors"))
    assert all(t.device.type == "cpu" for t in moments.values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_all_reduce_keeps_the_weights_dtype(tmp_path, dtype):
    """float64 runs are not rounded to float32 on their way through the all-reduce, and bf16 runs do not send
    twice the bytes they need (one rank: the sum is the input, bit for bit)."""
    from raymeta.run.ray_train import all_reduce

    model = tiny_llama(vocab_size=V, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    learner = MetaLearner(model, MetaConfig(method="fomaml", moment_policy="shared"))
    acc = learner.accumulate(_tasks())
    sent: list[tuple[torch.dtype, int]] = []
    real = dist.all_reduce

    def spy(tensor, *args, **kwargs):
        sent.append((tensor.dtype, tensor.numel()))
        return real(tensor, *args, **kwargs)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dist, "all_reduce", spy)
            out = all_reduce(acc, learner)
    finally:
        dist.destroy_process_group()
    assert max(sent, key=lambda x: x[1])[0] == dtype, sent  # the buffer of gradients and moments
    for part, reduced in ((acc.grads, out.grads), (acc.m, out.m), (acc.v, out.v)):
        for name, tensor in part.items():
            assert reduced[name].dtype == dtype and torch.equal(reduced[name], tensor), name
