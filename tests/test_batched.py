"""task.batched: the task-learner vmapped over a worker's tasks gives the per-task results (batched.py)."""
import pytest
import torch

from conftest import OFFICIAL
from metanas_ray.batched import adapt_tasks, check_batchable, run_tasks
from metanas_ray.comm import LocalComm
from metanas_ray.config import ConfigError
from metanas_ray.data import TaskSampler
from metanas_ray.inner_loop import Moments, NonFiniteLossError, adapt, run_task
from metanas_ray.state import build_network, init_state
from metanas_ray.train_loop import _initial_state, meta_step


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    """|a − b| ≤ tol · max(1, max |b|): float tolerance relative to the tensor's scale."""
    assert a.shape == b.shape
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    assert err <= tol * scale, f"max |Δ| {err:.3g} against scale {scale:.3g}"


def close_states(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            close(a[part][k], b[part][k], tol)


def _setup(cfg, splits, n_tasks=3):
    net = build_network(cfg, splits.channels)
    state = init_state(cfg, net)
    sampler = TaskSampler(splits.train, cfg.data.n_way, cfg.data.k_shot, cfg.data.n_query, cfg.run.seed, "train")
    return net, state, [sampler.sample(0, i) for i in range(n_tasks)]


def _compare(cfg, splits, learn_arch=True, hold_tau=False, tol=1e-5):
    net, state, tasks = _setup(cfg, splits)
    kept = Moments.zeros(state) if cfg.task.optimizer == "adam" else None
    if kept is not None:  # kept moments from an earlier meta-batch: nonzero, with step counts
        kept = Moments({p: {k: torch.rand_like(v) * 1e-4 for k, v in d.items()} for p, d in kept.v.items()},
                       {"weights": 7, "alphas": 5})
    adapted, stats, moments = run_tasks(net, state, tasks, cfg.task, cfg.task.steps, learn_arch, hold_tau=hold_tau,
                                        moments=kept)
    for i, task in enumerate(tasks):
        own = kept.copy() if kept is not None else None
        ref, ref_stats = run_task(net, state, task, cfg.task, cfg.task.steps, learn_arch, hold_tau=hold_tau,
                                  moments=own)
        close_states(adapted[i], ref, tol)
        for key in ("loss", "query_loss"):
            assert stats[i][key] == pytest.approx(ref_stats[key], rel=tol, abs=tol)
        for key in ("accuracy", "query_accuracy"):
            assert stats[i][key] == ref_stats[key]
        if own is not None:
            close_states(moments[i].v, own.v, tol)
            assert moments[i].t == own.t
    return state, adapted


def test_conv4_batched_adapt_equals_per_task(smoke_cfg, synthetic_splits):
    cfg = smoke_cfg.override({"model.kind": "conv4", "model.conv4_channels": 8, "task.batch_size": 3})
    _compare(cfg, synthetic_splits)


def test_supernet_batched_adapt_equals_per_task(smoke_cfg, synthetic_splits):
    """SGD with clipping (per task), random minibatches and drop-path drawn from each task's generator."""
    cfg = smoke_cfg.override({"task.batch_size": 4, "task.batch_sampling": "random", "task.drop_path": 0.2,
                              "task.grad_clip": 0.5, "task.weight_decay": 1e-3})
    state, adapted = _compare(cfg, synthetic_splits)
    assert any(not torch.equal(adapted[0]["alphas"][k], state["alphas"][k]) for k in state["alphas"])
    assert not torch.equal(adapted[0]["weights"]["classifier.weight"], adapted[1]["weights"]["classifier.weight"])


def test_supernet_official_options_batched(smoke_cfg, synthetic_splits):
    """Adam (β1 = 0) from kept moments, pairwise β, separate soft-pruning at 0.01, α weight decay, linear τ; then the
    warm-up: α frozen, τ held."""
    official = {k: v for k, v in OFFICIAL.items() if k.startswith(("model.", "task."))}
    cfg = smoke_cfg.override(official)
    _compare(cfg, synthetic_splits)
    state, adapted = _compare(cfg, synthetic_splits, learn_arch=False, hold_tau=True)
    assert all(torch.equal(adapted[0]["alphas"][k], state["alphas"][k]) for k in state["alphas"])


def test_exactly_zero_mixture_weights_match(smoke_cfg, synthetic_splits):
    """A meta-pruned operation (α = -1e9: weight exactly 0) is skipped per task and computed at weight 0 batched."""
    net, state, tasks = _setup(smoke_cfg, synthetic_splits, 2)
    state["alphas"]["alpha_normal"][:, 1] = -1e9
    adapted, stats, _ = adapt_tasks(net, state, [t.x_train for t in tasks], [t.y_train for t in tasks],
                                    smoke_cfg.task, 3)
    for i, task in enumerate(tasks):
        ref, ref_stats = adapt(net, state, task.x_train, task.y_train, smoke_cfg.task, 3)
        close_states(adapted[i], ref)
        assert stats[i]["loss"] == pytest.approx(ref_stats["loss"], rel=1e-5)


def test_soft_pruning_per_task_is_batched(smoke_cfg, synthetic_splits):
    """Product soft-pruning with τ annealed to 0.05: per task different terms fall under the threshold (skipped by
    adapt, computed at weight 0 batched), and the results agree."""
    cfg = smoke_cfg.override({"model.prune_threshold": 0.02, "task.tau_alpha_end": 0.05, "task.tau_beta_end": 0.05,
                              "task.batch_size": 4})
    _compare(cfg, synthetic_splits)


def test_non_finite_loss_of_one_task_is_refused(smoke_cfg, synthetic_splits):
    net, state, tasks = _setup(smoke_cfg, synthetic_splits, 2)
    bad = tasks[1].x_train.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="images hold NaN"):
        adapt_tasks(net, state, [tasks[0].x_train, bad], [t.y_train for t in tasks], smoke_cfg.task, 2)


def test_what_is_not_batched_is_refused_naming_the_key(smoke_cfg):
    for over in ({"task.bf16": True}, {"model.kind": "genotype", "model.genotype": "metanas_og_v2"}):
        with pytest.raises(ConfigError, match=r"task\.batched"):
            smoke_cfg.override({"task.batched": True, **over})
    cfg = smoke_cfg.override({"task.bf16": True})
    with pytest.raises(ConfigError, match=r"task\.bf16"):
        check_batchable(build_network(cfg, 1), cfg.task)


class _NoRecorder:
    def data_split(self, class_split):
        pass


@pytest.mark.parametrize("over", [
    {},
    {"model.kind": "conv4", "model.conv4_channels": 8, "meta.algorithm": "fomaml"},
    {"task.optimizer": "adam", "task.adam_moments": "kept", "task.lr_w": 0.005, "task.lr_alpha": 0.005,
     "meta.meta_batch": 3},
], ids=["supernet-reptile", "conv4-fomaml", "supernet-adam-kept"])
def test_meta_step_batched_equals_per_task(smoke_cfg, synthetic_splits, over):
    results = []
    for batched in (False, True):
        cfg = smoke_cfg.override({**over, "task.batched": batched})
        m = _initial_state(cfg, LocalComm(), "cpu", None, synthetic_splits, _NoRecorder())
        accuracy, loss, _ = meta_step(m, 0, cfg, LocalComm(), "cpu", False)
        results.append((m, accuracy, loss))
    (off, acc_off, loss_off), (on, acc_on, loss_on) = results
    close_states(on.state, off.state)
    assert acc_on == acc_off and loss_on == pytest.approx(loss_off, rel=1e-5)
    if off.moments is not None:
        close_states(on.moments.v, off.moments.v)
        assert on.moments.t == off.moments.t
