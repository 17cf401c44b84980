"""The found network: a fixed network built from a genotype (``model.kind: genotype``), as the official code's
``AugmentCNN`` builds the paper's final models, meta-learned by the same pipeline (REPTILE / FO-MAML on w; no α).

    stem (conv 3×3, BN) → ``model.layers`` cells (reduction cells at ``model.reduction_layers``, channels times
    ``model.channel_scale`` there) → global average pool → linear classifier

Cell l holds, for node j, the genotype's two (operation, input) pairs: node_j = Σ op(state_input), the states being
the two preprocessed cell inputs and the nodes before j; the cell's output concatenates all its nodes. Operations
and preprocessing are those of the supernet (:data:`~.ops.OPS`, batch norm on batch statistics, no affine
parameters), so the network is a pure function of its weights. Drop-path (``task.drop_path``) zeroes whole
non-identity operations per image and scales the kept ones by 1/(1 − p), from masks ``drop_l`` ``[B, E]`` that the
task-learner draws from the task's own generator (:func:`drop_path_masks`).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, ModelConfig
from .genotype import Genotype
from .ops import OPS, FactorizedReduce, ReLUConvBN, bn


def published() -> dict[str, dict]:
    """The genotypes the package ships (``genotypes.json``: each with the source it was taken from)."""
    return json.loads(resources.files("metanas_ray").joinpath("genotypes.json").read_text())


def load_genotype(spec: str) -> Genotype:
    """``model.genotype``: a ``genotype.json`` path (any run's), or the name of a shipped genotype."""
    shipped = published()
    if spec in shipped:
        entry = shipped[spec]
        return Genotype({t: [[(op, int(i)) for op, i in node] for node in entry[t]] for t in ("normal", "reduce")},
                        len(entry["normal"]))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.genotype: '{spec}' is neither a genotype.json file nor a shipped genotype "
                          f"({', '.join(shipped)})")
    try:
        return Genotype.load(path)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"model.genotype: {path} is not a genotype.json ({type(e).__name__}: {e})") from None


def is_identity(op: str, stride: int) -> bool:
    return op == "skip_connect" and stride == 1


class GenotypeCell(nn.Module):
    def __init__(self, cell: list[list[tuple[str, int]]], c_pp: int, c_p: int, c: int, reduction_p: bool,
                 reduction: bool):
        super().__init__()
        self.reduction = reduction
        self.preproc0 = FactorizedReduce(c_pp, c) if reduction_p else ReLUConvBN(c_pp, c, 1, 1, 0)
        self.preproc1 = ReLUConvBN(c_p, c, 1, 1, 0)
        self.edge_list = [(j, i, op) for j, node in enumerate(cell) for op, i in node]  # (node, input, operation)
        self.ops = nn.ModuleList(OPS[op](c, 2 if reduction and i < 2 else 1) for _, i, op in self.edge_list)
        self.nodes = len(cell)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``drop``: ``[B, E]`` per-image multipliers of the cell's edges (None: no drop-path)."""
        states = [self.preproc0(s0), self.preproc1(s1)]
        for j in range(self.nodes):
            total = None
            for k, (jj, i, _) in enumerate(self.edge_list):
                if jj != j:
                    continue
                out = self.ops[k](states[i])
                if drop is not None:
                    out = out * drop[:, k, None, None, None]
                total = out if total is None else total + out
            states.append(total)
        return torch.cat(states[2:], dim=1)


class GenotypeNetwork(nn.Module):
    """The fixed network of ``genotype`` with the supernet's macro-architecture (``model.*``)."""

    def __init__(self, cfg: ModelConfig, genotype: Genotype, in_channels: int, n_classes: int):
        super().__init__()
        needed = ["normal"] + (["reduce"] if any(0 <= i < cfg.layers for i in cfg.reduction_layers) else [])
        missing = [t for t in needed if t not in genotype.cells]
        if missing:
            raise ConfigError(f"model.genotype has no {missing[0]} cell, which model.reduction_layers needs")
        c = cfg.init_channels
        c_stem = cfg.stem_multiplier * c
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_stem, 3, 1, 1, bias=False), bn(c_stem, affine=True))
        self.channels_last = cfg.channels_last
        self.genotype = genotype
        self.cells = nn.ModuleList()
        c_pp, c_p, c_cur, reduction_p = c_stem, c_stem, c, False
        for layer in range(cfg.layers):
            reduction = layer in cfg.reduction_layers
            if reduction:
                c_cur *= cfg.channel_scale
            cell = genotype.cells["reduce" if reduction else "normal"]
            self.cells.append(GenotypeCell(cell, c_pp, c_p, c_cur, reduction_p, reduction))
            reduction_p = reduction
            c_pp, c_p = c_p, c_cur * len(cell)
        self.classifier = nn.Linear(c_p, n_classes)

    def forward(self, x: torch.Tensor, mix: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``x`` ``[B, C, H, W]`` → logits; ``mix`` holds only the drop-path masks ``drop_l`` (there is no α)."""
        mix = mix or {}
        s0 = s1 = self.stem(x)
        if self.channels_last:
            s0 = s1 = s0.contiguous(memory_format=torch.channels_last)
        for l, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, mix.get(f"drop_{l}"))
        return self.classifier(s1.mean(dim=(2, 3)))

    def drop_path_masks(self, batch: int, p: float, generator: torch.Generator,
                        device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return drop_path_masks(self, batch, p, generator, device)


def drop_path_masks(net: GenotypeNetwork, batch: int, p: float, generator: torch.Generator,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """``{"drop_l": [B, E]}``: Bernoulli(1 − p)/(1 − p) per image and edge, 1 on the identity edges."""
    keep = 1.0 - p
    out = {}
    for l, cell in enumerate(net.cells):
        m = torch.bernoulli(torch.full((batch, len(cell.edge_list)), keep), generator=generator) / keep
        for k, (_, i, op) in enumerate(cell.edge_list):
            if is_identity(op, 2 if cell.reduction and i < 2 else 1):
                m[:, k] = 1.0
        out[f"drop_{l}"] = m.to(device)
    return out
