"""What a run leaves behind: :class:`RunRecorder` implements :class:`metanas_ray.train_loop.Recorder` on a run
directory (``metanas_ray.rundir``) and its trackers (``metanas_ray.tracking``).

During meta-training, rank 0 rewrites metrics.csv, saves the due checkpoints and logs the new rows to
TensorBoard / MLflow; at the end it writes genotype.json, plots/ (learning curves, α/β, the cells) and, last,
summary.json. Ray Train's driver calls :meth:`RunRecorder.finish` itself once the workers are done
(``ray_train.RayRecorder``); Tune's trials report instead (``tune.TuneRecorder``).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from .config import Config
from .rundir import RunDir, RunDirError, writing
from .tracking import Tracker

log = logging.getLogger(__name__)


class RunRecorder:
    """Writes metrics, checkpoints and results into ``run`` (rank 0 only; every rank calls)."""

    def __init__(self, run: RunDir, cfg: Config, rank: int = 0):
        self.run, self.rank = run, rank
        self.tracker = Tracker(run.path, cfg) if rank == 0 else None

    def data_split(self, class_split: dict[str, Any]) -> None:
        """split.json. Only a warning when it cannot be written: a lone failing rank 0 would leave the other
        workers waiting; the next :meth:`record` reports an unwritable directory on every rank."""
        if self.rank == 0:
            try:
                self.run.write_split(class_split)
            except RunDirError as e:
                log.warning("%s", e)

    def resumed(self, rows: list[dict[str, Any]]) -> None:
        """Continuing from a checkpoint: drop the rows logged after it, so metrics.csv has no duplicates."""
        if self.rank == 0:
            self.run.write_metrics(rows)
            self.tracker.resumed_at(int(rows[-1]["step"]) if rows else 0)

    def record(self, rows: list[dict[str, Any]], payload: dict[str, Any] | None, keep: int, comm=None,
               device: str | torch.device = "cpu") -> None:
        """Called on every worker after a meta-step that logged a row and/or is due for a checkpoint. Rank 0
        writes; when that fails, every worker raises the same RunDirError (one small all-reduce), so none
        waits for the others at the next meta-step."""
        error = ""
        if self.rank == 0:
            try:
                self.run.write_metrics(rows)
                if payload is not None:
                    self.run.save_checkpoint(payload, keep)
            except RunDirError as e:
                error = str(e)
        if comm is not None and comm.world > 1:
            failed = comm.all_reduce_sum(torch.tensor([1.0 if error else 0.0], device=device))
            error = error or ("rank 0 could not write the run directory" if failed.item() > 0 else "")
        if error:
            raise RunDirError(error)
        if self.tracker is not None:
            self.tracker.rows(rows)
        self.report(rows, payload)

    def report(self, rows: list[dict[str, Any]], payload: dict[str, Any] | None) -> None:
        """What the run's orchestrator (Ray Train) is told after rank 0 wrote; nothing in one process."""

    def stop_requested(self) -> bool:
        """Whether a stop was asked for (rank 0 looks for the run directory's STOP file, see ``interrupt``)."""
        return self.rank == 0 and self.run.stop_file.exists()

    def finish(self, summary: dict[str, Any], state: dict, cfg: Config, rows: list[dict[str, Any]]) -> None:
        """genotype.json, plots/ and summary.json (last), then the final figures to the trackers."""
        if self.rank != 0:
            return
        from .genotype import derive
        from .inner_loop import Temperature

        genotype = derive(state["alphas"], cfg.model.ops, cfg.model.nodes) if state["alphas"] else None
        if cfg.model.kind == "genotype":  # the found network: the genotype it was built from
            from .genotype_net import load_genotype
            genotype = load_genotype(cfg.model.genotype)
        if genotype is not None:
            with writing(self.run.genotype_file):
                genotype.save(self.run.genotype_file)
            with writing(self.run.plots):
                self.run.plots.mkdir(exist_ok=True)
                genotype.write_dot(self.run.plots)
            log.info("found cells, in the official code's notation: %s", genotype.to_official())
        try:
            from .plotting import plot_learning_curves, write_run_plots
            if not state["alphas"]:  # Conv4 and the found network have no α to draw
                self.run.plots.mkdir(exist_ok=True)
                plot_learning_curves(rows, self.run.plots / "learning_curves.png")
            else:
                write_run_plots(self.run.plots, rows, state["alphas"], genotype, cfg.model.ops, cfg.model.nodes,
                                Temperature.from_config(cfg.task).final)
        except Exception as e:  # plots are a convenience: never lose the results over one
            log.warning("could not draw the plots: %s", e)
        self.run.write_summary(summary)
        if self.tracker is not None:  # the rows went to the trackers as they were recorded
            text = (f"{genotype.to_official()}\n\n{self.run.genotype_file.read_text()}" if genotype is not None
                    else "")
            self.tracker.finish(summary, text, self.run.plots, int(rows[-1]["step"]) if rows else 0)
