"""The sweep file of ``python -m metanas_ray.tune``: read, checked and sampled, with no Ray running.

A sweep file (YAML; see ``tune_configs/sweep_*.yaml``)::

    base: smoke.yaml                   # a run config (relative to this file, else the cwd)
    overrides: {run.meta_steps: 6}     # fixed changes to the base, dotted keys (also: --set KEY=VALUE)
    search:                            # dotted key: {distribution: arguments}
      task.lr_w: {loguniform: [0.01, 3.0]}      # also uniform: [low, high], randint: [low, high] (inclusive)
      task.tau_schedule: {choice: [exponential, linear]}
      meta.lr_w: {grid: [1.0, 0.5]}             # every sample runs the whole grid
    num_samples: 4                     # Tune's num_samples: trials = num_samples × grid size
    search_alg: random                 # random | grid: Tune's BasicVariantGenerator, seeded with `seed`
    seed: 0                            # searcher seed: same file + seed = same trial configurations
    trial_seed: fixed                  # fixed: every trial uses run.seed (same tasks); sampled: one per trial
    metric: val_accuracy               # a reported value (see REPORTED) that ASHA and the ranking use
    mode: max
    scheduler: {name: asha, grace_period: 2, reduction_factor: 2, max_t: 6}   # or fifo (no early stops);
                                       # defaults: eval.every, 2, the longest run.meta_steps
    resources: {cpu: 1, gpu: 0, workers: 1}    # per worker; workers > 1 or gpu > 0: Ray Train workers
    max_concurrent: 2                  # 0: as many trials as the cluster holds

Everything that can be wrong with a sweep is checked here before the first trial starts (``error: ...``, exit
2): the file and its settings, every possible value of each searched key, every trial configuration the seeded
searcher will draw (:func:`load_sweep`), a new or resumed sweep directory (:func:`prepare`) and the data of
every trial (:func:`check_data`). :func:`trial_config` is a trial's full config (what ``best_config.yaml`` holds
for the best one); :func:`write_trials_csv` writes ``trials.csv`` from the :class:`TrialRecord` s that
``metanas_ray.tune`` reads back from Tune.

Importing this module does not import Ray; :func:`param_space` and :func:`sample_configs` (and so
:func:`load_sweep`) import Ray Tune's distributions and its seeded searcher when called.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config import Config, ConfigError, flat_keys, load, plain, read_yaml_mapping, save
from .data import check_tasks, load_splits
from .ray_train import absolute_data_root

REPORTED = ("val_accuracy", "val_ci95", "train_accuracy", "train_loss", "tasks_per_second", "wall_seconds")
"""What every report to Tune carries besides ``step`` (the columns of a meta-validated metrics row)."""
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
_SWEEP_KEYS = {"base", "overrides", "search", "num_samples", "search_alg", "seed", "trial_seed", "metric", "mode",
               "scheduler", "resources", "max_concurrent"}


class SweepError(ValueError):
    """A sweep file, search space or request that cannot run."""


# ------------------------------------------------------------------------------------------------ the sweep
@dataclass(frozen=True)
class Sweep:
    """A parsed, validated sweep file. ``base`` already holds the fixed overrides (data.root absolute)."""

    base: Config
    search: dict[str, tuple[str, tuple]]  # key -> (distribution, arguments)
    num_samples: int = 1
    search_alg: str = "random"
    seed: int = 0
    trial_seed: str = "fixed"
    metric: str = "val_accuracy"
    mode: str = "max"
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 0  # 0: the longest run.meta_steps a trial can have
    cpu: float = 1.0
    gpu: float = 0.0
    workers: int = 1
    max_concurrent: int = 0

    @property
    def on_train(self) -> bool:
        """Whether trials run on Ray Train workers (else in the trial process)."""
        return self.workers > 1 or self.gpu > 0

    def per_trial(self) -> dict[str, float]:
        return {"CPU": self.workers * self.cpu, "GPU": self.workers * self.gpu}

    def to_dict(self) -> dict[str, Any]:
        """The sweep-file form, with ``base`` pointing at ``base_config.yaml`` next to it."""
        return {"base": "base_config.yaml", "overrides": {},
                "search": {k: {d: list(a)} for k, (d, a) in self.search.items()},
                "num_samples": self.num_samples, "search_alg": self.search_alg, "seed": self.seed,
                "trial_seed": self.trial_seed, "metric": self.metric, "mode": self.mode,
                "scheduler": {"name": self.scheduler, "grace_period": self.grace_period,
                              "reduction_factor": self.reduction_factor, "max_t": self.max_t},
                "resources": {"cpu": self.cpu, "gpu": self.gpu, "workers": self.workers},
                "max_concurrent": self.max_concurrent}

    def save(self, directory: Path) -> None:
        save(self.base, directory / "base_config.yaml")
        (directory / "sweep.yaml").write_text(yaml.safe_dump(plain(self.to_dict()), sort_keys=False))


def _number(key: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SweepError(f"{key}: {what} must be a finite number, got {value!r}")
    return value


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise SweepError(f"sweep '{name}' must be a mapping, got {value!r}")
    return value


def _parse_dist(key: str, spec: Any, default: Any) -> tuple[str, tuple]:
    where = f"search space '{key}'"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SweepError(f"{where} must be one {{distribution: arguments}} mapping "
                         f"({', '.join(DISTRIBUTIONS)}), got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SweepError(f"{where}: unknown distribution '{kind}'; known: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise SweepError(f"{where}: {kind} needs a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return kind, tuple(args)
    if len(args) != 2:
        raise SweepError(f"{where}: {kind} needs [low, high], got {args!r}")
    low, high = (_number(where, a, f"{kind} bound") for a in args)
    if low > high:
        raise SweepError(f"{where}: {kind} low {low} is above high {high}")
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"{where}: loguniform needs 0 < low, got low {low}")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise SweepError(f"{where}: randint needs integer bounds, got {args!r}")
    if isinstance(default, (bool, str, list, tuple)):
        raise SweepError(f"{where}: {kind} needs a numeric key, but '{key}' holds {type(default).__name__} "
                         f"values; use choice or grid")
    if isinstance(default, int) and kind != "randint":
        raise SweepError(f"{where}: '{key}' is an integer key; use randint, choice or grid, not {kind}")
    return kind, (int(low), int(high)) if kind == "randint" else (low, high)


def _find_base(name: Any, sweep_file: Path) -> Path:
    if not isinstance(name, str) or not name:
        raise SweepError(f"sweep 'base' must name a run config file, got {name!r}")
    for candidate in (sweep_file.parent / name, Path(name)):
        if candidate.is_file():
            return candidate
    raise SweepError(f"base config not found: {name} (looked next to {sweep_file} and in {Path.cwd()})")


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> Sweep:
    """Read and check a sweep file (``overrides``: more fixed overrides, e.g. from ``--set``): everything
    that needs no Ray cluster and no data."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep file", SweepError)
    unknown = sorted(set(raw) - _SWEEP_KEYS)
    if unknown:
        raise SweepError(f"unknown sweep key '{unknown[0]}'; known: {', '.join(sorted(_SWEEP_KEYS))}")
    base_file = _find_base(raw.get("base"), path)
    fixed = {**_section(raw, "overrides"), **(overrides or {})}
    try:
        base = load(base_file, fixed)
    except ConfigError as e:
        raise SweepError(f"base config {base_file} with the sweep's overrides: {e}") from None
    base = absolute_data_root(base)  # trial processes run elsewhere

    known = flat_keys(base)
    search_raw = _section(raw, "search")
    if not search_raw:
        raise SweepError("sweep 'search' is empty: name at least one config key to search")
    search = {}
    for key, spec in search_raw.items():
        if key not in known:
            raise SweepError(f"search space: unknown config key '{key}'")
        if key in fixed:
            raise SweepError(f"search space: '{key}' is also a fixed override; keep it in one place")
        search[key] = _parse_dist(key, spec, known[key])

    sched = raw.get("scheduler", {"name": "asha"})
    sched = {"name": sched} if isinstance(sched, str) else sched
    res = _section(raw, "resources")
    if not isinstance(sched, dict):
        raise SweepError(f"sweep 'scheduler' must be a name or a mapping, got {sched!r}")
    bad = sorted(set(sched) - {"name", "grace_period", "reduction_factor", "max_t"}) or \
        sorted(set(res) - {"cpu", "gpu", "workers"})
    if bad:
        raise SweepError(f"unknown sweep key '{bad[0]}' in scheduler/resources")
    try:
        sweep = Sweep(
            base=base, search=search, num_samples=int(raw.get("num_samples", 1)),
            search_alg=str(raw.get("search_alg", "random")), seed=int(raw.get("seed", 0)),
            trial_seed=str(raw.get("trial_seed", "fixed")), metric=str(raw.get("metric", "val_accuracy")),
            mode=str(raw.get("mode", "max")), scheduler=str(sched.get("name", "asha")),
            grace_period=int(sched.get("grace_period", base.eval.every or 1)),
            reduction_factor=float(sched.get("reduction_factor", 2)), max_t=int(sched.get("max_t", 0)),
            cpu=float(res.get("cpu", 1)), gpu=float(res.get("gpu", 0)), workers=int(res.get("workers", 1)),
            max_concurrent=int(raw.get("max_concurrent", 0)))
    except (TypeError, ValueError) as e:
        raise SweepError(f"sweep file {path}: a number is malformed ({e})") from None
    return _check(sweep)


def prepare(sweep_file: str | Path | None, out: Path, resume: bool,
            overrides: dict[str, Any] | None = None) -> Sweep:
    """The sweep to run into ``out``: a new one from ``sweep_file``, or the saved one for ``--resume``."""
    saved = out / "sweep.yaml"
    if resume:
        if overrides:
            raise SweepError("--resume continues the saved sweep as it was; drop --set, --data-root and --seed")
        if not saved.is_file() or not (out / "tune").is_dir():
            raise SweepError(f"--resume {out}: no sweep there (sweep.yaml or tune/ missing)")
        s = load_sweep(saved)
        given = load_sweep(sweep_file) if sweep_file is not None else s
        if (given.to_dict(), given.base) != (s.to_dict(), s.base):
            raise SweepError(f"--resume continues the sweep saved in {out}; {sweep_file} differs from it "
                             f"(drop --config or choose another --output)")
        return s
    if sweep_file is None:
        raise SweepError("--config SWEEP_FILE is needed (or --resume with --output of an existing sweep)")
    s = load_sweep(sweep_file, overrides)
    if saved.exists() or (out / "tune").exists():
        raise SweepError(f"{out} already holds a sweep; continue it with --resume or choose another --output")
    return s


def resized(s: Sweep, num_workers: int | None = None, num_gpus: int | None = None) -> Sweep:
    """``s`` with the trial workers that ``--num-workers`` (CPU) or ``--num-gpus`` (one GPU each) ask for."""
    if num_gpus:
        s = replace(s, workers=num_gpus, gpu=1.0)
    elif num_workers is not None or num_gpus == 0:
        s = replace(s, workers=num_workers or s.workers, gpu=0.0)
    base = s.base.override({"scale.num_workers": s.workers if not s.gpu else 0,
                            "scale.num_gpus": s.workers if s.gpu else 0})
    return _check(replace(s, base=base))


def _check(s: Sweep) -> Sweep:
    """Settings, every possible value of each key, and every trial configuration the searcher will draw."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise SweepError(msg)

    need(s.num_samples >= 1, f"num_samples must be at least 1, got {s.num_samples}")
    need(s.search_alg in ("random", "grid"), f"search_alg must be random or grid, got '{s.search_alg}'")
    need(s.search_alg != "grid" or all(d == "grid" for d, _ in s.search.values()),
         "search_alg grid needs every search key to be a grid: [...] (or use search_alg: random)")
    need(s.trial_seed in ("fixed", "sampled"), f"trial_seed must be fixed or sampled, got '{s.trial_seed}'")
    need(s.trial_seed == "fixed" or "run.seed" not in s.search, "trial_seed sampled draws run.seed; "
         "do not search run.seed as well")
    need(s.metric in REPORTED, f"metric '{s.metric}' is never reported by a trial; reported: {', '.join(REPORTED)}")
    need(s.mode in ("max", "min"), f"mode must be max or min, got '{s.mode}'")
    need(s.scheduler in ("asha", "fifo"), f"scheduler must be asha or fifo, got '{s.scheduler}'")
    need(s.grace_period >= 1, f"scheduler grace_period must be at least 1 meta-step, got {s.grace_period}")
    need(s.reduction_factor > 1, f"scheduler reduction_factor must be above 1, got {s.reduction_factor}")
    need(s.cpu > 0 and s.gpu >= 0, f"resources need cpu > 0 and gpu >= 0, got cpu {s.cpu}, gpu {s.gpu}")
    need(s.workers >= 1, f"resources workers must be at least 1, got {s.workers}")
    need(s.max_concurrent >= 0, f"max_concurrent must be >= 0 (0: as many as fit), got {s.max_concurrent}")
    for key, (kind, args) in s.search.items():  # each value alone (ranges: both bounds), for a clear message
        for value in args:  # choice/grid: every value; uniform/loguniform/randint: both bounds
            try:
                s.base.override({key: value})
            except ConfigError as e:
                raise SweepError(f"search space '{key}': {kind} value {value!r} is invalid: {e}") from None
    configs = [trial_config(s, values) for values in _checked_samples(s)]
    longest = max(c.run.meta_steps for c in configs)
    if s.max_t == 0:
        s = replace(s, max_t=longest)
    need(s.grace_period <= s.max_t, f"scheduler grace_period {s.grace_period} exceeds max_t {s.max_t}")
    for cfg in configs:
        need(cfg.eval.every > 0, f"eval.every is 0: trials would never meta-validate, so nothing would "
                                 f"report '{s.metric}' to rank them on")
    return s


def _checked_samples(s: Sweep) -> list[dict[str, Any]]:
    out = []
    for values in sample_configs(s):
        try:
            trial_config(s, values)
        except ConfigError as e:
            raise SweepError(f"search space: the trial configuration {values} is invalid: {e}") from None
        out.append(values)
    return out


def param_space(s: Sweep) -> dict[str, Any]:
    """The search space as Ray Tune distributions (``run.seed`` too where ``trial_seed`` is sampled)."""
    from ray import tune

    make = {"uniform": tune.uniform, "loguniform": tune.loguniform, "choice": lambda *a: tune.choice(list(a)),
            "grid": lambda *a: tune.grid_search(list(a)), "randint": lambda lo, hi: tune.randint(lo, hi + 1)}
    space = {key: make[kind](*args) for key, (kind, args) in s.search.items()}
    if s.trial_seed == "sampled":
        space["run.seed"] = tune.randint(0, 2**31 - 1)
    return space


def searcher(s: Sweep, max_concurrent: int = 0):
    """Tune's random/grid searcher, seeded with the sweep's ``seed``, running at most ``max_concurrent`` trials
    at a time (0: no cap). The cap is the searcher's own: Tune applies ``TuneConfig(max_concurrent_trials=...)``
    only to a ``Searcher`` (as a ``ConcurrencyLimiter``) and ignores it, with a warning, for this
    ``SearchAlgorithm``, the one Tune searcher that takes a seed."""
    from ray.tune.search.basic_variant import BasicVariantGenerator
    return BasicVariantGenerator(random_state=s.seed, max_concurrent=max_concurrent)


def sample_configs(s: Sweep) -> list[dict[str, Any]]:
    """The searched values of every trial, in trial order, exactly as the sweep's searcher draws them."""
    gen = searcher(s)
    gen.add_configurations({"preview": {"run": lambda config: None, "config": param_space(s),
                                        "num_samples": s.num_samples}})
    out = []
    while (trial := gen.next_trial()) is not None:
        out.append(dict(trial.config))
    return out


def trial_config(s: Sweep, values: dict[str, Any]) -> Config:
    """The full resolved config of a trial (what ``best_config.yaml`` holds for the best one)."""
    return s.base.override({k: v for k, v in values.items() if k in s.search or k == "run.seed"})


def exec_config(s: Sweep, cfg: Config) -> Config:
    """How a trial runs ``cfg``: a checkpoint at every meta-validation, threads = its CPUs. Neither changes
    the numbers, only when state is saved and how many cores compute them."""
    return cfg.override({"run.checkpoint_every": cfg.eval.every,
                         "run.threads": cfg.run.threads or max(1, int(s.cpu))})


def check_data(s: Sweep) -> None:
    """Every data setting the trials use loads and holds enough classes for their tasks (before any trial)."""
    seen: dict[tuple, Any] = {}
    for values in sample_configs(s):
        d = trial_config(s, values).data
        key = (d.dataset, d.root, d.image_size, d.split, d.split_fractions, d.synthetic_classes,
               d.synthetic_per_class)
        if key not in seen:
            seen[key] = load_splits(d)
        check_tasks(d, seen[key])


# ------------------------------------------------------------------------------------------------ results
@dataclass
class TrialRecord:
    """One trial as ``trials.csv`` shows it, plus its reported history."""

    trial_id: str
    index: int
    status: str
    values: dict[str, Any]
    seed: int
    meta_steps: int
    best: float
    best_step: int
    last: float
    wall_seconds: float
    stopped_early: bool
    error: str
    history: list[dict[str, Any]]
    checkpoints: list[tuple[dict[str, Any], Path]]


def write_trials_csv(s: Sweep, trials: Sequence[TrialRecord], path: Path) -> None:
    m = s.metric
    columns = ["trial_id", "trial", *s.search, "seed", f"best_{m}", f"best_{m}_step", f"last_{m}", "meta_steps",
               "stopped_early", "wall_seconds", "status", "error"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for t in trials:
            w.writerow([t.trial_id, t.index, *(_cell(t.values[k]) for k in s.search), t.seed,
                        _cell(t.best), t.best_step, _cell(t.last), t.meta_steps, t.stopped_early,
                        round(t.wall_seconds, 2), t.status, t.error])


def _cell(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return ""
    return yaml.safe_dump(list(v), default_flow_style=True).strip() if isinstance(v, (list, tuple)) else v

