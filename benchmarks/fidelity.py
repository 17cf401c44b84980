"""Fidelity: the official MetaNAS code and ours, meta-trained on the same Omniglot tasks; accuracy and wall-clock.

    git clone https://github.com/boschresearch/metanas ../metanas   # AGPL-3.0: imported from a checkout, not vendored
    python -m benchmarks.fidelity --official-root ../metanas        # benchmarks/results/fidelity.{json,png}

Three runs, one after the other, on the tasks of ``metanas_ray.data`` (Omniglot 5-way 1-shot, meta-training tasks
15-shot): the official code, ours (``python -m metanas_ray.run`` in a subprocess: Ray Train, default workers) and our
Conv4 REPTILE baseline, at the settings of the official ``run_og_meta_train.sh`` with ``hp_setting og_metanas`` (5
inner Adam steps on 20 images drawn with replacement, lr 0.005, REPTILE meta lr 1.0 / 0.6, 10 tasks a meta-step, α
frozen for the first half, drop-path 0.2, τ 1 → 0.05, the meta-model pruned at 0.01 after each validation) and
``run_og_meta_testing.sh`` (100 steps on batches of 10, α adapted in the first 50, τ → 0.1, soft-pruning at 0.05),
scaled down to the supernet of ``tune_configs/quick.yaml`` and tens of meta-steps: on 2 cores the official code takes
~15 s a warm-up meta-step, ~30 s a search meta-step and ~24 s a meta-val/test task.

The official code runs in this process: its own classes, built as ``metanas_main`` builds them (with our stem
multiplier and channel scale, 2 and 2), and its own ``train`` and ``evaluate``, fed by an adapter whose
``sample_meta_train()`` serves our tasks as its ``Task`` namedtuples (loaders as in ``tasks/torchmeta_loader.py``)
and whose ``sample_meta_test()`` serves our meta-validation tasks during training (it monitors on meta-test tasks;
we keep a validation split), then our meta-test tasks. Its accuracy per task is read off its ``top1_logger_test``;
the 95% CI is 1.96 · sample std / √tasks for all three. Its ``warm_up_epochs`` is W + 1 (epochs count from 1): both
freeze α for W meta-steps. Run-time patches, each listed in ``patches``: those of ``benchmarks.official``, the CPU for
``config.device`` (``meta_architecture_search``, with ``torch.cuda.set_device``, is not called) and, as PyTorch >= 2's
``zero_grad()`` sets grads to None, in-place zeroing (PyTorch 1.x) in the two meta-optimizers (else the ``.grad is
not None`` guard of ``NAS_Reptile.step`` skips every parameter: the meta-model never moves) and in those of ``Darts``
(else a weight pruned by the forward pass in a task's last step drops out of its ``w_task``: KeyError in REPTILE).

What could make it unfair. Noise: one seed, tens of tasks per meta-test, batches from torch's global generator there
and per-task generators here: differences within the CIs mean nothing. The official architect is stale:
``Architect.v_net`` is a deepcopy of the model made once in ``Darts.__init__``, refreshed only by ``virtual_step``,
which first-order DARTS never calls, so every α gradient is taken on that copy at the initial weights and α
(``architect_copy_unchanged`` checks it after training); ours takes it at the current ones. It is the official
behaviour and is kept. Threads: both get all cores (ours: Ray's default workers × threads each; the official run:
``--threads`` in one process), but two processes are not one with two threads, a busy machine slows the latter most
(``load_average_1min`` is recorded), and this machine's speed drifts by up to a third. The official meta-validation
uses the training script's τ 0.05 and pruning at 0.01, ours the meta-test values: only the meta-tests are strictly
alike. Wall-clock: ours counts its whole process (Ray's start, the data), the official code ``train`` and
``evaluate``; the in-run ratio is recorded beside.

A little past 400 lines: driving the official code (its config, patches and task adapter), the two runs beside it
and their comparison belong in one file, read top to bottom.
"""
from __future__ import annotations

import argparse
import copy
import csv
import inspect
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from benchmarks.official import DEFAULTS, SCRIPT, _import_official, _provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fidelity.json"
DATA = (ROOT / ".." / "shared" / "data" / "omniglot").resolve()
KINDS = ("official", "ours", "conv4")


def settings(args) -> dict:
    """The settings all three runs share (our config's names)."""
    if args.meta_steps % args.eval_every:
        raise SystemExit(f"--meta-steps ({args.meta_steps}) must be a multiple of --eval-every ({args.eval_every})")
    return dict(
        data=dict(dataset="omniglot", root=str(args.data_root), download=False, n_way=5, k_shot=1, train_shots=15,
                  n_query=args.n_query),
        model=dict(init_channels=8, layers=3, nodes=2, reduction_layers=[1, 2], stem_multiplier=2, channel_scale=2,
                   input_weights="pairwise", prune_threshold=0.01, prune_rule="separate"),
        task=dict(steps=5, optimizer="adam", adam_moments="kept", lr_w=0.005, lr_alpha=0.005, alpha_weight_decay=1e-3,
                  grad_clip=0.0, batch_size=20, batch_sampling="random", drop_path=0.2, tau_schedule="linear",
                  tau_alpha_start=1.0, tau_beta_start=1.0, tau_alpha_end=0.05, tau_beta_end=0.05, warmup_tau="hold"),
        meta=dict(algorithm="reptile", optimizer="sgd", lr_w=1.0, lr_alpha=0.6, anneal="constant", meta_batch=10,
                  warmup_steps=args.meta_steps // 2, prune_every=args.eval_every, prune_threshold=0.01),
        eval=dict(steps=100, arch_steps=50, batch_size=10, tau_end=0.1, prune_threshold=0.05, warmup_arch="frozen",
                  every=args.eval_every, val_tasks=args.val_tasks, test_tasks=args.test_tasks),
        run=dict(seed=args.seed, meta_steps=args.meta_steps, log_every=args.eval_every,
                 checkpoint_every=args.eval_every),
    )


def ours_config(s: dict, kind: str) -> dict:
    """Our run config: the shared settings, or for the Conv4 baseline the same without the keys of the supernet
    (its α, τ, drop-path, pruning and warm-up: it has no paths and no architecture)."""
    if kind == "ours":
        return s
    s = copy.deepcopy(s)
    s["model"] = {"kind": "conv4"}
    for section, keys in (("task", ("drop_path", "alpha_weight_decay", "lr_alpha", "tau_schedule", "tau_alpha_start",
                                    "tau_beta_start", "tau_alpha_end", "tau_beta_end", "warmup_tau")),
                          ("meta", ("lr_alpha", "warmup_steps", "prune_every", "prune_threshold")),
                          ("eval", ("arch_steps", "tau_end", "prune_threshold", "warmup_arch"))):
        for key in keys:
            del s[section][key]
    return s


# ---------------------------------------------------------------- the official code

def official_config(off, s: dict, path: Path) -> SimpleNamespace:
    """The official code's configuration: the training script, ``hp_setting og_metanas``, our scale."""
    logger = logging.getLogger("fidelity.official")
    logger.handlers, logger.propagate = [logging.FileHandler(path / "official.log")], False
    logger.setLevel(logging.INFO)
    d, m, t, me, e = s["data"], s["model"], s["task"], s["meta"], s["eval"]
    cfg = SimpleNamespace(**{**DEFAULTS, **SCRIPT})
    cfg.__dict__.update(
        k=d["n_way"], n=d["k_shot"], q=d["n_query"], init_channels=m["init_channels"], layers=m["layers"],
        nodes=m["nodes"], reduction_layers=m["reduction_layers"], alpha_prune_threshold=m["prune_threshold"],
        meta_epochs=s["run"]["meta_steps"], warm_up_epochs=me["warmup_steps"] + 1, eval_freq=e["every"],
        test_task_train_steps=e["steps"], test_adapt_steps=e["arch_steps"] / e["steps"],
        test_meta_batch_size=e["val_tasks"], eval_epochs=None, print_freq=10 ** 9, seed=s["run"]["seed"],
        meta_model_prune_threshold=me["prune_threshold"], normalizer_t_min=t["tau_alpha_end"],
        device=torch.device("cpu"), gpus=[0], path=str(path), job_id=None, logger=logger, eval_prefix="",
        model_path=None)
    cfg = off.utils.set_hyperparameter(cfg)
    want = dict(n_train=d["train_shots"], batch_size=t["batch_size"], batch_size_test=e["batch_size"],
                task_train_steps=t["steps"], meta_batch_size=me["meta_batch"], w_lr=t["lr_w"], alpha_lr=t["lr_alpha"],
                alpha_weight_decay=t["alpha_weight_decay"], w_meta_lr=me["lr_w"], a_meta_lr=me["lr_alpha"],
                drop_path_prob=t["drop_path"], normalizer_t_max=t["tau_alpha_start"], w_grad_clip=10e5,
                w_meta_anneal=0, a_meta_anneal=0, w_task_anneal=0, a_task_anneal=0)  # meta.anneal: constant
    assert {k: getattr(cfg, k) for k in want} == want, "og_metanas no longer gives the shared settings"
    return cfg


class Tasks:
    """The official code's task distribution, serving our tasks as its ``Task`` namedtuples."""

    def __init__(self, off, samplers, s: dict):
        self.off, self.samplers, self.s = off, samplers, s
        self.step, self.phase, self.test_next, self.start = 0, "val", 0, time.perf_counter()

    def _task(self, task, batch_size: int):
        """As ``torchmeta_loader.sample_meta_batch``: batches drawn with replacement from D_train (unless one batch
        is all of it), the same loader for training and α; all queries in one batch."""
        n = len(task.y_train)
        sampler = (torch.utils.data.RandomSampler(range(n), replacement=True, num_samples=batch_size)
                   if batch_size != n else None)
        train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(task.x_train, task.y_train),
                                            batch_size=batch_size, sampler=sampler)
        test = [(task.x_query, task.y_query)]
        return self.off.Task(train, train, test)

    def sample_meta_train(self):
        tasks = [self._task(self.samplers["train"].sample(self.step, i), self.s["task"]["batch_size"])
                 for i in range(self.s["meta"]["meta_batch"])]
        self.step += 1
        if self.step % 10 == 0:
            print(f"  official: meta-step {self.step}, {time.perf_counter() - self.start:.0f} s", flush=True)
        return tasks

    def sample_meta_test(self):
        e = self.s["eval"]
        if self.phase == "val":
            return [self._task(self.samplers["val"].sample(0, i), e["batch_size"]) for i in range(e["val_tasks"])]
        lo, self.test_next = self.test_next, min(self.test_next + e["val_tasks"], e["test_tasks"])
        return [self._task(self.samplers["test"].sample(0, i), e["batch_size"]) for i in range(lo, self.test_next)]


def _zero_in_place(self, set_to_none: bool = False) -> None:  # PyTorch 1.x: grads zeroed, never set to None
    torch.optim.Optimizer.zero_grad(self, set_to_none=False)


class _SGDZeroesInPlace(torch.optim.SGD):
    zero_grad = _zero_in_place


class _AdamZeroesInPlace(torch.optim.Adam):
    zero_grad = _zero_in_place


def _zero_grads_in_place(off, meta_optimizer, task_optimizer) -> list[str]:
    """PyTorch >= 2's ``zero_grad()`` sets grads to None, which the official code tests for (see above)."""
    if inspect.signature(torch.optim.Optimizer.zero_grad).parameters["set_to_none"].default is not True:
        return []
    patches = []
    if "grad is not None" in inspect.getsource(off.NAS_Reptile.step):
        for opt in (meta_optimizer.w_meta_optim, meta_optimizer.a_meta_optim):
            opt.__class__ = _SGDZeroesInPlace
        patches.append("NAS_Reptile: its meta-optimizers zero grads in place (PyTorch 1.x), else its .grad-is-None "
                       "guard skips every parameter and the meta-model never moves")
    if "grad is not None" in inspect.getsource(off.Darts.step):
        for opt in (task_optimizer.w_optim, task_optimizer.a_optim):
            opt.__class__ = _AdamZeroesInPlace
        patches.append("Darts: its w and alpha optimizers zero grads in place (PyTorch 1.x), else a weight the "
                       "forward pass pruned in a task's last step drops out of w_task and NAS_Reptile.step fails "
                       "with a KeyError when the tasks differ")
    return patches


def _mean_ci(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, 1.96 * math.sqrt(var / n)


def run_official(off, samplers, s: dict, path: Path) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    cfg = official_config(off, s, path)
    torch.manual_seed(cfg.seed)
    off.main.np.random.seed(cfg.seed)
    normalizer = off.main._init_alpha_normalizer(cfg.normalizer, cfg.task_train_steps, cfg.normalizer_t_max,
                                                 cfg.normalizer_t_min, cfg.normalizer_temp_anneal_mode)
    model = off.main.SearchCNNController(  # as _build_model, with our stem multiplier and channel scale
        1, cfg.init_channels, cfg.k, cfg.layers, n_nodes=cfg.nodes, reduction_layers=cfg.reduction_layers,
        stem_multiplier=s["model"]["stem_multiplier"], device_ids=cfg.gpus, normalizer=normalizer,
        PRIMITIVES=off.main.gt.PRIMITIVES_FEWSHOT, feature_scale_rate=s["model"]["channel_scale"],
        use_hierarchical_alphas=cfg.use_hierarchical_alphas, use_pairwise_input_alphas=cfg.use_pairwise_input_alphas,
        alpha_prune_threshold=cfg.alpha_prune_threshold).to(cfg.device)
    cfg, meta_optimizer = off.main._init_meta_optimizer(cfg, off.NAS_Reptile, model)
    cfg, task_optimizer = off.main._init_task_optimizer(cfg, off.Darts, model)
    patches = _zero_grads_in_place(off, meta_optimizer, task_optimizer)
    patches.append("config.device = cpu, not cuda (meta_architecture_search, with torch.cuda.set_device, is not "
                   "called: the model is built as in _build_model, then train and evaluate)")

    # instrumentation, not a patch: each meta-val/meta-test task's accuracy, from the official top1_logger_test
    tasks, evals = Tasks(off, samplers, s), []
    official_step = task_optimizer.step

    def step(task, epoch, global_progress="", test_phase=False, **kw):
        if not test_phase:
            return official_step(task, epoch, global_progress, test_phase, **kw)
        key = tasks.step if tasks.phase == "val" else "test"
        if not evals or evals[-1]["step"] != key:  # wall-clock as ours: at the end of the meta-step, before validating
            evals.append({"step": key, "accuracies": [], "wall_seconds": time.perf_counter() - tasks.start})
        meter = cfg.top1_logger_test
        before = (meter.sum, meter.count)
        info = official_step(task, epoch, global_progress, test_phase, **kw)
        evals[-1]["accuracies"].append((meter.sum - before[0]) / (meter.count - before[1]))
        if key == "test" and len(evals[-1]["accuracies"]) % 10 == 0:
            print(f"  official: meta-test task {len(evals[-1]['accuracies'])}", flush=True)
        return info

    task_optimizer.step = step
    v_net_before = [p.detach().clone() for p in task_optimizer.architect.v_net.parameters()]
    meta_before = [p.detach().clone() for p in model.weights()]
    tasks.start = time.perf_counter()
    off.main.train(cfg, model, tasks, task_optimizer, meta_optimizer)
    t_train = time.perf_counter() - tasks.start
    stale = all(torch.equal(a, b) for a, b in zip(v_net_before, task_optimizer.architect.v_net.parameters()))
    moved = any(not torch.equal(a, b) for a, b in zip(meta_before, model.weights()))

    # meta-test as run_og_meta_testing.sh: τ_end 0.1 and soft-pruning at 0.05 (on the architect's copy too, which
    # a fresh meta-test process would deepcopy from the model built with them)
    for net in (model, task_optimizer.architect.v_net):
        net.normalizer["params"]["t_min"] = s["eval"]["tau_end"]
        net.alpha_prune_threshold = s["eval"]["prune_threshold"]
    tasks.phase = "test"
    cfg.eval_epochs = math.ceil(s["eval"]["test_tasks"] / s["eval"]["val_tasks"])
    t0 = time.perf_counter()
    off.main.evaluate(cfg, model, tasks, task_optimizer)
    t_test = time.perf_counter() - t0
    test = evals.pop()
    assert test["step"] == "test" and len(test["accuracies"]) == s["eval"]["test_tasks"]
    acc, ci = _mean_ci(test["accuracies"])
    assert abs(acc - cfg.top1_logger_test.avg) < 1e-9, "per-task accuracies disagree with the official mean"
    return {"meta_test_accuracy": acc, "meta_test_ci95": ci, "meta_test_tasks": len(test["accuracies"]),
            "wall_seconds": {"meta_train": t_train, "meta_test": t_test, "total": t_train + t_test},
            "meta_steps": tasks.step,
            "meta_val": [{"step": v["step"], **dict(zip(("accuracy", "ci95"), _mean_ci(v["accuracies"]))),
                          "wall_seconds": v["wall_seconds"]} for v in evals],
            "architect_copy_unchanged": stale, "meta_weights_moved": moved, "patches": patches,
            "official_settings": {k: v for k, v in sorted(vars(cfg).items()) if isinstance(v, (int, float, str, list))}}


# ---------------------------------------------------------------- ours

def run_ours(config: dict, path: Path, name: str) -> dict:
    """``python -m metanas_ray.run --config <path>/<name>.yaml --output <path>/<name>``, as a user runs it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    out = path / name
    cmd = [sys.executable, "-m", "metanas_ray.run", "--config", str(path / f"{name}.yaml"), "--output", str(out)]
    print(f"  {' '.join(cmd)}  (log: {path / f'{name}.log'})", flush=True)
    t0 = time.perf_counter()
    with open(path / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}).returncode
    process = time.perf_counter() - t0
    if rc != 0:
        tail = (path / f"{name}.log").read_text().splitlines()[-15:]
        raise SystemExit(f"{name}: metanas_ray.run exited with {rc}; its log ends:\n" + "\n".join(tail))
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = [{"step": int(r["step"]), "accuracy": float(r["val_accuracy"]), "ci95": float(r["val_ci95"]),
            "wall_seconds": float(r["wall_seconds"])} for r in rows if r["val_accuracy"] not in ("", "nan")]
    # the meta-training loop (all its validations included): what its tasks/s counts; the rest is the meta-test
    # (and the second or so of loading the data and building the model before the loop)
    train = summary["meta_steps"] * config["meta"]["meta_batch"] / summary["tasks_per_second"]
    return {"meta_test_accuracy": summary["meta_test_accuracy_soft"], "meta_test_ci95": summary["meta_test_ci95_soft"],
            "meta_test_accuracy_hard": summary["meta_test_accuracy_hard"],
            "meta_test_ci95_hard": summary["meta_test_ci95_hard"], "meta_test_tasks": summary["meta_test_tasks"],
            "wall_seconds": {"meta_train": train, "meta_test": summary["wall_seconds"] - train,
                             "total": summary["wall_seconds"], "process": process},
            "meta_steps": summary["meta_steps"], "meta_val": val, "workers": summary.get("workers"),
            "run_dir": str(out)}


# ---------------------------------------------------------------- report

def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for kind, color in zip(KINDS, ("tab:red", "tab:blue", "tab:gray")):
        r = results[kind]
        label = f"{kind}: meta-test {100 * r['meta_test_accuracy']:.1f} ± {100 * r['meta_test_ci95']:.1f}%"
        for ax, x in zip(axes, ("step", "wall_seconds")):
            xs = [v[x] for v in r["meta_val"]]
            ax.errorbar(xs, [v["accuracy"] for v in r["meta_val"]], yerr=[v["ci95"] for v in r["meta_val"]],
                        color=color, marker="o", ms=3, capsize=2, label=label)
            end = r["meta_steps"] if x == "step" else r["wall_seconds"]["total"]
            ax.errorbar([end], [r["meta_test_accuracy"]], yerr=[r["meta_test_ci95"]], color=color, marker="*",
                        ms=12, capsize=3, linestyle="none")
    axes[0].set(xlabel="meta-step", ylabel="meta-validation accuracy (★ meta-test)")
    axes[1].set(xlabel="wall-clock seconds (★ at the end of the meta-test)")
    axes[0].legend(loc="lower right", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("Omniglot 5-way 1-shot: the official MetaNAS code vs ours (same tasks)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(results: dict) -> dict:
    off, ours = results["official"], results["ours"]
    diff = 100 * (ours["meta_test_accuracy"] - off["meta_test_accuracy"])
    within = abs(diff) <= 100 * off["meta_test_ci95"]
    ratio = off["wall_seconds"]["total"] / ours["wall_seconds"]["process"]
    return {"accuracy_difference_points": diff, "within_official_ci95": within,
            "at_or_above_official": diff >= 0 or within,
            "wall_clock_ratio_official_over_ours": ratio,
            "wall_clock_ratio_official_over_ours_in_run": off["wall_seconds"]["total"] / ours["wall_seconds"]["total"],
            "target": "ours at or above the official meta-test accuracy (or within its 95% CI) in at most a third "
                      "of its wall-clock time (ours: the whole process)",
            "target_met": (diff >= 0 or within) and ratio >= 3.0}


def _cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                platform.processor() or platform.machine())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-root", type=Path, required=True, help="a checkout of boschresearch/metanas")
    p.add_argument("--meta-steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=20, help="meta-validate (and prune the meta-model) every ...")
    p.add_argument("--val-tasks", type=int, default=8)
    p.add_argument("--test-tasks", type=int, default=50)
    p.add_argument("--n-query", type=int, default=5, help="queries per class (the official scripts: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the official run")
    p.add_argument("--data-root", type=Path, default=DATA)
    p.add_argument("--runs", type=Path, help="the runs' folder (default: runs/fidelity-<time>); a run whose "
                   "<kind>.json is already there, from the same settings, is not run again")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    root = args.official_root.resolve()
    off = _import_official(root)  # exits with one clear message when the checkout is missing
    s = settings(args)
    runs = args.runs or ROOT / "runs" / f"fidelity-{time.strftime('%Y%m%d-%H%M%S')}"
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "config.yaml").write_text(yaml.safe_dump(s, sort_keys=False))
    from metanas_ray.config import load
    from metanas_ray.data import check_tasks, load_splits
    cfg = load(runs / "config.yaml")
    samplers = check_tasks(cfg.data, load_splits(cfg.data), cfg.run.seed)
    torch.set_num_threads(args.threads)

    results = {}
    for kind in KINDS:
        done = runs / f"{kind}.json"
        if done.is_file() and json.loads(done.read_text())["settings"] == s:
            results[kind] = r = json.loads(done.read_text())
            print(f"{kind}: the run in {runs} (from {done})")
        else:
            print(f"{kind}: {args.meta_steps} meta-steps, {args.val_tasks} meta-val tasks every {args.eval_every}, "
                  f"{args.test_tasks} meta-test tasks", flush=True)
            load_start = os.getloadavg()[0]
            results[kind] = r = (run_official(off, samplers, s, runs / "official") if kind == "official"
                                 else run_ours(ours_config(s, kind), runs, kind))
            r["load_average_1min"] = {"start": load_start, "end": os.getloadavg()[0]}  # alone: about the threads
            r["settings"] = s
            done.write_text(json.dumps(r, indent=2) + "\n")
        print(f"{kind}: meta-test {100 * r['meta_test_accuracy']:.2f}% ± {100 * r['meta_test_ci95']:.2f} | "
              f"meta-train {r['wall_seconds']['meta_train']:.0f} s, meta-test {r['wall_seconds']['meta_test']:.0f} s",
              flush=True)
    patches = off.patches + results["official"].pop("patches")
    out = {**{k: {key: v for key, v in r.items() if key != "settings"} for k, r in results.items()},
           "settings": s, "patches": patches, **_provenance(root),
           "official_root": str(root), "runs": str(runs), "torch_version": torch.__version__,
           "threads": {"official": args.threads, "ours": "Ray Train's default: workers × (cores / workers)"},
           "device": "cpu", "cpu": _cpu(), "cpus": os.cpu_count(), "python": platform.python_version()}
    out["comparison"] = c = compare(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"ours − official: {c['accuracy_difference_points']:+.2f} points "
          f"({'within' if c['within_official_ci95'] else 'outside'} the official 95% CI of "
          f"±{100 * results['official']['meta_test_ci95']:.2f}); wall-clock official/ours "
          f"{c['wall_clock_ratio_official_over_ours']:.2f}× (in-run: "
          f"{c['wall_clock_ratio_official_over_ours_in_run']:.2f}×)")
    print(f"target {'MET' if c['target_met'] else 'NOT met'}: {c['target']}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
