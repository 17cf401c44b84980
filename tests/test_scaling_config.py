"""How many Ray Train workers a run asks for, and what each holds (no Ray started: the cluster is faked)."""
from __future__ import annotations

import pytest

from metanas_ray.ray_train import ScaleError, torch_config, worker_resources, workers_for


@pytest.fixture
def cluster(monkeypatch):
    import ray

    def fake(cpus: int, gpus: int) -> None:
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus, "GPU": gpus})
    return fake


def test_workers_share_each_gpu_with_a_fraction_of_it_and_gloo(cluster, smoke_cfg):
    cluster(16, 2)
    cfg = smoke_cfg.override({"scale.num_gpus": 2, "scale.workers_per_gpu": 3, "run.threads": 0})
    assert workers_for(cfg) == (6, True, 1)  # 16 CPUs // 6 workers // 2
    assert worker_resources(cfg) == {"GPU": pytest.approx(1 / 3)}
    assert torch_config(cfg).backend == "gloo"  # NCCL takes one rank per GPU


def test_one_worker_per_gpu_keeps_nccl_and_a_whole_gpu(cluster, smoke_cfg):
    cluster(16, 2)
    cfg = smoke_cfg.override({"scale.num_gpus": 2, "run.threads": 0})
    assert workers_for(cfg) == (2, True, 4)
    assert worker_resources(cfg) == {"GPU": 1.0}
    assert torch_config(cfg).backend is None  # Ray Train's default: NCCL on GPUs


def test_cpu_workers_hold_one_cpu_each(cluster, smoke_cfg):
    cluster(2, 0)
    assert workers_for(smoke_cfg.override({"scale.num_workers": 2, "run.threads": 0})) == (2, False, 1)
    assert worker_resources(smoke_cfg) == {"CPU": 1}
    with pytest.raises(ScaleError, match="more GPUs than the Ray cluster has"):
        workers_for(smoke_cfg.override({"scale.num_gpus": 1, "scale.workers_per_gpu": 2}))
