"""The per-source supernet computes the same function as the per-edge one it replaced.

``benchmarks/reference_search_space.py`` is the per-edge implementation as it was; its parameters are mapped onto
the per-source layout (:func:`to_fast`) and the gradients mapped back (:func:`to_reference`). Logits and the
gradients w.r.t. every weight and every architecture tensor must agree (float64: to rounding).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from metanas_ray.config import Config, ModelConfig
from metanas_ray.inner_loop import adapt
from metanas_ray.config import TaskLearnerConfig
from metanas_ray.search_space import SearchNetwork, edges, init_alphas, mixture
from metanas_ray.state import build_network, init_state

import benchmarks.reference_search_space as R

CL = torch.channels_last
TINY = ModelConfig(init_channels=4, layers=3, nodes=3, reduction_layers=(1,), stem_multiplier=2)
CUSTOM_OPS = ("dil_conv_5x5", "none", "skip_connect", "sep_conv_5x5", "max_pool_3x3", "conv_1x5_5x1")


def _nets(cfg: ModelConfig, dtype=torch.float64, seed: int = 0, n_classes: int = 5):
    torch.manual_seed(seed)
    ref = R.SearchNetwork(cfg, 1, n_classes).to(dtype)
    fast = SearchNetwork(cfg, 1, n_classes).to(dtype)
    fast.channels_last = False
    return ref, fast


def _leaf(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_(True) for k, v in d.items()}


def _run(net, params, x, mix_fn, v):
    """Logits and (d/d params, d/d architecture) of a random projection of the logits."""
    arch = _leaf(mix_fn.inputs)
    logits = functional_call(net, params, (x, mix_fn(arch)))
    grads = torch.autograd.grad((logits * v).sum(), list(params.values()) + list(arch.values()),
                                allow_unused=True, materialize_grads=True)  # pruned terms: zero gradients
    n = len(params)
    return logits, dict(zip(params, grads[:n])), dict(zip(arch, grads[n:]))


class _Mix:
    """The mixture as a function of leaf tensors ``inputs`` (alphas via softmax, or the [E, O] weights themselves)."""

    def __init__(self, inputs, nodes, tau=None):
        self.inputs, self.nodes, self.tau = inputs, nodes, tau

    def __call__(self, arch):
        return mixture(arch, self.tau[0], self.tau[1], self.nodes) if self.tau else arch


def _check(cfg, x, mix: _Mix, threshold=0.0, channels_last=False, dtype=torch.float64, tol=None, seed=0):
    ref, fast = _nets(cfg, dtype, seed)
    ref.threshold = fast.threshold = threshold
    ref_params = _leaf(dict(ref.named_parameters()))
    fast_params = R.to_fast(ref_params, fast)
    if channels_last:  # as init_state does for a channels-last config: NHWC weights and activations
        fast.channels_last = True
        fast_params = {k: v.contiguous(memory_format=CL) if v.dim() == 4 else v for k, v in fast_params.items()}
    fast_params = _leaf(fast_params)
    x = x.to(dtype)
    mix.inputs = {k: v.to(dtype) for k, v in mix.inputs.items()}
    v = torch.randn(x.shape[0], 5, generator=torch.Generator().manual_seed(seed + 7), dtype=dtype)
    out_r, gw_r, ga_r = _run(ref, ref_params, x, mix, v)
    out_f, gw_f, ga_f = _run(fast, fast_params, x, mix, v)
    tol = tol or {}
    torch.testing.assert_close(out_f, out_r, **tol)
    back = R.to_reference(gw_f, fast)
    assert set(back) == set(gw_r)
    for k in gw_r:
        torch.testing.assert_close(back[k], gw_r[k], **tol, msg=lambda m, k=k: f"d/d {k}: {m}")
    for k in ga_r:
        torch.testing.assert_close(ga_f[k], ga_r[k], **tol, msg=lambda m, k=k: f"d/d {k}: {m}")
    return ga_r


def _alphas(cfg, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    a = init_alphas(cfg, g)
    return {k: scale * torch.randn(v.shape, generator=g) for k, v in a.items()}


def test_parameter_count_and_names_map_one_to_one():
    ref, fast = _nets(ModelConfig(), torch.float32, n_classes=20)
    n_ref = sum(p.numel() for p in ref.parameters())
    n_fast = sum(p.numel() for p in fast.parameters())
    assert n_ref == n_fast == 462_272  # the paper's Omniglot supernet
    mapped = [r for refs in R.parameter_map(fast).values() for r in refs]
    assert sorted(mapped) == sorted(k for k, _ in ref.named_parameters())


@pytest.mark.parametrize("tau", [(1.0, 1.0), (0.3, 0.7), (0.05, 0.1)])
def test_random_architecture_at_several_temperatures(tau):
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    _check(TINY, x, _Mix(_alphas(TINY, 2, 2.0), TINY.nodes, tau))


@pytest.mark.parametrize("nodes", [2, 3])
def test_odd_sizes_into_reductions(nodes):
    cfg = dataclasses.replace(TINY, nodes=nodes, layers=4, reduction_layers=(1, 3))  # 7 → 4 → 2
    x = torch.randn(4, 1, 7, 7, generator=torch.Generator().manual_seed(3))
    _check(cfg, x, _Mix(_alphas(cfg, 4), nodes, (0.5, 0.5)))


def test_channels_last_float64():
    x = torch.randn(4, 1, 7, 7, generator=torch.Generator().manual_seed(5))
    _check(TINY, x, _Mix(_alphas(TINY, 6), TINY.nodes, (0.7, 0.4)), channels_last=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_production_kernels(channels_last):
    # float32 runs oneDNN's kernels (the float64 tests run PyTorch's reference convolutions)
    cfg = dataclasses.replace(TINY, init_channels=6)
    x = torch.randn(6, 1, 9, 9, generator=torch.Generator().manual_seed(8))
    _check(cfg, x, _Mix(_alphas(cfg, 9), cfg.nodes, (0.6, 0.6)), channels_last=channels_last,
           dtype=torch.float32, tol={"rtol": 1e-4, "atol": 1e-5})


def _sparse_mix(cfg, seed, ops=None, low=0.004):
    """Mixture weights [E, O] with most terms at or below 0.01: one strong operation per edge, and node 0 of
    the normal cell pruned entirely (its strongest term is then kept)."""
    n_ops = len(ops or cfg.ops)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in ("normal", "reduce"):
        w = low * torch.rand(len(edges(cfg.nodes)), n_ops, generator=g)
        strong = torch.randint(0, n_ops, (w.shape[0],), generator=g)
        w[torch.arange(w.shape[0]), strong] = 0.2 + torch.rand(w.shape[0], generator=g)
        w[w.shape[0] - 1, :] = 0.01  # at the threshold: pruned (terms <= threshold are skipped)
        if t == "normal":
            w[:2] = low * torch.rand(2, n_ops, generator=g)  # node 0: everything pruned
        out[t] = w
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_soft_pruning_skips_the_same_terms(channels_last):
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(10))
    mix = _sparse_mix(TINY, 11)
    ga = _check(TINY, x, _Mix(mix, TINY.nodes), threshold=0.01, channels_last=channels_last)
    # the skipped terms get no gradient; node 0's strongest term (kept) does
    assert (ga["normal"] != 0).sum() < ga["normal"].numel() // 2
    assert ga["normal"][:2].abs().sum() > 0


def test_pruning_with_alphas_at_a_low_temperature():
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(12))
    alphas = _alphas(TINY, 13, 3.0)
    with torch.no_grad():
        mix = mixture(alphas, 0.1, 0.1, TINY.nodes)
    skipped = sum(int((m <= 0.01).sum()) for m in mix.values())
    assert 0 < skipped < sum(m.numel() for m in mix.values())
    _check(TINY, x, _Mix(alphas, TINY.nodes, (0.1, 0.1)), threshold=0.01)


@pytest.mark.parametrize("nodes", [2, 3])
def test_custom_operation_subset(nodes):
    cfg = dataclasses.replace(TINY, nodes=nodes, ops=CUSTOM_OPS, layers=3, reduction_layers=(0, 2))
    x = torch.randn(4, 1, 9, 9, generator=torch.Generator().manual_seed(14))
    _check(cfg, x, _Mix(_alphas(cfg, 15, 2.0), nodes, (0.5, 0.8)))
    _check(cfg, x, _Mix(_sparse_mix(cfg, 16), nodes), threshold=0.01, channels_last=True)


def test_a_node_that_keeps_only_none():
    cfg = dataclasses.replace(TINY, ops=CUSTOM_OPS, nodes=2, layers=2, reduction_layers=(1,))
    mix = _sparse_mix(cfg, 17)
    for t in mix:
        mix[t][:2] = 0.001
        mix[t][0, CUSTOM_OPS.index("none")] = 0.005  # node 0's strongest (kept) term is "none": zeros
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(18))
    _check(cfg, x, _Mix(mix, cfg.nodes), threshold=0.01)


def _conv_flops(net, x, mix):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, mix)
    return counter.get_total_flops()


@pytest.mark.parametrize("sparse", [False, True])
def test_the_same_convolution_work_as_the_reference(sparse):
    """Not one multiply more than the per-edge network: pruned terms (and unneeded operation types) cost nothing."""
    cfg = dataclasses.replace(TINY, layers=4, reduction_layers=(1, 3))
    ref, fast = _nets(cfg, torch.float32)
    ref.threshold = fast.threshold = 0.01
    mix = _sparse_mix(cfg, 19) if sparse else mixture(_alphas(cfg, 20), 1.0, 1.0, cfg.nodes)
    x = torch.randn(4, 1, 8, 8)
    assert _conv_flops(fast, x, mix) == _conv_flops(ref, x, mix)
    if sparse:
        dense = mixture(_alphas(cfg, 20), 1.0, 1.0, cfg.nodes)
        assert _conv_flops(fast, x, mix) < 0.5 * _conv_flops(fast, x, dense)


def test_adapt_steps_agree_with_the_reference(smoke_cfg):
    """Two task-learner steps (SGD on weights and architecture) from the same state land on the same state."""
    ref = R.SearchNetwork(smoke_cfg.model, 1, smoke_cfg.data.n_way).double()
    fast = build_network(smoke_cfg, 1).double()
    state = init_state(smoke_cfg, fast)
    state = {"weights": {k: v.double() for k, v in R.to_fast(dict(ref.named_parameters()), fast).items()},
             "alphas": {k: v.double() for k, v in state["alphas"].items()}}
    ref_state = {"weights": {k: v.detach() for k, v in ref.named_parameters()}, "alphas": state["alphas"]}
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    y = torch.arange(6) % smoke_cfg.data.n_way
    cfg = TaskLearnerConfig(lr_w=0.2, lr_alpha=0.5)
    a_fast, s_fast = adapt(fast, state, x, y, cfg, 2)
    a_ref, s_ref = adapt(ref, ref_state, x, y, cfg, 2)
    assert s_fast["loss"] == pytest.approx(s_ref["loss"], rel=1e-9)
    back = R.to_reference(a_fast["weights"], fast)
    for k, v in a_ref["weights"].items():
        torch.testing.assert_close(back[k], v)
    for k, v in a_ref["alphas"].items():
        torch.testing.assert_close(a_fast["alphas"][k], v)


def test_default_init_per_edge_matches_nn_conv2d():
    """Stacked weights are initialised per edge as nn.Conv2d would (bound 1/sqrt(fan_in of one edge))."""
    net = SearchNetwork(dataclasses.replace(TINY, init_channels=8), 1, 5)
    src = net.cells[0].sources[0]
    for name, p in src.named_parameters():
        fan_in = p.shape[1] * p.shape[2] * p.shape[3]
        bound = 1 / fan_in ** 0.5
        assert p.abs().max() <= bound + 1e-7 and p.abs().max() > 0.5 * bound, name


def test_unknown_operation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown operations"):
        SearchNetwork(dataclasses.replace(TINY, ops=("conv_3x3", "conv_7x7")), 1, 5)
