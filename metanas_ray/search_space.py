"""The DARTS supernet of MetaNAS: normal and reduction cells of mixed operations.

A cell has two inputs (the outputs of the two previous cells) and ``nodes`` intermediate nodes. Node j reads
every earlier state i (inputs first) through an edge (j, i) that is a mixed operation

    x_j = Σ_i softmax(β_j/τ_β)_i · Σ_o softmax(α_ji/τ_α)_o · o(x_i)

and the cell outputs the concatenation of its intermediate nodes. The architecture (α, β) is not a module
parameter: it is passed to ``forward`` as one ``[E, O]`` matrix per cell type of combined edge weights
(see :func:`mixture`), so the network is a pure function of (weights, architecture, images).

Architecture tensors (one set per cell type ``t`` in ``normal``/``reduce``):
``alpha_t``: ``[E, O]`` operation logits, ``beta_t``: ``[E]`` input logits, E = Σ_j (j + 2) edges, O operations.

A cell is computed per source state, not per edge: all edges leaving a state run together
(:class:`~.ops.EdgeOps`: the shared ReLU, pools and identity once, each parametric operation as one set of
kernels on weights stacked over the edges), then node j = Σ_(e, o) w[e, o] · out[e, o]. Terms with weight
<= ``threshold`` are not computed (soft-pruning); a node whose terms are all pruned keeps its strongest. The
function is the per-edge one's (``tests/test_search_space_fast.py`` checks logits and gradients against it).
Activations are NHWC when ``channels_last`` (oneDNN's fast kernels on the CPU).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .ops import EdgeOps, FactorizedReduce, ReLUConvBN, bn


def edges(nodes: int) -> list[tuple[int, int]]:
    """(node j, source i) for every edge, node-major; sources 0, 1 are the cell inputs, 2 + m is node m."""
    return [(j, i) for j in range(nodes) for i in range(j + 2)]


class SearchCell(nn.Module):
    """One cell, computed per source state: all edges leaving a state at once (:class:`~.ops.EdgeOps`).

    ``sources[i]`` holds the operations of the edges that leave state i (to nodes j ≥ i − 1), stacked in the
    order of :func:`edges`; ``source_edges[i]`` lists those edges' indices into :func:`edges`."""

    def __init__(self, nodes: int, c_pp: int, c_p: int, c: int, reduction_p: bool, reduction: bool,
                 ops: tuple[str, ...]):
        super().__init__()
        self.reduction = reduction
        self.nodes = nodes
        self.n_ops = len(ops)
        self.preproc0 = FactorizedReduce(c_pp, c) if reduction_p else ReLUConvBN(c_pp, c, 1, 1, 0)
        self.preproc1 = ReLUConvBN(c_p, c, 1, 1, 0)
        self.edge_list = edges(nodes)
        # states 0 … nodes feed later nodes; the last node only feeds the cell's output
        self.source_edges = [[k for k, (_, i) in enumerate(self.edge_list) if i == src] for src in range(nodes + 1)]
        self.sources = nn.ModuleList(
            EdgeOps(c, 2 if reduction and src < 2 else 1, len(ks), ops) for src, ks in enumerate(self.source_edges))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                threshold: float = 0.0) -> torch.Tensor:
        """``weights``: ``[E, O]`` combined edge weights; terms with weight <= threshold are skipped."""
        states = [self.preproc0(s0), self.preproc1(s1)]
        active = (weights > threshold).tolist()
        n_ops, e = self.n_ops, 0
        for j in range(self.nodes):
            if not any(any(active[k]) for k in range(e, e + j + 2)):  # all pruned: keep the strongest term
                flat = int(weights[e:e + j + 2].argmax())
                active[e + flat // n_ops][flat % n_ops] = True
            e += j + 2
        terms: list[list] = [[] for _ in self.edge_list]
        e = 0
        for j in range(self.nodes):
            for src in range(0 if j == 0 else j + 1, j + 2):  # the states that became available
                ks = self.source_edges[src]
                if not any(any(active[k]) for k in ks):
                    continue
                w = weights[ks[0]:ks[-1] + 1] if ks[-1] - ks[0] == len(ks) - 1 else weights[ks]
                for k, t in zip(ks, self.sources[src](states[src], w, [active[k] for k in ks])):
                    terms[k] = t
            node_terms = [t for k in range(e, e + j + 2) for t in terms[k]]
            if node_terms:
                states.append(_weighted_sum(node_terms))
            else:  # only "none" is active: zeros, as Zero(stride) computes them
                i = next(i for i, k in enumerate(range(e, e + j + 2)) if any(active[k]))
                stride = 2 if self.reduction and i < 2 else 1
                states.append(states[i][:, :, ::stride, ::stride] * 0.0)
            e += j + 2
        return torch.cat(states[2:], dim=1)


def _weighted_sum(terms: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """Σ scale·out over ``(out, scale)`` terms (``scale`` None: 1), accumulating in place into a fresh tensor."""
    (t0, s0), rest = terms[0], terms[1:]
    if not rest:
        return t0 if s0 is None else t0 * s0
    if s0 is not None:
        acc = t0 * s0
    else:
        (t1, s1), rest = rest[0], rest[1:]
        acc = t0 + t1 if s1 is None else torch.addcmul(t0, t1, s1)
    for t, s in rest:
        if s is None:
            acc.add_(t)
        else:
            acc.addcmul_(t, s)
    return acc


class SearchNetwork(nn.Module):
    """Stem → cells (reduction at ``reduction_layers``) → global average pool → linear classifier."""

    def __init__(self, cfg: ModelConfig, in_channels: int, n_classes: int):
        super().__init__()
        c = cfg.init_channels
        c_stem = cfg.stem_multiplier * c
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_stem, 3, 1, 1, bias=False), bn(c_stem, affine=True))
        self.threshold = cfg.prune_threshold
        self.channels_last = cfg.channels_last  # NHWC activations (build_network sets it from the config too)
        self.nodes = cfg.nodes
        self.ops = cfg.ops
        self.cells = nn.ModuleList()
        c_pp, c_p, c_cur = c_stem, c_stem, c
        reduction_p = False
        for layer in range(cfg.layers):
            reduction = layer in cfg.reduction_layers
            if reduction:
                c_cur *= cfg.channel_scale
            self.cells.append(SearchCell(cfg.nodes, c_pp, c_p, c_cur, reduction_p, reduction, cfg.ops))
            reduction_p = reduction
            c_pp, c_p = c_p, c_cur * cfg.nodes
        self.classifier = nn.Linear(c_p, n_classes)

    def forward(self, x: torch.Tensor, mix: dict[str, torch.Tensor]) -> torch.Tensor:
        """``x``: ``[B, C, H, W]``; ``mix``: ``{"normal": [E, O], "reduce": [E, O]}`` → logits ``[B, n_classes]``."""
        s0 = s1 = self.stem(x)
        if self.channels_last:  # (the stem's 1-channel input does not decide the layout: make it explicit)
            s0 = s1 = s0.contiguous(memory_format=torch.channels_last)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, mix["reduce" if cell.reduction else "normal"], self.threshold)
        return self.classifier(s1.mean(dim=(2, 3)))


def cell_types(cfg: ModelConfig) -> list[str]:
    has_reduce = any(0 <= i < cfg.layers for i in cfg.reduction_layers)
    has_normal = cfg.layers > len(set(cfg.reduction_layers))
    return [t for t, present in (("normal", has_normal), ("reduce", has_reduce)) if present]


def init_alphas(cfg: ModelConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """α ~ 1e-3·N(0, 1) (all operations nearly equal, as in DARTS), β = 0 (all inputs equal)."""
    n_edges = len(edges(cfg.nodes))
    out = {}
    for t in cell_types(cfg):
        out[f"alpha_{t}"] = 1e-3 * torch.randn(n_edges, len(cfg.ops), generator=generator)
        out[f"beta_{t}"] = torch.zeros(n_edges)
    return out


def _segment_softmax(logits: torch.Tensor, nodes: int) -> torch.Tensor:
    """Softmax of ``[E]`` logits within each node's inputs (node j owns j + 2 consecutive edges)."""
    parts, start = [], 0
    for j in range(nodes):
        parts.append(torch.softmax(logits[start:start + j + 2], dim=0))
        start += j + 2
    return torch.cat(parts)


def mixture(alphas: dict[str, torch.Tensor], tau_alpha: float, tau_beta: float, nodes: int) -> dict[str, torch.Tensor]:
    """Combined edge weights softmax(β/τ_β)_e · softmax(α_e/τ_α) per cell type: ``{t: [E, O]}``."""
    out = {}
    for key, alpha in alphas.items():
        if key.startswith("alpha_"):
            t = key[len("alpha_"):]
            beta = alphas[f"beta_{t}"]
            out[t] = _segment_softmax(beta / tau_beta, nodes)[:, None] * torch.softmax(alpha / tau_alpha, dim=-1)
    return out
