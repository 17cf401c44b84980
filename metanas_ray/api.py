"""The Python API: what the command-line tools do, as functions that return objects a notebook can use.

    import metanas_ray as mr
    cfg = mr.load_config("tune_configs/smoke.yaml", {"run.meta_steps": 4})
    run = mr.train(cfg, "runs/api", in_process=True)       # or workers=2, gpus=8: on Ray Train
    run.summary["meta_test_accuracy_soft"], run.metrics.tail(), run.genotype.to_official()
    predictor = mr.predict(run, support="my_support/")      # adapted to your labelled images
    predictor(["a.png", "b.png"])                           # a DataFrame: file, predicted, probabilities

``mr.load_run(DIR)`` opens any run directory; ``mr.tune(SWEEP_YAML, DIR)`` runs a sweep and returns its summary.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import Config, load
from .genotype import Genotype


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """A run config: the YAML file ``path`` (None: the defaults) with dotted ``overrides``, e.g.
    ``{"task.lr_w": 0.05}``; a ConfigError names a bad key or value."""
    return load(path, overrides)


@dataclass
class Run:
    """A run directory, read: its ``config``, meta-learned ``state`` ({"weights", "alphas"} of tensors), ``genotype``
    (None for Conv4), ``metrics`` (a pandas DataFrame of metrics.csv) and ``summary`` (summary.json; None until the
    run has finished)."""

    path: Path
    config: Config
    state: dict = field(repr=False)
    genotype: Genotype | None
    metrics: Any = field(repr=False)
    summary: dict | None

    def __repr__(self) -> str:
        acc = self.summary and self.summary.get("meta_test_accuracy_soft")
        return f"Run({str(self.path)!r}, meta-test soft accuracy {acc})"


def load_run(path: str | Path) -> Run:
    """Read the run directory ``path`` (its newest readable checkpoint)."""
    import pandas as pd

    from .rundir import RunDir

    run = RunDir(path)
    cfg = run.open_existing()
    found = run.load_checkpoint()
    metrics = pd.read_csv(run.metrics_file) if run.metrics_file.is_file() else pd.DataFrame()
    genotype = Genotype.load(run.genotype_file) if run.genotype_file.is_file() else None
    summary = json.loads(run.summary_file.read_text()) if run.summary_file.is_file() else None
    return Run(run.path, cfg, found[0]["state"], genotype, metrics, summary)


def train(config: Config | str | Path, output: str | Path, *, workers: int | None = None, gpus: int | None = None,
          address: str | None = None, in_process: bool = False) -> Run:
    """Meta-train ``config`` (a Config or a YAML path) into the new run directory ``output`` and return it read.
    On Ray Train (a local Ray unless ``address``) with ``workers`` CPU or ``gpus`` GPU workers, or in this process."""
    from .rundir import RunDir
    from .recording import RunRecorder
    from .tracking import start_mlflow
    from .train_loop import meta_train

    cfg = config if isinstance(config, Config) else load(config)
    scale = {k: v for k, v in (("scale.num_workers", workers), ("scale.num_gpus", gpus), ("scale.address", address))
             if v is not None}
    cfg = cfg.override(scale) if scale else cfg
    run = RunDir(output).create(cfg)
    start_mlflow(run.path, cfg)
    if in_process:
        from .run import in_process_device
        meta_train(cfg, RunRecorder(run, cfg), device=in_process_device(cfg))
    else:
        from .ray_train import fit
        fit(cfg, run)
    return load_run(run.path)


class Predictor:
    """A run's model adapted to one labelled support set. Call it on image paths (a DataFrame: file, predicted,
    probability and one ``p_<class>`` column per class) or on a float tensor ``[B, C, H, W]`` in [0, 1] (the
    probabilities ``[B, n_classes]``). ``export(DIR)`` writes it as TorchScript with its metadata."""

    def __init__(self, model, class_names: list[str], preprocessing):
        self.model, self.class_names, self.preprocessing = model, class_names, preprocessing

    def __call__(self, images: torch.Tensor | Sequence[str | Path]):
        if isinstance(images, torch.Tensor):
            with torch.no_grad():
                return self.model(images)
        import pandas as pd
        files = [Path(f) for f in images]
        with torch.no_grad():
            probs = self.model(torch.stack([self.preprocessing.load(f) for f in files]))
        best = probs.argmax(-1).tolist()
        rows = [{"file": str(f), "predicted": self.class_names[b], "probability": float(p[b]),
                 **{f"p_{n}": float(v) for n, v in zip(self.class_names, p)}} for f, p, b in zip(files, probs, best)]
        return pd.DataFrame(rows)

    def export(self, directory: str | Path) -> list[Path]:
        from .predict import export
        return export(self.model, self.class_names, self.preprocessing, directory)


def predict(run: Run | str | Path, support: str | Path, hard: bool = False) -> Predictor:
    """Adapt ``run``'s meta-learned model (Algorithm 3) to ``support``, a folder of class folders, and return the
    :class:`Predictor`."""
    from .predict import adapt_to, load_run as load_for_prediction, read_support

    loaded = load_for_prediction(run.path if isinstance(run, Run) else run)
    names, files, labels = read_support(support, loaded.cfg.data.n_way)
    x = torch.stack([loaded.preprocessing.load(f) for f in files])
    model = adapt_to(loaded, x, torch.tensor(labels), hard, len(names))
    return Predictor(model, names, loaded.preprocessing)


def tune(sweep: str | Path | None, output: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run the Ray Tune sweep file ``sweep`` into ``output`` (``resume``: continue the sweep saved there; ``sweep``
    may then be None); returns its summary (``summary.json``: the best trial, its values, its meta-test accuracy)."""
    from .ray_train import init_ray
    from .sweep import prepare
    from .tune import run_sweep

    out = Path(output).expanduser().resolve()
    s = prepare(sweep, out, resume, {})
    started = init_ray(s.base, dashboard=s.on_train)
    try:
        return run_sweep(s, out, resume).summary
    finally:
        if started:
            import ray
            ray.shutdown()
