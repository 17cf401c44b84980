"""The run directory (``--output``), the contract with users, scripts and the Ray/Tune layers:

    config.yaml      the resolved config          metrics.csv   one row per logged meta-step
    checkpoints/     step_XXXXXXX.pt (last N)     genotype.json the derived cells
    plots/           learning curves, α/β, cells  summary.json  meta-test results (written last)
    error.txt        only while a run is stopped on an error (nothing else is removed)

A directory that already holds a run is never overwritten: continuing it needs ``--resume``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from . import checkpoint
from . import config as config_mod


class RunDirError(RuntimeError):
    """A run directory that cannot be created, resumed or written."""


_MARKERS = ("config.yaml", "metrics.csv", "checkpoints", "summary.json")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        self.config_file = self.path / "config.yaml"
        self.metrics_file = self.path / "metrics.csv"
        self.checkpoints = self.path / "checkpoints"
        self.plots = self.path / "plots"
        self.genotype_file = self.path / "genotype.json"
        self.summary_file = self.path / "summary.json"
        self.error_file = self.path / "error.txt"

    # -- creating and resuming ------------------------------------------------------------------------------
    def holds_run(self) -> bool:
        return self.path.is_dir() and any((self.path / m).exists() for m in _MARKERS)

    def create(self, cfg: config_mod.Config) -> "RunDir":
        """Start a new run here; refuses a directory that already holds one."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--output {self.path} is a file, not a directory")
        if self.holds_run():
            raise RunDirError(f"{self.path} already holds a run; continue it with --resume {self.path} "
                              f"or choose another --output")
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            self.plots.mkdir(exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create run directory {self.path}: {e}") from None
        config_mod.save(cfg, self.config_file)
        return self

    def open_existing(self) -> config_mod.Config:
        """The saved config of a run to resume (checks there is something to resume)."""
        if not self.config_file.is_file():
            raise RunDirError(f"--resume {self.path}: no run there (config.yaml missing)")
        return config_mod.load(self.config_file)

    def latest_checkpoint(self) -> Path | None:
        return checkpoint.latest(self.checkpoints)

    # -- writing ------------------------------------------------------------------------------------------------
    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """(Re)write metrics.csv from all rows so far: after a restart it has no gap and no duplicate."""
        if not rows:
            return
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
        _atomic_write(self.metrics_file, buf.getvalue())

    def save_checkpoint(self, payload: dict[str, Any], keep: int) -> Path:
        path = checkpoint.save(self.checkpoints / checkpoint.checkpoint_name(payload["step"]), payload)
        checkpoint.prune(self.checkpoints, keep)
        return path

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The run's last file: once it is there, an ``error.txt`` from a stop before ``--resume`` is stale."""
        _atomic_write(self.summary_file, json.dumps(summary, indent=2) + "\n")
        self.error_file.unlink(missing_ok=True)

    def write_error(self, message: str) -> None:
        _atomic_write(self.error_file, message.rstrip() + "\n")
