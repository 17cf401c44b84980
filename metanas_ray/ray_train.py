"""Meta-training on Ray Train: every worker runs the DARTS inner loops of its share of each meta-batch.

    python -m metanas_ray.run --config tune_configs/quick.yaml --num-workers 2   # 2 CPU processes
    python -m metanas_ray.run --num-gpus 8                                      # 8 GPU actors, one GPU each
    ray job submit --working-dir . -- python -m metanas_ray.run --num-gpus 8    # on a cluster (RAY_ADDRESS)

One ``TorchTrainer`` runs :func:`metanas_ray.train_loop.meta_train` inside its workers for the whole run;
the workers meet once per meta-step in one ``torch.distributed`` all-reduce of the process group that Ray
Train set up (gloo on CPU, NCCL on GPU). Checkpoints go through ``ray.train.report`` (keep-last-N), and
``FailureConfig`` restarts the workers from the last one when a worker dies; since each checkpoint carries
the metrics rows logged so far, the run's metrics have no gap and no duplicate after a restart.

Rank 0 writes the run directory as it goes; on a multi-node cluster ``--output`` and the data root must be
on storage that every node sees (as Ray Train's own storage path must be).
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import Config, ConfigError, from_dict
from .interrupt import Stopped, reclaim_signals
from .rundir import RunDir, RunDirError
from .recording import RunRecorder
from .train_loop import meta_train

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
"""The payload's file in a checkpoint reported to Ray Train or Tune (:func:`report_with_checkpoint`)."""
_FAILED = "failed"  # a failure that a restart cannot fix is returned as {_FAILED: (kind, message)}, not raised
_STOPPED = "stopped"  # a stop on request (SIGINT/SIGTERM) after meta-step N: {_STOPPED: N}


class ScaleError(RuntimeError):
    """A Ray cluster that cannot give the run what it asks for."""


# ------------------------------------------------------------------------------------------------ workers
class RayRecorder(RunRecorder):
    """Rank 0 writes the run directory; every rank reports to Ray Train at the same meta-steps."""

    def report(self, rows: list[dict[str, Any]], payload: dict[str, Any] | None) -> None:
        """Checkpoints only: every ``ray.train.report`` is a barrier of all workers through a Ray actor (about
        1.5 s a call here), and the metrics rows are in metrics.csv and in every checkpoint already."""
        if payload is None:
            return
        metrics = {k: v for k, v in rows[-1].items()} if rows else {}
        metrics["step"] = payload["step"]
        report_with_checkpoint(metrics, payload, self.rank)

    def finish(self, summary, state, cfg, rows) -> None:
        if self.tracker is not None:  # the driver writes genotype, plots, summary and the final figures
            self.tracker.close()


def absolute_data_root(cfg: Config) -> Config:
    """``cfg`` with its data root made absolute: Ray Train workers and Tune trials run in other working
    directories (synthetic data has no root)."""
    if cfg.data.dataset == "synthetic":
        return cfg
    return cfg.override({"data.root": str(Path(cfg.data.root).expanduser().resolve())})


def worker_env(threads: int) -> dict[str, str]:
    """Environment of every Ray Train worker: ``threads`` OpenMP threads, no usage stats, Train's print patch off."""
    return {"OMP_NUM_THREADS": str(threads), "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def quiet_worker_logs(rank: int) -> None:
    """One progress line per logged meta-step, from rank 0 only. Ray Train itself logs every ``ray.train.report``
    at INFO from every rank, under a logger named by its source file; our progress line already says it."""
    if rank != 0:
        logging.getLogger("metanas_ray").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except Exception:  # another Ray version: its lines stay
        pass


def report_with_checkpoint(metrics: dict[str, Any], payload: dict[str, Any] | None, rank: int, *,
                           tune_session: bool = False) -> None:
    """Report ``metrics`` with ``payload`` as the checkpoint, which rank 0 saves (None: no checkpoint): to Ray
    Train from a worker (every rank calls: each report is a barrier of all workers), or, ``tune_session``, to
    Tune from a trial's own process. :func:`load_reported` reads the payload back."""
    with tempfile.TemporaryDirectory() as tmp:
        saved = rank == 0 and payload is not None
        if saved:
            checkpoint.save(Path(tmp) / CHECKPOINT_FILE, payload)
        if tune_session:
            from ray import tune
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp) if saved else None)
        else:
            import ray.train
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if saved else None)


def load_reported(ckpt) -> dict[str, Any] | None:
    """The payload of a checkpoint (a ``ray.train`` or ``ray.tune`` Checkpoint) that
    :func:`report_with_checkpoint` reported; None for None."""
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return checkpoint.load(Path(d) / CHECKPOINT_FILE)


def worker_setup(config: dict[str, Any]) -> tuple[Config, int, Any, Any, dict[str, Any] | None]:
    """The start of a Ray Train worker, of a run or of a Tune trial: (its config, from ``config["cfg"]``; its
    world rank, progress logged from rank 0 only; the ``torch.distributed`` communicator; its device, its GPU
    when ``scale.num_gpus``; the payload of the checkpoint that Ray Train restarted it from, None on a first
    start)."""
    import ray.train
    import ray.train.torch
    import torch

    from .comm import TorchDistComm

    cfg = from_dict(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    quiet_worker_logs(rank)
    device = ray.train.torch.get_device() if cfg.scale.num_gpus else torch.device("cpu")
    return cfg, rank, TorchDistComm(), device, load_reported(ray.train.get_checkpoint())


def train_func(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train worker function: load data once, agree that every worker could, then meta-train."""
    import torch

    from .data import DataError, check_tasks, load_splits
    from .inner_loop import NonFiniteLossError

    cfg, rank, comm, device, restarted = worker_setup(config)
    error, splits = "", None
    try:
        splits = load_splits(cfg.data)
        check_tasks(cfg.data, splits)
    except DataError as e:
        error = f"worker {rank} on {socket.gethostname()}: {e}"
    # every worker must be able to load the data, or none starts (a lone failure would hang the others)
    ok = comm.all_reduce_sum(torch.tensor([0.0 if error else 1.0], device=device))
    if int(ok.item()) < comm.world:
        return {_FAILED: ("DataError", error or "another worker could not load the dataset (see its log)")}
    resume = config.get("resume")
    if restarted is not None:  # restarted by FailureConfig: continue from the last reported checkpoint
        resume = restarted
        if rank == 0:
            log.info("restarting from the checkpoint of meta-step %d", resume["step"])
    try:
        return meta_train(cfg, RayRecorder(RunDir(config["run_dir"]), cfg, rank), comm, device, resume, splits)
    except Stopped as e:  # SIGINT/SIGTERM on the driver: the checkpoint of this step is saved
        return {_STOPPED: e.step}
    except (NonFiniteLossError, ConfigError, DataError, RunDirError) as e:
        return {_FAILED: (type(e).__name__, str(e))}


# ------------------------------------------------------------------------------------------------ driver
def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast (instead of Ray's long retries) when a host:port address does not answer."""
    if address in ("", "auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ScaleError(f"--address must be host:port (or 'auto'), got '{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ScaleError(f"cannot reach a Ray cluster at {address}: {e}") from None


def init_ray(cfg: Config, dashboard: bool = True) -> bool:
    """Connect to ``scale.address`` / ``RAY_ADDRESS``, or start a local Ray on 127.0.0.1 sized to this
    machine. Returns whether this call started Ray (and so should shut it down). The dashboard (on
    127.0.0.1) serves the state API that Ray Train's placement-group cleaner polls; without it that cleaner
    logs a warning every few seconds."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # without this Ray rewrites a 127.0.0.1 node address to the host's IP and listens on every interface
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    address = cfg.scale.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        _check_reachable(address)
    if ray.is_initialized():
        return False
    if not address and (running := _ray_start_cluster()):
        # Ray's own helpers (Ray Train's placement-group cleaner) find the cluster that `ray start` recorded;
        # a second local Ray beside it would have them watch the wrong one: join it instead
        address = running
        try:  # as ray.init does for a cluster it finds itself: send the token that `ray start` made, if any
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available)
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        except ImportError:  # a Ray without token authentication
            pass
        log.info("Ray: joining the Ray already running here at %s (from `ray start`; `ray stop` it to have this "
                 "command start its own)", address)
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return True
    # Ray Train's preemption watcher (an actor per run that polls for node drains, e.g. of spot instances)
    # has nothing to watch on one local machine, and its start logs a spurious core_worker error line
    # (ray-project/ray#53727); the processes of the Ray started here inherit this environment
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    cpus, gpus = os.cpu_count() or 1, _local_gpus()
    log.info("Ray: starting a local Ray on 127.0.0.1 (%d CPUs, %d GPUs; --address joins a cluster)", cpus, gpus)
    ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=dashboard,
             _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    return True


def _ray_start_cluster() -> str:
    """The address of the cluster that `ray start` recorded on this machine, if it still answers ("": none). A
    record left by a head that was not stopped cleanly is removed, as `ray stop` would have."""
    try:
        from ray._common.utils import get_ray_address_file
        record = Path(get_ray_address_file(None))
        address = record.read_text().strip() if record.is_file() else ""
    except Exception:  # another Ray version: start a local Ray as before
        return ""
    if not address:
        return ""
    try:
        _check_reachable(address, timeout=2.0)
    except ScaleError:
        log.info("Ray: %s names %s, which no longer answers (a head not stopped cleanly); removing it",
                 record, address)
        record.unlink(missing_ok=True)
        return ""
    return address


def _local_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:
        return 0


def workers_for(cfg: Config) -> tuple[int, bool, int]:
    """(number of workers, use GPUs, torch threads per worker) for the cluster Ray is connected to: on GPUs,
    ``scale.num_gpus × scale.workers_per_gpu`` workers."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 0)), int(res.get("GPU", 0))
    s = cfg.scale
    if s.num_gpus:
        if s.num_gpus > gpus:
            raise ScaleError(f"--num-gpus {s.num_gpus} asks for more GPUs than the Ray cluster has ({gpus})")
        n = s.num_gpus * s.workers_per_gpu
        return n, True, cfg.run.threads or max(1, cpus // n // 2)
    n = s.num_workers or max(1, min(cpus, cfg.meta.meta_batch))
    if n > cpus:
        raise ScaleError(f"--num-workers {n} asks for more CPUs than the Ray cluster has ({cpus}); "
                         f"each CPU worker takes one CPU")
    return n, False, cfg.run.threads or max(1, cpus // n)


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one Ray Train worker holds: one CPU, or 1/``scale.workers_per_gpu`` of a GPU."""
    return {"GPU": 1 / cfg.scale.workers_per_gpu} if cfg.scale.num_gpus else {"CPU": 1}


def torch_config(cfg: Config):
    """The process group's backend: Ray Train's default (gloo on CPUs, NCCL on GPUs), but gloo where workers
    share a GPU (NCCL refuses two ranks on one device)."""
    from ray.train.torch import TorchConfig
    return TorchConfig(backend="gloo") if cfg.scale.num_gpus and cfg.scale.workers_per_gpu > 1 else TorchConfig()


def fit(cfg: Config, run: RunDir, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Meta-train ``cfg`` on Ray Train into ``run``; returns the summary (written to summary.json)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = absolute_data_root(cfg)  # workers have another working directory
    started = init_ray(cfg)
    reclaim_signals()
    try:
        n, use_gpu, threads = workers_for(cfg)
        cfg = cfg.override({"run.threads": threads})
        log.info("Ray Train: %d %s worker%s, %d thread%s each, %s", n, "GPU" if use_gpu else "CPU",
                 "s" if n > 1 else "", threads, "s" if threads > 1 else "", _spread(cfg.meta.meta_batch, n))
        trainer = TorchTrainer(
            train_func,
            train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(run.path), "resume": resume},
            scaling_config=ScalingConfig(num_workers=n, use_gpu=use_gpu, resources_per_worker=worker_resources(cfg)),
            torch_config=torch_config(cfg),
            run_config=RunConfig(
                name="train", storage_path=str(run.path / "ray"),
                failure_config=FailureConfig(max_failures=cfg.scale.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                worker_runtime_env={"env_vars": worker_env(threads)},
                logging_config=LoggingConfig(log_level="WARNING")),
        )
        t0 = time.perf_counter()
        try:
            result = _fit_in_thread(trainer)
        except Exception as e:  # restarts exhausted (ray.train.TrainingFailedError) or the trainer broke
            raise ScaleError(f"Ray Train failed after {cfg.scale.max_failures} restarts: {e}") from None
        if result.error is not None:
            raise ScaleError(f"Ray Train failed: {result.error}")
        summary = getattr(result, "return_value", None)
        if isinstance(summary, dict) and _FAILED in summary:
            raise _error(*summary[_FAILED])
        if isinstance(summary, dict) and _STOPPED in summary:
            raise Stopped(summary[_STOPPED])
        payload = checkpoint.load(run.latest_checkpoint() or Path(result.checkpoint.path) / CHECKPOINT_FILE)
        summary = dict(summary or {})
        summary["workers"] = n
        summary["fit_seconds"] = time.perf_counter() - t0
        run.write_metrics(payload["metrics"])
        RunRecorder(run, cfg).finish(summary, payload["state"], cfg, payload["metrics"])
        return summary
    finally:
        if started:
            ray.shutdown()


def _fit_in_thread(trainer):
    """``trainer.fit()`` in a helper thread, so that SIGINT and SIGTERM reach this process's own handlers in
    the main thread (``metanas_ray.interrupt``): in the main thread Ray Train installs a SIGINT handler of its
    own that aborts the run without a last checkpoint."""
    import threading

    out: dict[str, Any] = {}

    def target():
        try:
            out["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread
            out["error"] = e

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # wakes up for signal handlers (which run in the main thread only)
    if "error" in out:
        raise out["error"]
    return out["result"]


def _error(kind: str, message: str) -> Exception:
    from .data import DataError
    from .inner_loop import NonFiniteLossError

    return {"DataError": DataError, "NonFiniteLossError": NonFiniteLossError, "RunDirError": RunDirError,
            "ConfigError": ConfigError}.get(kind, ScaleError)(message)


def _spread(meta_batch: int, n: int) -> str:
    counts = [len(range(r, meta_batch, n)) for r in range(n)]
    return f"meta-batch of {meta_batch} tasks spread as {counts}"
