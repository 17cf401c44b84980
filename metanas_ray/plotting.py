"""Run plots (matplotlib only, headless): learning curves, the architecture weights (α, β) and the derived cells.

``write_run_plots`` writes them all into a run's ``plots/`` directory:

    learning_curves.png   meta-train query accuracy, meta-val accuracy (± 95 % CI) and meta-train loss
    alphas.png            softmax(α/τ_α) per edge and operation, softmax(β/τ_β) per node's inputs
    cell_normal.png       the derived normal cell, drawn left to right (only if the genotype has one)
    cell_reduce.png       the derived reduction cell, drawn left to right (only if the genotype has one)

Every function closes the figures it opens, so it can be called from a long training loop.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from .genotype import Genotype  # noqa: E402
from .search_space import edges, input_weights, node_edges, pairs  # noqa: E402

log = logging.getLogger(__name__)

CELL_TYPES = ("normal", "reduce")
_DPI = 110

# -- learning curves -----------------------------------------------------------------------------------------------


def _num(value: Any) -> float:
    """A metrics value as float; missing, empty (a csv row without meta-validation) or unparsable → NaN."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([_num(r.get(key)) for r in rows], dtype=float)


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over ``window`` neighbouring values (shorter at the ends; NaNs ignored), so no lag."""
    out = np.full_like(y, np.nan)
    half = window // 2
    for n in range(len(y)):
        seg = y[max(0, n - half):n + half + 1]
        seg = seg[np.isfinite(seg)]
        if seg.size:
            out[n] = seg.mean()
    return out


def plot_learning_curves(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Accuracy (meta-train query, meta-val ± CI) and meta-train loss against the meta-step; returns ``path``.

    ``rows`` are metrics.csv rows (dicts, values may be numbers or the strings of a csv file) with ``step``,
    ``train_accuracy``, ``train_loss`` and, on rows with meta-validation, ``val_accuracy`` and ``val_ci95``.
    """
    path = Path(path)
    rows = list(rows)
    step = _column(rows, "step")
    if rows and not np.isfinite(step).any():  # no step column: number the rows
        step = np.arange(1, len(rows) + 1, dtype=float)
    train_acc, train_loss = _column(rows, "train_accuracy"), _column(rows, "train_loss")
    val_acc, val_ci = _column(rows, "val_accuracy"), _column(rows, "val_ci95")

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=_DPI)
    try:
        smooth = len(rows) >= 20
        window = max(5, len(rows) // 20) | 1  # odd: centred
        for ax, y, colour, label in ((ax_acc, train_acc, "tab:blue", "meta-train (query)"),
                                     (ax_loss, train_loss, "tab:red", "meta-train loss")):
            ok = np.isfinite(y) & np.isfinite(step)
            if not ok.any():
                continue
            marker = "o" if ok.sum() <= 30 else None
            ax.plot(step[ok], y[ok], color=colour, marker=marker, markersize=3, lw=1,
                    alpha=0.35 if smooth else 1.0, label=label if not smooth else f"{label}, raw")
            if smooth:
                ax.plot(step[ok], _moving_average(y[ok], window), color=colour, lw=1.8,
                        label=f"{label}, running mean of {window}")

        ok = np.isfinite(val_acc) & np.isfinite(step)
        if ok.any():
            x, y = step[ok], val_acc[ok]
            ci = np.nan_to_num(val_ci[ok], nan=0.0)
            if (ci > 0).any() and ok.sum() > 1:
                ax_acc.fill_between(x, y - ci, y + ci, color="tab:green", alpha=0.18, lw=0)
            ax_acc.errorbar(x, y, yerr=ci if (ci > 0).any() else None, color="tab:green", marker="s",
                            markersize=4, lw=1.5, capsize=3, label="meta-val (± 95 % CI)")

        ax_acc.set(title="accuracy", xlabel="meta-step", ylabel="accuracy")
        ax_loss.set(title="meta-train loss", xlabel="meta-step", ylabel="loss")
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="best")
            else:
                ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes,
                        color="gray")
            if np.isfinite(step).sum() == 1:  # one point: give the axis some width around it
                s = step[np.isfinite(step)][0]
                ax.set_xlim(s - 1, s + 1)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    log.debug("wrote %s", path)
    return path


# -- architecture weights ------------------------------------------------------------------------------------------


def state_name(i: int, math_text: bool = False) -> str:
    """The name of cell state ``i``: 0, 1 are the inputs c_{k-2}, c_{k-1}, 2 + m is intermediate node m."""
    if i < 2:
        name = f"c_{{k-{2 - i}}}"
        return f"${name}$" if math_text else name
    return f"$n_{{{i - 2}}}$" if math_text else f"n{i - 2}"


def edge_label(j: int, i: int, math_text: bool = False) -> str:
    """``n{j}←{source}``, e.g. ``n0←c_{k-2}``, ``n2←n0`` (``math_text``: the mathtext form for drawing)."""
    if math_text:
        return f"$n_{{{j}}} \\leftarrow {state_name(i, True).strip('$')}$"
    return f"n{j}←{state_name(i)}"


def _annotate(ax, values: np.ndarray, vmax: float, fontsize: float, bold_max: bool) -> None:
    for r in range(values.shape[0]):
        best = int(np.argmax(values[r])) if bold_max else -1
        for c in range(values.shape[1]):
            v = values[r, c]
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=fontsize,
                    color="white" if v > 0.6 * vmax else "black",
                    fontweight="bold" if c == best else "normal")


def plot_architecture(alphas: Mapping[str, torch.Tensor], ops: Sequence[str], nodes: int, path: str | Path,
                      tau: tuple[float, float] = (1.0, 1.0)) -> Path:
    """One figure: per cell type, softmax(α/τ_α) as an annotated [edge × operation] heatmap and, aligned
    with its rows, softmax(β/τ_β) (each node's weights over its j + 2 inputs). Returns ``path``."""
    path = Path(path)
    ops = tuple(ops)
    edge_list = edges(nodes)
    n_edges, n_ops = len(edge_list), len(ops)
    types = _ordered(k[len("alpha_"):] for k in alphas if k.startswith("alpha_"))
    tau_a, tau_b = float(tau[0]), float(tau[1])

    panels = []
    for t in types:
        alpha = alphas[f"alpha_{t}"].detach().float().cpu()
        if tuple(alpha.shape) != (n_edges, n_ops):
            raise ValueError(f"alpha_{t} has shape {tuple(alpha.shape)}, expected ({n_edges}, {n_ops}) "
                             f"for {nodes} nodes and {n_ops} operations")
        a = torch.softmax(alpha / tau_a, dim=-1).numpy()
        b = None
        for key, size in ((f"beta_{t}", n_edges), (f"beta_pair_{t}", len(pairs(nodes)))):
            if key in alphas and alphas[key].numel() != size:
                raise ValueError(f"{key} has {alphas[key].numel()} entries, expected {size}")
            if key in alphas:  # per-input β, or each input's share of the pairwise β (Σ over its pairs)
                b = input_weights({key: alphas[key].detach().float().cpu().reshape(-1)}, t, tau_b, nodes).numpy()
        panels.append((t, a, b))

    row_h, gap, top, bottom = 0.3, 1.2, 0.55, 0.8  # inches: per edge row, between cell types, margins
    block = n_edges * row_h
    fig_h = max(len(panels), 1) * block + max(len(panels) - 1, 0) * gap + top + bottom
    width = max(6.0, 1.3 + 0.78 * n_ops + 1.6)
    fig = plt.figure(figsize=(width, fig_h), dpi=_DPI)
    try:
        if not panels:
            fig.text(0.5, 0.5, "no architecture parameters", ha="center", va="center", color="gray")
        else:
            gs = fig.add_gridspec(len(panels), 2, width_ratios=[n_ops, 1.15], wspace=0.04, hspace=gap / block,
                                  left=1.35 / width, right=1 - 0.12 / width, top=1 - top / fig_h,
                                  bottom=bottom / fig_h)
            labels = [edge_label(j, i, math_text=True) for j, i in edge_list]
            bounds = [own.start - 0.5 for own in node_edges(nodes)[1:]]  # between nodes' edge groups
            for p, (t, a, b) in enumerate(panels):
                ax_a = fig.add_subplot(gs[p, 0])
                ax_b = fig.add_subplot(gs[p, 1], sharey=ax_a)
                ax_a.imshow(a, cmap="Blues", vmin=0.0, vmax=max(float(a.max()), 1e-6), aspect="auto")
                _annotate(ax_a, a, float(a.max()), 7, bold_max=True)
                ax_a.set_xticks(range(n_ops), ops, rotation=30, ha="right", fontsize=8)
                ax_a.set_yticks(range(n_edges), labels, fontsize=8)
                tau_txt = f", $\\tau_\\alpha$ = {tau_a:g}" if tau_a != 1.0 else ""
                ax_a.set_title(f"{t} cell: softmax(α) per edge{tau_txt}", fontsize=10)
                if b is not None:
                    ax_b.imshow(b[:, None], cmap="Oranges", vmin=0.0, vmax=1.0, aspect="auto")
                    _annotate(ax_b, b[:, None], 1.0, 7, bold_max=False)
                else:
                    ax_b.text(0.0, (n_edges - 1) / 2, "no β", ha="center", va="center", color="gray")
                    ax_b.set_xlim(-0.5, 0.5)
                tau_txt = f"\n$\\tau_\\beta$ = {tau_b:g}" if tau_b != 1.0 else ""
                ax_b.set_title(f"{'input weight' if f'beta_pair_{t}' in alphas else 'softmax(β)'}{tau_txt}",
                               fontsize=9)
                ax_b.set_xticks([])
                ax_b.tick_params(axis="y", left=False, labelleft=False)
                for ax in (ax_a, ax_b):
                    for y in bounds:
                        ax.axhline(y, color="black", lw=0.8)
                    ax.tick_params(length=0)
        fig.savefig(path)
    finally:
        plt.close(fig)
    log.debug("wrote %s", path)
    return path


# -- cells as DAGs -------------------------------------------------------------------------------------------------

OUTPUT = "c_{k}"


def cell_edges(genotype: Genotype, cell_type: str) -> list[tuple[str, str, str | None]]:
    """The arrows of a cell drawing: ``(source, target, op)``, op edges first (node by node, in genotype
    order), then ``(node, "c_{k}", None)`` from every intermediate node to the output. Sources and targets
    are ``c_{k-2}``, ``c_{k-1}``, ``"0"`` … ``"n-1"`` (intermediate nodes) and ``c_{k}``."""
    if cell_type not in genotype.cells:
        raise KeyError(f"the genotype has no {cell_type} cell (has: {', '.join(genotype.cells) or 'none'})")
    cell = genotype.cells[cell_type]
    out: list[tuple[str, str, str | None]] = []
    for j, node in enumerate(cell):
        for op, i in node:
            if not 0 <= i < j + 2:
                raise ValueError(f"{cell_type} cell node {j} reads input {i}; only 0 … {j + 1} exist")
            out.append((state_name(i) if i < 2 else str(i - 2), str(j), op))
    out += [(str(j), OUTPUT, None) for j in range(len(cell))]
    return out


_HALF = np.array([0.45, 0.22])  # inches: half width and half height of every box
_LEVEL = 0.5  # inches between the apexes of arches one span apart (more than a label is high)
_LABEL_FONTSIZE = 9


@dataclass
class CellLayout:
    """Geometry of a cell drawing, in inches (equal aspect): what :func:`plot_cell` draws.

    The states c_{k-2}, c_{k-1}, 0 … n-1, c_{k} stand in one row, in this order, ``step`` apart. An arrow between
    neighbours is a straight line; one that spans s columns arches over the row, its apex (s − 1)·``_LEVEL`` above
    the boxes, so it passes over every box in between. The arrows into c_{k} arch under the row, as does a second
    operation on the same input. Each op label sits at its arrow's apex (or middle): labels of one span are
    ``step`` apart, more than a label is wide, and labels of different spans ``_LEVEL`` apart in height."""

    arrows: list[tuple[str, str, str | None]]  # (source, target, op) as in cell_edges
    pos: dict[str, np.ndarray]  # box name → centre
    levels: list[float]  # per arrow: apex height in _LEVELs, > 0 above the row, < 0 below it, 0 a straight line
    paths: list[np.ndarray]  # per arrow: the 4 control points of a cubic Bézier, from box edge to box edge
    curves: list[np.ndarray]  # per arrow: [41, 2] points along it
    labels: list[tuple[int, tuple[float, float], tuple[float, float, float, float]]]  # (arrow, centre, rect)

    def box_rect(self, name: str, pad: float = 0.0) -> tuple[float, float, float, float]:
        (x0, y0), (x1, y1) = self.pos[name] - _HALF - pad, self.pos[name] + _HALF + pad
        return float(x0), float(y0), float(x1), float(y1)

    def extent(self) -> tuple[float, float, float, float]:
        pts = np.concatenate(self.curves + [np.array([p - _HALF, p + _HALF]) for p in self.pos.values()]
                             + [np.reshape(rect, (2, 2)) for _, _, rect in self.labels])
        (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)


def _text_size(text: str, fontsize: float) -> tuple[float, float]:
    """Width and height of ``text`` in inches."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    w, h, _ = TextToPath().get_text_width_height_descent(text, FontProperties(size=fontsize), ismath=False)
    return w / 72, h / 72


def _arrow_path(p0: np.ndarray, p1: np.ndarray, level: float) -> np.ndarray:
    """The 4 control points of the arrow from box centre ``p0`` to box centre ``p1`` (right of p0, same row): at
    level 0 the straight line between their facing sides, else a bow from the top (level > 0) or bottom of one box
    to that of the other, apex |level|·_LEVEL beyond them. Longer arrows leave and enter further from the centres,
    so arches that share a box nest there instead of crossing."""
    if level == 0:
        a, b = p0 + [_HALF[0], 0.0], p1 - [_HALF[0], 0.0]
        return np.array([a, (2 * a + b) / 3, (a + 2 * b) / 3, b])
    off = min(0.05 + 0.1 * abs(level), _HALF[0] - 0.05)
    y0 = p0[1] + np.sign(level) * _HALF[1]
    y1 = y0 + level * _LEVEL / 0.75  # a cubic's apex reaches 3/4 of the way to its middle control points
    return np.array([[p0[0] + off, y0], [p0[0] + off, y1], [p1[0] - off, y1], [p1[0] - off, y0]])


def cell_layout(genotype: Genotype, cell_type: str) -> CellLayout:
    """Place the boxes, arrows and op labels of one cell (see :class:`CellLayout`)."""
    from matplotlib.bezier import BezierSegment

    arrows = cell_edges(genotype, cell_type)
    names = [state_name(0), state_name(1)] + [str(j) for j in range(len(genotype.cells[cell_type]))] + [OUTPUT]
    size = {op: _text_size(op, _LABEL_FONTSIZE) for _, _, op in arrows if op is not None}
    step = max(2.0, 2 * _HALF[0] + max((w for w, _ in size.values()), default=0.0) + 0.35)  # a label fits between
    lay = CellLayout(arrows, {name: np.array([k * step, 0.0]) for k, name in enumerate(names)}, [], [], [], [])
    seen: dict[tuple[str, str], int] = {}
    for k, (src, dst, op) in enumerate(arrows):
        level = float(names.index(dst) - names.index(src) - 1)  # span − 1
        repeat = seen[(src, dst)] = seen.get((src, dst), -1) + 1
        if repeat:  # the same input again: alternately under and over the row, higher each time
            level = max(level + 0.5 * (repeat // 2), 0.6)
        lay.levels.append(-level if op is None or repeat % 2 else level)
        lay.paths.append(_arrow_path(lay.pos[src], lay.pos[dst], lay.levels[-1]))
        lay.curves.append(BezierSegment(lay.paths[-1])(np.linspace(0.0, 1.0, 41)))
        if op is not None:
            (cx, cy), (w, h) = lay.curves[-1][20], size[op]
            rect = (cx - w / 2 - 0.06, cy - h / 2 - 0.06, cx + w / 2 + 0.06, cy + h / 2 + 0.06)
            lay.labels.append((k, (float(cx), float(cy)), rect))
    return lay


def plot_cell(genotype: Genotype, cell_type: str, path: str | Path) -> list[tuple[str, str, str | None]]:
    """Draw one cell of ``genotype`` (layout: :func:`cell_layout`); returns the arrows drawn, ``(source, target,
    op)`` as in :func:`cell_edges`. (:meth:`Genotype.write_dot` writes the same cell for Graphviz.)"""
    from matplotlib.path import Path as MplPath

    path = Path(path)
    lay = cell_layout(genotype, cell_type)
    ops_used = sorted({op for _, _, op in lay.arrows if op is not None})
    colour = {op: plt.get_cmap("tab10")(k % 10) for k, op in enumerate(ops_used)}

    x0, y0, x1, y1 = lay.extent()
    x0, y0, x1, y1 = x0 - 0.25, y0 - 0.25, x1 + 0.25, y1 + 0.6  # margins, room for the title
    fig = plt.figure(figsize=(x1 - x0, y1 - y0), dpi=_DPI)
    drawn: list[tuple[str, str, str | None]] = []
    try:
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        ax.set(xlim=(x0, x1), ylim=(y0, y1), aspect="equal")
        ax.axis("off")
        for name, c in lay.pos.items():
            face = "#c7e9c0" if name in ("c_{k-2}", "c_{k-1}") else "#fdf1b8" if name == OUTPUT else "#c6dbef"
            ax.add_patch(FancyBboxPatch(tuple(c - _HALF), *(2 * _HALF), boxstyle="round,pad=0,rounding_size=0.1",
                                        fc=face, ec="#333333", lw=1.2, zorder=3))
            ax.text(*c, f"${name}$" if name.startswith("c_") else name, ha="center", va="center", fontsize=12,
                    zorder=4)
        for (src, dst, op), ctrl in zip(lay.arrows, lay.paths):
            ax.add_patch(FancyArrowPatch(
                path=MplPath(ctrl, [MplPath.MOVETO] + [MplPath.CURVE4] * 3), arrowstyle="-|>", mutation_scale=12,
                lw=1.4 if op else 1.0, color=colour[op] if op else "#888888", linestyle="-" if op else (0, (4, 2)),
                zorder=2))
            drawn.append((src, dst, op))
        for k, centre, _ in lay.labels:
            op = lay.arrows[k][2]
            ax.text(*centre, op, ha="center", va="center", fontsize=_LABEL_FONTSIZE, zorder=5, color="black",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec=colour[op], lw=0.8))
        ax.text((x0 + x1) / 2, y1 - 0.3, f"{cell_type} cell", ha="center", va="center", fontsize=12,
                fontweight="bold")
        fig.savefig(path)
    finally:
        plt.close(fig)
    log.debug("wrote %s", path)
    return drawn


# -- all plots of a run --------------------------------------------------------------------------------------------


def write_run_plots(plots_dir: str | Path, rows: Sequence[Mapping[str, Any]],
                    alphas: Mapping[str, torch.Tensor], genotype: Genotype, ops: Sequence[str], nodes: int,
                    tau: tuple[float, float] = (1.0, 1.0)) -> list[Path]:
    """Write learning_curves.png, alphas.png and cell_<type>.png (for the cell types in ``genotype``) into
    ``plots_dir`` (created if needed); returns the paths written."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_learning_curves(rows, plots_dir / "learning_curves.png"),
               plot_architecture(alphas, ops, nodes, plots_dir / "alphas.png", tau)]
    for t in _ordered(genotype.cells):
        plot_cell(genotype, t, plots_dir / f"cell_{t}.png")
        written.append(plots_dir / f"cell_{t}.png")
    log.info("wrote %d plots to %s", len(written), plots_dir)
    return written


def _ordered(types: Iterable[str]) -> list[str]:
    """Cell types: normal, reduce, then any others, sorted."""
    types = list(types)
    return [t for t in CELL_TYPES if t in types] + sorted(t for t in types if t not in CELL_TYPES)
