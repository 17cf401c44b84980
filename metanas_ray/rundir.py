"""The run directory (``--output``), the contract with users, scripts and the Ray/Tune layers:

    config.yaml      the resolved config          metrics.csv   one row per logged meta-step
    checkpoints/     step_XXXXXXX.pt (last N)     genotype.json the derived cells
    plots/           learning curves, α/β, cells  summary.json  meta-test results (written last)
    tb/              TensorBoard events            mlflow.json   the MLflow run's id (with --mlflow)
    split.json       the class names of each meta-split (meta-train / meta-val / meta-test)
    error.txt        only while a run is stopped on an error (nothing else is removed)
    STOP             only while a stop is requested (SIGINT/SIGTERM, see ``metanas_ray.interrupt``)

A directory that already holds a run is never overwritten: continuing it needs ``--resume``. Every write
that fails raises :class:`RunDirError` naming the path; what was written before stays.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import checkpoint
from . import config as config_mod


class RunDirError(RuntimeError):
    """A run directory that cannot be created, resumed or written."""


_MARKERS = ("config.yaml", "metrics.csv", "checkpoints", "summary.json")


@contextmanager
def writing(path: Path):
    """Turns a failed write of ``path`` (permissions, a full disk, torch's own writer) into one RunDirError."""
    try:
        yield
    except RunDirError:
        raise
    except (OSError, RuntimeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        raise RunDirError(f"cannot write {path}: {reason}") from None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with writing(path):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


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
        self.stop_file = self.path / "STOP"
        self._created: list[Path] = []  # what create() made, for discard()

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
        self._created = [p for p in (self.path, self.checkpoints, self.plots) if not p.exists()]
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            self.plots.mkdir(exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create run directory {self.path}: {e.strerror or e}") from None
        self._created.append(self.config_file)
        self.save_config(cfg)
        return self

    def save_config(self, cfg: config_mod.Config) -> None:
        _atomic_write(self.config_file, config_mod.dumps(cfg))

    def computed_nothing(self) -> bool:
        """No checkpoint and no metrics yet: nothing that a rerun would not redo."""
        return self.latest_checkpoint() is None and not self.metrics_file.exists()

    def discard(self) -> bool:
        """Remove what :meth:`create` made (and Ray's records), so that the same ``--output`` can start the run
        again; only while nothing was computed. Returns whether it did."""
        if not self._created or not self.computed_nothing():
            return False
        for extra in (self.path / "ray", self.path / "tb", self.path / "mlflow.json", self.split_file,
                      self.error_file, self.stop_file):
            if extra.is_dir():
                shutil.rmtree(extra, ignore_errors=True)
            else:
                extra.unlink(missing_ok=True)
        for p in reversed(self._created):
            try:
                p.rmdir() if p.is_dir() else p.unlink(missing_ok=True)
            except OSError:  # something the user put there: leave it
                pass
        self._created = []
        return True

    def open_existing(self) -> config_mod.Config:
        """The saved config of a run to resume (checks there is something to resume)."""
        if not self.config_file.is_file():
            raise RunDirError(f"--resume {self.path}: no run there (config.yaml missing)")
        return config_mod.load(self.config_file)

    def latest_checkpoint(self) -> Path | None:
        return checkpoint.latest(self.checkpoints)

    def load_checkpoint(self, path: str | Path | None = None, purpose: str = "yet") -> tuple[dict[str, Any], Path]:
        """The payload and path of checkpoint ``path``, or of the run's newest readable one; a RunDirError says
        the run has none ``purpose`` (e.g. "to evaluate")."""
        if path:
            return checkpoint.load(path), Path(path)
        found = checkpoint.load_latest(self.checkpoints)
        if not found:
            raise RunDirError(f"{self.path} has no checkpoint {purpose}")
        return found

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
        path = self.checkpoints / checkpoint.checkpoint_name(payload["step"])
        with writing(path):
            checkpoint.save(path, payload)
            checkpoint.prune(self.checkpoints, keep)
        return path

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The run's last file: once it is there, an ``error.txt`` from a stop before ``--resume`` is stale."""
        _atomic_write(self.summary_file, json.dumps(summary, indent=2) + "\n")
        self.error_file.unlink(missing_ok=True)

    def write_error(self, message: str) -> None:
        _atomic_write(self.error_file, message.rstrip() + "\n")

    # -- the classes of each meta-split ---------------------------------------------------------------------------
    @property
    def split_file(self) -> Path:
        return self.path / "split.json"

    def write_split(self, class_split: dict[str, Any]) -> None:
        """split.json: which classes each meta-split holds (``MetaSplits.class_split()``), so that a run's
        meta-test classes can be checked against its meta-training ones. Rewritten at every start (the same
        content for the same data); :meth:`discard` removes it with what :meth:`create` made."""
        if self._created and not self.split_file.exists():
            self._created.append(self.split_file)
        _atomic_write(self.split_file, json.dumps(class_split, indent=1) + "\n")
