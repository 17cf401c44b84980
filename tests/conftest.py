"""Shared fixtures: a tiny config on synthetic data, and one thread per process (2-core CI machines)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every Ray port on 127.0.0.1
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tune_configs" / "smoke.yaml"


@pytest.fixture
def smoke_cfg():
    from metanas_ray.config import load
    return load(SMOKE)


@pytest.fixture(scope="session")
def synthetic_splits():
    from metanas_ray.config import load
    from metanas_ray.data import load_splits
    return load_splits(load(SMOKE).data)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting one costs seconds), on loopback only."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="WARNING")  # "local": never a `ray start` head that a test left running
    yield ray
    ray.shutdown()


def ray_cli() -> str:
    """The ``ray`` command of this interpreter's Ray: beside it, or (a venv over system site-packages, where pip
    put no script in the venv) the one on PATH."""
    import shutil
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or str(beside))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_processes_mentioning(marker: str) -> None:
    """SIGKILL every process whose command line holds ``marker``: stops one test's Ray head (``ray stop`` would
    also stop every other Ray on the machine, the test session's among them)."""
    import signal
    import time
    for _ in range(50):
        pids = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and int(entry) != os.getpid():
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if marker.encode() in f.read():
                            pids.append(int(entry))
            except OSError:
                continue
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)


# every option that reproduces the official code, at the smoke config's scale (tests/test_official_options.py)
OFFICIAL = {
    "model.input_weights": "pairwise", "model.prune_rule": "separate", "model.prune_threshold": 0.01,
    "task.optimizer": "adam", "task.adam_moments": "kept", "task.lr_w": 0.005, "task.lr_alpha": 0.005,
    "task.alpha_weight_decay": 1e-3, "task.grad_clip": 0.0, "task.batch_size": 4, "task.batch_sampling": "random",
    "task.drop_path": 0.2, "task.tau_schedule": "linear", "task.tau_alpha_end": 0.05, "task.tau_beta_end": 0.05,
    "task.warmup_tau": "hold", "meta.anneal": "constant", "meta.warmup_steps": 2, "meta.prune_every": 2,
    "meta.prune_threshold": 0.1, "eval.steps": 4, "eval.arch_steps": 2, "eval.batch_size": 3, "eval.tau_end": 0.1,
    "eval.prune_threshold": 0.05, "eval.warmup_arch": "frozen",
}
