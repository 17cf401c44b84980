"""The discrete architecture derived from (α, β): a DARTS-style genotype, its JSON form and hard pruning.

Each intermediate node j keeps its ``k`` strongest inputs i, ranked by softmax(β_j)_i · max_o softmax(α_ji)_o, or,
with pairwise input weights (``beta_pair_t``), the two inputs of its strongest pair (as the official code), and on
each kept edge the single strongest operation. A genotype is, per cell type, a list of nodes, each a
list of ``(operation, input)`` pairs (inputs 0, 1 are the cell inputs, 2 + m is node m), as in DARTS.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .search_space import edges, mixture, node_edges, node_sizes, pairs

Cell = list[list[tuple[str, int]]]


@dataclass(frozen=True)
class Genotype:
    cells: dict[str, Cell] = field(default_factory=dict)  # "normal" / "reduce" → nodes → (op, input)
    nodes: int = 0

    def to_json(self) -> str:
        data = {t: [[[op, i] for op, i in node] for node in cell] for t, cell in self.cells.items()}
        data.update({f"{t}_concat": list(range(2, 2 + self.nodes)) for t in self.cells})
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Genotype":
        data = json.loads(text)
        cells = {t: [[(str(op), int(i)) for op, i in node] for node in v]
                 for t, v in data.items() if not t.endswith("_concat")}
        nodes = max((len(c) for c in cells.values()), default=0)
        return cls(cells, nodes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    def to_official(self) -> str:
        """The genotype in the notation of the official MetaNAS code (its ``utils/genotypes.py``, DARTS's
        ``Genotype`` namedtuple with one list of (operation, input) pairs per node), ready to paste there."""
        def cell(t: str) -> str:
            return "[" + ", ".join("[" + ", ".join(f'("{op}", {i})' for op, i in node) + "]"
                                   for node in self.cells.get(t, [])) + "]"
        concat = f"range(2, {2 + self.nodes})"
        return (f"Genotype(normal={cell('normal')}, normal_concat={concat}, "
                f"reduce={cell('reduce')}, reduce_concat={concat})")

    def to_dot(self, cell_type: str) -> str:
        """One cell as a Graphviz DOT graph: the inputs c_{k-2}, c_{k-1}, the nodes 0 … n-1 and the output c_{k},
        each kept edge labelled with its operation (``dot -Tsvg cell_normal.dot > cell_normal.svg`` draws it)."""
        if cell_type not in self.cells:
            raise KeyError(f"the genotype has no {cell_type} cell (has: {', '.join(self.cells) or 'none'})")
        name = {0: "c_{k-2}", 1: "c_{k-1}"}
        lines = [f"digraph cell_{cell_type} {{", "  rankdir=LR;",
                 '  node [shape=box, style="rounded,filled", fontname=Helvetica];',
                 '  edge [fontname=Helvetica, fontsize=10];',
                 '  "c_{k-2}" [fillcolor=darkseagreen2];', '  "c_{k-1}" [fillcolor=darkseagreen2];']
        cell = self.cells[cell_type]
        lines += [f'  "{j}" [fillcolor=lightblue];' for j in range(len(cell))]
        lines.append('  "c_{k}" [fillcolor=palegoldenrod];')
        for j, node in enumerate(cell):
            for op, i in node:
                lines.append(f'  "{name.get(i, str(i - 2))}" -> "{j}" [label="{op}"];')
        lines += [f'  "{j}" -> "c_{{k}}" [color=gray];' for j in range(len(cell))]
        return "\n".join(lines + ["}"]) + "\n"

    def write_dot(self, directory: str | Path) -> list[Path]:
        """``cell_<type>.dot`` for each cell into ``directory``, and ``cell_<type>.svg`` where Graphviz's
        ``dot`` program is installed. Returns the files written."""
        import shutil
        import subprocess

        written = []
        for t in self.cells:
            dot = Path(directory) / f"cell_{t}.dot"
            dot.write_text(self.to_dot(t))
            written.append(dot)
            if shutil.which("dot"):
                svg = dot.with_suffix(".svg")
                done = subprocess.run(["dot", "-Tsvg", str(dot), "-o", str(svg)], capture_output=True, timeout=60)
                if done.returncode == 0:
                    written.append(svg)
        return written

    @classmethod
    def load(cls, path: str | Path) -> "Genotype":
        return cls.from_json(Path(path).read_text())


def derive(alphas: dict[str, torch.Tensor], ops: tuple[str, ...], nodes: int, k: int = 2) -> Genotype:
    """The genotype of architecture tensors ``alpha_t`` ``[E, O]`` and ``beta_t`` ``[E]`` (or ``beta_pair_t`` ``[P]``)."""
    cells: dict[str, Cell] = {}
    with torch.no_grad():
        for key in alphas:
            if not key.startswith("alpha_"):
                continue
            t = key[len("alpha_"):]
            op_w = torch.softmax(alphas[key], dim=-1)
            strength, best = op_w.max(dim=-1)
            cell: Cell = []
            pair_logits = alphas.get(f"beta_pair_{t}")
            pair_groups = pair_logits.split(node_sizes(nodes, True)) if pair_logits is not None else None
            node_pairs = [[(a, b) for (jj, a, b) in pairs(nodes) if jj == j] for j in range(nodes)]
            for j, own in enumerate(node_edges(nodes)):
                if pair_groups is not None:
                    keep = list(node_pairs[j][int(pair_groups[j].argmax())])
                else:
                    rows = slice(own.start, own.stop)
                    score = torch.softmax(alphas[f"beta_{t}"][rows], dim=0) * strength[rows]
                    keep = sorted(score.topk(min(k, len(own))).indices.tolist())
                cell.append([(ops[int(best[own[i]])], i) for i in keep])
            cells[t] = cell
    return Genotype(cells, nodes)


def hard_mixture(alphas: dict[str, torch.Tensor], ops: tuple[str, ...], nodes: int,
                 tau: tuple[float, float]) -> dict[str, torch.Tensor]:
    """Hard pruning: the soft mixture at ``tau`` with every (edge, operation) outside the genotype set to 0.

    With pairwise input weights each kept input weighs its pair's softmax(β/τ_β) alone (the other pairs are
    gone), as the official sparsified forward pass computes it."""
    genotype = derive(alphas, ops, nodes)
    soft = mixture(alphas, tau[0], tau[1], nodes)
    own = node_edges(nodes)
    out = {}
    for t, cell in genotype.cells.items():
        mask = torch.zeros_like(soft[t])
        for j, node in enumerate(cell):
            for op, i in node:
                mask[own[j][i], ops.index(op)] = 1.0
        if f"beta_pair_{t}" in alphas:
            pi = [torch.softmax(g / tau[1], dim=0).max() for g in alphas[f"beta_pair_{t}"].split(node_sizes(nodes, True))]
            node_of = torch.tensor([j for j, _ in edges(nodes)])
            op_w = torch.softmax(alphas[f"alpha_{t}"] / tau[0], dim=-1)
            out[t] = (torch.stack(pi)[node_of][:, None] * op_w * mask).detach()
        else:
            out[t] = (soft[t] * mask).detach()
    return out
