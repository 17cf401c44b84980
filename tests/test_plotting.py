"""Run plots: every function writes a real PNG, copes with sparse metrics, and the cell drawing is the genotype."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from metanas_ray import plotting
from metanas_ray.genotype import Genotype, derive
from metanas_ray.search_space import edges

OPS = ("max_pool_3x3", "avg_pool_3x3", "skip_connect", "conv_1x5_5x1", "conv_3x3", "sep_conv_3x3", "dil_conv_3x3")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_side: int = 150) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert min(img.shape[:2]) >= min_side and max(img.shape[:2]) <= 6000
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas
    return img


def random_alphas(nodes: int, seed: int, types: tuple[str, ...] = ("normal", "reduce")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_edges = len(edges(nodes))
    out = {}
    for t in types:
        out[f"alpha_{t}"] = 2.0 * torch.randn(n_edges, len(OPS), generator=g)
        out[f"beta_{t}"] = torch.randn(n_edges, generator=g)
    return out


def metrics_rows(n: int, val_every: int | None, as_csv_strings: bool = False) -> list[dict]:
    rows = []
    for s in range(1, n + 1):
        row = {"step": s, "train_accuracy": 0.3 + 0.4 * (1 - math.exp(-s / 20)), "train_loss": 1.5 * math.exp(-s / 30)}
        if val_every is not None:
            has_val = s % val_every == 0
            row["val_accuracy"] = 0.3 + 0.35 * (1 - math.exp(-s / 25)) if has_val else math.nan
            row["val_ci95"] = 0.03 if has_val else math.nan
        if as_csv_strings:  # as read back from metrics.csv: strings, "" where there was no value
            row = {k: ("" if isinstance(v, float) and math.isnan(v) else str(v)) for k, v in row.items()}
        rows.append(row)
    return rows


@pytest.fixture(autouse=True)
def no_open_figures():
    plt.close("all")
    yield
    assert plt.get_fignums() == [], "a plotting function left a figure open"


# -- learning curves -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [
    metrics_rows(60, val_every=10),
    metrics_rows(60, val_every=10, as_csv_strings=True),
    metrics_rows(12, val_every=None),  # no val keys at all
    [{k: v for k, v in r.items()} | {"val_accuracy": "", "val_ci95": ""} for r in metrics_rows(5, None)],
    metrics_rows(1, val_every=None),  # a single row
    metrics_rows(1, val_every=1),  # a single row with meta-validation
    [],
], ids=["val", "csv-strings", "no-val-keys", "empty-val", "one-row", "one-row-val", "no-rows"])
def test_learning_curves(tmp_path: Path, rows: list[dict]) -> None:
    out = plotting.plot_learning_curves(rows, tmp_path / "lc.png")
    assert out == tmp_path / "lc.png"
    img = assert_png(out)
    assert img.shape[1] > img.shape[0]  # two panels side by side


# -- architecture weights ------------------------------------------------------------------------------------------


def test_architecture_both_cells(tmp_path: Path) -> None:
    alphas = random_alphas(3, seed=0)
    alphas = {k: v.requires_grad_() for k, v in alphas.items()}  # live parameters are fine
    img = assert_png(plotting.plot_architecture(alphas, OPS, 3, tmp_path / "a.png", tau=(2.0, 0.5)))
    one = assert_png(plotting.plot_architecture(random_alphas(3, 0, ("normal",)), OPS, 3, tmp_path / "n.png"))
    assert img.shape[0] > 1.6 * one.shape[0]  # one heatmap block per cell type


def test_architecture_five_nodes_and_edge_labels(tmp_path: Path) -> None:
    assert_png(plotting.plot_architecture(random_alphas(5, seed=1), OPS, 5, tmp_path / "a.png"))
    labels = [plotting.edge_label(j, i) for j, i in edges(3)]
    assert labels[:3] == ["n0←c_{k-2}", "n0←c_{k-1}", "n1←c_{k-2}"] and labels[-1] == "n2←n1"


def test_architecture_rejects_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="alpha_normal"):
        plotting.plot_architecture(random_alphas(3, 0, ("normal",)), OPS, 4, tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


# -- cells ------------------------------------------------------------------------------------------------------------


def rect_overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Overlap area of two (x0, y0, x1, y1) rectangles."""
    return max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)


def expected_arrows(genotype: Genotype, cell_type: str) -> list[tuple[str, str, str | None]]:
    names = {0: "c_{k-2}", 1: "c_{k-1}"}
    cell = genotype.cells[cell_type]
    ops = [(names.get(i, str(i - 2)), str(j), op) for j, node in enumerate(cell) for op, i in node]
    return ops + [(str(j), "c_{k}", None) for j in range(len(cell))]


@pytest.mark.parametrize("nodes", [3, 5])
def test_plot_cell_draws_the_genotype(tmp_path: Path, nodes: int) -> None:
    genotype = derive(random_alphas(nodes, seed=nodes), OPS, nodes)
    for t in ("normal", "reduce"):
        drawn = plotting.plot_cell(genotype, t, tmp_path / f"{t}.png")
        img = assert_png(tmp_path / f"{t}.png")
        assert img.shape[1] > img.shape[0]  # inputs left, output right
        assert drawn == expected_arrows(genotype, t)
        assert len(drawn) == 2 * nodes + nodes  # k = 2 inputs per node, and every node feeds the output


def test_plot_cell_hand_built_genotype(tmp_path: Path) -> None:
    cell = [[("sep_conv_3x3", 0), ("skip_connect", 0)], [("conv_3x3", 2), ("max_pool_3x3", 2), ("avg_pool_3x3", 1)],
            [("skip_connect", 3)]]  # repeated inputs, three inputs, one input
    genotype = Genotype({"normal": cell}, 3)
    drawn = plotting.plot_cell(genotype, "normal", tmp_path / "c.png")
    assert_png(tmp_path / "c.png")
    assert drawn == expected_arrows(genotype, "normal")
    lay = plotting.cell_layout(genotype, "normal")
    assert lay.levels[0] * lay.levels[1] < 0  # the two arrows c_{k-2} → 0: one above the row, one below
    assert lay.levels[2] == 0 > lay.levels[3]  # the two arrows 0 → 1: a straight line and an arch below
    with pytest.raises(KeyError, match="reduce"):
        plotting.plot_cell(genotype, "reduce", tmp_path / "r.png")
    with pytest.raises(ValueError, match="node 0 reads input 2"):
        plotting.cell_edges(Genotype({"normal": [[("conv_3x3", 2)]]}, 1), "normal")


@pytest.mark.parametrize("nodes", [3, 4, 5])
def test_cell_layout_has_no_overlaps(nodes: int) -> None:
    for seed in range(4):
        genotype = derive(random_alphas(nodes, seed=100 + seed, types=("normal",)), OPS, nodes)
        lay = plotting.cell_layout(genotype, "normal")
        assert lay.arrows == expected_arrows(genotype, "normal")
        boxes = [lay.box_rect(b) for b in lay.pos]
        labels = [rect for _, _, rect in lay.labels]
        assert [lay.arrows[k][2] for k, _, _ in lay.labels] == [op for _, _, op in lay.arrows if op is not None]
        assert all(rect_overlap(a, b) == 0 for a, b in itertools.combinations(boxes + labels, 2))
        for (src, dst, _), curve in zip(lay.arrows, lay.curves):  # no arrow crosses a box it does not touch
            for b, rect in zip(lay.pos, boxes):
                if b not in (src, dst):
                    inside = ((curve[:, 0] >= rect[0]) & (curve[:, 0] <= rect[2])
                              & (curve[:, 1] >= rect[1]) & (curve[:, 1] <= rect[3]))
                    assert not inside.any(), (seed, src, dst, b)
        x = [lay.pos[name][0] for name in ["c_{k-2}", "c_{k-1}"] + [str(j) for j in range(nodes)] + ["c_{k}"]]
        assert x == sorted(set(x))  # inputs on the left, the nodes in order, the output on the right


# -- all plots of a run ---------------------------------------------------------------------------------------------


def test_write_run_plots(tmp_path: Path) -> None:
    alphas = random_alphas(3, seed=3)
    genotype = derive(alphas, OPS, 3)
    written = plotting.write_run_plots(tmp_path / "run" / "plots", metrics_rows(30, 10), alphas, genotype, OPS, 3,
                                       tau=(1.0, 1.0))
    assert [p.name for p in written] == ["learning_curves.png", "alphas.png", "cell_normal.png", "cell_reduce.png"]
    for p in written:
        assert p.parent == tmp_path / "run" / "plots"
        assert_png(p)


def test_write_run_plots_without_reduce_cell(tmp_path: Path) -> None:
    alphas = random_alphas(3, seed=4, types=("normal",))
    genotype = derive(alphas, OPS, 3)
    assert set(genotype.cells) == {"normal"}
    written = plotting.write_run_plots(tmp_path, metrics_rows(1, None), alphas, genotype, OPS, 3)
    assert [p.name for p in written] == ["learning_curves.png", "alphas.png", "cell_normal.png"]
    assert not (tmp_path / "cell_reduce.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
