"""The meta-batch sampler: MetaICL instances, disjoint support/query, seeded, resumable, limited data."""

from __future__ import annotations

import pytest
import torch

from raymeta.data.layout import Example
from raymeta.data.sampler import MetaBatchSampler
from raymeta.errors import UserError


def _pools(n_tasks: int = 4, size: int = 20) -> dict[str, list[Example]]:
    return {
        f"t{t}": [Example(f"t{t}", f"x{t}-{i}", "a" if i % 2 else "b", ("a", "b")) for i in range(size)] for t in range(n_tasks)
    }


def _sampler(seed: int = 0, **kw) -> MetaBatchSampler:
    args = dict(k=3, tasks_per_step=2, support_size=2, query_size=2, seed=seed)
    args.update(kw)
    return MetaBatchSampler(_pools(), **args)


def test_instances_are_metaicl_instances_with_disjoint_support_and_query():
    for sample in _sampler().sample():
        targets = [i.target for i in sample.support + sample.query]
        assert len(set(targets)) == 4  # support and query targets are distinct examples
        for inst in sample.support + sample.query:
            assert len(inst.demonstrations) == 3 and inst.target not in inst.demonstrations
            assert {d.task for d in inst.demonstrations} == {inst.target.task} == {sample.task}
    assert len({s.task for s in _sampler().sample()}) == 2


def test_seeded_and_resumable():
    a, b = _sampler(seed=7), _sampler(seed=7)
    assert [a.sample() for _ in range(3)] == [b.sample() for _ in range(3)]
    assert _sampler(seed=8).sample() != _sampler(seed=7).sample()
    state = a.state()
    expected = [a.sample() for _ in range(2)]
    fresh = _sampler(seed=123)
    fresh.load_state(state)
    assert [fresh.sample() for _ in range(2)] == expected


def test_limited_data_uses_a_fixed_subset_per_task():
    s = _sampler(max_examples_per_task=8)
    seen: dict[str, set[str]] = {}
    for _ in range(30):
        for sample in s.sample():
            for inst in sample.support + sample.query:
                seen.setdefault(sample.task, set()).update(e.input for e in (*inst.demonstrations, inst.target))
    assert all(len(v) <= 8 for v in seen.values()) and any(len(v) == 8 for v in seen.values())
    assert _sampler(max_examples_per_task=8).pools == s.pools  # the same subset every time


def test_too_small_pools_and_too_many_tasks_are_refused():
    with pytest.raises(UserError, match="tasks_per_step: expected at most the 4 meta-train tasks, got 5"):
        _sampler(tasks_per_step=5)
    with pytest.raises(UserError, match=r"task 't0': 20 training examples, need at least k \+ support_size \+ query_size = 21"):
        _sampler(k=17)


def test_bf16_autocast_meta_step_is_finite_and_keeps_fp32_state():
    from raymeta.core.meta import MetaConfig, MetaLearner, TaskBatch
    from tests.conftest import tiny_llama
    from tests.test_meta import _batch

    model = tiny_llama(vocab_size=23)
    cfg = MetaConfig(precision="bf16")
    learner = MetaLearner(model, cfg)
    m = learner.step([TaskBatch("a", _batch(1), _batch(2)), TaskBatch("b", _batch(3), _batch(4))])
    assert not m.skipped and torch.isfinite(torch.tensor([m.query_loss, m.grad_norm])).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert learner.state is not None and all(t.dtype == torch.float32 for t in learner.state.m.values())


def _key(e: Example) -> tuple[str, str]:
    return (e.input, e.output)


def test_no_query_target_is_a_support_target_or_in_a_support_prompt():
    """Within one step and task the inner loop never sees a query answer: no query target is a support target
    or a demonstration of a support instance. On pools of exactly k + support + query examples (k=4, 2 + 2)
    the old rule put a query target into a support prompt in most steps."""
    s = MetaBatchSampler(_pools(size=8), k=4, tasks_per_step=2, support_size=2, query_size=2, seed=0)
    for _ in range(200):
        for sample in s.sample():
            query = {_key(i.target) for i in sample.query}
            for inst in sample.support:
                assert _key(inst.target) not in query
                assert not query & {_key(d) for d in inst.demonstrations}, sample


def test_a_duplicated_query_example_stays_out_of_support_prompts_too():
    """The rule holds for the example, not the index: a pool that holds the same example twice."""
    pool = [Example("t", f"x{i % 5}", "a" if i % 2 else "b", ("a", "b")) for i in range(10)]  # each twice
    s = MetaBatchSampler({"t": pool}, k=2, tasks_per_step=1, support_size=1, query_size=1, seed=0)
    for _ in range(200):
        (sample,) = s.sample()
        query = {_key(i.target) for i in sample.query}
        assert not query & {_key(d) for d in (*sample.support[0].demonstrations, sample.support[0].target)}


def test_a_rule_1_checkpoint_resumes_under_rule_1_with_a_warning():
    old = _sampler(seed=3)
    old.rule = 1  # as a sampler before rule 2 drew
    state = {k: v for k, v in old.state().items() if k != "rule"}  # and recorded: no rule in its state
    expected = [old.sample() for _ in range(3)]
    resumed = _sampler(seed=99)
    with pytest.warns(UserWarning, match="rule 1"):
        resumed.load_state(state, "runs/x/checkpoints/step-000002")
    assert resumed.rule == 1 and [resumed.sample() for _ in range(3)] == expected
    assert _sampler(seed=3).state()["rule"] == 2
    with pytest.raises(UserError, match="sampler rule 7 is unknown"):
        resumed.load_state({**state, "rule": 7})
