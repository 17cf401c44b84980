"""The flags that ``run``, ``tune`` and ``evaluate`` share, each with one meaning (README: "One set of flags").

:data:`FLAGS` is the table (``flags.yaml``): a flag, what it sets, and what it means on each command (absent
where it does not apply). :func:`add_shared` puts a command's column on its parser; :func:`overrides` turns the
parsed flags into dotted config keys, the same keys ``--set`` takes.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, parse_overrides

COMMANDS = ("run", "tune", "evaluate")


def _load_flags() -> dict[str, tuple[str, str, str, dict[str, str]]]:
    """``flags.yaml`` (a table, kept as data): flag -> (metavar, config key it sets or "", what it means,
    {command: its --help there})."""
    raw = yaml.safe_load((Path(__file__).with_name("flags.yaml")).read_text())
    return {flag: (row["metavar"], row["key"], row["means"], {c: row[c] for c in COMMANDS if c in row})
            for flag, row in raw.items()}


FLAGS = _load_flags()


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
