import copy

import pytest
import torch
import torch.nn.functional as F

from metanas_ray.config import TaskLearnerConfig
from metanas_ray.inner_loop import NonFiniteLossError, Temperature, adapt, forward, query_gradient, run_task
from metanas_ray.state import build_network, init_state


@pytest.fixture
def setup(smoke_cfg, synthetic_splits):
    from metanas_ray.data import TaskSampler
    net = build_network(smoke_cfg, 1)
    state = init_state(smoke_cfg, net)
    task = TaskSampler(synthetic_splits.train, 5, 1, 3, 0, "train").sample(0, 0)
    return net, state, task


def test_each_step_is_the_task_learner_equation_at_the_current_weights(setup):
    """w_{j+1} = w_j − λ∇_w L(w_j, α_j) and α_{j+1} = α_j − ξ∇_α L(w_j, α_j), with both gradients from one fresh
    forward pass at the *current* (w_j, α_j) — not at a stale copy of the network, as in the official code."""
    net, state, task = setup
    cfg = TaskLearnerConfig(lr_w=0.3, lr_alpha=0.7, tau_schedule="constant", tau_alpha_start=0.5,
                            tau_beta_start=0.8, grad_clip=0.0)
    one, _ = adapt(net, state, task.x_train, task.y_train, cfg, 1)
    two, _ = adapt(net, state, task.x_train, task.y_train, cfg, 2)
    g = query_gradient(net, one, task.x_train, task.y_train, (0.5, 0.8))  # autograd on a fresh forward at (w_1, α_1)
    for k in one["weights"]:
        torch.testing.assert_close(two["weights"][k], one["weights"][k] - 0.3 * g["weights"][k])
    for k in one["alphas"]:
        torch.testing.assert_close(two["alphas"][k], one["alphas"][k] - 0.7 * g["alphas"][k])
    assert any((g["alphas"][k].abs() > 0).any() for k in g["alphas"])


def test_adapt_leaves_the_meta_parameters_alone_and_copies_no_model(setup, monkeypatch):
    net, state, task = setup
    before = copy.deepcopy(state)
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: pytest.fail("the task-learner deep-copied something"))
    adapted, stats = run_task(net, state, task, TaskLearnerConfig(), 3)
    for part in state:
        for k in state[part]:
            assert torch.equal(state[part][k], before[part][k])
    changed = [k for k in adapted["weights"] if not torch.equal(adapted["weights"][k], state["weights"][k])]
    assert changed and any(not torch.equal(adapted["alphas"][k], state["alphas"][k]) for k in state["alphas"])
    assert 0.0 <= stats["query_accuracy"] <= 1.0


def test_frozen_architecture_during_warmup(setup):
    net, state, task = setup
    adapted, _ = adapt(net, state, task.x_train, task.y_train, TaskLearnerConfig(), 2, learn_arch=False)
    for k in state["alphas"]:
        assert torch.equal(adapted["alphas"][k], state["alphas"][k])


def test_non_finite_loss_is_a_clear_error(setup):
    net, state, task = setup
    bad = task.x_train.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="images hold NaN"):
        adapt(net, state, bad, task.y_train, TaskLearnerConfig(), 2)
    huge = {"weights": {k: torch.full_like(v, float("inf")) if k == "classifier.weight" else v
                        for k, v in state["weights"].items()},
            "alphas": state["alphas"]}  # as after a blown-up meta-update
    with pytest.raises(NonFiniteLossError, match="before its first step.*lower meta.lr_w"):
        adapt(net, huge, task.x_train, task.y_train, TaskLearnerConfig(), 2)
    with pytest.raises(NonFiniteLossError, match="at inner step 1.*lower task.lr_w"):
        adapt(net, state, task.x_train, task.y_train, TaskLearnerConfig(lr_w=1e30, grad_clip=0.0), 2)


def test_temperature_schedules():
    t = Temperature(1.0, 0.01, 2.0, 0.5, "exponential")
    assert t.at(0, 5) == (1.0, 2.0)
    assert t.at(4, 5) == pytest.approx((0.01, 0.5))
    assert t.at(2, 5) == pytest.approx((0.1, 1.0))
    lin = Temperature(1.0, 0.2, 1.0, 0.2, "linear")
    assert lin.at(1, 3) == pytest.approx((0.6, 0.6))
    assert Temperature(1.0, 0.2, 1.0, 0.2, "constant").final == (1.0, 1.0)
    taus = [t.at(i, 10)[0] for i in range(10)]
    assert taus == sorted(taus, reverse=True)


def test_adam_task_optimizer_first_step_is_a_normalised_gradient_step(setup):
    net, state, task = setup
    cfg = TaskLearnerConfig(optimizer="adam", lr_w=0.01, lr_alpha=0.02, tau_schedule="constant", grad_clip=0.0)
    one, _ = adapt(net, state, task.x_train, task.y_train, cfg, 1)
    g = query_gradient(net, state, task.x_train, task.y_train, (1.0, 1.0))
    for part, lr in (("weights", 0.01), ("alphas", 0.02)):
        for k in state[part]:
            step = g[part][k] / (g[part][k].abs() + 1e-8)  # bias-corrected v = g² at the first step
            torch.testing.assert_close(one[part][k], state[part][k] - lr * step, atol=1e-5, rtol=1e-4)


def test_minibatches_cycle_class_balanced_through_the_training_data(setup):
    from metanas_ray.inner_loop import _batches
    y = torch.arange(5).repeat_interleave(3)  # 5-way 3-shot, grouped by label
    batches = _batches(y, 5)
    assert len(batches) == 3 and all(sorted(y[b].tolist()) == [0, 1, 2, 3, 4] for b in batches)
    assert sorted(torch.cat(batches).tolist()) == list(range(15))
    assert _batches(y, 0) is None and _batches(y, 15) is None
    net, state, task = setup
    full, _ = adapt(net, state, task.x_train, task.y_train, TaskLearnerConfig(batch_size=0), 1)
    half, _ = adapt(net, state, task.x_train, task.y_train, TaskLearnerConfig(batch_size=2), 1)
    assert not torch.equal(full["weights"]["stem.0.weight"], half["weights"]["stem.0.weight"])


def test_soft_pruned_terms_get_zero_gradient_and_do_not_break_the_task_learner(smoke_cfg, synthetic_splits):
    from metanas_ray.data import TaskSampler
    cfg = smoke_cfg.override({"model.prune_threshold": 0.05})
    net = build_network(cfg, 1)
    state = init_state(cfg, net)
    for k in state["alphas"]:  # anneal: one operation per edge carries almost all the weight
        if k.startswith("alpha_"):
            state["alphas"][k] = torch.zeros_like(state["alphas"][k])
            state["alphas"][k][:, 4] = 10.0
    task = TaskSampler(synthetic_splits.train, 5, 1, 3, 0, "train").sample(0, 0)
    adapted, _ = adapt(net, state, task.x_train, task.y_train, TaskLearnerConfig(), 2)
    moved = {k for k in state["weights"] if not torch.equal(adapted["weights"][k], state["weights"][k])}
    assert moved and len(moved) < len(state["weights"])  # pruned operations' weights got no update
    g = query_gradient(net, adapted, task.x_query, task.y_query, (0.1, 0.1))
    assert all(torch.isfinite(v).all() for v in g["weights"].values())


def test_bf16_autocast_runs_the_convolutions_in_bfloat16_and_keeps_float32_state(setup, monkeypatch):
    """``task.bf16``: the same task-learner under bfloat16 autocast. The convolutions see bf16 inputs, while the
    parameters, updates and logits stay float32 and the result stays close to the float32 one."""
    net, state, task = setup
    cfg = TaskLearnerConfig(lr_w=0.1, lr_alpha=0.1)
    exact, _ = adapt(net, state, task.x_train, task.y_train, cfg, 3)
    seen = []
    conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda x, *a, **k: seen.append(conv2d(x, *a, **k).dtype) or conv2d(x, *a, **k))
    cfg16 = TaskLearnerConfig(lr_w=0.1, lr_alpha=0.1, bf16=True)
    low, stats = adapt(net, state, task.x_train, task.y_train, cfg16, 3)
    assert seen and set(seen) == {torch.bfloat16}
    logits = forward(net, low, task.x_query, bf16=True)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert stats["loss"] == stats["loss"]  # finite, not NaN
    for part in ("weights", "alphas"):
        for k, v in low[part].items():
            assert v.dtype == torch.float32
            delta = exact[part][k] - state[part][k]  # what float32 adaptation moved
            err = (v - exact[part][k]).norm()
            assert err <= 0.2 * delta.norm() + 1e-3, (k, float(err), float(delta.norm()))
    assert any(not torch.equal(low["weights"][k], exact["weights"][k]) for k in low["weights"])


def test_the_loss_is_read_back_once_per_task_not_once_per_step(smoke_cfg, synthetic_splits, monkeypatch):
    """No host synchronisation for the finite-loss check inside a step (a GPU runs ahead): Conv4, which prunes
    nothing, reads tensors back only after its last step (the final loss, accuracy and the step losses)."""
    from metanas_ray.data import check_tasks
    cfg = smoke_cfg.override({"model.kind": "conv4", "model.conv4_channels": 8})
    net = build_network(cfg, synthetic_splits.channels)
    task = check_tasks(cfg.data, synthetic_splits)["train"].sample(0, 0)
    reads = []
    for name in ("__float__", "item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name: reads.append(_n) or _real(self, *a))
    adapt(net, init_state(cfg, net), task.x_train, task.y_train, cfg.task, steps=7)
    assert len(reads) == 3, reads
