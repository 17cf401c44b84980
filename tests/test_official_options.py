"""The options that reproduce the official MetaNAS code, each against a hand-computed case: pairwise input weights,
separate soft-pruning, drop-path, Adam moments kept across tasks, α weight decay, random minibatches, τ held in
warm-up, the two-phase meta-test, meta-model pruning; and the paper configs, which use them all."""
import math

import pytest
import torch

from metanas_ray.config import ConfigError, TaskLearnerConfig, load
from metanas_ray.data import TaskSampler
from metanas_ray.genotype import derive, hard_mixture
from metanas_ray.inner_loop import Moments, Temperature, adapt, query_gradient, run_task
from metanas_ray.ops import EdgeOps
from metanas_ray.search_space import (drop_path_masks, edges, init_alphas, input_weights, mixture, pairs,
                                      prune_meta_alphas)
from metanas_ray.state import build_network, init_state

from conftest import ROOT

PAPER_CONFIGS = ["omniglot_20way_1shot", "omniglot_20way_5shot", "miniimagenet_5way_1shot", "miniimagenet_5way_5shot"]


@pytest.fixture
def pairwise(smoke_cfg, synthetic_splits):
    cfg = smoke_cfg.override({"model.input_weights": "pairwise"})
    net = build_network(cfg, 1)
    state = init_state(cfg, net)
    task = TaskSampler(synthetic_splits.train, 5, 2, 3, 0, "train").sample(0, 0)
    return cfg, net, state, task


def test_pairwise_input_weight_is_the_sum_of_the_softmax_of_the_pairs_that_hold_the_input():
    # node 0: one pair (0, 1); node 1: pairs (0, 1), (0, 2), (1, 2) with softmax [1/6, 2/6, 3/6]
    assert pairs(2) == [(0, 0, 1), (1, 0, 1), (1, 0, 2), (1, 1, 2)]
    logits = torch.tensor([0.3, 0.0, math.log(2.0), math.log(3.0)])
    w = input_weights({"beta_pair_normal": logits}, "normal", 1.0, 2)
    # edges: (0, 0), (0, 1), (1, 0), (1, 1), (1, 2)
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 1 / 6 + 2 / 6, 1 / 6 + 3 / 6, 2 / 6 + 3 / 6]))
    # τ_β sharpens the pairs: the strongest pair (1, 2) takes node 1, input 0 fades out
    cold = input_weights({"beta_pair_normal": logits}, "normal", 0.01, 2)
    torch.testing.assert_close(cold[2:], torch.tensor([0.0, 1.0, 1.0]), atol=1e-6, rtol=0)


def test_pairwise_state_has_one_logit_per_pair_and_the_network_learns_it(pairwise):
    cfg, net, state, task = pairwise
    assert set(state["alphas"]) == {"alpha_normal", "beta_pair_normal", "alpha_reduce", "beta_pair_reduce"}
    assert state["alphas"]["beta_pair_normal"].shape == (len(pairs(cfg.model.nodes)),)
    adapted, _ = adapt(net, state, task.x_train, task.y_train, cfg.task, 2)
    assert not torch.equal(adapted["alphas"]["beta_pair_normal"], state["alphas"]["beta_pair_normal"])


def test_pairwise_genotype_keeps_the_two_inputs_of_the_strongest_pair_and_hard_pruning_weighs_them_by_it():
    ops = ("max_pool_3x3", "conv_3x3")
    alphas = {"alpha_normal": torch.zeros(5, 2), "beta_pair_normal": torch.tensor([0.0, 2.0, 0.0, 1.0])}
    alphas["alpha_normal"][:, 1] = 1.0  # conv_3x3 strongest on every edge
    alphas["alpha_normal"][3, 0] = 3.0  # but max_pool on edge (1, 1)
    geno = derive(alphas, ops, 2)
    assert geno.cells["normal"] == [[("conv_3x3", 0), ("conv_3x3", 1)], [("conv_3x3", 0), ("max_pool_3x3", 1)]]
    alphas["beta_pair_normal"][3] = 5.0  # now pair (1, 2) wins node 1
    geno = derive(alphas, ops, 2)
    assert geno.cells["normal"][1] == [("max_pool_3x3", 1), ("conv_3x3", 2)]
    hard = hard_mixture(alphas, ops, 2, (1.0, 1.0))["normal"]
    pi = torch.softmax(torch.tensor([2.0, 0.0, 5.0]), 0)[2]  # node 1's kept pair
    op = torch.softmax(alphas["alpha_normal"], -1)
    expected = torch.zeros(5, 2)
    expected[0, 1], expected[1, 1] = op[0, 1], op[1, 1]  # node 0: its only pair, weight 1
    expected[3, 0], expected[4, 1] = pi * op[3, 0], pi * op[4, 1]
    torch.testing.assert_close(hard, expected)
    assert all(len(node) == 2 for node in geno.cells["normal"])


def test_separate_pruning_drops_operations_and_pairs_below_the_threshold_each_on_its_own():
    alphas = {"alpha_normal": torch.log(torch.tensor([[0.96, 0.03, 0.01]] * 5)),
              "beta_pair_normal": torch.log(torch.tensor([1.0, 0.96, 0.03, 0.01]))}
    mix = mixture(alphas, 1.0, 1.0, 2, rule="separate", threshold=0.02)["normal"]
    op = torch.tensor([0.96, 0.03, 0.0])  # 0.01 ≤ 0.02: pruned; 0.03 kept although 0.03·(input weight) < 0.02
    inputs = torch.tensor([1.0, 1.0, 0.96 + 0.03, 0.96, 0.03])  # pair (1, 2) at 0.01 pruned
    torch.testing.assert_close(mix, inputs[:, None] * op[None], atol=1e-6, rtol=1e-5)
    product = mixture(alphas, 1.0, 1.0, 2, rule="product", threshold=0.02)["normal"]
    assert (product > 0).all()  # under the product rule the network skips small products itself


def test_drop_path_masks_scale_kept_paths_and_never_drop_the_identity(smoke_cfg):
    net = build_network(smoke_cfg, 1)
    g = torch.Generator().manual_seed(0)
    masks = drop_path_masks(net, 64, 0.25, g)
    assert set(masks) == {f"drop_{l}" for l in range(len(net.cells))}
    skip = list(net.ops).index("skip_connect")
    for l, cell in enumerate(net.cells):
        m = masks[f"drop_{l}"]
        assert m.shape == (64, len(edges(cell.nodes)), len(net.ops))
        assert all(v in (0.0, 1.0) or v == pytest.approx(1 / 0.75) for v in m.unique().tolist())
        for k, (_, i) in enumerate(cell.edge_list):
            stride2 = cell.reduction and i < 2  # a stride-2 skip is FactorizedReduce: droppable
            assert (m[:, k, skip] == 1.0).all() != stride2
    others = torch.cat([m[:, :, [o for o in range(len(net.ops)) if o != skip]].flatten() for m in masks.values()])
    assert abs(float((others == 0).float().mean()) - 0.25) < 0.05  # the drop rate
    again = drop_path_masks(net, 64, 0.25, torch.Generator().manual_seed(0))
    assert all(torch.equal(masks[k], again[k]) for k in masks)  # a function of the task's generator


def test_drop_path_multiplies_each_image_path_by_its_mask():
    ops = ("max_pool_3x3", "skip_connect", "conv_3x3")
    eo = EdgeOps(4, 1, 2, ops)
    x = torch.randn(3, 4, 6, 6)
    w = torch.full((2, 3), 0.5)
    active = [[True] * 3, [True] * 3]
    drop = torch.ones(3, 2, 3)
    drop[1] = 0.0  # image 1 loses every path ...
    drop[2, 0, 2] = 2.0  # image 2's conv path of edge 0 is kept and rescaled
    plain = eo(x, w, active)
    dropped = eo(x, w, active, drop)
    for e in range(2):
        for (out, s), (out_d, s_d), o in zip(plain[e], dropped[e], ops):
            y = out if s is None else out * s
            y_d = out_d if s_d is None else out_d * s_d
            factor = torch.ones(3) if o == "skip_connect" else drop[:, e, ops.index(o)]  # ... but the identity
            torch.testing.assert_close(y_d, y * factor[:, None, None, None])


def test_drop_path_runs_in_meta_training_tasks_only_and_depends_on_the_task_alone(pairwise):
    cfg, net, state, task = pairwise
    with_drop = TaskLearnerConfig(drop_path=0.3, tau_schedule="constant")
    a, _ = run_task(net, state, task, with_drop, 2)
    b, _ = run_task(net, state, task, with_drop, 2)
    c, _ = run_task(net, state, task, TaskLearnerConfig(tau_schedule="constant"), 2)
    k = "stem.0.weight"
    assert torch.equal(a["weights"][k], b["weights"][k]) and not torch.equal(a["weights"][k], c["weights"][k])
    with pytest.raises(ValueError, match="generator"):
        adapt(net, state, task.x_train, task.y_train, with_drop, 1, drop_path=0.3)


def test_random_minibatches_are_drawn_with_replacement_from_the_task_generator(pairwise):
    from metanas_ray.inner_loop import _batch
    y = torch.arange(5).repeat_interleave(15)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    b1 = [_batch(y, s, 20, "random", None, g1) for s in range(3)]
    b2 = [_batch(y, s, 20, "random", None, g2) for s in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(b1, b2)) and all(len(b) == 20 for b in b1)
    assert not torch.equal(b1[0], b1[1])
    # 10 images from a 5-image D_train: with replacement, as the official meta-test batches of 10
    assert len(_batch(torch.arange(5), 0, 10, "random", None, g1)) == 10
    assert _batch(torch.arange(5), 0, 5, "random", None, g1) is None  # the whole set: no sampling


def test_alpha_weight_decay_adds_its_l2_term_to_the_architecture_gradient(pairwise):
    cfg, net, state, task = pairwise
    plain = TaskLearnerConfig(lr_w=0.0, lr_alpha=0.5, tau_schedule="constant", grad_clip=0.0)
    decayed = TaskLearnerConfig(lr_w=0.0, lr_alpha=0.5, tau_schedule="constant", grad_clip=0.0, alpha_weight_decay=0.1)
    a, _ = adapt(net, state, task.x_train, task.y_train, plain, 1)
    b, _ = adapt(net, state, task.x_train, task.y_train, decayed, 1)
    for k, v in state["alphas"].items():  # α − ξ(g + δα) = (α − ξg) − ξδα
        torch.testing.assert_close(b["alphas"][k], a["alphas"][k] - 0.5 * 0.1 * v)


def test_kept_adam_moments_continue_from_the_given_state_and_are_updated_in_place(pairwise):
    cfg, net, state, task = pairwise
    tcfg = TaskLearnerConfig(optimizer="adam", adam_moments="kept", lr_w=0.01, lr_alpha=0.02,
                             tau_schedule="constant", grad_clip=0.0)
    moments = Moments.zeros(state)
    for part in moments.v:
        for k in moments.v[part]:
            moments.v[part][k].fill_(4e-6)
    moments.t = {"weights": 9, "alphas": 4}
    before = moments.copy()
    one, _ = adapt(net, state, task.x_train, task.y_train, tcfg, 1, moments=moments)
    g = query_gradient(net, state, task.x_train, task.y_train, (1.0, 1.0))
    for part, lr, t in (("weights", 0.01, 10), ("alphas", 0.02, 5)):
        for k in state[part]:
            v = 0.999 * before.v[part][k] + 0.001 * g[part][k] ** 2
            torch.testing.assert_close(moments.v[part][k], v)
            step = g[part][k] / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
            torch.testing.assert_close(one[part][k], state[part][k] - lr * step, atol=1e-6, rtol=1e-4)
    assert moments.t == {"weights": 10, "alphas": 5}
    fresh, _ = adapt(net, state, task.x_train, task.y_train, tcfg, 1)  # no moments: zeros, as task.adam_moments reset
    assert not torch.equal(fresh["weights"]["stem.0.weight"], one["weights"]["stem.0.weight"])


def test_two_phase_meta_test_adapts_alpha_and_anneals_tau_in_the_first_steps_only(pairwise):
    cfg, net, state, task = pairwise
    t = Temperature(1.0, 0.1, 1.0, 0.1, "linear")
    taus, query = t.schedule_for(6, arch_steps=3)
    assert [a for a, _ in taus] == pytest.approx([1.0, 0.55, 0.1, 0.1, 0.1, 0.1]) and query == (0.1, 0.1)
    assert t.schedule_for(4, hold=True) == ([(1.0, 1.0)] * 4, (1.0, 1.0))  # τ held (the official warm-up)
    assert t.schedule_for(4, arch_steps=0) == ([(1.0, 1.0)] * 4, (1.0, 1.0))
    tcfg = TaskLearnerConfig(tau_schedule="linear", tau_alpha_end=0.1, tau_beta_end=0.1)
    two, _ = adapt(net, state, task.x_train, task.y_train, tcfg, 2)
    four, _ = adapt(net, state, task.x_train, task.y_train, tcfg, 4, arch_steps=2)
    for k in state["alphas"]:
        torch.testing.assert_close(four["alphas"][k], two["alphas"][k])  # α stopped after step 2
    assert not torch.equal(four["weights"]["stem.0.weight"], two["weights"]["stem.0.weight"])  # w went on
    none, _ = adapt(net, state, task.x_train, task.y_train, tcfg, 2, arch_steps=0)
    assert all(torch.equal(none["alphas"][k], v) for k, v in state["alphas"].items())


def test_meta_model_pruning_sets_weak_operations_to_a_large_negative_logit_once():
    alphas = {"alpha_normal": torch.log(torch.tensor([[0.7, 0.295, 0.005], [0.5, 0.5, 0.0 + 1e-9]])),
              "beta_normal": torch.zeros(2)}
    assert prune_meta_alphas(alphas, 1.0, 0.01) == 2
    assert (alphas["alpha_normal"][:, 2] == -1e9).all() and (alphas["alpha_normal"][:, :2] > -10).all()
    assert prune_meta_alphas(alphas, 1.0, 0.01) == 0  # already pruned: not counted again
    assert (alphas["beta_normal"] == 0).all()


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_carry_the_official_settings(name):
    cfg = load(ROOT / "tune_configs" / f"{name}.yaml")
    t, m, e = cfg.task, cfg.model, cfg.eval
    assert m.input_weights == "pairwise" and m.prune_rule == "separate" and m.layers == 4 and m.channel_scale == 1
    assert (t.optimizer, t.adam_moments, t.batch_size, t.batch_sampling, t.drop_path) == ("adam", "kept", 20, "random", 0.2)
    assert (t.tau_schedule, t.warmup_tau, t.alpha_weight_decay, t.grad_clip) == ("linear", "hold", 1e-3, 0.0)
    assert cfg.data.train_shots == 15 and cfg.meta.warmup_steps == 15000 and cfg.meta.anneal == "constant"
    assert (e.steps, e.arch_steps, e.tau_end, e.prune_threshold, e.warmup_arch) == (100, 50, 0.1, 0.05, "frozen")
    text = (ROOT / "tune_configs" / f"{name}.yaml").read_text()
    for line in text.splitlines():  # every key says where it comes from
        if line.startswith("  ") and ":" in line and not line.strip().startswith("#"):
            key = line.split(":")[0].strip()
            assert "#" in line, line


@pytest.mark.parametrize("key, value", [
    ("data.split", "lake"), ("model.input_weights", "pairs"), ("model.prune_rule", "sum"),
    ("task.adam_moments", "forever"), ("task.batch_sampling", "shuffle"), ("task.warmup_tau", "freeze"),
    ("task.alpha_weight_decay", -1e-3), ("task.drop_path", 1.0), ("meta.prune_every", -1),
    ("meta.prune_threshold", 1.5), ("eval.arch_steps", 11), ("eval.arch_steps", -2), ("eval.batch_size", -1),
    ("eval.tau_end", -0.1), ("eval.tau_end", 5.0), ("eval.prune_threshold", 1.0), ("eval.warmup_arch", "maybe"),
])
def test_bad_values_of_the_new_keys_name_the_key(smoke_cfg, key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        smoke_cfg.override({key: value})


def test_kept_adam_moments_need_the_adam_optimizer(smoke_cfg):
    with pytest.raises(ConfigError, match="task.adam_moments.*task.optimizer"):
        smoke_cfg.override({"task.adam_moments": "kept"})


def test_drop_path_on_the_conv4_baseline_is_an_error_naming_the_key(smoke_cfg):
    with pytest.raises(ConfigError, match="task.drop_path.*conv4"):
        smoke_cfg.override({"model.kind": "conv4", "task.drop_path": 0.2})


def test_a_vinyals_split_needs_omniglot(smoke_cfg):
    with pytest.raises(ConfigError, match="data.split"):
        smoke_cfg.override({"data.split": "vinyals"})


def test_init_alphas_of_pairwise_input_weights_are_small_random_logits():
    from metanas_ray.config import ModelConfig
    a = init_alphas(ModelConfig(nodes=3, input_weights="pairwise"), torch.Generator().manual_seed(0))
    assert a["beta_pair_normal"].shape == (1 + 3 + 6,) and 0 < a["beta_pair_normal"].abs().max() < 0.01
