"""The Ray Train path: same result at any worker count, a killed worker does not stop the run, bad scale input."""
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from metanas_ray import checkpoint
from metanas_ray.config import ConfigError
from metanas_ray.ray_train import ScaleError, fit
from metanas_ray.rundir import RunDir
from metanas_ray.run import main

from conftest import OFFICIAL, SMOKE

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


def _cfg(smoke_cfg, workers, **extra):
    return smoke_cfg.override({"meta.meta_batch": 3, "run.meta_steps": 6, "run.checkpoint_every": 2,
                               "run.log_every": 1, "eval.every": 0, "eval.test_tasks": 3,
                               "scale.num_workers": workers, **extra})


def _final(run_dir):
    return checkpoint.load(checkpoint.latest(run_dir / "checkpoints"))


def _worker_pids():
    """PIDs of live Ray Train worker processes (their process title names the actor class)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"RayTrainWorker" in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return sorted(pids)


def test_one_process_and_two_workers_end_the_same_with_the_official_options_and_a_killed_worker_changes_nothing(
        ray_session, smoke_cfg, tmp_path):
    """Drop-path and minibatches come from each task's own generator, and the kept Adam moments are the mean over
    the meta-batch: one process and two Ray Train workers, one of them SIGKILLed mid-run, end at the same
    meta-parameters and moments (the restarted group resumes from the last checkpoint)."""
    from metanas_ray.recording import RunRecorder
    from metanas_ray.train_loop import meta_train
    cfg = _cfg(smoke_cfg, 2, **OFFICIAL)
    one = RunDir(tmp_path / "one").create(cfg)
    s1 = meta_train(cfg, RunRecorder(one, cfg))

    two = RunDir(tmp_path / "two").create(cfg)
    killed = []

    def kill_a_worker_mid_run():  # once the first checkpoint exists, SIGKILL a real worker process
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if checkpoint.latest(two.checkpoints) is not None and _worker_pids():
                victim = _worker_pids()[-1]
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_mid_run, daemon=True)
    killer.start()
    s2 = fit(cfg, two)
    killer.join(timeout=1)
    assert killed, "no worker was killed"
    assert s2["workers"] == 2 and s2["tasks_per_worker"] == [2, 1]  # 3 tasks do not divide by 2 workers
    assert len(s2["seconds_in_tasks"]) == 2 and all(t > 0 for t in s2["seconds_in_tasks"])
    a, b = _final(one.path), _final(two.path)
    assert a["step"] == b["step"] == 6
    for part in ("weights", "alphas"):
        for k in a["state"][part]:
            torch.testing.assert_close(a["state"][part][k], b["state"][part][k], rtol=1e-5, atol=1e-6)
        for k in a["task_optimizer"]["v"][part]:
            torch.testing.assert_close(a["task_optimizer"]["v"][part][k], b["task_optimizer"]["v"][part][k],
                                       rtol=1e-5, atol=1e-9)
    assert (a["state"]["alphas"]["alpha_normal"] == -1e9).any()  # the meta-model was pruned on both
    assert s1["meta_test_accuracy_soft"] == pytest.approx(s2["meta_test_accuracy_soft"], abs=1e-6)
    steps = [int(r["step"]) for r in csv.DictReader((two.path / "metrics.csv").open())]
    assert steps == [1, 2, 3, 4, 5, 6]  # no gap, no duplicate after the restart
    for name in ("summary.json", "genotype.json", "config.yaml", "plots/learning_curves.png"):
        assert (two.path / name).is_file()


def test_scale_requests_the_cluster_cannot_meet(ray_session, smoke_cfg, tmp_path):
    with pytest.raises(ScaleError, match="GPUs"):
        fit(smoke_cfg.override({"scale.num_gpus": 4}), RunDir(tmp_path / "g").create(smoke_cfg))
    with pytest.raises(ScaleError, match="CPUs"):
        fit(smoke_cfg.override({"scale.num_workers": 64}), RunDir(tmp_path / "c").create(smoke_cfg))


@pytest.mark.parametrize("args, needle", [
    (["--num-workers", "0"], "--num-workers must be at least 1"),
    (["--num-workers", "-2"], "--num-workers must be at least 1"),
    (["--num-gpus", "-1"], "--num-gpus must be at least 0"),
    (["--address", "127.0.0.1:9"], "cannot reach a Ray cluster at 127.0.0.1:9"),
])
@pytest.mark.timeout(60)  # an unreachable address fails at once, not after Ray's minutes of retries
def test_bad_scale_flags(tmp_path, capsys, args, needle):
    assert main(["--config", str(SMOKE), "--output", str(tmp_path / "r"), *args]) == 2
    assert needle in capsys.readouterr().err


def test_a_worker_without_the_dataset_fails_with_a_message(ray_session, smoke_cfg, tmp_path):
    from metanas_ray.data import DataError
    cfg = smoke_cfg.override({"data.dataset": "omniglot", "data.root": str(tmp_path / "missing"),
                              "data.download": False, "scale.num_workers": 2})
    with pytest.raises(DataError, match="images_background.zip"):
        fit(cfg, RunDir(tmp_path / "d").create(cfg))
    assert not (tmp_path / "d" / "summary.json").exists()
