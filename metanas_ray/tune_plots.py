"""Sweep plots (matplotlib Agg only), written by ``metanas_ray.tune`` into the sweep's ``plots/``:

    val_curves.png      the ranking metric against meta-steps for every trial; ASHA-stopped trials dashed
                        and ended with ×, errored trials dotted, the best trial drawn thick
    search_values.png   each searched value against the trial's best metric (log axis for loguniform keys,
                        categories for choice/grid keys of strings or lists); stopped trials hollow

    python -c "from metanas_ray.tune_plots import write_sweep_plots"   # called by the sweep; no CLI
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

log = logging.getLogger(__name__)

_DPI = 110


def plot_trial_curves(trials: Sequence[Any], metric: str, path: Path, mode: str = "max") -> Path:
    """``metric`` against ``step`` for each trial (``TrialRecord`` s with a ``history`` of reports)."""
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=_DPI)
    try:
        sign = 1 if mode == "max" else -1
        ranked = [(sign * t.best, -t.index) for t in trials if not math.isnan(t.best)]
        best_index = -max(ranked)[1] if ranked else None
        cmap = plt.get_cmap("tab10" if len(trials) <= 10 else "tab20")
        for n, t in enumerate(trials):
            xs = [r["step"] for r in t.history]
            ys = [r[metric] for r in t.history]
            if not xs:
                continue
            style = "--" if t.stopped_early else ":" if t.status == "ERROR" else "-"
            best = t.index == best_index
            note = " (stopped early)" if t.stopped_early else " (error)" if t.status == "ERROR" else ""
            ax.plot(xs, ys, style, color=cmap(n % cmap.N), lw=2.6 if best else 1.3, marker="o", markersize=3,
                    label=f"trial {t.index}{' ★ best' if best else ''}{note}")
            if t.stopped_early:
                ax.plot(xs[-1], ys[-1], "x", color=cmap(n % cmap.N), markersize=9, mew=2)
        ax.set(xlabel="meta-steps", ylabel=metric, title=f"{metric} of every trial (× = stopped early by ASHA)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best", ncol=2 if len(trials) > 8 else 1)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _log_minor(value: float, _pos: int) -> str:
    if value <= 0:
        return ""
    mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
    return f"{value:g}" if mantissa in (2.0, 5.0) else ""


def _categorical(values: Sequence[Any], kind: str) -> bool:
    return kind in ("choice", "grid") and any(not isinstance(v, (int, float)) or isinstance(v, bool)
                                              for v in values)


def plot_search_values(trials: Sequence[Any], metric: str, kinds: Mapping[str, str], path: Path) -> Path:
    """One panel per searched key: the value against the trial's best ``metric``."""
    keys = list(kinds)
    cols = min(3, len(keys)) or 1
    rows = math.ceil(len(keys) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), dpi=_DPI, squeeze=False)
    try:
        for ax, key in zip(axes.flat, keys):
            values = [t.values.get(key) for t in trials]
            if _categorical(values, kinds[key]):
                labels = sorted({str(v) for v in values})
                xs = [labels.index(str(v)) for v in values]
                ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
                ax.set_xlim(-0.5, len(labels) - 0.5)
            else:
                xs = [float(v) for v in values]
                if kinds[key] == "loguniform":
                    ax.set_xscale("log")
                    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                    ax.xaxis.set_minor_formatter(FuncFormatter(_log_minor))  # 2×, 5× only: no overlap
            for x, t in zip(xs, trials):
                if math.isnan(t.best):
                    continue
                face = "none" if t.stopped_early else "tab:blue"
                ax.scatter([x], [t.best], s=36, facecolors=face, edgecolors="tab:red" if t.status == "ERROR"
                           else "tab:blue", zorder=3)
                ax.annotate(str(t.index), (x, t.best), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.set(xlabel=key, ylabel=f"best {metric}")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle("searched values (hollow: stopped early; numbers: trial)", fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def write_sweep_plots(directory: Path, trials: Sequence[Any], metric: str, kinds: Mapping[str, str],
                      mode: str = "max") -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [plot_trial_curves(trials, metric, directory / "val_curves.png", mode),
             plot_search_values(trials, metric, kinds, directory / "search_values.png")]
    log.debug("wrote %s", paths)
    return paths
