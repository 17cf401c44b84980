"""Seconds per task of the official MetaNAS code beside ours, in one process on this machine.

    git clone https://github.com/boschresearch/metanas ../metanas   # AGPL-3.0: used from a checkout, not vendored
    python -m benchmarks.official --official-root ../metanas        # writes benchmarks/results/official.json

The official code runs at the settings of its ``scripts/run_og_meta_train.sh`` (Omniglot 20-way, 4 layers,
reductions at 1 and 3, 3 nodes, 28 channels, the seven few-shot operations, pairwise input α, softmax temperature
annealed linearly 1 → 0.05, drop-path 0.2, first-order DARTS) with ``hp_setting og_metanas`` applied
(``utils.set_hyperparameter``: 5 task-train steps, batches of 20), ``metanas_main.py``'s defaults for the rest, on
the CPU. (The script's tasks are 5-shot, but each inner step trains on one batch of 20 images, as a 20-way 1-shot
task of ours does, and the query batch is 20 images in both.) It needs scipy, as the official code imports it. One
official task is what ``metanas_main.train`` does per task: ``Darts.step`` (its inner loop and the query evaluation)
and ``load_state_dict`` of the meta-model's state. It is timed in both phases of meta-training:

* search (epoch ≥ ``warm_up_epochs``): per inner step an α step on the architect's network copy, then a w step
  on the model: two forward and backward passes;
* warm-up (epoch < ``warm_up_epochs``): the w step only;

each round alternating with one fresh task of ours at the paper setting (``benchmarks.inner_loop.paper_setting``: 5
DARTS steps updating w and α from one backward pass, plus the query evaluation). A speed-up is the median over
rounds of the ratio of neighbouring runs (this machine's speed drifts by up to a third); the ratio of the medians is
recorded beside it. Both run under glibc's default malloc and the same threads, on fake images (the work per step
does not depend on their values; with fresh α nothing is pruned in either).

Two patches are applied at run time, not to the official files, each only where the checkout has the line it
replaces (``patches`` in the results says which did): ``ops.drop_path_`` draws its mask with
``torch.cuda.FloatTensor`` (here: the same Bernoulli mask on the CPU), and ``utils.accuracy`` calls ``.view`` on a
tensor that current PyTorch makes non-contiguous (here: ``.reshape``). The results name the checkout's commit (when
it is a git repository of its own) and a SHA-256 of its ``metanas/**/*.py`` files and the script.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.inner_loop import _times, one_task, paper_setting

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "official.json"
N_WAY = 20

# scripts/run_og_meta_train.sh (k is the number of classes per task in the official code)
SCRIPT = dict(dataset="omniglot", hp_setting="og_metanas", use_hp_setting=1, n=5, k=N_WAY, q=1, workers=0, gpus=[0],
              meta_model_prune_threshold=0.01, alpha_prune_threshold=0.01, meta_model="searchcnn",
              meta_epochs=30000, warm_up_epochs=15000, use_pairwise_input_alphas=True, eval_freq=2500,
              eval_epochs=200, normalizer="softmax", normalizer_temp_anneal_mode="linear", normalizer_t_min=0.05,
              normalizer_t_max=1.0, drop_path_prob=0.2, init_channels=28, layers=4, reduction_layers=[1, 3],
              use_first_order_darts=True, use_torchmeta_loader=True, test_adapt_steps=1.0)
# metanas_main.py's argparse defaults for everything else the code reads
DEFAULTS = dict(seed=2, meta_batch_size=5, test_meta_batch_size=25, task_train_steps=5, test_task_train_steps=50,
                w_meta_optim=None, w_meta_lr=0.001, w_meta_anneal=1, w_task_anneal=0, a_meta_optim=None,
                a_meta_lr=0.001, a_meta_anneal=1, a_task_anneal=0, n_train=15, batch_size=64, w_lr=0.025,
                w_momentum=0.0, w_weight_decay=0.0, w_grad_clip=10e5, use_drop_path_in_meta_testing=False, nodes=3,
                use_hierarchical_alphas=False, alpha_lr=3e-4, alpha_weight_decay=0.001,
                anneal_softmax_temperature=False, do_unrolled_architecture_steps=False, sparsify_input_alphas=None,
                use_vinyals_split=False, start_epoch=1, print_freq=50, eval=False)


def _import_official(root: Path):
    """The official modules from the checkout at ``root``, with the two run-time patches applied."""
    if not (root / "metanas" / "metanas_main.py").is_file():
        raise SystemExit(f"no official MetaNAS checkout at {root} (metanas/metanas_main.py is missing); "
                         f"git clone https://github.com/boschresearch/metanas {root}")
    sys.path.insert(0, str(root))
    try:
        from metanas import metanas_main
        from metanas.meta_optimizer.reptile import NAS_Reptile
        from metanas.models import ops
        from metanas.task_optimizer.darts import Darts
        from metanas.tasks.core import Task
        from metanas.utils import utils
    except ModuleNotFoundError as e:
        raise SystemExit(f"the official code at {root} needs {e.name!r}, which is not installed "
                         f"(pip install {e.name})") from e

    def drop_path_(x, drop_prob, training):  # as the official one, with the mask on x's device
        if training and drop_prob > 0.0:
            keep_prob = 1.0 - drop_prob
            mask = torch.empty(x.size(0), 1, 1, 1, device=x.device).bernoulli_(keep_prob)
            x.div_(keep_prob).mul_(mask)
        return x

    def accuracy(output, target, topk=(1,)):  # as the official one, with .reshape for .view
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0).mul_(1.0 / target.size(0)) for k in topk]

    patches = []
    if "torch.cuda.FloatTensor" in inspect.getsource(ops.drop_path_):
        ops.drop_path_ = drop_path_
        patches.append("ops.drop_path_: mask on x's device, not torch.cuda.FloatTensor")
    if ".view(-1)" in inspect.getsource(utils.accuracy):
        utils.accuracy = accuracy
        patches.append("utils.accuracy: .reshape(-1) for .view(-1)")
    return SimpleNamespace(main=metanas_main, NAS_Reptile=NAS_Reptile, Darts=Darts, Task=Task, utils=utils,
                           patches=patches)


def _provenance(root: Path) -> dict:
    """The checkout's git commit (None unless ``root`` is a repository's top level) and a SHA-256 of the
    official sources (path and content of every ``metanas/**/*.py`` and the script, in path order)."""
    digest = hashlib.sha256()
    for path in sorted([*root.glob("metanas/**/*.py"), root / "scripts" / "run_og_meta_train.sh"]):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    commit = None
    try:
        git = ["git", "-C", str(root), "rev-parse"]
        top = subprocess.run(git + ["--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
        if Path(top).resolve() == root:
            commit = subprocess.run(git + ["HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"official_commit": commit, "official_sources_sha256": digest.hexdigest()}


def official_task(off, gen: torch.Generator):
    """``(run(epoch), cfg, settings, weights)``: one official meta-training task on a fresh meta-model, as
    ``train()`` runs it; ``settings``: the configuration it ran with."""
    cfg = argparse.Namespace(**DEFAULTS, **SCRIPT)
    cfg.device = torch.device("cpu")
    cfg = off.utils.set_hyperparameter(cfg)
    settings = {k: getattr(cfg, k) for k in sorted(SCRIPT) + sorted(DEFAULTS)}  # before the optimizers replace some
    torch.manual_seed(cfg.seed)
    normalizer = off.main._init_alpha_normalizer(cfg.normalizer, cfg.task_train_steps, cfg.normalizer_t_max,
                                                 cfg.normalizer_t_min, cfg.normalizer_temp_anneal_mode)
    task_distribution = SimpleNamespace(n_input_channels=1, input_size=28, n_classes=N_WAY)
    model = off.main._build_model(cfg, task_distribution, normalizer)
    cfg, _ = off.main._init_meta_optimizer(cfg, off.NAS_Reptile, model)
    cfg, task_optimizer = off.main._init_task_optimizer(cfg, off.Darts, model)
    for name in ("top1_logger", "top1_logger_test", "losses_logger", "losses_logger_test"):
        setattr(cfg, name, off.utils.AverageMeter())
    x_train, x_query = torch.rand(N_WAY, 1, 28, 28, generator=gen), torch.rand(N_WAY, 1, 28, 28, generator=gen)
    train_loader = [(x_train, torch.arange(N_WAY))]  # one batch of 20 per step; its train and valid loaders are one
    task = off.Task(train_loader, train_loader, [(x_query, torch.arange(N_WAY))])
    meta_state = copy.deepcopy(model.state_dict())

    def run(epoch: int) -> None:
        task_optimizer.step(task, epoch=epoch, global_progress="")
        model.load_state_dict(meta_state)

    assert cfg.task_train_steps == 5 and cfg.batch_size == N_WAY, "og_metanas: 5 steps on batches of 20"
    return run, cfg, settings, sum(p.numel() for p in model.weights())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-root", type=Path, required=True, help="a checkout of boschresearch/metanas")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    root = args.official_root.resolve()
    off = _import_official(root)

    gen = torch.Generator().manual_seed(0)
    cfg, net, fresh, data = paper_setting(gen)
    ours = one_task(cfg, net, fresh, data)
    run, off_cfg, settings, off_weights = official_task(off, gen)
    timings = _times({"official_search": lambda: run(off_cfg.warm_up_epochs), "ours": ours,
                      "official_warmup": lambda: run(1)}, args.rounds, args.warmup)
    times = timings.wall
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {phase: statistics.median(a / b for a, b in zip(times[f"official_{phase}"], times["ours"]))
             for phase in ("search", "warmup")}
    out = {
        "seconds_per_task_ours": med["ours"],
        "seconds_per_task_official_search": med["official_search"],
        "seconds_per_task_official_warmup": med["official_warmup"],
        "speedup_vs_official_search": ratio["search"],  # median over rounds of neighbours' ratios
        "speedup_vs_official_warmup": ratio["warmup"],
        "ratio_of_medians_search": med["official_search"] / med["ours"],
        "ratio_of_medians_warmup": med["official_warmup"] / med["ours"],
        "weights_ours": sum(v.numel() for v in fresh["weights"].values()),
        "weights_official": off_weights,
        **_provenance(root),
        "patches": off.patches,
        "official_settings": settings,
        "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup, "seconds_all": times,
        "torch_version": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "load_average_start": load_start, "load_average_end": os.getloadavg(), "load_average_per_round": timings.loads,
        "cpus": os.cpu_count(), "python": platform.python_version(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"torch {torch.__version__}, {args.threads} threads, load average {load_start[0]:.2f} → "
          f"{out['load_average_end'][0]:.2f}; weights: ours {out['weights_ours']:,}, official {off_weights:,}")
    print(f"{'median over rounds:':<44}{'s/task':>7}{'× ours':>16}")
    for label, key in (("ours (fresh α: w and α, one pass per step)", "ours"),
                       ("official, search (α pass, then w pass)", "official_search"),
                       ("official, warm-up (w pass only)", "official_warmup")):
        times_ours = f"{out['speedup_vs_' + key]:.2f}×" if key != "ours" else ""
        print(f"{label:<44}{med[key]:>7.3f}{times_ours:>16}")
    print(f"official patched at run time: {'; '.join(off.patches) or 'nothing'}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
