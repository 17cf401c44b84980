"""Meta-training, the paper's Algorithm 1, written once for one process or N Ray Train workers.

    for t = 0 … T-1:
        for each task T_i of the meta-batch (this worker's share: i ≡ rank mod world):
            (w*_i, α*_i) = Φ^k(w_meta, α_meta, D_train of T_i)         # task-learner, inner_loop.adapt
        mean over all i of the contributions                           # the one all-reduce per meta-step
        (w_meta, α_meta) ← meta-update(…)                              # meta_update.MetaLearner.step
        every eval.every steps: meta-validate (Algorithm 3 on meta-val classes)
    meta-test the final (w_meta, α_meta) on the meta-test classes, soft- and hard-pruned

Task T_i of meta-step t is drawn from (seed, t, i) alone, and every worker applies the same meta-update
to the same summed contributions, so the result does not depend on the number of workers.
Rank 0 alone writes the run directory (through a :class:`Recorder`).
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch

from .comm import LocalComm, my_share
from .config import Config
from .data import MetaSplits, check_tasks, load_splits
from .evaluate import eta, meta_test, meta_test_threshold
from .genotype import derive
from .inner_loop import Moments, NonFiniteLossError, Temperature, run_task
from .interrupt import Stopped
from .memory import keep_freed_memory
from .meta_update import MetaLearner
from .rundir import RunDir, RunDirError, writing
from .search_space import prune_meta_alphas
from .state import build_network, clone, flatten, init_state, place, unflatten

log = logging.getLogger(__name__)


class Recorder:
    """Writes metrics, checkpoints and results into the run directory (rank 0 only)."""

    def __init__(self, run: RunDir, rank: int = 0):
        self.run = run
        self.rank = rank

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
        self.report(rows, payload)

    def report(self, rows: list[dict[str, Any]], payload: dict[str, Any] | None) -> None:
        """What the run's orchestrator (Ray Train) is told after rank 0 wrote; nothing in one process."""

    def stop_requested(self) -> bool:
        """Whether a stop was asked for (rank 0 looks for the run directory's STOP file, see ``interrupt``)."""
        return self.rank == 0 and self.run.stop_file.exists()

    def finish(self, summary: dict[str, Any], state: dict, cfg: Config, rows: list[dict[str, Any]]) -> None:
        if self.rank != 0:
            return
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


def _threads(cfg: Config, world: int) -> int:
    return cfg.run.threads or max(1, (os.cpu_count() or 1) // world)


def _stats_vector(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _per_worker(comm, values: list[float], device) -> list[list[float]]:
    """``values`` of every worker, by rank (one all-reduce of a world × len(values) matrix)."""
    m = torch.zeros(comm.world, len(values), dtype=torch.float64, device=device)
    m[comm.rank] = _stats_vector(values)
    return comm.all_reduce_sum(m).cpu().tolist()


def _check_meta_update(state: dict, scale: dict, t: int) -> None:
    """Stop before a blown-up meta-update reaches a checkpoint, naming the meta learning rate: w_meta or α_meta
    non-finite, or past 1,000 times ``scale`` (the larger of its norm and of the meta-batch's mean contribution
    before the step: REPTILE at ε ≤ 1 lands between the two). Tasks that diverge make the mean itself large and
    are the task-learner's to report (``inner_loop`` warns, naming task.lr_w)."""
    for part, key in (("weights", "meta.lr_w"), ("alphas", "meta.lr_alpha")):
        if not state[part]:
            continue
        after = _norm(state[part])
        if not math.isfinite(after) or after > 1000 * scale[part]:
            raise NonFiniteLossError(f"the meta-update blew up {'w_meta' if part == 'weights' else 'α_meta'} at "
                                     f"meta-step {t} (norm {after:.3g}, against {scale[part]:.3g} before it); "
                                     f"lower {key}")


def _norm(tensors: dict) -> float:
    """The Euclidean norm of all ``tensors`` together (float64)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(v.double())) ** 2 for v in tensors.values()))


def meta_train(cfg: Config, recorder: Recorder, comm=None, device: str | torch.device = "cpu",
               resume: dict[str, Any] | None = None, splits: MetaSplits | None = None,
               final_test: bool = True) -> dict[str, Any]:
    """Run (or continue, from a checkpoint payload ``resume``) meta-training and the final meta-test.

    Returns the summary (also written to ``summary.json`` by rank 0). ``final_test=False`` skips the
    meta-test (Tune trials: no test data during a sweep); its summary entries are then ``None``.
    """
    comm = comm or LocalComm()
    torch.set_num_threads(_threads(cfg, comm.world))
    keep_freed_memory(cfg.run.keep_freed_memory_mb)  # each inner step reuses the last one's activations
    t_start = time.perf_counter()
    d, T = cfg.data, cfg.run.meta_steps
    splits = splits or load_splits(d)
    samplers = check_tasks(d, splits, cfg.run.seed)  # fails here, before any work, if a split is too small
    net = build_network(cfg, splits.channels)
    state = place(net, init_state(cfg, net), device)
    learner = MetaLearner(cfg.meta, T)
    # the task-learner's Adam moments, carried over tasks (task.adam_moments: kept; see inner_loop.Moments)
    moments = Moments.zeros(state) if cfg.task.adam_moments == "kept" else None
    start, rows, elapsed_before = 0, [], 0.0
    if resume is not None:
        state = place(net, resume["state"], device)
        learner.load_state_dict(resume["meta_optimizer"], device)
        if moments is not None and resume.get("task_optimizer") is not None:
            moments = Moments.from_state_dict(resume["task_optimizer"], device)
        start, rows = int(resume["step"]), list(resume["metrics"])
        elapsed_before = float(resume.get("elapsed", 0.0))
        torch.set_rng_state(resume["rng"])
        if recorder.rank == 0:
            recorder.run.write_metrics(rows)  # drop rows logged after the checkpoint: no duplicates
        log.info("resumed at meta-step %d of %d", start, T)
    my_tasks = my_share(cfg.meta.meta_batch, comm)
    n_flat = flatten(state).numel()
    n_moments = flatten(moments.v).numel() if moments is not None else 0
    t_loop, tasks_done = time.perf_counter(), 0
    seconds = dict.fromkeys(("tasks", "all_reduce", "meta_update", "recording"), 0.0)  # this worker's, over the loop

    for t in range(start, T):
        learn_arch = learner.learns_architecture(t)
        hold_tau = not learn_arch and cfg.task.warmup_tau == "hold"  # the official warm-up keeps τ at its start
        _, tau = Temperature.from_config(cfg.task).schedule_for(cfg.task.steps, None, hold_tau)
        total = torch.zeros(n_flat + n_moments, dtype=torch.float32, device=device)
        acc = loss = failed = 0.0
        t0 = time.perf_counter()
        for i in my_tasks:
            task = samplers["train"].sample(t, i).to(device)
            task_moments = moments.copy() if moments is not None else None
            try:
                adapted, stats = run_task(net, state, task, cfg.task, cfg.task.steps, learn_arch,
                                          hold_tau=hold_tau, moments=task_moments)
            except NonFiniteLossError as e:
                failed, failure = 1.0, str(e)
                break
            total[:n_flat] += flatten(learner.contribution(net, adapted, task.x_query, task.y_query, tau))
            if task_moments is not None:
                total[n_flat:] += flatten(task_moments.v)
            acc += stats["query_accuracy"]
            loss += stats["query_loss"]
        # the one meeting point of all workers: contributions and statistics summed in one all-reduce
        t1 = time.perf_counter()
        stop = 1.0 if recorder.stop_requested() else 0.0  # SIGINT/SIGTERM: every worker stops after this step
        summed = comm.all_reduce_sum(torch.cat([total.double(), _stats_vector([acc, loss, failed, stop]).to(device)]))
        stats_at = n_flat + n_moments
        stopping = bool(summed[stats_at + 3] > 0)
        if summed[stats_at + 2] > 0:  # (reading it also waits for an asynchronous, e.g. NCCL, all-reduce to finish)
            raise NonFiniteLossError(
                failure if failed else f"a worker's task-learner loss became non-finite at meta-step {t}")
        t2 = time.perf_counter()
        mean = unflatten((summed[:n_flat] / cfg.meta.meta_batch).float(), state)
        scale = {p: max(_norm(state[p]), _norm(mean[p]), 1.0) for p in ("weights", "alphas")}
        learner.step(state, mean, t)
        _check_meta_update(state, scale, t)
        if moments is not None:  # the next meta-batch starts from the mean of this one's final moments
            moments = moments.advanced(unflatten((summed[n_flat:stats_at] / cfg.meta.meta_batch).float(), moments.v),
                                       cfg.task.steps * cfg.meta.meta_batch, learn_arch)
        if cfg.meta.prune_every and cfg.meta.prune_threshold > 0 and (t + 1) % cfg.meta.prune_every == 0:
            prune_meta_alphas(state["alphas"], Temperature.from_config(cfg.task).final[0], cfg.meta.prune_threshold)
        t3 = time.perf_counter()
        seconds["tasks"] += t1 - t0
        seconds["all_reduce"] += t2 - t1
        seconds["meta_update"] += t3 - t2
        tasks_done += cfg.meta.meta_batch
        done = t + 1
        validate = cfg.eval.every > 0 and (done % cfg.eval.every == 0 or done == T)
        logged = done % cfg.run.log_every == 0 or done == T or validate
        if logged:
            wall = time.perf_counter() - t_loop
            row = {"step": done,
                   "train_accuracy": float(summed[stats_at]) / cfg.meta.meta_batch,
                   "train_loss": float(summed[stats_at + 1]) / cfg.meta.meta_batch,
                   "val_accuracy": math.nan, "val_ci95": math.nan,
                   "tasks_per_second": tasks_done / wall if wall > 0 else math.nan,
                   "wall_seconds": elapsed_before + time.perf_counter() - t_start}
            if validate:
                frozen = not learn_arch and cfg.eval.warmup_arch == "frozen"  # official: α frozen in warm-up
                val = meta_test(net, state, samplers["val"], cfg.eval.val_tasks, cfg, comm, device, hard=False,
                                moments=moments, learn_arch=not frozen, hold_tau=frozen and hold_tau)
                row["val_accuracy"], row["val_ci95"] = val["accuracy_soft"], val["ci95_soft"]
            rows.append(row)
            if comm.rank == 0:
                left = (T - done) * wall / max(done - start, 1)
                val_txt = f" | meta-val {row['val_accuracy']:.3f} ± {row['val_ci95']:.3f}" if validate else ""
                log.info("step %d/%d | meta-train acc %.3f loss %.3f%s | %.1f tasks/s | %s left",
                         done, T, row["train_accuracy"], row["train_loss"], val_txt, row["tasks_per_second"],
                         eta(left))
        payload = None
        if done % cfg.run.checkpoint_every == 0 or done == T or stopping:
            payload = {"step": done, "state": clone(state, "cpu"), "meta_optimizer": learner.state_dict(),
                       "task_optimizer": moments.state_dict() if moments is not None else None,
                       "metrics": list(rows), "rng": torch.get_rng_state(), "config": cfg.to_dict(),
                       "elapsed": elapsed_before + time.perf_counter() - t_start}
        if logged or payload is not None:
            t4 = time.perf_counter()
            recorder.record(rows, payload, cfg.run.keep_checkpoints, comm, device)
            seconds["recording"] += time.perf_counter() - t4
        if stopping:
            log.info("stopped after meta-step %d on request; its checkpoint is saved", done)
            raise Stopped(done)

    train_seconds = time.perf_counter() - t_loop
    per_worker = _per_worker(comm, list(seconds.values()), device)
    if final_test:
        log.info("meta-testing on %d tasks of the meta-test classes", cfg.eval.test_tasks)
        test = meta_test(net, state, samplers["test"], cfg.eval.test_tasks, cfg, comm, device, moments=moments,
                         threshold=meta_test_threshold(cfg))
    else:
        test = dict.fromkeys(("accuracy_soft", "ci95_soft", "accuracy_hard", "ci95_hard"), math.nan) | {"tasks": 0}
    best_val = max((r["val_accuracy"] for r in rows if not math.isnan(r["val_accuracy"])), default=math.nan)
    summary = {
        "meta_test_accuracy_soft": test["accuracy_soft"], "meta_test_ci95_soft": test["ci95_soft"],
        "meta_test_accuracy_hard": test["accuracy_hard"], "meta_test_ci95_hard": test["ci95_hard"],
        "meta_test_tasks": test["tasks"],
        "meta_val_accuracy_best": best_val,
        "meta_val_accuracy_last": rows[-1]["val_accuracy"] if rows else math.nan,
        "meta_steps": T,
        "wall_seconds": elapsed_before + time.perf_counter() - t_start,
        "tasks_per_second": tasks_done / train_seconds if train_seconds > 0 and tasks_done else math.nan,
        "workers": comm.world,
        "device": torch.device(device).type,  # cpu | cuda
        "tasks_per_worker": [len(range(r, cfg.meta.meta_batch, comm.world)) for r in range(comm.world)],
        # where each worker's meta-training time went: its tasks (inner loops and contributions), the
        # all-reduce (communication and waiting for the slowest worker), the meta-update (serial per step), and
        # recording (metrics.csv, checkpoints and, on Ray Train, reporting them)
        **{f"seconds_in_{k}": [round(w[i], 3) for w in per_worker] for i, k in enumerate(seconds)},
        "weights": sum(v.numel() for v in state["weights"].values()),
        "model": cfg.model.kind, "dataset": d.dataset,
        "n_way": d.n_way, "k_shot": d.k_shot,
    }
    summary = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    recorder.finish(summary, clone(state, "cpu"), cfg, rows)
    return summary
