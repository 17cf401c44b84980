"""The flags that ``run``, ``tune`` and ``evaluate`` share, each with one meaning (README: "One set of flags").

:data:`FLAGS` is the table: a flag, what it sets, and what it means on each command ("" where it does not
apply). :func:`add_shared` puts a command's column on its parser; :func:`overrides` turns the parsed flags into
dotted config keys, the same keys ``--set`` takes.
"""
from __future__ import annotations

import argparse
from typing import Any

from .config import ConfigError, parse_overrides

COMMANDS = ("run", "tune", "evaluate")

# flag: (metavar, config key it sets or "", what it means, {command: its --help there})
FLAGS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "--config": ("FILE", "", "the run config (`run`) or sweep file (`tune`)", {
        "run": "a YAML run config (see tune_configs/); default: the built-in defaults",
        "tune": "a sweep file (see tune_configs/sweep_*.yaml)"}),
    "--set": ("KEY=VALUE", "", "override a config key (`evaluate`: `eval.*`, `data.*`)", {
        "run": "override a config key, e.g. --set task.lr_w=0.05 (repeatable)",
        "tune": "a fixed override of the sweep's base config (repeatable)",
        "evaluate": "override an eval.* or data.* key of the run's config, e.g. --set eval.steps=50"}),
    "--data-root": ("DIR", "data.root", "`data.root`", {
        "run": "dataset directory (data.root)", "tune": "dataset directory of every trial (data.root)",
        "evaluate": "dataset directory, if not where the run found it (data.root)"}),
    "--output": ("PATH", "", "where results go: run / sweep directory, evaluation JSON", {
        "run": "run directory (default: runs/<config>-<time>)",
        "tune": "sweep directory (default: runs/<sweep file>-<time>)",
        "evaluate": "the evaluation JSON (default: RUN_DIR/evaluation-<split>-<time>.json)"}),
    "--resume": ("DIR", "", "continue the run / sweep in DIR", {
        "run": "continue the run in DIR from its last checkpoint",
        "tune": "continue the interrupted sweep in DIR"}),
    "--seed": ("N", "run.seed", "`run.seed`", {
        "run": "run.seed: initialisation and every task drawn", "tune": "run.seed of the base config",
        "evaluate": "run.seed: which meta-test tasks are drawn (default: the run's)"}),
    "--num-workers": ("N", "scale.num_workers", "CPU workers (of each trial)", {
        "run": "CPU workers (scale.num_workers)", "tune": "Ray Train workers per trial (resources.workers)"}),
    "--num-gpus": ("N", "scale.num_gpus", "GPU workers, one GPU each (`evaluate`: 0 or 1)", {
        "run": "GPU workers, one GPU each (scale.num_gpus; 0: CPU workers)",
        "tune": "GPU workers per trial, one GPU each (resources.workers, resources.gpu: 1)",
        "evaluate": "0: the CPU, 1: the GPU (default: the GPU when PyTorch sees one)"}),
    "--address": ("ADDR", "scale.address", "the Ray cluster (default: `RAY_ADDRESS` or a local Ray)", {
        "run": "Ray cluster address (scale.address; default: RAY_ADDRESS or a local Ray)",
        "tune": "Ray cluster address (default: RAY_ADDRESS or a local Ray)"}),
    "--mlflow": ("URI", "run.mlflow", "also log to MLflow", {
        "run": "also log to MLflow (run.mlflow), e.g. file:runs/mlflow; pip install 'metanas-ray[mlflow]'",
        "tune": "also log every trial to MLflow (Tune's MLflowLoggerCallback), e.g. file:runs/mlflow"}),
    "--print-config": ("", "", "print the resolved config, every key with its meaning, and exit", {
        "run": "print the resolved config (every key, its default where it differs, its meaning) and exit",
        "tune": "print the sweep's resolved base config and its search space, and exit",
        "evaluate": "print the run's config as evaluate resolves it, and exit"}),
}


def add_shared(p: argparse.ArgumentParser, command: str) -> None:
    """Add ``command``'s column of :data:`FLAGS` to ``p``."""
    for flag, (metavar, _, _, helps) in FLAGS.items():
        if command not in helps:
            continue
        kw: dict[str, Any] = {"help": helps[command]}
        if flag == "--print-config":
            kw["action"] = "store_true"
        elif flag == "--resume" and command == "tune":  # "--output DIR --resume", the older form, still works
            kw.update(metavar=metavar, nargs="?", const="")
        elif flag == "--set":
            kw.update(dest="overrides", action="append", default=[], metavar=metavar)
        else:
            kw["metavar"] = metavar
            if flag in ("--seed", "--num-workers", "--num-gpus"):
                kw["type"] = int
        p.add_argument(flag, **kw)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--set`` pairs and the flags that set one config key, as dotted keys (checked like ``--set``)."""
    out = parse_overrides(getattr(args, "overrides", []) or [])
    num_workers, num_gpus = getattr(args, "num_workers", None), getattr(args, "num_gpus", None)
    if num_workers is not None and num_workers < 1:
        raise ConfigError(f"--num-workers must be at least 1, got {num_workers}")
    if num_gpus is not None and num_gpus < 0:
        raise ConfigError(f"--num-gpus must be at least 0, got {num_gpus} (0: CPU workers)")
    for flag, (_, key, _, _) in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if key and value is not None:
            out[key] = value
    return out


def flag_table() -> str:
    """:data:`FLAGS` as the README's Markdown table (a test keeps the two the same)."""
    lines = ["| flag | means | " + " | ".join(f"`{c}`" for c in COMMANDS) + " |", "|---|---|---|---|---|"]
    for flag, (metavar, _, means, helps) in FLAGS.items():
        marks = ["✓" if c in helps else "—" for c in COMMANDS]
        lines.append(f"| `{flag}{' ' + metavar if metavar else ''}` | {means} | " + " | ".join(marks) + " |")
    return "\n".join(lines)
