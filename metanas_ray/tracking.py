"""Experiment tracking: TensorBoard events in the run directory's ``tb/`` and, with ``--mlflow URI``, an MLflow run.

    python -m metanas_ray.run --config tune_configs/quick.yaml --mlflow file:runs/mlflow
    tensorboard --logdir runs/            # runs (tb/) and sweeps (Tune's own events) side by side
    mlflow ui --backend-store-uri file:runs/mlflow

Both get the same things: every metrics.csv row as scalars at its meta-step, the final meta-test figures, the
genotype as text and the pictures of ``plots/`` (TensorBoard: images; MLflow: the whole run directory as
artifacts, Ray's internal ``ray/`` folder left out). MLflow also gets the resolved config as params.

The driver opens the MLflow run before meta-training (:func:`start_mlflow`: a bad URI fails there, before any
work) and records its id in ``mlflow.json``; rank 0, wherever it runs, logs the rows to that id, and ``--resume``
continues the same MLflow run. A tracker that fails during a run warns once and stops tracking: the run and its
directory go on. TensorBoard comes from ``tensorboardX`` (a dependency of Ray Tune); MLflow is the optional
extra ``metanas-ray[mlflow]``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, flat_keys

log = logging.getLogger(__name__)

MLFLOW_FILE = "mlflow.json"  # in the run directory: {"tracking_uri", "experiment_id", "run_id"}
EXPERIMENT = "metanas-ray"
SWEEP_EXPERIMENT = "metanas-ray-sweeps"  # one MLflow run per trial
FINAL = ("meta_test_accuracy_soft", "meta_test_ci95_soft", "meta_test_accuracy_hard", "meta_test_ci95_hard",
         "meta_val_accuracy_best", "tasks_per_second", "wall_seconds")


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row or summary (a NaN is a meta-step without meta-validation)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _mlflow_client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("run.mlflow (--mlflow) needs MLflow: pip install 'metanas-ray[mlflow]'") from None
    if uri.startswith("file:") or "://" not in uri:  # asked for by name: MLflow 3 refuses a file store unless told
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(uri)


def start_mlflow(run_dir: Path, cfg: Config) -> str:
    """Open (or, for ``--resume``, reopen) the MLflow run of ``run_dir``; returns its id ("" without
    ``run.mlflow``). Logs the config as params. Any failure is a ConfigError naming ``--mlflow``."""
    if not cfg.run.mlflow:
        return ""
    record = run_dir / MLFLOW_FILE
    try:
        client = _mlflow_client(cfg.run.mlflow)
        if record.is_file():
            saved = json.loads(record.read_text())
            if saved.get("tracking_uri") == cfg.run.mlflow:
                client.update_run(saved["run_id"], status="RUNNING")
                return saved["run_id"]
        found = client.get_experiment_by_name(EXPERIMENT)
        experiment = found.experiment_id if found else client.create_experiment(EXPERIMENT)
        run_id = client.create_run(experiment, run_name=run_dir.name).info.run_id
        params = {k: str(v)[:500] for k, v in flat_keys(cfg).items()}
        from mlflow.entities import Param
        client.log_batch(run_id, params=[Param(k, v) for k, v in sorted(params.items())])
    except ConfigError:
        raise
    except Exception as e:  # an unreachable server, a bad scheme, a read-only store
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"run.mlflow (--mlflow {cfg.run.mlflow}): cannot open an MLflow run: {first}") from None
    record.write_text(json.dumps({"tracking_uri": cfg.run.mlflow, "experiment_id": experiment,
                                  "run_id": run_id}, indent=2) + "\n")
    return run_id


def mlflow_callback(uri: str):
    """Tune's MLflowLoggerCallback for a sweep (each trial one MLflow run), once the store answers; a
    ConfigError naming ``--mlflow`` otherwise, before any trial."""
    try:
        client = _mlflow_client(uri)
        if client.get_experiment_by_name(SWEEP_EXPERIMENT) is None:
            client.create_experiment(SWEEP_EXPERIMENT)
    except ConfigError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--mlflow {uri}: cannot open the MLflow store: {first}") from None
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=SWEEP_EXPERIMENT)


def end_mlflow(run_dir: Path, status: str) -> None:
    """Mark the MLflow run of ``run_dir`` (if any) FAILED or KILLED after an error or a stop; never raises."""
    record = run_dir / MLFLOW_FILE
    if not record.is_file():
        return
    try:
        saved = json.loads(record.read_text())
        _mlflow_client(saved["tracking_uri"]).set_terminated(saved["run_id"], status=status)
    except Exception as e:
        log.warning("could not mark the MLflow run %s: %s", status, e)


class Tracker:
    """TensorBoard and MLflow for one run, on rank 0 (or the driver at the end). Rows already logged (before
    ``resumed_at``) are not logged again; TensorBoard purges the events an interrupted session wrote after it."""

    def __init__(self, run_dir: Path, cfg: Config):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.last_step = 0
        self._purge_from: int | None = None  # after a resume: TensorBoard drops what a crashed session logged here
        self._tb = None
        self._mlflow = None  # (client, run_id)
        self._failed: set[str] = set()

    def resumed_at(self, step: int) -> None:
        self.last_step = step
        self._purge_from = step + 1 if step else None

    # -- the two backends, opened on first use; a failure warns once and turns that backend off ----------------
    def _writer(self):
        if self._tb is None and self.cfg.run.tensorboard and "tensorboard" not in self._failed:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self._purge_from,
                                         flush_secs=30)
            except Exception as e:
                self._fail("tensorboard", e)
        return self._tb

    def _client(self):
        if self._mlflow is None and self.cfg.run.mlflow and "mlflow" not in self._failed:
            try:
                saved = json.loads((self.run_dir / MLFLOW_FILE).read_text())
                self._mlflow = (_mlflow_client(saved["tracking_uri"]), saved["run_id"])
            except Exception as e:
                self._fail("mlflow", e)
        return self._mlflow

    def _fail(self, backend: str, e: Exception) -> None:
        self._failed.add(backend)
        key = "run.tensorboard" if backend == "tensorboard" else "run.mlflow"
        log.warning("%s tracking stopped (the run goes on; %s turns it off): %s", backend, key, e)
        if backend == "tensorboard":
            self._tb = None
        else:
            self._mlflow = None

    # -- what is logged ------------------------------------------------------------------------------------------
    def rows(self, rows: list[dict[str, Any]]) -> None:
        """The rows logged since the last call, each at its meta-step."""
        new = [r for r in rows if int(r["step"]) > self.last_step]
        if not new:
            return
        self.last_step = int(new[-1]["step"])
        if (tb := self._writer()) is not None:
            try:
                for r in new:
                    for k, v in _numbers(r).items():
                        tb.add_scalar(f"meta_train/{k}" if not k.startswith("val") else f"meta_val/{k}", v,
                                      int(r["step"]))
                tb.flush()
            except Exception as e:
                self._fail("tensorboard", e)
        self._log_mlflow([(k, v, int(r["step"])) for r in new for k, v in _numbers(r).items()])

    def _log_mlflow(self, metrics: list[tuple[str, float, int]]) -> None:
        """(name, value, meta-step) triples, in one request."""
        if (ml := self._client()) is not None:
            try:
                from mlflow.entities import Metric
                now = int(time.time() * 1000)
                ml[0].log_batch(ml[1], metrics=[Metric(k, v, now, step) for k, v, step in metrics])
            except Exception as e:
                self._fail("mlflow", e)

    def finish(self, summary: dict[str, Any], genotype_text: str, plots: Path, step: int) -> None:
        """The final meta-test figures, the genotype and the pictures; MLflow also the run directory."""
        final = {k: v for k, v in _numbers(summary).items() if k in FINAL}
        if (tb := self._writer()) is not None:
            try:
                for k, v in final.items():
                    tb.add_scalar(f"meta_test/{k}", v, step)
                if genotype_text:
                    tb.add_text("genotype", genotype_text, step)
                for png in sorted(plots.glob("*.png")):
                    tb.add_image(f"plots/{png.stem}", _image(png), step, dataformats="HWC")
                tb.flush()
            except Exception as e:
                self._fail("tensorboard", e)
        self._log_mlflow([(f"meta_test/{k}", v, step) for k, v in final.items()])
        if (ml := self._client()) is not None:
            try:
                client, run_id = ml
                if genotype_text:
                    client.set_tag(run_id, "genotype", genotype_text[:5000])
                for p in sorted(self.run_dir.iterdir()):
                    if p.name == "ray" or p.name.startswith("."):
                        continue
                    if p.is_dir():
                        client.log_artifacts(run_id, str(p), artifact_path=p.name)
                    else:
                        client.log_artifact(run_id, str(p))
                client.set_terminated(run_id, status="FINISHED")
            except Exception as e:
                self._fail("mlflow", e)
        self.close()

    def close(self) -> None:
        if self._tb is not None:
            try:
                self._tb.close()
            except Exception:
                pass
            self._tb = None


def _image(png: Path):
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        return np.asarray(im.convert("RGB"))
