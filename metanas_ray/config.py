"""One frozen config for a MetaNAS run, filled from YAML and ``--set key=value`` overrides.

Sections mirror the paper's pieces: ``data`` (the N-way k-shot tasks), ``model`` (the DARTS supernet),
``task`` (the task-learner Φ^k: λ_task, ξ_task, τ_α/τ_β annealing), ``meta`` (the meta-learner: REPTILE or
first-order MAML), ``eval`` (meta-validation and Algorithm 3) and ``run`` / ``scale`` (seed, steps, workers).

Keys are addressed with dots everywhere (YAML nesting, ``--set task.lr_w=0.1``, Tune search spaces).
Unknown keys and out-of-range values raise :class:`ConfigError` with the offending key in the message.
:func:`describe` prints every key with its default and the comment beside it here (``--print-config``).

Past 400 lines because every key lives here once: its type, default and meaning (the dataclasses), the
range checks that name it (:func:`validate`) and what ``--resume`` may change (:data:`RESUMABLE`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "omniglot"  # omniglot | miniimagenet | folder | synthetic
    root: str = "data/omniglot"  # --data-root; for omniglot: zips or unpacked folders
    download: bool = True  # omniglot only: fetch the official zips when absent
    n_way: int = 20  # N classes per task
    k_shot: int = 1  # k training images per class (the task's D_train)
    train_shots: int = 0  # k of the meta-training tasks (0: k_shot); MetaNAS and REPTILE meta-train on more shots
    n_query: int = 5  # q query images per class (the task's D_test)
    image_size: int = 28  # images are resized once to image_size × image_size
    split: str = "alphabets"  # omniglot only: alphabets (ours, by whole alphabets) | vinyals (1028/172/423 characters)
    split_fractions: tuple[float, ...] = (0.64, 0.16, 0.20)  # folder only, a flat <root>/<class>/ folder: the
    # fractions of its classes for meta-train / val / test (default miniImageNet's 64/16/20), dealt by class name
    synthetic_classes: int = 40  # synthetic only: classes per split (train/val/test)
    synthetic_per_class: int = 12  # synthetic only: images per class


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "supernet"  # supernet (MetaNAS) | genotype (the found network, fixed) | conv4 (the MAML/REPTILE baseline)
    genotype: str = ""  # genotype only: a run's genotype.json, or a shipped name (metanas_og_v2, metanas_in_v2, ...)
    init_channels: int = 28  # C of the first cell
    layers: int = 4  # number of cells
    nodes: int = 3  # intermediate nodes per cell
    reduction_layers: tuple[int, ...] = (1, 3)  # cell indices that halve the resolution
    stem_multiplier: int = 3
    channel_scale: int = 1  # channels are multiplied by this at each reduction (DARTS: 2; MetaNAS Omniglot: 1)
    ops: tuple[str, ...] = (
        "max_pool_3x3", "avg_pool_3x3", "skip_connect", "conv_1x5_5x1",
        "conv_3x3", "sep_conv_3x3", "dil_conv_3x3",
    )
    conv4_channels: int = 64  # conv4 only: filters per layer
    input_weights: str = "per_input"  # per_input: β weighs each input of a node | pairwise: each pair (official)
    prune_threshold: float = 0.0  # soft-pruning: terms at or below this weight are skipped in the forward pass
    prune_rule: str = "product"  # product: on softmax(β)·softmax(α) | separate: on each factor alone (official)
    channels_last: bool = True  # NHWC memory format for the convolutions (faster on CPU)


@dataclass(frozen=True)
class TaskLearnerConfig:
    """The task-learner Φ^k: k first-order DARTS steps per task."""

    steps: int = 5  # k, inner steps during meta-training
    optimizer: str = "sgd"  # sgd (the paper's equation) | adam (β1 = 0, as the official code and REPTILE)
    adam_moments: str = "reset"  # adam only: reset (zero for every task) | kept (carried over tasks, official)
    batch_size: int = 0  # images per inner step (0: all of D_train every step)
    batch_sampling: str = "cycle"  # cycle: class-balanced through D_train | random: drawn with replacement (official)
    lr_w: float = 0.1  # λ_task, SGD learning rate of the weights w
    lr_alpha: float = 0.1  # ξ_task, SGD learning rate of α and β
    tau_alpha_start: float = 1.0  # τ_α at the first inner step
    tau_alpha_end: float = 0.1  # τ_α at the last inner step (soft-pruning: towards 0)
    tau_beta_start: float = 1.0  # τ_β at the first inner step
    tau_beta_end: float = 0.1  # τ_β at the last inner step
    tau_schedule: str = "exponential"  # exponential | linear | constant (stays at the start values)
    warmup_tau: str = "anneal"  # during meta.warmup_steps: anneal τ as after it | hold it at the start (official)
    grad_clip: float = 5.0  # clip the norm of each inner gradient (0: off)
    alpha_weight_decay: float = 0.0  # L2 term on α, β added to their gradient (official: 1e-3)
    weight_decay: float = 0.0  # L2 term on w added to its gradient (official upscaled models: 1e-4)
    drop_path: float = 0.0  # drop-path probability of each operation in meta-training tasks (official: 0.2)
    bf16: bool = False  # autocast the task-learner's forward/backward to bfloat16 (w, α and updates stay float32)
    batched: bool = False  # adapt a worker's meta-training tasks together, vmapped over tasks (batched.py)
    cuda_graph: bool = False  # GPU: each inner step a CUDA-graph replay, no host sync (graphed.py); off: unchecked


@dataclass(frozen=True)
class MetaConfig:
    """The meta-learner: moves w_meta, α_meta towards the adapted (w*, α*)."""

    algorithm: str = "reptile"  # reptile | fomaml
    optimizer: str = "sgd"  # sgd | adam, on the meta-update direction
    meta_batch: int = 5  # tasks per meta-step
    lr_w: float = 1.0  # meta learning rate of w (REPTILE's ε_w)
    lr_alpha: float = 0.6  # meta learning rate of α, β
    anneal: str = "linear"  # linear | constant: meta learning rates decay linearly to 0 over the run
    warmup_steps: int = 0  # meta-steps during which only w is meta-learned (α, β stay fixed)
    prune_every: int = 0  # every this many meta-steps, α_meta logits whose softmax(α/τ_end) < prune_threshold
    prune_threshold: float = 0.01  # are set to -1e9, so those operations are never run again (official; 0: never)


@dataclass(frozen=True)
class EvalConfig:
    """Meta-validation during training and meta-testing (Algorithm 3) at the end."""

    every: int = 50  # meta-validate every this many meta-steps (0: never)
    val_tasks: int = 20  # tasks per meta-validation
    test_tasks: int = 200  # tasks for the final meta-test
    steps: int = 10  # inner steps when adapting to a meta-val / meta-test task
    arch_steps: int = -1  # of those, the first arch_steps adapt α, β and anneal τ; then w alone (-1: all)
    batch_size: int = 0  # images per adaptation step, sampled as task.batch_sampling (0: task.batch_size)
    tau_end: float = 0.0  # final τ_α and τ_β when adapting (0: task.tau_alpha_end / task.tau_beta_end)
    prune_threshold: float = -1.0  # soft-pruning threshold at meta-test (-1: model.prune_threshold)
    warmup_arch: str = "adapt"  # meta-validation during meta.warmup_steps: adapt α | keep it frozen (official)


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    meta_steps: int = 1000
    log_every: int = 10  # a metrics.csv row and a progress line every this many meta-steps
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    threads: int = 0  # torch threads per worker (0: cores / workers)
    keep_freed_memory_mb: int = 1024  # freed memory a worker's malloc keeps for reuse (glibc; 0: its default)
    tensorboard: bool = True  # TensorBoard events in the run directory's tb/ (tensorboard --logdir runs/)
    mlflow: str = ""  # --mlflow: an MLflow tracking URI (file:DIR, sqlite:///F.db, http://HOST:5000; "": off)


@dataclass(frozen=True)
class ScaleConfig:
    """Where the meta-training loop runs (Ray Train)."""

    num_workers: int = 0  # CPU workers (0: a sensible default for the machine)
    num_gpus: int = 0  # GPUs; with workers_per_gpu 1 (the default) one worker each
    workers_per_gpu: int = 1  # workers sharing each GPU, 1/N of it each (gloo then: NCCL takes one rank per GPU)
    address: str = ""  # a Ray cluster to join ("": RAY_ADDRESS or a local Ray on 127.0.0.1)
    max_failures: int = 3  # restarts from the last checkpoint when a worker dies


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskLearnerConfig = field(default_factory=TaskLearnerConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

    def override(self, updates: dict[str, Any]) -> "Config":
        """A copy with dotted-key updates applied (``{"task.lr_w": 0.1}``)."""
        return from_dict(_merge(self.to_dict(), _nest(updates)))


def plain(obj: Any) -> Any:
    """Tuples to lists, recursively: what YAML and JSON writers take."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}': '{p}' is a value, not a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], updates: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = dict(base)
    for key, value in updates.items():
        if key not in out:
            raise ConfigError(f"unknown config key '{prefix}{key}'; known: {', '.join(sorted(base))}")
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{prefix}{key}' is a section; set its keys, e.g. '{prefix}{key}.<name>'")
            out[key] = _merge(out[key], value, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check/convert a YAML or command-line value to the field's declared type."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return int(as_float)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    if getattr(typ, "__origin__", None) is tuple:
        (item_typ, _) = typ.__args__
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return tuple(_coerce(key, v, item_typ) for v in value)
    raise ConfigError(f"config key '{key}': unsupported type {typ}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a mapping, got {values!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; known keys of "
            f"'{prefix.rstrip('.') or 'config'}': {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        typ = hints[f.name]
        if is_dataclass(typ):
            kwargs[f.name] = _build(typ, values[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(prefix + f.name, values[f.name], typ)
    return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a Config from a (possibly partial) nested dict."""
    return _build(Config, values or {}, "")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["task.lr_w=0.1", "data.n_way=5"]`` → ``{"task.lr_w": 0.1, "data.n_way": 5}`` (values parsed as YAML)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key written twice in one mapping is an error (YAML would keep the last silently:
    a second ``run:`` section would reset every key of the first to its default)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (lines {seen[key].start_mark.line + 1} and "
                    f"{key_node.start_mark.line + 1}); merge the two", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path, what: str, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """The mapping a YAML file holds; ``error`` (naming ``what`` and the file) when it is missing or malformed,
    or when a key appears twice in one mapping."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise error(f"{what} {path} must hold a mapping, got {type(values).__name__}")
    return values


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML run config (``None``: the defaults) and apply dotted overrides."""
    values = read_yaml_mapping(path, "config file") if path is not None else {}
    values = _merge(Config().to_dict(), values)
    if overrides:
        values = _merge(values, _nest(overrides))
    return from_dict(values)


def dumps(cfg: Config) -> str:
    """The YAML text of ``cfg``, as ``save`` writes it."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dumps(cfg))


# What ``--resume`` may change: how fast the rest of the run learns, how long it runs (``run.meta_steps``, never
# below the meta-steps done), what it logs and keeps, how it evaluates, where the data is and where it runs.
# Everything else shapes what has been learnt so far (the data, the tasks, the network, the algorithm).
RESUMABLE = ("task.lr_w", "task.lr_alpha", "meta.lr_w", "meta.lr_alpha", "run.meta_steps", "run.log_every",
             "run.checkpoint_every", "run.keep_checkpoints", "run.threads", "run.keep_freed_memory_mb",
             "run.tensorboard", "run.mlflow", "eval.*", "data.root", "data.download", "scale.*")


def resumable(key: str) -> bool:
    """Whether ``--resume`` may change ``key`` (see :data:`RESUMABLE`)."""
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE)


def flat_keys(cfg: Config | None = None) -> dict[str, Any]:
    """All dotted keys with their values, e.g. ``{"task.lr_w": 0.1, ...}``."""
    def walk(d: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(walk(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out
    return walk((cfg or Config()).to_dict(), "")


def _comments() -> dict[str, str]:
    """The comment after each field in this file's dataclasses: ``{"data.n_way": "N classes per task", ...}``."""
    import inspect
    out: dict[str, str] = {}
    for section, cls in (("data", DataConfig), ("model", ModelConfig), ("task", TaskLearnerConfig),
                         ("meta", MetaConfig), ("eval", EvalConfig), ("run", RunConfig), ("scale", ScaleConfig)):
        lines = inspect.getsource(cls).splitlines()
        names = {f.name for f in fields(cls)}
        for i, line in enumerate(lines):
            name = line.strip().split(":", 1)[0]
            if name in names and "#" in line:
                text = line.split("#", 1)[1].strip()
                # a comment continued on the following comment-only lines
                for more in lines[i + 1:]:
                    if more.strip().startswith("#") and not more.strip().split(":", 1)[0] in names:
                        text += " " + more.strip().lstrip("#").strip()
                    else:
                        break
                out[f"{section}.{name}"] = text
    return out


def describe(cfg: Config) -> str:
    """Every key of ``cfg`` as YAML, with its default where it differs and what it means (``--print-config``)."""
    defaults, comments = flat_keys(), _comments()
    lines, section = [], ""
    for key, value in flat_keys(cfg).items():
        s, name = key.split(".", 1)
        if s != section:
            lines.append(f"{s}:")
            section = s
        text = yaml.safe_dump({name: value}, default_flow_style=True, width=10_000).strip()[1:-1]
        note = comments.get(key, "")
        if value != defaults[key]:
            note = f"(default: {defaults[key]!r}) {note}".strip()
        lines.append(f"  {text}" + (f"  # {note}" if note else ""))
    return "\n".join(lines) + "\n"


_DATASETS = ("omniglot", "miniimagenet", "folder", "synthetic")
_OPS_KNOWN = (
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "conv_1x5_5x1",
    "conv_3x3", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
)


def validate(cfg: Config) -> None:
    """Range checks that need no data; dataset-dependent checks (N-way vs classes) live in the data module."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' {msg}")

    d, m, t, me, e, r, s = cfg.data, cfg.model, cfg.task, cfg.meta, cfg.eval, cfg.run, cfg.scale
    need(d.dataset in _DATASETS, "data.dataset", f"must be one of {_DATASETS}, got '{d.dataset}'")
    need(d.n_way >= 2, "data.n_way", f"must be at least 2, got {d.n_way}")
    need(d.k_shot >= 1, "data.k_shot", f"must be at least 1, got {d.k_shot}")
    need(d.train_shots >= 0, "data.train_shots", f"must be >= 0 (0: data.k_shot), got {d.train_shots}")
    need(d.n_query >= 1, "data.n_query", f"must be at least 1, got {d.n_query}")
    need(8 <= d.image_size <= 512, "data.image_size", f"must be in 8..512, got {d.image_size}")
    need(d.split in ("alphabets", "vinyals"), "data.split", f"must be 'alphabets' or 'vinyals', got '{d.split}'")
    need(d.split == "alphabets" or d.dataset == "omniglot", "data.split",
         f"'{d.split}' is an Omniglot split; data.dataset is '{d.dataset}'")
    fractions = list(d.split_fractions)
    need(len(fractions) == 3 and all(math.isfinite(f) and f > 0 for f in fractions), "data.split_fractions",
         f"must be 3 positive fractions (meta-train, meta-val, meta-test), got {fractions}")
    need(abs(sum(fractions) - 1) <= 1e-3, "data.split_fractions",
         f"must sum to 1, got {fractions} (sum {sum(fractions):g})")
    need(d.dataset == "folder" or d.split_fractions == DataConfig.split_fractions, "data.split_fractions",
         f"is read by data.dataset: folder only; data.dataset is '{d.dataset}'")
    need(d.synthetic_classes >= 2, "data.synthetic_classes", "must be at least 2")
    need(d.synthetic_per_class >= 2, "data.synthetic_per_class", "must be at least 2")
    need(m.kind in ("supernet", "genotype", "conv4"), "model.kind",
         f"must be 'supernet', 'genotype' or 'conv4', got '{m.kind}'")
    need(m.kind != "genotype" or bool(m.genotype), "model.genotype",
         "is needed by model.kind: genotype (a run's genotype.json, or a shipped name such as metanas_og_v2)")
    need(m.kind == "genotype" or not m.genotype, "model.genotype",
         f"is only read by model.kind: genotype (model.kind is '{m.kind}')")
    if m.kind == "genotype":
        from .genotype_net import load_genotype
        load_genotype(m.genotype)  # a missing or unreadable genotype is an error here, before any work
    need(m.kind != "conv4" or d.image_size >= 16, "data.image_size",
         f"must be at least 16 for model.kind: conv4 (its 4 max-pools halve {d.image_size} pixels to nothing)")
    need(m.init_channels >= 1, "model.init_channels", "must be positive")
    need(m.layers >= 1, "model.layers", "must be positive")
    need(m.nodes >= 1, "model.nodes", "must be positive")
    need(all(0 <= i < m.layers for i in m.reduction_layers), "model.reduction_layers",
         f"must be cell indices in 0..{m.layers - 1}, got {list(m.reduction_layers)}")
    need(len(m.ops) >= 1 and len(set(m.ops)) == len(m.ops), "model.ops", "must be a non-empty list without repeats")
    for op in m.ops:
        need(op in _OPS_KNOWN, "model.ops", f"has unknown operation '{op}'; known: {', '.join(_OPS_KNOWN)}")
    need(m.channel_scale >= 1, "model.channel_scale", "must be positive")
    need(m.stem_multiplier >= 1, "model.stem_multiplier", "must be positive")
    need(m.conv4_channels >= 1, "model.conv4_channels", "must be positive")
    need(0.0 <= m.prune_threshold < 1.0, "model.prune_threshold", "must be in [0, 1)")
    need(m.input_weights in ("per_input", "pairwise"), "model.input_weights",
         f"must be 'per_input' or 'pairwise', got '{m.input_weights}'")
    need(m.prune_rule in ("product", "separate"), "model.prune_rule",
         f"must be 'product' or 'separate', got '{m.prune_rule}'")
    need(t.adam_moments in ("reset", "kept"), "task.adam_moments", f"must be 'reset' or 'kept', got '{t.adam_moments}'")
    need(t.adam_moments == "reset" or t.optimizer == "adam", "task.adam_moments",
         f"'kept' needs task.optimizer: adam (got '{t.optimizer}')")
    need(t.batch_sampling in ("cycle", "random"), "task.batch_sampling",
         f"must be 'cycle' or 'random', got '{t.batch_sampling}'")
    need(t.warmup_tau in ("anneal", "hold"), "task.warmup_tau", f"must be 'anneal' or 'hold', got '{t.warmup_tau}'")
    need(math.isfinite(t.alpha_weight_decay) and t.alpha_weight_decay >= 0, "task.alpha_weight_decay",
         f"must be a finite number >= 0, got {t.alpha_weight_decay}")
    need(0.0 <= t.drop_path < 1.0, "task.drop_path", f"must be in [0, 1), got {t.drop_path}")
    need(t.drop_path == 0 or m.kind != "conv4", "task.drop_path",
         f"drops the cells' operation paths; model.kind: {m.kind} has none (set task.drop_path: 0)")
    need(math.isfinite(t.weight_decay) and t.weight_decay >= 0, "task.weight_decay",
         f"must be a finite number >= 0, got {t.weight_decay}")
    need(not t.batched or (m.kind != "genotype" and not t.bf16), "task.batched",
         "supports model.kind supernet or conv4 without task.bf16 (see batched.py), got "
         f"model.kind: {m.kind}, task.bf16: {t.bf16}")
    need(me.prune_every >= 0, "meta.prune_every", f"must be >= 0 (0: never), got {me.prune_every}")
    need(0.0 <= me.prune_threshold < 1.0, "meta.prune_threshold", f"must be in [0, 1), got {me.prune_threshold}")
    need(e.arch_steps == -1 or 0 <= e.arch_steps <= e.steps, "eval.arch_steps",
         f"must be -1 (all) or in 0..eval.steps ({e.steps}), got {e.arch_steps}")
    need(math.isfinite(e.tau_end) and e.tau_end >= 0, "eval.tau_end",
         f"must be 0 (task.tau_*_end) or a positive number, got {e.tau_end}")
    need(e.tau_end <= min(t.tau_alpha_start, t.tau_beta_start), "eval.tau_end",
         f"must not exceed task.tau_alpha_start / task.tau_beta_start, got {e.tau_end}")
    need(e.prune_threshold == -1 or 0.0 <= e.prune_threshold < 1.0, "eval.prune_threshold",
         f"must be -1 (model.prune_threshold) or in [0, 1), got {e.prune_threshold}")
    need(e.warmup_arch in ("adapt", "frozen"), "eval.warmup_arch",
         f"must be 'adapt' or 'frozen', got '{e.warmup_arch}'")
    for key, v in (("task.lr_w", t.lr_w), ("task.lr_alpha", t.lr_alpha), ("meta.lr_w", me.lr_w),
                   ("meta.lr_alpha", me.lr_alpha), ("task.grad_clip", t.grad_clip)):
        need(math.isfinite(v) and v >= 0, key, f"must be a finite number >= 0, got {v}")
    for which in ("alpha", "beta"):
        start, end = getattr(t, f"tau_{which}_start"), getattr(t, f"tau_{which}_end")
        need(math.isfinite(start) and start > 0, f"task.tau_{which}_start", f"must be a positive number, got {start}")
        need(math.isfinite(end) and end > 0, f"task.tau_{which}_end", f"must be a positive number, got {end}")
        need(end <= start, f"task.tau_{which}_end", f"must not exceed task.tau_{which}_start ({end} > {start})")
    need(t.tau_schedule in ("exponential", "linear", "constant"), "task.tau_schedule",
         f"must be exponential, linear or constant, got '{t.tau_schedule}'")
    need(me.algorithm in ("reptile", "fomaml"), "meta.algorithm", f"must be 'reptile' or 'fomaml', got '{me.algorithm}'")
    need(t.optimizer in ("sgd", "adam"), "task.optimizer", f"must be 'sgd' or 'adam', got '{t.optimizer}'")
    need(me.optimizer in ("sgd", "adam"), "meta.optimizer", f"must be 'sgd' or 'adam', got '{me.optimizer}'")
    need(me.anneal in ("linear", "constant"), "meta.anneal", f"must be 'linear' or 'constant', got '{me.anneal}'")
    # whole numbers with a least value, and what that least value means where it is special
    for key, least, meaning in (
            ("task.steps", 1, ""), ("task.batch_size", 0, "0: all of D_train"), ("meta.meta_batch", 1, ""),
            ("meta.warmup_steps", 0, ""), ("eval.every", 0, "0: never"), ("eval.val_tasks", 1, ""),
            ("eval.test_tasks", 1, ""), ("eval.steps", 1, ""), ("eval.batch_size", 0, "0: all of D_train"),
            ("run.meta_steps", 1, ""), ("run.log_every", 1, ""), ("run.checkpoint_every", 1, ""),
            ("run.keep_checkpoints", 1, ""), ("run.threads", 0, "0: cores / workers"),
            ("run.keep_freed_memory_mb", 0, "0: malloc's default"), ("scale.num_workers", 0, "0: automatic"),
            ("scale.num_gpus", 0, ""), ("scale.workers_per_gpu", 1, ""), ("scale.max_failures", 0, "")):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        need(value >= least, key, f"must be at least {least}{f' ({meaning})' if meaning else ''}, got {value}")
    need(s.workers_per_gpu == 1 or s.num_gpus > 0, "scale.workers_per_gpu",
         f"is {s.workers_per_gpu} but scale.num_gpus is 0: it shares GPUs between workers")
