"""The CUDA path: the supernet and the task-learner compute on the GPU what they compute on the CPU, and a run
started on the GPU (in-process or on a Ray Train GPU worker) is evaluated, resumed or read on the CPU.

The GPU tests skip where PyTorch sees no GPU (CI): on a GPU machine, ``python -m pytest tests/test_cuda.py``
(``python -m benchmarks.cuda`` times the GPU). The device choices' error messages are tested everywhere.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metanas_ray import checkpoint
from metanas_ray.config import ConfigError, TaskLearnerConfig
from metanas_ray.evaluate import main as evaluate
from metanas_ray.inner_loop import adapt, forward
from metanas_ray.run import in_process_device, main
from metanas_ray.search_space import mixture
from metanas_ray.state import build_network, init_state, place

from conftest import OFFICIAL, SMOKE

CUDA = torch.cuda.is_available()


def gpu(test):
    """Needs a CUDA GPU: marked `gpu` (pytest -m gpu runs these alone), skipped without one."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="PyTorch sees no GPU")(test))


pytestmark = pytest.mark.timeout(300)
ALL_OPS = ("max_pool_3x3", "avg_pool_3x3", "skip_connect", "conv_1x5_5x1", "conv_3x3", "sep_conv_3x3",
           "dil_conv_3x3", "sep_conv_5x5", "dil_conv_5x5", "none")


def _tiny(smoke_cfg, channels_last: bool):
    return smoke_cfg.override({"model.ops": list(ALL_OPS), "model.layers": 3, "model.nodes": 3,
                               "model.reduction_layers": [1], "model.channels_last": channels_last})


def test_in_process_device_follows_num_gpus(smoke_cfg):
    assert in_process_device(smoke_cfg) == "cpu"
    with pytest.raises(ConfigError, match="needs Ray Train"):
        in_process_device(smoke_cfg.override({"scale.num_gpus": 2}))
    if CUDA:
        assert in_process_device(smoke_cfg.override({"scale.num_gpus": 1})) == "cuda"
    else:
        with pytest.raises(ConfigError, match="PyTorch sees none"):
            in_process_device(smoke_cfg.override({"scale.num_gpus": 1}))


def test_in_process_run_without_its_gpu_stops_before_writing(tmp_path, capsys):
    if CUDA:
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    assert main(["--config", str(SMOKE), "--output", str(out), "--in-process", "--num-gpus", "1"]) == 2
    assert "PyTorch sees none" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("device, needle", [("meta", "only cpu and cuda"), ("cuda:x", "not a device"),
                                            (f"cuda:{torch.cuda.device_count()}", "CUDA device")])  # one past the last
@pytest.mark.slow
def test_evaluate_names_a_bad_device(tmp_path, capsys, device, needle):
    assert main(["--config", str(SMOKE), "--output", str(tmp_path / "r"), "--in-process",
                 "--set", "run.meta_steps=2", "--set", "eval.test_tasks=2", "--set", "eval.every=0"]) == 0
    capsys.readouterr()
    assert evaluate([str(tmp_path / "r"), "--device", device]) == 2
    assert needle in capsys.readouterr().err


def test_place_puts_conv_weights_in_the_layout_of_the_device(smoke_cfg):
    """NHWC on the CPU (model.channels_last), NCHW elsewhere ("meta" stands in for a GPU here); always a copy."""
    cfg = _tiny(smoke_cfg, True)
    net = build_network(cfg, 1)
    state = init_state(cfg, net)
    on_cpu = place(net, state, "cpu")
    assert net.channels_last
    for part, d in on_cpu.items():
        for k, v in d.items():
            assert v.data_ptr() != state[part][k].data_ptr() and torch.equal(v, state[part][k])
            if v.dim() == 4:
                assert v.is_contiguous(memory_format=torch.channels_last)
    elsewhere = place(net, state, "meta")
    assert not net.channels_last and next(net.parameters()).device.type == "meta"
    assert all(v.device.type == "meta" and v.is_contiguous() for d in elsewhere.values() for v in d.values())


@gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_supernet_logits_and_gradients_on_cuda_equal_the_cpu(smoke_cfg, channels_last):
    """float64 weights and images, every operation, the CPU in either layout: the GPU's logits and gradients are
    the CPU's (to the float32 rounding of the loss: forward() returns float32 logits)."""
    cfg = _tiny(smoke_cfg, channels_last)
    net = build_network(cfg, 1).double()
    state = {part: {k: v.double() for k, v in d.items()} for part, d in init_state(cfg, net).items()}
    x = torch.rand(6, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % cfg.data.n_way
    results = []
    for device in ("cpu", "cuda"):
        p = {part: {k: v.requires_grad_(True) for k, v in d.items()} for part, d in place(net, state, device).items()}
        logits = forward(net, p, x.to(device), (0.7, 0.9))
        grads = torch.autograd.grad(F.cross_entropy(logits, y.to(device)),
                                    [v for d in p.values() for v in d.values()], allow_unused=True,
                                    materialize_grads=True)
        results.append([logits.cpu(), *(g.cpu() for g in grads)])
    for cpu, cuda in zip(*results):  # per tensor, relative to its largest entry (measured on an H100: ≤ 3.3e-7)
        assert (cuda - cpu).abs().max() <= 1e-5 * cpu.abs().max()


@gpu
def test_functional_forward_equals_the_module_on_cuda(smoke_cfg):
    cfg = _tiny(smoke_cfg, True)
    net = build_network(cfg, 1)
    state = place(net, init_state(cfg, net), "cuda")
    x = torch.rand(6, 1, 16, 16, device="cuda")
    mix = mixture(state["alphas"], 1.0, 1.0, cfg.model.nodes)
    for name, prm in net.named_parameters():  # the same tensors, in the same memory format
        prm.data = state["weights"][name].clone()
    with torch.no_grad():
        torch.testing.assert_close(forward(net, state, x), net(x, mix))
        torch.testing.assert_close(forward(net, state, x), functional_call(net, state["weights"], (x, mix)))


@gpu
def test_task_learner_on_cuda_follows_the_cpu_and_learns(smoke_cfg, monkeypatch):
    """float32 (TF32 off), the CPU in NHWC: the GPU's 5-step update of every tensor is the CPU's to 1%, and it
    lowers the training loss. (Measured on an H100: 1.2e-4 apart; the CPU's own NHWC and NCHW: 1.6e-4.)"""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = _tiny(smoke_cfg, True)
    net = build_network(cfg, 1)
    state = init_state(cfg, net)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(10, 1, 16, 16, generator=g), torch.arange(10) % 5
    task_cfg = TaskLearnerConfig(lr_w=0.05, lr_alpha=0.05)
    cpu, _ = adapt(net, place(net, state, "cpu"), x, y, task_cfg, 5)
    start = place(net, state, "cuda")
    gpu_state, _ = adapt(net, start, x.cuda(), y.cuda(), task_cfg, 5)
    for part in ("weights", "alphas"):
        for k, v in cpu[part].items():
            assert gpu_state[part][k].is_cuda
            step_cpu, step_gpu = v - state[part][k], gpu_state[part][k].cpu() - state[part][k]
            assert (step_gpu - step_cpu).abs().max() <= 1e-2 * step_cpu.abs().max(), (part, k)
    with torch.no_grad():
        before = F.cross_entropy(forward(net, start, x.cuda()), y.cuda())
        after = F.cross_entropy(forward(net, gpu_state, x.cuda()), y.cuda())
    assert after < before


@gpu
def test_a_gpu_run_is_read_evaluated_and_resumed_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert main(["--config", str(SMOKE), "--output", str(out), "--in-process", "--num-gpus", "1",
                 "--set", "run.meta_steps=6", "--set", "run.checkpoint_every=3", "--set", "meta.optimizer=adam"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cuda" and 0 <= summary["meta_test_accuracy_soft"] <= 1
    payload = checkpoint.load(checkpoint.latest(out / "checkpoints"))  # weights_only, mapped to the CPU
    tensors = [v for d in payload["state"].values() for v in d.values()]
    assert tensors and all(v.device.type == "cpu" and torch.isfinite(v).all() for v in tensors)
    capsys.readouterr()
    for device in ("cpu", "cuda"):
        assert evaluate([str(out), "--tasks", "4", "--device", device]) == 0
        printed = capsys.readouterr().out
        assert json.loads(printed[printed.rindex("\n{\n") + 1:])["device"] == device
    # continue the GPU run on the CPU, then on the GPU again (Adam's meta-moments move with the state)
    assert main(["--resume", str(out), "--in-process", "--set", "scale.num_gpus=0", "--set", "run.meta_steps=9"]) == 0
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["device"] == "cpu" and resumed["meta_steps"] == 9
    assert main(["--resume", str(out), "--in-process", "--num-gpus", "1", "--set", "run.meta_steps=12"]) == 0
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["device"] == "cuda" and resumed["meta_steps"] == 12


@pytest.mark.ray
@gpu
def test_ray_train_gpu_worker_meta_trains_on_the_gpu(ray_session, tmp_path):
    if ray_session.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the test session's Ray has no GPU")
    out = tmp_path / "ray_gpu"
    assert main(["--config", str(SMOKE), "--output", str(out), "--num-gpus", "1",
                 "--set", "run.meta_steps=4", "--set", "eval.test_tasks=4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cuda" and summary["workers"] == 1 and summary["meta_steps"] == 4


@gpu
@pytest.mark.parametrize("over", [
    {"model.prune_threshold": 0.02, "task.batch_size": 4, "task.batch_sampling": "random", "task.drop_path": 0.2,
     "task.tau_alpha_end": 0.05, "task.tau_beta_end": 0.05},
    {k: v for k, v in OFFICIAL.items() if k.startswith(("model.", "task."))},
    {"model.kind": "conv4", "model.conv4_channels": 8, "task.batch_size": 3},
], ids=["supernet-sgd-pruned", "supernet-official", "conv4"])
def test_cuda_graph_replays_give_the_eager_steps(smoke_cfg, synthetic_splits, over):
    """task.cuda_graph on a GPU: two tasks (the second replays the graphs the first captured) against eager adapt
    on the same GPU, and the captures really happened (capture=True raises rather than falling back)."""
    from metanas_ray import graphed
    from metanas_ray.data import TaskSampler
    from metanas_ray.inner_loop import Moments
    cfg = smoke_cfg.override({**over, "model.channels_last": False})
    net = build_network(cfg, synthetic_splits.channels)
    state = place(net, init_state(cfg, net), "cuda")
    sampler = TaskSampler(synthetic_splits.train, cfg.data.n_way, cfg.data.k_shot, cfg.data.n_query, 0, "train")
    adam = cfg.task.optimizer == "adam"
    for i in range(2):
        task = sampler.sample(0, i).to("cuda")
        start = Moments.zeros(state) if adam else None
        ref_m, our_m = (start.copy(), start.copy()) if adam else (None, None)
        ref, ref_stats = adapt(net, state, task.x_train, task.y_train, cfg.task, cfg.task.steps,
                               drop_path=cfg.task.drop_path, generator=task.generator(), moments=ref_m)
        ours, stats = graphed.adapt(net, state, task.x_train, task.y_train, cfg.task, cfg.task.steps,
                                    drop_path=cfg.task.drop_path, generator=task.generator(), moments=our_m,
                                    capture=True)
        for part in ref:
            for k in ref[part]:
                scale = max(1.0, float(ref[part][k].abs().max()))
                assert float((ours[part][k] - ref[part][k]).abs().max()) <= 1e-4 * scale, (part, k)
        assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-4, abs=1e-4)
        if adam:
            assert our_m.t == ref_m.t
    assert sum(len(r.graphs) for r in graphed._replays[net].values()) >= 1


@gpu
def test_cuda_graph_of_the_batched_steps_gives_the_per_task_steps(smoke_cfg, synthetic_splits):
    """task.batched with task.cuda_graph: three tasks' vmapped steps replayed (twice: the second call replays the
    graphs the first captured) against eager adapt per task, official options, on the same GPU."""
    from metanas_ray.batched import adapt_tasks
    from metanas_ray.data import TaskSampler
    from metanas_ray.inner_loop import Moments
    cfg = smoke_cfg.override({**{k: v for k, v in OFFICIAL.items() if k.startswith(("model.", "task."))},
                              "model.channels_last": False})
    net = build_network(cfg, synthetic_splits.channels)
    state = place(net, init_state(cfg, net), "cuda")
    sampler = TaskSampler(synthetic_splits.train, cfg.data.n_way, cfg.data.k_shot, cfg.data.n_query, 0, "train")
    for t in range(2):
        tasks = [sampler.sample(t, i).to("cuda") for i in range(3)]
        adapted, stats, moments = adapt_tasks(
            net, state, [k.x_train for k in tasks], [k.y_train for k in tasks], cfg.task, cfg.task.steps,
            drop_path=cfg.task.drop_path, generators=[k.generator() for k in tasks], moments=Moments.zeros(state),
            capture=True)
        for i, task in enumerate(tasks):
            own = Moments.zeros(state)
            ref, ref_stats = adapt(net, state, task.x_train, task.y_train, cfg.task, cfg.task.steps,
                                   drop_path=cfg.task.drop_path, generator=task.generator(), moments=own)
            for part in ref:
                for k in ref[part]:
                    scale = max(1.0, float(ref[part][k].abs().max()))
                    assert float((adapted[i][part][k] - ref[part][k]).abs().max()) <= 1e-4 * scale, (i, part, k)
            assert stats[i]["loss"] == pytest.approx(ref_stats["loss"], rel=1e-4, abs=1e-4)
            assert moments[i].t == own.t
