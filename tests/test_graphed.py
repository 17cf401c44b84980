"""task.cuda_graph: the host-sync-free inner step that a CUDA graph replays gives adapt's results (graphed.py).

Capture itself needs a GPU (``tests/test_cuda.py``); here the step runs eagerly, on the CPU against
``inner_loop.adapt`` and on the meta device, whose tensors hold no values: a step that read one back would fail there.
"""
import logging

import pytest
import torch

from conftest import OFFICIAL
from metanas_ray import graphed, inner_loop
from metanas_ray.config import ConfigError
from metanas_ray.data import TaskSampler
from metanas_ray.inner_loop import Moments, adapt
from metanas_ray.search_space import soft_pruned
from metanas_ray.state import build_network, init_state
from test_batched import close, close_states


def _setup(cfg, splits):
    net = build_network(cfg, splits.channels)
    state = init_state(cfg, net)
    sampler = TaskSampler(splits.train, cfg.data.n_way, cfg.data.k_shot, cfg.data.n_query, cfg.run.seed, "train")
    return net, state, sampler.sample(0, 0)


def _kept(state):
    """Adam moments as an earlier meta-batch leaves them: nonzero, with step counts."""
    zeros = Moments.zeros(state)
    return Moments({p: {k: torch.rand_like(v) * 1e-4 for k, v in d.items()} for p, d in zeros.v.items()},
                   {"weights": 7, "alphas": 5})


def _compare(cfg, splits, tol=1e-5, **kw):
    net, state, task = _setup(cfg, splits)
    adam = cfg.task.optimizer == "adam"
    start = _kept(state) if adam else None
    ref_m, ours_m = (start.copy(), start.copy()) if adam else (None, None)
    ref, ref_stats = adapt(net, state, task.x_train, task.y_train, cfg.task, cfg.task.steps,
                           drop_path=cfg.task.drop_path, generator=task.generator(), moments=ref_m, **kw)
    ours, stats = graphed.adapt(net, state, task.x_train, task.y_train, cfg.task, cfg.task.steps,
                                drop_path=cfg.task.drop_path, generator=task.generator(), moments=ours_m,
                                capture=False, **kw)
    close_states(ours, ref, tol)
    assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=tol, abs=tol)
    assert stats["accuracy"] == ref_stats["accuracy"]
    if adam:
        close_states(ours_m.v, ref_m.v, tol)
        assert ours_m.t == ref_m.t
    assert not net.all_terms if hasattr(net, "all_terms") else True  # restored after the steps
    return state, ours


def test_soft_pruned_weights_zero_what_the_cell_skips_and_keep_each_nodes_strongest():
    # 2 nodes: node 0 owns edges 0-1, node 1 edges 2-4; 2 operations
    w = torch.tensor([[0.30, 0.01], [0.02, 0.40],               # node 0: two terms above 0.05
                      [0.01, 0.03], [0.04, 0.02], [0.01, 0.00]])  # node 1: all at or below: 0.04 stays
    out = soft_pruned(w, 0.05, [range(0, 2), range(2, 5)])
    expected = torch.tensor([[0.30, 0.0], [0.0, 0.40], [0.0, 0.0], [0.04, 0.0], [0.0, 0.0]])
    assert torch.equal(out, expected)
    assert torch.equal(soft_pruned(w, 0.0, [range(0, 2), range(2, 5)]), w)


def test_graphed_steps_equal_adapt_with_soft_pruning_minibatches_and_drop_path(smoke_cfg, synthetic_splits):
    """SGD, clipping and weight decay; terms below the threshold are skipped by adapt, zero-weighted here."""
    cfg = smoke_cfg.override({"model.prune_threshold": 0.02, "task.batch_size": 4, "task.batch_sampling": "random",
                              "task.drop_path": 0.2, "task.grad_clip": 0.5, "task.weight_decay": 1e-3,
                              "task.tau_alpha_end": 0.05, "task.tau_beta_end": 0.05})
    state, adapted = _compare(cfg, synthetic_splits)
    assert any(not torch.equal(adapted["alphas"][k], state["alphas"][k]) for k in state["alphas"])


def test_graphed_steps_equal_adapt_with_the_official_options(smoke_cfg, synthetic_splits):
    """Adam (β1 = 0) from kept moments, pairwise β, separate pruning, α weight decay, linear τ, drop-path."""
    cfg = smoke_cfg.override({k: v for k, v in OFFICIAL.items() if k.startswith(("model.", "task."))})
    _compare(cfg, synthetic_splits)


def test_graphed_steps_equal_adapt_in_the_official_meta_test_and_warm_up(smoke_cfg, synthetic_splits):
    """α adapts in the first 2 of 4 steps only (Adam's α step count stops there); then α frozen with τ held."""
    cfg = smoke_cfg.override({**{k: v for k, v in OFFICIAL.items() if k.startswith(("model.", "task."))},
                              "task.steps": 4, "task.drop_path": 0.0})
    _compare(cfg, synthetic_splits, arch_steps=2)
    _compare(cfg, synthetic_splits, learn_arch=False, hold_tau=True)


@pytest.mark.parametrize("over", [
    {"model.kind": "conv4", "model.conv4_channels": 8, "task.batch_size": 3, "task.optimizer": "adam"},
    {"model.kind": "genotype", "model.genotype": "metanas_og_v2", "task.drop_path": 0.2, "task.batch_size": 4},
    {"task.bf16": True, "model.prune_threshold": 0.02},
], ids=["conv4", "found-network", "bf16"])
def test_graphed_steps_equal_adapt_for_other_networks_and_bf16(smoke_cfg, synthetic_splits, over):
    _compare(smoke_cfg.override(over), synthetic_splits, tol=1e-5 if "task.bf16" not in over else 1e-3)


def _on_meta(state):
    return {part: {k: v.to("meta") for k, v in d.items()} for part, d in state.items()}


def _steps_on_meta(net, cfg, state, task, make, stack=None):
    """A task's k steps (graphed.run_steps) with every tensor on the meta device; ``stack``: T tasks' worth."""
    p = graphed.plan(net, task.y_train, cfg.task, cfg.task.steps, True, 2, False, cfg.task.batch_size,
                     cfg.task.drop_path, task.generator(), Moments.zeros(state))
    p = graphed.Plan(p.arch, p.schedule.to("meta"), p.index, p.drops, p.t_end)
    grow = (lambda t: t.unsqueeze(0).expand(stack, *t.shape).contiguous()) if stack else (lambda t: t)
    inputs = [(grow(task.x_train[i]).to("meta"), grow(task.y_train[i]).to("meta"),
               {k: grow(m).to("meta") for k, m in d.items()}) for i, d in zip(p.index, p.drops)]
    w, a = ({k: grow(t).to("meta") for k, t in state[part].items()} for part in ("weights", "alphas"))
    if not stack:
        w, a = ({k: t.requires_grad_(True) for k, t in d.items()} for d in (w, a))
    v = {part: {k: grow(t).to("meta") for k, t in d.items()} for part, d in Moments.zeros(state).v.items()}
    return graphed.run_steps(make, w, a, v, inputs, p)


META_CASE = {**{k: v for k, v in OFFICIAL.items() if k.startswith(("model.", "task."))},
             "model.prune_rule": "product", "model.prune_threshold": 0.02, "model.channels_last": False}


def test_inner_steps_read_nothing_back_to_the_host(smoke_cfg, synthetic_splits):
    """On the meta device a tensor has a shape and no values: .item(), .tolist() or a branch on a value raise.
    A task's steps (minibatch gather, soft-pruning, drop-path, Adam, α adapting in 2 of them) run there."""
    cfg = smoke_cfg.override(META_CASE)
    net, state, task = _setup(cfg, synthetic_splits)
    with graphed.all_terms(net):
        losses, acc = _steps_on_meta(net, cfg, state, task, lambda arch: graphed.make_step(net, cfg.task, arch))
    assert losses.device.type == "meta" and losses.shape == (cfg.task.steps,)
    with pytest.raises((RuntimeError, NotImplementedError)):  # the check: reading a meta tensor does fail
        losses.tolist()


def test_batched_inner_steps_read_nothing_back_to_the_host(smoke_cfg, synthetic_splits):
    """The same for the vmapped step of task.batched (three tasks): what graph+batched captures."""
    from metanas_ray.batched import _vmappable, _vmapped_step
    cfg = smoke_cfg.override(META_CASE)
    net, state, task = _setup(cfg, synthetic_splits)
    with _vmappable(net):
        losses, acc = _steps_on_meta(net, cfg, state, task, lambda arch: _vmapped_step(net, cfg.task, arch), 3)
    assert losses.device.type == "meta" and losses.shape == (cfg.task.steps, 3) and acc.shape == (3,)


def test_the_eager_forward_does_read_back_so_the_meta_check_can_fail(smoke_cfg, synthetic_splits):
    cfg = smoke_cfg.override({"model.prune_threshold": 0.02, "model.channels_last": False})
    net, state, task = _setup(cfg, synthetic_splits)
    on_meta = {part: {k: v.to("meta") for k, v in d.items()} for part, d in state.items()}
    with pytest.raises((RuntimeError, NotImplementedError)):
        adapt(net, on_meta, task.x_train.to("meta"), task.y_train.to("meta"), cfg.task, 1)


def test_cuda_graph_without_a_gpu_runs_adapt_and_says_so_once(smoke_cfg, synthetic_splits, caplog):
    net, state, task = _setup(smoke_cfg, synthetic_splits)
    inner_loop._warned.clear()
    with caplog.at_level(logging.INFO, logger="metanas_ray.graphed"):
        for _ in range(2):
            ours, _ = graphed.adapt(net, state, task.x_train, task.y_train, smoke_cfg.task, 2)
    ref, _ = adapt(net, state, task.x_train, task.y_train, smoke_cfg.task, 2)
    assert [r.getMessage() for r in caplog.records] == [
        "task.cuda_graph: no CUDA device (cpu): the inner steps run eagerly"]
    close_states(ours, ref, 0.0)


def test_cuda_graph_key_is_validated(smoke_cfg):
    with pytest.raises(ConfigError, match="task.cuda_graph"):
        smoke_cfg.override({"task.cuda_graph": "sometimes"})


def test_meta_step_with_cuda_graph_on_the_cpu_equals_the_default(smoke_cfg, synthetic_splits):
    from metanas_ray.comm import LocalComm
    from metanas_ray.train_loop import _initial_state, meta_step
    from test_batched import _NoRecorder
    results = []
    for graph in (False, True):
        cfg = smoke_cfg.override({"task.cuda_graph": graph})
        m = _initial_state(cfg, LocalComm(), "cpu", None, synthetic_splits, _NoRecorder())
        meta_step(m, 0, cfg, LocalComm(), "cpu", False)
        results.append(m.state)
    close_states(results[1], results[0], 0.0)
    close(results[1]["weights"]["classifier.weight"], results[0]["weights"]["classifier.weight"], 0.0)
