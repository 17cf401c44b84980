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
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .comm import LocalComm, my_share
from .config import Config
from .data import MetaSplits, check_tasks, load_splits
from .evaluate import eta, meta_test, meta_test_threshold
from .graphed import run_task as graphed_run_task
from .inner_loop import Moments, NonFiniteLossError, Temperature, run_task
from .interrupt import Stopped
from .memory import keep_freed_memory
from .meta_update import MetaLearner
from .search_space import prune_meta_alphas
from .state import build_network, clone, flatten, init_state, place, unflatten

log = logging.getLogger(__name__)


class Recorder(Protocol):
    """Where meta-training's results go; every rank calls, the implementation decides who writes.
    ``recording.RunRecorder`` writes a run directory (and TensorBoard / MLflow), ``ray_train.RayRecorder`` also
    reports checkpoints to Ray Train, ``tune.TuneRecorder`` reports meta-validations to Tune."""

    def data_split(self, class_split: dict[str, Any]) -> None:
        """The class names of each meta-split, once the data is loaded and checked."""

    def resumed(self, rows: list[dict[str, Any]]) -> None:
        """Meta-training continues from a checkpoint whose metrics rows are ``rows``."""

    def record(self, rows: list[dict[str, Any]], payload: dict[str, Any] | None, keep: int, comm,
               device: str | torch.device) -> None:
        """After a meta-step that logged a row (``rows[-1]``) and/or is due for a checkpoint (``payload``)."""

    def stop_requested(self) -> bool:
        """Whether a stop was asked for (read on rank 0, shared in the meta-step's all-reduce)."""

    def finish(self, summary: dict[str, Any], state: dict, cfg: Config, rows: list[dict[str, Any]]) -> None:
        """After the final meta-test: the summary and the meta-learned state (on the CPU)."""


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


@dataclass
class MetaState:
    """What meta-training carries from one meta-step to the next: θ_meta = (w_meta, α_meta) as plain tensors
    (``state``), the meta-learner, the task-learner's kept Adam moments, the metrics rows, and the clocks."""

    net: torch.nn.Module
    state: dict
    learner: MetaLearner
    moments: Moments | None  # task.adam_moments: kept (see inner_loop.Moments); else None
    samplers: dict
    my_tasks: list[int]  # this worker's share of each meta-batch: i ≡ rank (mod world)
    start: int = 0  # the first meta-step of this invocation (> 0 after a resume)
    rows: list[dict[str, Any]] = field(default_factory=list)
    elapsed_before: float = 0.0  # meta-training seconds of the invocations before a resume
    t_start: float = field(default_factory=time.perf_counter)
    t_loop: float = 0.0
    tasks_done: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("tasks", "all_reduce", "meta_update", "recording"), 0.0))  # this worker's, over the loop

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start


def meta_train(cfg: Config, recorder: Recorder, comm=None, device: str | torch.device = "cpu",
               resume: dict[str, Any] | None = None, splits: MetaSplits | None = None,
               final_test: bool = True) -> dict[str, Any]:
    """Algorithm 1: meta-train (w_meta, α_meta) for ``run.meta_steps`` meta-steps, then meta-test them.

    Continues from a checkpoint payload ``resume`` if given. Returns the summary (rank 0 writes it through
    ``recorder``). ``final_test=False`` skips the meta-test (Tune trials: no test data during a sweep); its
    summary entries are then ``None``.
    """
    comm = comm or LocalComm()
    torch.set_num_threads(_threads(cfg, comm.world))
    keep_freed_memory(cfg.run.keep_freed_memory_mb)  # each inner step reuses the last one's activations
    m = _initial_state(cfg, comm, device, resume, splits, recorder)
    T = cfg.run.meta_steps
    m.t_loop = time.perf_counter()
    for t in range(m.start, T):
        accuracy, loss, stopping = meta_step(m, t, cfg, comm, device, recorder.stop_requested())
        done = t + 1
        validate = cfg.eval.every > 0 and (done % cfg.eval.every == 0 or done == T)
        logged = done % cfg.run.log_every == 0 or done == T or validate
        if logged:
            m.rows.append(_metrics_row(m, done, accuracy, loss, validate, cfg, comm, device))
        due = done % cfg.run.checkpoint_every == 0 or done == T or stopping
        payload = _checkpoint_payload(m, done, cfg) if due else None
        if logged or payload is not None:
            t4 = time.perf_counter()
            recorder.record(m.rows, payload, cfg.run.keep_checkpoints, comm, device)
            m.seconds["recording"] += time.perf_counter() - t4
        if stopping:
            log.info("stopped after meta-step %d on request; its checkpoint is saved", done)
            raise Stopped(done)
    summary = _summary(m, cfg, comm, device, final_test)
    recorder.finish(summary, clone(m.state, "cpu"), cfg, m.rows)
    return summary


def _initial_state(cfg: Config, comm, device, resume: dict[str, Any] | None, splits: MetaSplits | None,
                   recorder: Recorder) -> MetaState:
    """θ_meta initialised (or restored from ``resume``), the meta-learner and the task samplers."""
    splits = splits or load_splits(cfg.data)
    samplers = check_tasks(cfg.data, splits, cfg.run.seed)  # fails here, before any work, if a split is too small
    recorder.data_split(splits.class_split())
    net = build_network(cfg, splits.channels)
    state = place(net, init_state(cfg, net), device)
    m = MetaState(net, state, MetaLearner(cfg.meta, cfg.run.meta_steps),
                  Moments.zeros(state) if cfg.task.adam_moments == "kept" else None,
                  samplers, my_share(cfg.meta.meta_batch, comm))
    if resume is not None:
        m.state = place(net, resume["state"], device)
        m.learner.load_state_dict(resume["meta_optimizer"], device)
        if m.moments is not None and resume.get("task_optimizer") is not None:
            m.moments = Moments.from_state_dict(resume["task_optimizer"], device)
        m.start, m.rows = int(resume["step"]), list(resume["metrics"])
        m.elapsed_before = float(resume.get("elapsed", 0.0))
        torch.set_rng_state(resume["rng"])
        recorder.resumed(m.rows)
        log.info("resumed at meta-step %d of %d", m.start, cfg.run.meta_steps)
    return m


def _phase(m: MetaState, t: int, cfg: Config) -> tuple[bool, bool, Any]:
    """Whether meta-step ``t`` adapts α (not in warm-up), holds τ (the official warm-up), and its query τ."""
    learn_arch = m.learner.learns_architecture(t)
    hold_tau = not learn_arch and cfg.task.warmup_tau == "hold"
    _, tau = Temperature.from_config(cfg.task).schedule_for(cfg.task.steps, None, hold_tau)
    return learn_arch, hold_tau, tau


def meta_step(m: MetaState, t: int, cfg: Config, comm, device, stop_requested: bool) -> tuple[float, float, bool]:
    """One pass of Algorithm 1's loop: Φ^k on this worker's tasks of meta-batch ``t``, every worker's
    contributions summed in one all-reduce, and the meta-update of θ_meta (in place). Returns the meta-batch's
    mean query accuracy and loss, and whether a stop was requested (on any rank). With ``task.batched`` the
    worker's tasks adapt together, vmapped over tasks (``batched.py``); the rest stays per task. With
    ``task.cuda_graph`` each inner step is a CUDA-graph replay (``graphed.py``)."""
    learn_arch, hold_tau, tau = _phase(m, t, cfg)
    n_flat = flatten(m.state).numel()
    n_moments = flatten(m.moments.v).numel() if m.moments is not None else 0
    total = torch.zeros(n_flat + n_moments, dtype=torch.float32, device=device)
    acc = loss = failed = 0.0
    t0 = time.perf_counter()
    batch = _batched_tasks(m, t, cfg, device, learn_arch, hold_tau) if cfg.task.batched and m.my_tasks else None
    for n, i in enumerate(m.my_tasks):
        if isinstance(batch, NonFiniteLossError):  # (the first failing task of the batch, as the loop would stop)
            failed, failure = 1.0, str(batch)
            break
        if batch is not None:  # task.batched: adapted above, all of this worker's tasks in one vmapped pass
            task, adapted, stats, task_moments = batch[n]
        else:
            task = m.samplers["train"].sample(t, i).to(device)
            task_moments = m.moments.copy() if m.moments is not None else None
            try:  # (task.cuda_graph: the same steps, each a CUDA-graph replay on a GPU; graphed.py)
                adapted, stats = (graphed_run_task if cfg.task.cuda_graph else run_task)(
                    m.net, m.state, task, cfg.task, cfg.task.steps, learn_arch, hold_tau=hold_tau,
                    moments=task_moments)
            except NonFiniteLossError as e:
                failed, failure = 1.0, str(e)
                break
        total[:n_flat] += flatten(m.learner.contribution(m.net, adapted, task.x_query, task.y_query, tau))
        if task_moments is not None:
            total[n_flat:] += flatten(task_moments.v)
        acc += stats["query_accuracy"]
        loss += stats["query_loss"]
    # the one meeting point of all workers: contributions and statistics summed in one all-reduce
    t1 = time.perf_counter()
    stop = 1.0 if stop_requested else 0.0  # SIGINT/SIGTERM: every worker stops after this step
    summed = comm.all_reduce_sum(torch.cat([total.double(), _stats_vector([acc, loss, failed, stop]).to(device)]))
    stats_at = n_flat + n_moments
    stopping = bool(summed[stats_at + 3] > 0)
    if summed[stats_at + 2] > 0:  # (reading it also waits for an asynchronous, e.g. NCCL, all-reduce to finish)
        raise NonFiniteLossError(
            failure if failed else f"a worker's task-learner loss became non-finite at meta-step {t}")
    t2 = time.perf_counter()
    mean = unflatten((summed[:n_flat] / cfg.meta.meta_batch).float(), m.state)
    scale = {p: max(_norm(m.state[p]), _norm(mean[p]), 1.0) for p in ("weights", "alphas")}
    m.learner.step(m.state, mean, t)
    _check_meta_update(m.state, scale, t)
    if m.moments is not None:  # the next meta-batch starts from the mean of this one's final moments
        m.moments = m.moments.advanced(unflatten((summed[n_flat:stats_at] / cfg.meta.meta_batch).float(),
                                                 m.moments.v), cfg.task.steps * cfg.meta.meta_batch, learn_arch)
    if cfg.meta.prune_every and cfg.meta.prune_threshold > 0 and (t + 1) % cfg.meta.prune_every == 0:
        prune_meta_alphas(m.state["alphas"], Temperature.from_config(cfg.task).final[0], cfg.meta.prune_threshold)
    t3 = time.perf_counter()
    m.seconds["tasks"] += t1 - t0
    m.seconds["all_reduce"] += t2 - t1
    m.seconds["meta_update"] += t3 - t2
    m.tasks_done += cfg.meta.meta_batch
    return (float(summed[stats_at]) / cfg.meta.meta_batch, float(summed[stats_at + 1]) / cfg.meta.meta_batch,
            stopping)


def _batched_tasks(m: MetaState, t: int, cfg: Config, device, learn_arch: bool,
                   hold_tau: bool) -> list | NonFiniteLossError:
    """``task.batched``: this worker's tasks of meta-batch ``t`` adapted together (:func:`batched.run_tasks`), as
    (task, adapted, stats, final moments: kept ones only) in task order, or the first task's non-finite-loss
    error."""
    from .batched import run_tasks
    tasks = [m.samplers["train"].sample(t, i).to(device) for i in m.my_tasks]
    try:
        adapted, stats, moments = run_tasks(m.net, m.state, tasks, cfg.task, cfg.task.steps, learn_arch,
                                            hold_tau=hold_tau, moments=m.moments,
                                            capture=None if cfg.task.cuda_graph else False)
    except NonFiniteLossError as e:
        return e
    return list(zip(tasks, adapted, stats, moments if m.moments is not None else [None] * len(tasks)))


def _metrics_row(m: MetaState, done: int, accuracy: float, loss: float, validate: bool, cfg: Config, comm,
                 device) -> dict[str, Any]:
    """The metrics.csv row after meta-step ``done`` (meta-validating first when due); rank 0 prints it."""
    wall = time.perf_counter() - m.t_loop
    row = {"step": done, "train_accuracy": accuracy, "train_loss": loss, "val_accuracy": math.nan,
           "val_ci95": math.nan, "tasks_per_second": m.tasks_done / wall if wall > 0 else math.nan,
           "wall_seconds": m.elapsed()}
    if validate:
        learn_arch, hold_tau, _ = _phase(m, done - 1, cfg)
        frozen = not learn_arch and cfg.eval.warmup_arch == "frozen"  # official: α frozen in warm-up
        val = meta_test(m.net, m.state, m.samplers["val"], cfg.eval.val_tasks, cfg, comm, device, hard=False,
                        moments=m.moments, learn_arch=not frozen, hold_tau=frozen and hold_tau)
        row["val_accuracy"], row["val_ci95"] = val["accuracy_soft"], val["ci95_soft"]
    if comm.rank == 0:
        left = (cfg.run.meta_steps - done) * wall / max(done - m.start, 1)
        val_txt = f" | meta-val {row['val_accuracy']:.3f} ± {row['val_ci95']:.3f}" if validate else ""
        log.info("step %d/%d | meta-train acc %.3f loss %.3f%s | %.1f tasks/s | %s left", done, cfg.run.meta_steps,
                 row["train_accuracy"], row["train_loss"], val_txt, row["tasks_per_second"], eta(left))
    return row


def _checkpoint_payload(m: MetaState, done: int, cfg: Config) -> dict[str, Any]:
    """Everything that :func:`meta_train` needs to continue after meta-step ``done`` (see ``checkpoint``)."""
    return {"step": done, "state": clone(m.state, "cpu"), "meta_optimizer": m.learner.state_dict(),
            "task_optimizer": m.moments.state_dict() if m.moments is not None else None,
            "metrics": list(m.rows), "rng": torch.get_rng_state(), "config": cfg.to_dict(),
            "elapsed": m.elapsed()}


def _summary(m: MetaState, cfg: Config, comm, device, final_test: bool) -> dict[str, Any]:
    """The final meta-test of θ_meta (soft- and hard-pruned) and the run's figures: summary.json."""
    train_seconds = time.perf_counter() - m.t_loop
    per_worker = _per_worker(comm, list(m.seconds.values()), device)
    if final_test:
        log.info("meta-testing on %d tasks of the meta-test classes", cfg.eval.test_tasks)
        test = meta_test(m.net, m.state, m.samplers["test"], cfg.eval.test_tasks, cfg, comm, device,
                         moments=m.moments, threshold=meta_test_threshold(cfg))
    else:
        test = dict.fromkeys(("accuracy_soft", "ci95_soft", "accuracy_hard", "ci95_hard"), math.nan) | {"tasks": 0}
    rows, d = m.rows, cfg.data
    best_val = max((r["val_accuracy"] for r in rows if not math.isnan(r["val_accuracy"])), default=math.nan)
    summary = {
        "meta_test_accuracy_soft": test["accuracy_soft"], "meta_test_ci95_soft": test["ci95_soft"],
        "meta_test_accuracy_hard": test["accuracy_hard"], "meta_test_ci95_hard": test["ci95_hard"],
        "meta_test_tasks": test["tasks"],
        "meta_val_accuracy_best": best_val,
        "meta_val_accuracy_last": rows[-1]["val_accuracy"] if rows else math.nan,
        "meta_steps": cfg.run.meta_steps,
        "wall_seconds": m.elapsed(),
        "tasks_per_second": m.tasks_done / train_seconds if train_seconds > 0 and m.tasks_done else math.nan,
        "workers": comm.world,
        "device": torch.device(device).type,  # cpu | cuda
        "tasks_per_worker": [len(range(r, cfg.meta.meta_batch, comm.world)) for r in range(comm.world)],
        # where each worker's meta-training time went: its tasks (inner loops and contributions), the
        # all-reduce (communication and waiting for the slowest worker), the meta-update (serial per step), and
        # recording (metrics.csv, checkpoints and, on Ray Train, reporting them)
        **{f"seconds_in_{k}": [round(w[i], 3) for w in per_worker] for i, k in enumerate(m.seconds)},
        "weights": sum(v.numel() for v in m.state["weights"].values()),
        "model": cfg.model.kind, "dataset": d.dataset,
        "n_way": d.n_way, "k_shot": d.k_shot,
    }
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
