"""Multi-node on one machine: a two-node ray.cluster_utils.Cluster; Train workers and their Ray tasks
land on both nodes. The test starts and stops only its own cluster."""

from __future__ import annotations

import json
import os

import pytest

from raymeta.config import load_config
from raymeta.run.api import train
from tests.conftest import make_data_dir, tiny_gpt2


@pytest.fixture()
def two_nodes(no_ray):
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_training_spreads_over_two_nodes(two_nodes, tmp_path, gpt2_tokenizer):
    tiny_gpt2().save_pretrained(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(tmp_path / "model")
    make_data_dir(tmp_path / "data", k=4)
    # one CPU per node: 0.5 for each Train worker, 0.5 for its Ray task -> one worker per node
    cfg = load_config(
        None,
        [
            f"model={tmp_path / 'model'}",
            f"data={tmp_path / 'data'}",
            "setting=toy",
            f"out={tmp_path / 'run'}",
            "k=2",
            "steps=2",
            "checkpoint_every=2",
            "max_length=256",
            "num_workers=2",
            "tasks_per_step=2",
            "placement_strategy=SPREAD",
            "executor=ray",
            "cpus_per_worker=0.5",
            "cpus_per_task=0.5",
        ],
    )
    final = train(cfg, progress=False)
    assert (final / "model" / "model.safetensors").is_file()
    placement = [json.loads((tmp_path / "run" / "placement" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert len({p["node_id"] for p in placement}) == 2 and {p["executor"] for p in placement} == {"ray"}
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["skipped_steps"] == 0 for m in metrics)
