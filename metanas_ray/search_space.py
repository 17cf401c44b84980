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

Input weights (``model.input_weights``). ``per_input``: β_j is a softmax over node j's j + 2 inputs, as the
paper's equation reads. ``pairwise`` (the official code, ``--use_pairwise_input_alphas``): ``beta_pair_t`` ``[P]``
holds one logit per pair (a, b) of node j's inputs, P = Σ_j C(j + 2, 2), and

    x_j = Σ_(a<b) softmax(β_j/τ_β)_(a,b) · (o_a + o_b)      ⇔      input i weighs Σ_(pairs ∋ i) softmax(β_j/τ_β)

so as τ_β → 0 a node keeps exactly two inputs. Soft-pruning (``model.prune_rule``) with threshold θ: ``product``
skips the terms whose combined weight input·operation ≤ θ; ``separate`` (official) drops operations with
softmax(α/τ_α) ≤ θ and input pairs (or inputs) with weight ≤ θ, each on its own.

Drop-path (``task.drop_path`` p, meta-training tasks only, as in the official code): every (edge, operation)
output of every cell except the identity is multiplied per image by Bernoulli(1 − p)/(1 − p); the masks arrive
in ``mix`` as ``drop_l`` ``[B, E, O]`` for cell l (see :func:`drop_path_masks`), drawn from the task's own
generator so that they do not depend on the worker that runs the task.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from .config import ModelConfig
from .ops import EdgeOps, FactorizedReduce, ReLUConvBN, bn


def node_edges(nodes: int) -> list[range]:
    """The edges of each node, as indices into :func:`edges`: node j reads the j + 2 states i = 0 … j + 1, and
    its edges follow the Σ_(m<j) (m + 2) = j(j + 3)/2 edges of the nodes before it, so

        edge (j, i) is number j(j + 3)/2 + i,    node j owns range(j(j + 3)/2, j(j + 3)/2 + j + 2)

    (3 nodes: [0, 1], [2, 3, 4], [5, 6, 7, 8]). ``len(node_edges(n)[j])`` is node j's number of inputs."""
    return [range(j * (j + 3) // 2, j * (j + 3) // 2 + j + 2) for j in range(nodes)]


def edges(nodes: int) -> list[tuple[int, int]]:
    """(node j, source i) for every edge, node-major; sources 0, 1 are the cell inputs, 2 + m is node m."""
    return [(j, i) for j, own in enumerate(node_edges(nodes)) for i in range(len(own))]


def pairs(nodes: int) -> list[tuple[int, int, int]]:
    """(node j, input a, input b), a < b, for every pair of inputs of every node, node-major (as ``beta_pair_t``)."""
    return [(j, a, b) for j, own in enumerate(node_edges(nodes))
            for a in range(len(own)) for b in range(a + 1, len(own))]


def node_sizes(nodes: int, pairwise: bool = False) -> list[int]:
    """Entries of β per node: its j + 2 inputs, or their (j + 2)(j + 1)/2 pairs."""
    return [len(own) * (len(own) - 1) // 2 if pairwise else len(own) for own in node_edges(nodes)]


@lru_cache(maxsize=None)
def _incidence(nodes: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[E, P]``: 1 where edge (j, i) is one of the two inputs of pair p (of the same node j); made once per
    device (no host-to-device copy inside a captured step)."""
    if device != "cpu":
        return _incidence(nodes).to(device=device, dtype=dtype)
    index = {e: k for k, e in enumerate(edges(nodes))}
    m = torch.zeros(len(index), len(pairs(nodes)), dtype=dtype)
    for p, (j, a, b) in enumerate(pairs(nodes)):
        m[index[(j, a)], p] = m[index[(j, b)], p] = 1.0
    return m


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
        self.node_edges = node_edges(nodes)
        # states 0 … nodes feed later nodes; the last node only feeds the cell's output
        self.source_edges = [[k for k, (_, i) in enumerate(self.edge_list) if i == src] for src in range(nodes + 1)]
        self._indices = {(src, "cpu"): torch.tensor(ks) for src, ks in enumerate(self.source_edges)}
        self.sources = nn.ModuleList(
            EdgeOps(c, 2 if reduction and src < 2 else 1, len(ks), ops) for src, ks in enumerate(self.source_edges))

    def _index(self, src: int, device: torch.device) -> torch.Tensor:
        """``source_edges[src]`` as an index tensor on ``device``, made once."""
        key = (src, str(device))
        if key not in self._indices:  # (from the CPU copy: a tensor constructor fails under torch.func transforms)
            self._indices[key] = self._indices[(src, "cpu")].to(device)
        return self._indices[key]

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                threshold: float | None = 0.0, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``weights``: ``[E, O]`` combined edge weights; terms with weight <= threshold are skipped.
        ``drop``: ``[B, E, O]`` per-image drop-path multipliers (None: no drop-path). ``threshold`` None: every
        term is computed, with no decision read from ``weights`` (under ``torch.func.vmap``, see ``batched``)."""
        states = [self.preproc0(s0), self.preproc1(s1)]
        n_ops = self.n_ops
        if threshold is None:
            active = [[True] * n_ops for _ in self.edge_list]
        else:
            active = (weights > threshold).tolist()
            for own in self.node_edges:
                if not any(any(active[k]) for k in own):  # all pruned: keep the strongest term
                    flat = int(weights[own.start:own.stop].argmax())
                    active[own.start + flat // n_ops][flat % n_ops] = True
        terms: list[list] = [[] for _ in self.edge_list]
        for j, own in enumerate(self.node_edges):
            for src in range(0 if j == 0 else j + 1, j + 2):  # the states that became available
                ks = self.source_edges[src]
                if not any(any(active[k]) for k in ks):
                    continue
                if ks[-1] - ks[0] == len(ks) - 1:
                    w = weights[ks[0]:ks[-1] + 1]
                    d = None if drop is None else drop[:, ks[0]:ks[-1] + 1]
                else:  # (an index on the device: no host-to-device copy inside a captured step)
                    index = self._index(src, weights.device)
                    w = weights.index_select(0, index)
                    d = None if drop is None else drop.index_select(1, index)
                for k, t in zip(ks, self.sources[src](states[src], w, [active[k] for k in ks], d)):
                    terms[k] = t
            node_terms = [t for k in own for t in terms[k]]
            if node_terms:  # (vmap has no batching rule for the in-place sums: out of place there)
                states.append(_weighted_sum(node_terms, inplace=threshold is not None))
            else:  # only "none" is active: zeros, as Zero(stride) computes them
                i = next(i for i, k in enumerate(own) if any(active[k]))
                stride = 2 if self.reduction and i < 2 else 1
                states.append(states[i][:, :, ::stride, ::stride] * 0.0)
        return torch.cat(states[2:], dim=1)


def soft_pruned(weights: torch.Tensor, threshold: float, node_edges: list[range]) -> torch.Tensor:
    """``weights`` ``[E, O]`` with the terms that :meth:`SearchCell.forward` skips set to 0, decided on the device:
    terms <= ``threshold`` are zero unless all of a node's are, and then its strongest term stays. Computing every
    term at these weights is the skipping forward's function, with its gradients (a skipped term adds 0 and gets
    none; a zero-weighted one adds 0·out and gets 0), but reads no value back to the host, so it can be vmapped
    (``batched``) and captured in a CUDA graph (``graphed``)."""
    keep = weights > threshold
    parts = []
    for own in node_edges:
        k, w = keep[own.start:own.stop], weights[own.start:own.stop].flatten()
        strongest = (torch.arange(w.numel(), device=w.device) == w.argmax()).view_as(k)
        parts.append(k | (strongest & ~k.any()))
    return torch.where(torch.cat(parts), weights, torch.zeros_like(weights))


def _weighted_sum(terms: list[tuple[torch.Tensor, torch.Tensor | None]], inplace: bool = True) -> torch.Tensor:
    """Σ scale·out over ``(out, scale)`` terms (``scale`` None: 1), accumulating in place into a fresh tensor
    (``inplace=False``: the same sums out of place, for ``torch.func.vmap``)."""
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
            acc = acc.add_(t) if inplace else acc + t
        else:
            acc = acc.addcmul_(t, s) if inplace else torch.addcmul(acc, t, s)
    return acc


class SearchNetwork(nn.Module):
    """Stem → cells (reduction at ``reduction_layers``) → global average pool → linear classifier."""

    def __init__(self, cfg: ModelConfig, in_channels: int, n_classes: int):
        super().__init__()
        c = cfg.init_channels
        c_stem = cfg.stem_multiplier * c
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_stem, 3, 1, 1, bias=False), bn(c_stem, affine=True))
        self.threshold = cfg.prune_threshold
        self.prune_rule = cfg.prune_rule
        self.channels_last = cfg.channels_last  # NHWC activations (build_network sets it from the config too)
        self.all_terms = False  # every term, the pruned ones at weight 0 (set while batched.py / graphed.py run)
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
        """``x``: ``[B, C, H, W]``; ``mix``: ``{"normal": [E, O], "reduce": [E, O]}`` (and ``drop_l`` ``[B, E, O]``
        drop-path multipliers of cell l) → logits ``[B, n_classes]``. Under ``prune_rule: separate`` the
        weights arrive pruned (:func:`mixture`) and only exact zeros are skipped."""
        s0 = s1 = self.stem(x)
        if self.channels_last:  # (the stem's 1-channel input does not decide the layout: make it explicit)
            s0 = s1 = s0.contiguous(memory_format=torch.channels_last)
        threshold = self.threshold if self.prune_rule == "product" else 0.0
        for l, cell in enumerate(self.cells):
            weights = mix["reduce" if cell.reduction else "normal"]
            if self.all_terms:  # the same function with no decision read back: skipped terms weigh 0 instead
                s0, s1 = s1, cell(s0, s1, soft_pruned(weights, threshold, cell.node_edges), None, mix.get(f"drop_{l}"))
            else:
                s0, s1 = s1, cell(s0, s1, weights, threshold, mix.get(f"drop_{l}"))
        return self.classifier(s1.mean(dim=(2, 3)))

    def drop_path_masks(self, batch: int, p: float, generator: torch.Generator,
                        device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return drop_path_masks(self, batch, p, generator, device)


def cell_types(cfg: ModelConfig) -> list[str]:
    has_reduce = any(0 <= i < cfg.layers for i in cfg.reduction_layers)
    has_normal = cfg.layers > len(set(cfg.reduction_layers))
    return [t for t, present in (("normal", has_normal), ("reduce", has_reduce)) if present]


def init_alphas(cfg: ModelConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """α ~ 1e-3·N(0, 1) (all operations nearly equal, as in DARTS); β = 0 (all inputs equal), or with
    ``input_weights: pairwise`` one logit per input pair ~ 1e-3·N(0, 1) (``beta_pair_t``, as the official code)."""
    n_edges = len(edges(cfg.nodes))
    out = {}
    for t in cell_types(cfg):
        out[f"alpha_{t}"] = 1e-3 * torch.randn(n_edges, len(cfg.ops), generator=generator)
        if cfg.input_weights == "pairwise":
            out[f"beta_pair_{t}"] = 1e-3 * torch.randn(len(pairs(cfg.nodes)), generator=generator)
        else:
            out[f"beta_{t}"] = torch.zeros(n_edges)
    return out


def segment_softmax(logits: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Softmax of ``[E]`` logits within consecutive segments of ``sizes`` (each node's inputs, or pairs)."""
    return torch.cat([torch.softmax(part, dim=0) for part in logits.split(sizes)])


def _pruned(w: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(w > threshold, w, torch.zeros_like(w)) if threshold > 0 else w


def input_weights(alphas: dict[str, torch.Tensor], t: str, tau_beta: float, nodes: int,
                  threshold: float = 0.0) -> torch.Tensor:
    """``[E]``: the weight of each edge's input in its node, softmax(β_j/τ_β)_i or Σ_(pairs ∋ i) softmax(β_j/τ_β),
    with the entries (inputs, or pairs) at or below ``threshold`` set to 0."""
    pair = alphas.get(f"beta_pair_{t}")
    if pair is not None:
        pi = _pruned(segment_softmax(pair / tau_beta, node_sizes(nodes, True)), threshold)
        return _incidence(nodes, str(pi.device), pi.dtype) @ pi
    return _pruned(segment_softmax(alphas[f"beta_{t}"] / tau_beta, node_sizes(nodes)), threshold)


def mixture(alphas: dict[str, torch.Tensor], tau_alpha: float, tau_beta: float, nodes: int,
            rule: str = "product", threshold: float = 0.0) -> dict[str, torch.Tensor]:
    """Combined edge weights ``{t: [E, O]}``: input weight (:func:`input_weights`) · softmax(α_e/τ_α).

    ``rule: separate`` zeroes operations with softmax(α/τ_α) ≤ ``threshold`` and inputs / pairs with weight
    ≤ ``threshold`` (official soft-pruning); ``product`` leaves the weights whole (the network skips the terms
    whose product is ≤ its threshold)."""
    sep = threshold if rule == "separate" else 0.0
    out = {}
    for key, alpha in alphas.items():
        if key.startswith("alpha_"):
            t = key[len("alpha_"):]
            out[t] = input_weights(alphas, t, tau_beta, nodes, sep)[:, None] * _pruned(
                torch.softmax(alpha / tau_alpha, dim=-1), sep)
    return out


def drop_path_masks(net: nn.Module, batch: int, p: float, generator: torch.Generator,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """``{"drop_l": [B, E, O]}`` for every cell l: Bernoulli(1 − p)/(1 − p) per image, edge and operation, 1 for
    the identity (``skip_connect`` on a stride-1 edge), which the official code never drops."""
    keep = 1.0 - p
    ops = list(net.ops)
    out = {}
    for l, cell in enumerate(net.cells):
        m = torch.bernoulli(torch.full((batch, len(cell.edge_list), len(ops)), keep), generator=generator) / keep
        if "skip_connect" in ops:
            stride1 = [k for k, (_, i) in enumerate(cell.edge_list) if not (cell.reduction and i < 2)]
            m[:, stride1, ops.index("skip_connect")] = 1.0
        out[f"drop_{l}"] = m.to(device)
    return out


def prune_meta_alphas(alphas: dict[str, torch.Tensor], tau_alpha: float, threshold: float,
                      value: float = -1e9) -> int:
    """Official meta-model pruning, in place: α logits whose softmax(α/τ_α) < ``threshold`` become ``value``, so
    those operations are skipped from then on. Returns the number of logits pruned."""
    n = 0
    with torch.no_grad():
        for key, alpha in alphas.items():
            if key.startswith("alpha_"):
                low = (torch.softmax(alpha / tau_alpha, dim=-1) < threshold) & (alpha > value)
                n += int(low.sum())
                alpha[low] = value
    return n
