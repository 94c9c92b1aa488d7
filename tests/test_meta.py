"""The maths of meta-training, checked against finite differences, torch.optim and hand-worked numbers."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F

from raymeta.core.inner import inner_start
from raymeta.core.lm import Batch, FunctionalLM
from raymeta.core.meta import Accumulator, MetaConfig, MetaLearner, TaskBatch, TaskResult, task_meta_gradient
from raymeta.core.optim import AdamState, OptimizerSpec, optimizer_step, zeros_state
from tests.conftest import tiny_gpt2, tiny_llama

V = 23  # a small vocabulary keeps float64 finite differences fast


def _batch(seed: int, rows: int = 2, length: int = 7) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (rows, length), generator=g)
    return Batch(ids, tuple((length - 3 + r % 2, length) for r in range(rows)))


def _cfg(method: str = "maml_en_llm", inner: str = "adamw", policy: str = "none", steps: int = 1, **kw) -> MetaConfig:
    cfg = MetaConfig(method=method, moment_policy=policy, grad_clip=0.0, **kw)
    cfg.inner.optimizer, cfg.inner.steps, cfg.inner.lr = inner, steps, 0.05 if inner == "sgd" else 0.01
    cfg.outer.optimizer = "adamw" if inner != "sgd" else "sgd"
    return cfg


def _outer_state(params: dict[str, torch.Tensor]) -> AdamState:
    g = torch.Generator().manual_seed(5)
    return AdamState(
        {n: 0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()},
        {n: 1e-4 * torch.rand(p.shape, generator=g, dtype=p.dtype) + 1e-5 for n, p in params.items()},
        3,
    )


def _objective(flm: FunctionalLM, params, outer_state, batch: TaskBatch, cfg: MetaConfig) -> float:
    """The whole bi-level objective L_query(θ_K(θ)), evaluated without autograd."""
    with torch.no_grad():
        theta = dict(params)
        state = inner_start(cfg.inner_spec(), cfg.moment_policy, params, outer_state)
        for _ in range(cfg.inner.steps):
            with torch.enable_grad():
                leaf = {n: t.detach().requires_grad_() for n, t in theta.items()}
                grads = torch.autograd.grad(flm.loss(leaf, batch.support), list(leaf.values()))
            if cfg.inner.grad_clip:  # torch.nn.utils.clip_grad_norm_'s rule, written out
                norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
                grads = tuple(g * min(1.0, cfg.inner.grad_clip / (norm + 1e-6)) for g in grads)
            theta, state = optimizer_step(cfg.inner_spec(), theta, dict(zip(leaf, grads)), state)
        return float(flm.loss(theta, batch.query))


CASES = [("sgd", "none")] + [(inner, policy) for inner in ("adam", "adamw") for policy in ("none", "init", "shared")]


def _fd_check(make, steps: int, inner: str, policy: str, h: float, rel: float, inner_clip: float = 0.0) -> TaskResult:
    model = make(vocab_size=V, dtype=torch.float64)
    # eps = 1e-4: with zero starting moments Adam's first step is about lr * g / (|g| + eps), nearly
    # sign(g); a larger eps keeps the objective smooth on the scale of the finite-difference step
    cfg = _cfg(inner=inner, policy=policy, steps=steps, weight_decay=0.01, eps=1e-4)
    cfg.inner.grad_clip = inner_clip
    flm = FunctionalLM(model)
    params = flm.params()
    outer = _outer_state(params) if policy != "none" else None
    batch = TaskBatch("t", _batch(1), _batch(2))
    result = task_meta_gradient(flm, params, outer, batch, cfg)
    assert_matches_finite_differences(flm, params, outer, batch, cfg, result, h, rel)
    return result


def assert_matches_finite_differences(flm, params, outer, batch, cfg, result, h: float, rel: float) -> None:
    """Central differences of the whole bi-level objective along 3 random unit directions equal G·u."""
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        u = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}
        norm = torch.sqrt(sum(x.pow(2).sum() for x in u.values()))
        u = {n: x / norm for n, x in u.items()}
        plus = {n: p.detach() + h * u[n] for n, p in params.items()}
        minus = {n: p.detach() - h * u[n] for n, p in params.items()}
        fd = (_objective(flm, plus, outer, batch, cfg) - _objective(flm, minus, outer, batch, cfg)) / (2 * h)
        analytic = float(sum((result.grads[n] * u[n]).sum() for n in params))
        assert analytic == pytest.approx(fd, rel=rel, abs=1e-9), (analytic, fd)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("inner,policy", CASES)
def test_second_order_meta_gradient_matches_finite_differences(steps, inner, policy):
    # GPT-2 computes everything in float64, so central differences are exact to about 1e-9
    _fd_check(tiny_gpt2, steps, inner, policy, h=1e-6, rel=1e-6)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("inner,policy", [("sgd", "none"), ("adamw", "shared")])
def test_second_order_through_inner_grad_clip_matches_finite_differences(steps, inner, policy):
    # a clip well below the support gradients' norm, so every inner step is clipped (and differentiated)
    result = _fd_check(tiny_gpt2, steps, inner, policy, h=1e-6, rel=1e-6, inner_clip=0.05)
    assert result.support_grad_norm > 0.5  # the pre-clip norm: ten times the clip


def test_second_order_meta_gradient_on_llama_architecture():
    # Llama's RMSNorm and rotary embeddings run in float32 even in a float64 model: a larger step
    # keeps the float32 rounding below the tolerance
    _fd_check(tiny_llama, 2, "adamw", "shared", h=1e-3, rel=2e-3)


def test_fomaml_differs_from_second_order_and_is_the_query_gradient_at_theta_i():
    model = tiny_llama(vocab_size=V, dtype=torch.float64)
    flm = FunctionalLM(model)
    params = flm.params()
    batch = TaskBatch("t", _batch(3), _batch(4))
    second = task_meta_gradient(flm, params, None, batch, _cfg("maml_en_llm", "sgd", steps=2))
    first = task_meta_gradient(flm, params, None, batch, _cfg("fomaml", "sgd", steps=2))
    # θ_i by hand: two plain SGD steps on the support loss, then the query gradient at θ_i
    cfg = _cfg("fomaml", "sgd", steps=2)
    theta = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    for _ in range(2):
        grads = torch.autograd.grad(flm.loss(theta, batch.support), list(theta.values()))
        theta = {n: (t - cfg.inner.lr * gr).detach().requires_grad_() for (n, t), gr in zip(theta.items(), grads)}
    expected = torch.autograd.grad(flm.loss(theta, batch.query), list(theta.values()))
    for n, e in zip(theta, expected):
        torch.testing.assert_close(first.grads[n], e, rtol=1e-12, atol=1e-14)
    flat = lambda r: torch.cat([r.grads[n].flatten() for n in params])  # noqa: E731
    cosine = F.cosine_similarity(flat(first), flat(second), dim=0)
    assert cosine < 0.9999 and (flat(first) - flat(second)).norm() > 1e-3 * flat(second).norm()


def _hf_loss(model, batch: Batch) -> torch.Tensor:
    """MetaICL's loss computed the plain way, from the full logits of an ordinary forward pass."""
    logits = model(batch.ids).logits
    per_seq = [F.cross_entropy(logits[b, s - 1 : e - 1], batch.ids[b, s:e]) for b, (s, e) in enumerate(batch.spans)]
    return torch.stack(per_seq).mean()


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_metaicl_step_equals_plain_fine_tuning(make):
    model = make(vocab_size=V, dtype=torch.float64)
    reference = copy.deepcopy(model)
    cfg = _cfg("metaicl", "adamw", weight_decay=0.1)
    cfg.outer.lr = 1e-3
    learner = MetaLearner(model, cfg)
    tasks = [TaskBatch("a", _batch(1), _batch(5)), TaskBatch("b", _batch(2), _batch(6))]
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, betas=cfg.betas, eps=cfg.eps, weight_decay=0.1)
    for _ in range(2):
        learner.step(tasks)
        opt.zero_grad()
        loss = (_hf_loss(reference, tasks[0].query) + _hf_loss(reference, tasks[1].query)) / 2
        loss.backward()
        opt.step()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=n)


def test_reptile_update_matches_its_formula():
    model = tiny_llama(vocab_size=V, dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _cfg("reptile", "sgd", steps=3)
    cfg.outer.lr = 0.5  # ε
    learner = MetaLearner(model, cfg)
    tasks = [TaskBatch("a", _batch(1), _batch(5)), TaskBatch("b", _batch(2), _batch(6))]
    adapted = []
    for t in tasks:  # θ_i: three SGD steps on the support batch, by hand
        theta = {n: p.clone().requires_grad_() for n, p in before.items()}
        for _ in range(3):
            grads = torch.autograd.grad(learner.flm.loss(theta, t.support), list(theta.values()))
            theta = {n: (x - cfg.inner.lr * g).detach().requires_grad_() for (n, x), g in zip(theta.items(), grads)}
        adapted.append(theta)
    learner.step(tasks)
    for n, p in model.named_parameters():
        expected = before[n] + 0.5 * ((adapted[0][n] + adapted[1][n]) / 2 - before[n])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)


def test_shared_moments_rule_on_hand_worked_numbers():
    model = tiny_llama(vocab_size=V, dtype=torch.float64)
    cfg = _cfg("maml_en_llm", "adam", policy="shared", steps=1)
    cfg.outer.optimizer, cfg.outer.lr, cfg.betas, cfg.eps, cfg.eps_root, cfg.weight_decay = (
        "adam",
        0.1,
        (0.9, 0.999),
        0.0,
        0.0,
        0.0,
    )
    learner = MetaLearner(model, cfg)
    params = learner.flm.params()
    full = lambda x: {n: torch.full_like(p, x) for n, p in params.items()}  # noqa: E731
    learner.state = AdamState(full(0.1), full(0.04), 2)  # S = (m, v, step) before the meta-step
    with torch.no_grad():
        for p in params.values():
            p.fill_(1.0)
    acc = Accumulator()
    # two tasks: meta-gradients 0.1 and 0.3 (mean 0.2); final inner moments (0.3, 0.09) and (0.5, 0.25)
    for g, m, v, norm in ((0.1, 0.3, 0.09, 2.0), (0.3, 0.5, 0.25, 3.0)):
        acc.add(TaskResult(full(g), AdamState(full(m), full(v), 3), 1.0, 1.0, 10, norm))
    metrics = learner.apply(acc)
    # shared: m = (0.3 + 0.5) / 2 = 0.4, v = (0.09 + 0.25) / 2 = 0.17, step = 2 + K(1) = 3
    # outer Adam with g = 0.2:  m = 0.9 * 0.4 + 0.1 * 0.2 = 0.38
    #                           v = 0.999 * 0.17 + 0.001 * 0.04 = 0.16987, step = 4
    # bias corrections: 1 - 0.9^4 = 0.3439, 1 - 0.999^4 = 0.003994003999
    # θ = 1 - 0.1 * (0.38 / 0.3439) / sqrt(0.16987 / 0.003994003999) = 0.98305673
    m_hat, v_hat = 0.38 / 0.3439, 0.16987 / 0.003994003999
    expected = 1 - 0.1 * m_hat / v_hat**0.5
    assert learner.state is not None and learner.state.step == 4
    name = next(iter(params))
    assert float(learner.state.m[name].flatten()[0]) == pytest.approx(0.38, rel=1e-12)
    assert float(learner.state.v[name].flatten()[0]) == pytest.approx(0.16987, rel=1e-12)
    assert float(params[name].detach().flatten()[0]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.98305673, abs=1e-8)
    # meta_share: the step's m = 0.9 · 0.4 (support stream) + 0.1 · 0.2 (meta-gradient), one denominator
    assert metrics.meta_share == pytest.approx(0.02 / 0.38, rel=1e-12)
    assert metrics.support_grad_norm == pytest.approx(2.5) and metrics.outer_lr == 0.1


def test_init_policy_leaves_the_outer_state_to_the_meta_gradient():
    model = tiny_llama(vocab_size=V, dtype=torch.float64)
    cfg = _cfg("maml_en_llm", "adam", policy="init")
    learner = MetaLearner(model, cfg)
    params = learner.flm.params()
    learner.state = AdamState(
        {n: torch.full_like(p, 0.1) for n, p in params.items()}, {n: torch.full_like(p, 0.04) for n, p in params.items()}, 2
    )
    acc = Accumulator()
    acc.add(
        TaskResult(
            {n: torch.full_like(p, 0.2) for n, p in params.items()},
            AdamState(
                {n: torch.full_like(p, 9.0) for n, p in params.items()},
                {n: torch.full_like(p, 9.0) for n, p in params.items()},
                3,
            ),
            1.0,
            1.0,
            1,
        )
    )
    assert learner.apply(acc).meta_share is None  # no support stream in the outer moments to split from
    name = next(iter(params))
    assert learner.state is not None and learner.state.step == 3
    assert float(learner.state.m[name].flatten()[0]) == pytest.approx(0.9 * 0.1 + 0.1 * 0.2)  # the inner 9.0 is ignored


@pytest.mark.parametrize("chunk", [None, 4])
def test_differentiable_adam_matches_torch_optim_over_several_steps(chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr("raymeta.core.optim.adam._CHUNK", chunk)
    torch.manual_seed(0)
    for name, cls in (("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)):
        p0 = {"a": torch.randn(5, 3, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
        ref = {n: t.clone().requires_grad_() for n, t in p0.items()}
        opt = cls(ref.values(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        spec = OptimizerSpec(name, 1e-2, (0.9, 0.99), 1e-8, 0.0, 0.1)
        mine, state = dict(p0), zeros_state(p0)
        for _ in range(6):
            grads = {n: torch.randn_like(x) for n, x in p0.items()}
            grads["b"][0] = 0.0  # a weight with zero gradient: v stays 0
            for n in ref:
                ref[n].grad = grads[n].clone()
            opt.step()
            mine, state = optimizer_step(spec, mine, grads, state)
        for n in ref:
            torch.testing.assert_close(mine[n], ref[n].detach(), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("name,wd", [("adam", 0.0), ("adam", 0.1), ("adamw", 0.1)])
@pytest.mark.parametrize("eps", [1e-3, 0.0])
@pytest.mark.parametrize("chunk", [None, 5])
def test_adam_step_backward_matches_autograd_of_the_formula(name, wd, eps, chunk, monkeypatch):
    if chunk:  # the step works in chunks of a tensor's elements: 12 elements in chunks of 5, 5 and 2
        monkeypatch.setattr("raymeta.core.optim.adam._CHUNK", chunk)
    # the hand-written backward of one step, in all four inputs and for every output, against gradcheck
    # (finite differences) and against autograd through torch.optim's formula written out elementwise
    spec, step0 = OptimizerSpec(name, 0.03, (0.9, 0.99), eps, 1e-12, wd), 2
    gen = torch.Generator().manual_seed(3)
    p, g, m0 = (torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    v0 = (0.1 * torch.rand(4, 3, generator=gen, dtype=torch.float64) + 0.01).requires_grad_()

    def step(p, g, m0, v0):
        new, st = optimizer_step(spec, {"w": p}, {"w": g}, AdamState({"w": m0}, {"w": v0}, step0))
        return new["w"], st.m["w"], st.v["w"]

    assert torch.autograd.gradcheck(step, (p, g, m0, v0))

    def formula(p, g, m0, v0):
        b1, b2, t = 0.9, 0.99, step0 + 1
        if name == "adam":
            g = g + wd * p
        else:
            p = p * (1 - spec.lr * wd)
        m, v = b1 * m0 + (1 - b1) * g, b2 * v0 + (1 - b2) * g * g
        return p - spec.lr / (1 - b1**t) * m / (torch.sqrt(v / (1 - b2**t) + spec.eps_root) + spec.eps), m, v

    weights = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    for used in ((0,), (1,), (2,), (0, 1, 2)):  # outputs that reach the loss: p' only (K = 1), or the moments too
        mine = torch.autograd.grad(
            sum((step(p, g, m0, v0)[i] * weights[i]).sum() for i in used), (p, g, m0, v0), materialize_grads=True
        )
        ref = torch.autograd.grad(
            sum((formula(p, g, m0, v0)[i] * weights[i]).sum() for i in used), (p, g, m0, v0), materialize_grads=True
        )
        for a, b in zip(mine, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # the last inner step of a task: moments that start detached, only p' reaches the loss (the
    # backward's shortcut for this case)
    m0d, v0d = m0.detach(), v0.detach()
    mine = torch.autograd.grad((step(p, g, m0d, v0d)[0] * weights[0]).sum(), (p, g))
    ref = torch.autograd.grad((formula(p, g, m0d, v0d)[0] * weights[0]).sum(), (p, g))
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_guarded_sqrt_keeps_second_derivatives_finite_where_v_is_zero():
    def second_derivative(eps_root: float) -> torch.Tensor:
        p = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)}
        (g,) = torch.autograd.grad((p["w"] ** 3).sum(), [p["w"]], create_graph=True)  # g[1] = 0, so v[1] = 0
        new, _ = optimizer_step(OptimizerSpec("adam", 0.1, eps_root=eps_root), p, {"w": g}, zeros_state(p))
        (d,) = torch.autograd.grad(new["w"].sum(), [p["w"]])
        return d

    assert torch.isfinite(second_derivative(1e-16)).all()
    assert torch.isnan(second_derivative(0.0)[1])  # what the guard prevents: 0 * inf from sqrt'(0)


def test_non_finite_meta_gradient_skips_the_update():
    model = tiny_llama(vocab_size=V, dtype=torch.float64)
    learner = MetaLearner(model, _cfg("maml_en_llm", "adamw"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_before = copy.deepcopy(learner.state)
    params = learner.flm.params()
    acc = Accumulator()
    acc.add(TaskResult({n: torch.full_like(p, float("nan")) for n, p in params.items()}, None, 1.0, float("nan"), 1))
    metrics = learner.apply(acc)
    assert metrics.skipped and learner.skipped == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert learner.state is not None and state_before is not None and learner.state.step == state_before.step


def test_memory_stays_flat_over_meta_steps():
    model = tiny_gpt2(vocab_size=V, dtype=torch.float32)
    learner = MetaLearner(model, _cfg("maml_en_llm", "adamw", policy="shared", steps=2))
    tasks = [TaskBatch("a", _batch(1), _batch(5)), TaskBatch("b", _batch(2), _batch(6))]

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    learner.step(tasks)
    counts = []
    for _ in range(4):
        learner.step(tasks)
        counts.append(live_tensors())
    assert len(set(counts)) == 1, counts  # nothing accumulates across steps
    assert all(p.grad_fn is None and p.grad is None for p in model.parameters())
    assert learner.state is not None and all(t.grad_fn is None for t in [*learner.state.m.values(), *learner.state.v.values()])


def test_sdpa_without_math_backend_is_refused_for_second_order():
    """SDPA held to its fused kernel (flash attention's CPU kernel: no double backward, as on a GPU) must be
    refused in one line; FunctionalLM's own restriction to the math backend must win over the caller's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from raymeta.errors import UserError

    model = tiny_llama(vocab_size=V)
    model.config._attn_implementation = "sdpa"
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        with pytest.raises(UserError, match=r"^model: attention implementation 'sdpa' has no double backward \(") as refused:
            FunctionalLM(model, math_attention=False).check_double_backward()
        assert "attn_implementation='eager'" in str(refused.value) and "\n" not in str(refused.value)
        FunctionalLM(model, math_attention=True).check_double_backward()  # the math backend always works


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_activation_checkpointing_gives_the_exact_metaicl_update(make):
    plain = make(vocab_size=V, dtype=torch.float64)
    checkpointed = copy.deepcopy(plain)
    tasks = [TaskBatch("a", _batch(1), _batch(5)), TaskBatch("b", _batch(2), _batch(6))]
    MetaLearner(plain, _cfg("metaicl", "adamw")).step(tasks)
    learner = MetaLearner(checkpointed, _cfg("metaicl", "adamw", activation_checkpointing=True))
    calls = []
    original = learner.flm.checkpointing._run
    learner.flm.checkpointing._run = lambda *a: calls.append(1) or original(*a)
    learner.step(tasks)
    assert len(calls) == len(learner.flm.checkpointing.layers) * 2 * 2  # every layer checkpointed and recomputed
    assert not any(m.training for m in checkpointed.modules() if isinstance(m, torch.nn.Dropout))
    for (n, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(p, q), n


def test_bf16_query_policy_keeps_the_inner_loop_in_fp32_and_the_meta_gradient_close():
    # the policy bench/precision.py chose: bf16 autocast for the query pass only. Its inner loop is the
    # fp32 one, bit for bit; its meta-gradient stays within bf16 rounding of fp32's (cosine >= 0.999 here)
    model = tiny_llama(vocab_size=97)
    flm = FunctionalLM(model)
    params = flm.params()
    outer = _outer_state(params)
    batch = TaskBatch("t", _batch(1, length=24), _batch(2, length=24))
    results = {}
    for precision in ("fp32", "bf16_query", "bf16"):
        cfg = _cfg(inner="adamw", policy="shared", precision=precision)
        results[precision] = task_meta_gradient(flm, params, outer, batch, cfg)
    fp32, bq = results["fp32"], results["bf16_query"]
    assert bq.support_loss == fp32.support_loss and results["bf16"].support_loss != fp32.support_loss
    assert all(torch.equal(bq.inner_state.m[n], fp32.inner_state.m[n]) for n in params)
    flat = {k: torch.cat([g.reshape(-1).double() for g in r.grads.values()]) for k, r in results.items()}
    cosine = float(flat["bf16_query"] @ flat["fp32"] / (flat["bf16_query"].norm() * flat["fp32"].norm()))
    assert 0.999 <= cosine < 1.0


def test_a_finiteness_check_reads_the_host_once(monkeypatch):
    """`all_finite` over a task's gradients: one device-to-host read, not one per tensor (each is a sync on GPU)."""
    from raymeta.core.meta import all_finite

    reads: list[int] = []
    real = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: reads.append(1) or real(self))
    assert all_finite([torch.ones(3), torch.zeros(2, 2), torch.tensor([1.0])])
    assert len(reads) == 1
    assert not all_finite([torch.ones(2), torch.tensor([float("nan")])]) and not all_finite([torch.tensor(float("inf"))])
    assert all_finite([])


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_outer_schedule_is_hugging_faces(schedule):
    import transformers

    from raymeta.core.meta import schedule_factor

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    make = {
        "constant": lambda: transformers.get_constant_schedule_with_warmup(opt, 2),
        "linear": lambda: transformers.get_linear_schedule_with_warmup(opt, 2, 7),
        "cosine": lambda: transformers.get_cosine_schedule_with_warmup(opt, 2, 7),
    }[schedule]
    hf = make()
    for done in range(7):
        assert schedule_factor(schedule, 2, 7, done) == pytest.approx(hf.get_last_lr()[0], abs=1e-12), done
        opt.step()
        hf.step()


def test_per_loop_settings_override_the_flat_keys_and_no_decay_spares_norms_biases_embeddings():
    from raymeta.core.meta import InnerConfig, OuterConfig

    cfg = MetaConfig(
        betas=(0.8, 0.9),
        eps=1e-7,
        weight_decay=0.1,
        inner=InnerConfig(betas=(0.5, 0.6), weight_decay=0.0),
        outer=OuterConfig(eps=1e-5),
    )
    inner, outer = cfg.inner_spec(), cfg.outer_spec()
    assert (inner.betas, inner.eps, inner.weight_decay) == ((0.5, 0.6), 1e-7, 0.0)
    assert (outer.betas, outer.eps, outer.weight_decay) == ((0.8, 0.9), 1e-5, 0.1)

    model = tiny_gpt2(vocab_size=V, dtype=torch.float64)
    flm = FunctionalLM(model)
    exempt = flm.no_decay_names()
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"} <= exempt
    assert "transformer.h.0.attn.c_attn.weight" not in exempt and "transformer.h.0.attn.c_attn.bias" in exempt
    params = {n: p.detach() for n, p in flm.params().items()}
    zero = {n: torch.zeros_like(p) for n, p in params.items()}
    for name in ("adamw", "adam", "sgd"):
        spec = OptimizerSpec(name, 0.1, weight_decay=0.5, no_decay=exempt)
        state = zeros_state(params) if name != "sgd" else None
        for step in (optimizer_step, reference_step_of):
            new, _ = step(spec, params, zero, state)
            for n, p in params.items():  # zero gradients: only the decay moves a weight
                if n in exempt:
                    assert torch.equal(new[n], p), (name, n)
                else:
                    assert not torch.equal(new[n], p), (name, n)


def reference_step_of(spec, params, grads, state):
    from raymeta.core.optim import reference_step

    return reference_step(spec, params, grads, state)
