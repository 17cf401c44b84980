import torch
from torch.func import functional_call

from metanas_ray.config import Config, ModelConfig
from metanas_ray.inner_loop import forward
from metanas_ray.search_space import SearchNetwork, edges, init_alphas, mixture, node_edges, node_sizes, pairs
from metanas_ray.state import build_network, init_state


def test_paper_omniglot_supernet_size():
    # 4 cells, reductions at 1 and 3, 3 nodes, 28 channels, the seven MetaNAS operations: about 0.46M weights
    net = SearchNetwork(ModelConfig(), in_channels=1, n_classes=20)
    n = sum(p.numel() for p in net.parameters())
    assert 440_000 < n < 480_000
    assert net(torch.randn(2, 1, 28, 28), mixture(init_alphas(ModelConfig(), torch.Generator()), 1, 1, 3)).shape == (2, 20)


def test_functional_forward_equals_module_forward(smoke_cfg):
    net = build_network(smoke_cfg, 1)
    state = init_state(smoke_cfg, net)
    state["alphas"] = {k: torch.randn_like(v) for k, v in state["alphas"].items()}
    net.load_state_dict(state["weights"])  # the module now holds the same parameters
    x = torch.randn(6, 1, 16, 16)
    mix = mixture(state["alphas"], 0.7, 0.3, smoke_cfg.model.nodes)
    torch.testing.assert_close(forward(net, state, x, (0.7, 0.3)), net(x.contiguous(memory_format=torch.channels_last), mix))
    torch.testing.assert_close(functional_call(net, state["weights"], (x, mix)), net(x, mix))


def test_node_edges_index_each_nodes_inputs():
    # node j reads states 0 … j + 1; its edges follow the 2 + 3 + … + (j + 1) = j(j + 3)/2 edges of earlier nodes
    assert [list(own) for own in node_edges(3)] == [[0, 1], [2, 3, 4], [5, 6, 7, 8]]
    assert node_edges(0) == [] and list(node_edges(5)[4]) == [14, 15, 16, 17, 18, 19]
    assert edges(2) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert pairs(2) == [(0, 0, 1), (1, 0, 1), (1, 0, 2), (1, 1, 2)]
    assert node_sizes(3) == [2, 3, 4] and node_sizes(3, pairwise=True) == [1, 3, 6]
    for nodes in range(7):  # edge (j, i) is number node_edges[j][i]
        assert [edges(nodes)[k] for own in node_edges(nodes) for k in own] == edges(nodes)
        assert [(j, k - own.start) for j, own in enumerate(node_edges(nodes)) for k in own] == edges(nodes)


def test_softmax_of_alpha_over_tau_approaches_one_hot():
    cfg = ModelConfig(nodes=3)
    alphas = init_alphas(cfg, torch.Generator().manual_seed(0))
    alphas = {k: v * 100 for k, v in alphas.items()}  # distinct logits
    maxima, input_maxima = [], []
    for tau in (1.0, 0.1, 0.01, 0.001):
        w = mixture(alphas, tau, 1.0, 3)["normal"]  # β = 0: every input weighs the same
        op_w = w / w.sum(-1, keepdim=True)
        maxima.append(float(op_w.max(-1).values.min()))
        beta = {**alphas, "beta_normal": torch.linspace(-1, 1, alphas["beta_normal"].numel())}
        input_maxima.append(float(mixture(beta, 1.0, tau, 3)["normal"].sum(-1)[:2].max()))
    assert maxima == sorted(maxima) and maxima[0] < 0.5 and maxima[-1] > 0.999
    assert input_maxima == sorted(input_maxima) and input_maxima[-1] > 0.999
    alphas["beta_normal"] = torch.randn_like(alphas["beta_normal"])
    # per node, the input weights sum to 1 at any temperature
    w = mixture(alphas, 0.5, 0.5, 3)["normal"].sum(-1)
    for own in node_edges(3):
        torch.testing.assert_close(w[own.start:own.stop].sum(), torch.tensor(1.0))


def test_pruned_terms_are_skipped_exactly():
    cfg = ModelConfig(init_channels=4, layers=2, nodes=2, reduction_layers=(1,), stem_multiplier=1,
                      prune_threshold=0.01)
    net = SearchNetwork(cfg, 1, 3)
    alphas = init_alphas(cfg, torch.Generator().manual_seed(1))
    mix = mixture(alphas, 1.0, 1.0, 2)
    for t in mix:
        mix[t] = mix[t].clone()
        mix[t][:, 1:] = 0.0  # only the first operation survives
    x = torch.randn(3, 1, 8, 8)
    dense = SearchNetwork(ModelConfig(**{**cfg.__dict__, "prune_threshold": 0.0}), 1, 3)
    dense.load_state_dict(net.state_dict())
    torch.testing.assert_close(net(x, mix), dense(x, mix))
    assert len(edges(2)) == 5


def test_conv4_baseline_has_no_architecture():
    cfg = Config().override({"model.kind": "conv4", "data.n_way": 5})
    net = build_network(cfg, 1)
    state = init_state(cfg, net)
    assert state["alphas"] == {}
    assert forward(net, state, torch.randn(4, 1, 28, 28)).shape == (4, 5)
