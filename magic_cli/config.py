"""Config: compose `conf/` with Hydra's compose API, validate it into typed dataclasses, and
fingerprint the slice of it that determines training.

Every error is a `ConfigError` whose one-line message names the key to change.
Model and dataset options are checked against the keyword arguments of the registered
builder (closed registries; nothing is imported by a dotted path from YAML).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from magic_cli.data import DATASETS
from magic_cli.errors import ConfigError
from magic_cli.models import MODELS
from magic_cli.models.hf import resolve_path
from magic_cli.names import (
    DEVICES,
    DTYPES,
    LAUNCHERS,
    LOSS_REDUCTIONS,
    METHODS,
    OPTIMIZERS,
    OUTPUTS,
    SCHEDULES,
    STRATEGIES,
)
from magic_cli.plugins import load_plugins, plugin_digest
from magic_cli.readers import expand_path, read_text
from magic_cli.storage import sha256_tree

CONF_PACKAGE = "magic_cli.conf"
# Keys whose values determine the training run (and so its checkpoints, outputs and scores).
# `checkpoint` is not one of them: every strategy gives bit-identical scores, and a run's
# stored states are enough to derive the checkpoints of any other strategy.
TRAINING_KEYS = ("seed", "dtype", "device", "threads", "dataset", "model", "optimizer", "train")
# Optional keys added after runs existed: left at null (or empty) they stay out of the fingerprint.
OPTIONAL_KEYS = (("train", "order_file"), ("optimizer", "no_decay"), ("dataset", "tokenizer"))
# Optimizer keys each optimizer reads (besides name, lr, weight_decay, schedule); others are refused.
OPTIMIZER_KEYS = {"adam": ("betas", "eps", "eps_root"), "sgd": ("momentum", "nesterov")}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(key: str, value: Any, choices: typing.Iterable[str]) -> None:
    choices = list(choices)
    _check(value in choices, f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule: a multiplier of `lr` that is a pure function of the step."""

    name: str = "constant"  # one of names.SCHEDULES
    warmup: float = 0.0  # fraction of the steps rising linearly from start_factor to 1
    start_factor: float = 0.0  # multiplier at step 0 (when warmup > 0)
    end_factor: float = 0.0  # multiplier at the last step (onecycle, cosine, warmup_linear)

    def __post_init__(self):
        _choice("optimizer.schedule.name", self.name, SCHEDULES)
        _check(0.0 <= self.warmup < 1.0, f"optimizer.schedule.warmup must be in [0, 1), got {self.warmup}")
        _check(self.start_factor >= 0, "optimizer.schedule.start_factor must be >= 0")
        _check(self.end_factor >= 0, "optimizer.schedule.end_factor must be >= 0")


@dataclass(frozen=True)
class OptimizerConfig:
    """A pure optimizer (magic_cli.core.optim): adam (with eps_root) or sgd."""

    name: str
    lr: float
    betas: tuple = (0.9, 0.999)  # adam
    eps: float = 1e-8  # adam
    eps_root: float = 0.0  # adam; > 0 for finite metagradients
    momentum: float = 0.0  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = 0.0  # adam: decoupled; sgd: L2 in the gradient
    no_decay: tuple = ()  # parameter-name glob patterns without weight decay (e.g. biases and norms)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self):
        _choice("optimizer.name", self.name, OPTIMIZERS)
        _check(self.lr > 0, f"optimizer.lr must be > 0, got {self.lr}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optimizer.betas must be two numbers in [0, 1), got {list(self.betas)}")
        _check(self.eps >= 0, "optimizer.eps must be >= 0")
        _check(self.eps_root >= 0, "optimizer.eps_root must be >= 0")
        _check(0 <= self.momentum < 1, f"optimizer.momentum must be in [0, 1), got {self.momentum}")
        _check(not self.nesterov or self.momentum > 0, "optimizer.nesterov needs optimizer.momentum > 0")
        _check(self.weight_decay >= 0, "optimizer.weight_decay must be >= 0")
        _check(all(isinstance(p, str) for p in self.no_decay),
               f"optimizer.no_decay must be a list of parameter-name patterns, got {list(self.no_decay)}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int  # passes over the training split
    batch_size: int  # nominal batch size B (the last partial batch of an epoch is dropped)
    loss_reduction: str = "mean"  # mean | sum | token_mean (train.make_grad_fn)
    data_weights: str | None = None  # path to a .npy (or a text file, one a line) of N weights; None = all ones
    order_file: str | None = None  # path to a .npy (T, B) of example ids per step; None = seeded epochs

    def __post_init__(self):
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _choice("train.loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        for key in ("data_weights", "order_file"):
            path = getattr(self, key)
            _check(path is None or Path(path).is_file(), f"train.{key}: no such file {path!r}")


BYTE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int | None:
    """'512MB' -> 512000000, '1.5GiB' -> 1610612736; None if it is not a size with a unit."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", text)
    if not match or match.group(2).upper() not in BYTE_UNITS:
        return None
    return int(float(match.group(1)) * BYTE_UNITS[match.group(2).upper()])


@dataclass(frozen=True)
class CheckpointConfig:
    name: str = "all"  # all | sqrt | replay | binomial (replay.py)
    k: int = 4  # replay branching factor
    # binomial: the most training states held at once in the reverse pass, as a count (16) or as
    # bytes with a unit ("2GB", "512MiB"): then as many whole states as fit (train.checkpoint_param)
    memory: int | str = 16

    def __post_init__(self):
        _choice("checkpoint.name", self.name, STRATEGIES)
        _check(self.k >= 2, f"checkpoint.k must be >= 2, got {self.k}")
        if isinstance(self.memory, str):
            _check(bool(self.memory_bytes), "checkpoint.memory must be a number of states or a size with a unit "
                                            f"(B, KB, MB, GB, KiB, MiB, GiB; e.g. 512MB), got {self.memory!r}")
        else:
            _check(isinstance(self.memory, int) and not isinstance(self.memory, bool) and self.memory >= 3,
                   f"checkpoint.memory must be >= 3 states, got {self.memory!r}")

    @property
    def memory_bytes(self) -> int | None:
        """checkpoint.memory as bytes when it was given as a size, else None."""
        return parse_bytes(self.memory) if isinstance(self.memory, str) else None

    @property
    def param(self) -> int:
        """The strategy's parameter: replay's k, binomial's memory in states (others have none).
        A memory in bytes needs the state's size: use train.checkpoint_param(config)."""
        if self.name == "binomial":
            if self.memory_bytes is not None:
                raise ValueError("checkpoint.memory is in bytes: resolve it with train.checkpoint_param")
            return self.memory
        return self.k


@dataclass(frozen=True)
class TrakConfig:
    proj_dim: int = 1024  # random projection dimension k
    damping: float = 1.0  # lambda relative to the mean diagonal of Phi^T Phi
    checkpoints: int = 1  # ensemble over the last K epoch states (1 = final model only)

    def __post_init__(self):
        _check(self.proj_dim >= 1, f"attribute.trak.proj_dim must be >= 1, got {self.proj_dim}")
        _check(self.damping >= 0, f"attribute.trak.damping must be >= 0, got {self.damping}")
        _check(self.checkpoints >= 1, f"attribute.trak.checkpoints must be >= 1, got {self.checkpoints}")


@dataclass(frozen=True)
class EkfacConfig:
    damping: float = 1e-3  # lambda added to the eigenvalues
    relative_damping: bool = False  # lambda = damping * mean eigenvalue of each layer

    def __post_init__(self):
        _check(self.damping >= 0, f"attribute.ekfac.damping must be >= 0, got {self.damping}")


@dataclass(frozen=True)
class TracinConfig:
    states: str = "end"  # the epoch states TracIn sums over: start (of each epoch) | end
    checkpoints: int = 0  # the last K epochs (0 = every epoch)
    lr_weighting: bool = True  # weigh each epoch by its mean learning rate (else optimizer.lr throughout)

    def __post_init__(self):
        _choice("attribute.tracin.states", self.states, ("start", "end"))
        _check(self.checkpoints >= 0, f"attribute.tracin.checkpoints must be >= 0, got {self.checkpoints}")


@dataclass(frozen=True)
class SourceConfig:
    segments: int = 6  # runs of training steps unrolled separately, each with its own curvature
    damping: float = 1e-4  # added to the EK-FAC eigenvalues of each segment
    relative_damping: bool = False  # damping is a multiple of each layer's mean eigenvalue (else absolute)

    def __post_init__(self):
        _check(self.segments >= 1, f"attribute.source.segments must be >= 1, got {self.segments}")
        _check(self.damping >= 0, f"attribute.source.damping must be >= 0, got {self.damping}")


# the methods with hyperparameters (magic tune)
TUNABLE = {"trak": TrakConfig, "ekfac": EkfacConfig, "tracin": TracinConfig, "source": SourceConfig}


@dataclass(frozen=True)
class TuneConfig:
    """`magic tune` (stages/tune.py): validation ids and the grid of each baseline."""

    n_val: int = 20  # validation test ids: a seeded draw, left out of every reported LDS
    seed: int = 0
    grid: dict = field(default_factory=dict)  # method -> {key: [values]}

    def __post_init__(self):
        _check(self.n_val >= 1, f"attribute.tune.n_val must be >= 1, got {self.n_val}")
        for method, grid in self.grid.items():
            _check(method in TUNABLE, f"attribute.tune.grid.{method}: only {', '.join(TUNABLE)} have hyperparameters")
            _check(isinstance(grid, dict), f"attribute.tune.grid.{method} must map keys to lists of values")
            keys = [f.name for f in dataclasses.fields(TUNABLE[method])]
            for key, values in grid.items():
                _check(key in keys, f"unknown key attribute.tune.grid.{method}.{key}; valid keys: {', '.join(keys)}")
                _check(isinstance(values, (list, tuple)) and len(values) > 0,
                       f"attribute.tune.grid.{method}.{key} must be a non-empty list of values")


@dataclass(frozen=True)
class AttributeConfig:
    method: str = "magic"
    output: str = "loss"  # loss | margin
    batch_size: int = 64  # test ids per reverse pass (with `memory`: the most)
    replay_groups: int = 0  # groups of batch_size ids sharing one replay of training (0: all asked)
    # a size ("4GB"): groups as large as fit (up to batch_size), measured on this model (memory.py)
    memory: str | None = None
    # magic: torch.compile the batched backward-over-backward (metagrad.CompiledVJP): true, false,
    # or auto (when training's FLOPs reach metagrad.AUTO_COMPILE_FLOPS)
    compile: bool | str = "auto"
    trak: TrakConfig = field(default_factory=TrakConfig)
    ekfac: EkfacConfig = field(default_factory=EkfacConfig)
    tracin: TracinConfig = field(default_factory=TracinConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self):
        _choice("attribute.method", self.method, METHODS)
        _choice("attribute.output", self.output, OUTPUTS)
        _check(self.batch_size >= 1, f"attribute.batch_size must be >= 1, got {self.batch_size}")
        _check(self.memory is None or bool(parse_bytes(self.memory)),
               "attribute.memory must be a size with a unit (B, KB, MB, GB, KiB, MiB, GiB; e.g. 4GB), "
               f"got {self.memory!r}")
        _check(self.replay_groups >= 0, f"attribute.replay_groups must be >= 0, got {self.replay_groups}")
        _check(isinstance(self.compile, bool) or self.compile == "auto",
               f"attribute.compile must be true, false or auto, got {self.compile!r}")

    @property
    def memory_bytes(self) -> int | None:
        """attribute.memory in bytes (None: no budget)."""
        return parse_bytes(self.memory) if self.memory is not None else None


@dataclass(frozen=True)
class GroundTruthConfig:
    drop_fractions: tuple = (0.01, 0.05, 0.1, 0.2)
    num_subsets: int = 100
    seed: int = 0
    batch: int = 1  # retrainings run at once in one process (torch.func.vmap over their data weights)
    groups: str | None = None  # drop whole groups: "label", a table column, or a file (stages/groups.py)

    def __post_init__(self):
        _check(len(self.drop_fractions) > 0, "ground_truth.drop_fractions must not be empty")
        for p in self.drop_fractions:
            _check(0 < p < 1, f"ground_truth.drop_fractions: {p} is not in (0, 1)")
        _check(self.num_subsets >= 2, f"ground_truth.num_subsets must be >= 2, got {self.num_subsets}")
        _check(self.batch >= 1, f"ground_truth.batch must be >= 1, got {self.batch}")
        _check(self.groups is None or (isinstance(self.groups, str) and self.groups.strip() != ""),
               f"ground_truth.groups must be label, a column name or a file, got {self.groups!r}")


@dataclass(frozen=True)
class SmoothnessConfig:
    """`magic smoothness` (smoothness.py); never part of the training fingerprint."""

    h: float = 0.5  # step along each direction: trainings at w + h v and w + 2h v
    directions: int = 4  # seeded random directions v
    seed: int = 0  # seed of the directions (independent of the training seed)
    drop_fraction: float = 0.01  # v = minus the indicator of this fraction of the training examples

    def __post_init__(self):
        _check(0 < self.h <= 0.5, f"smoothness.h must be in (0, 0.5] (w + 2h v keeps weights >= 0), got {self.h}")
        _check(self.directions >= 1, f"smoothness.directions must be >= 1, got {self.directions}")
        _check(self.seed >= 0, f"smoothness.seed must be >= 0, got {self.seed}")
        _check(0 < self.drop_fraction < 1, f"smoothness.drop_fraction must be in (0, 1), got {self.drop_fraction}")


@dataclass(frozen=True)
class LauncherConfig:
    """Where retrainings and reverse passes run (launcher.py); never part of any fingerprint."""

    name: str = "local"  # local: processes on this machine (--workers) | slurm: a job array through submitit
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_min: int = 60  # time limit of one array task, minutes
    cpus_per_task: int = 1
    gpus_per_task: int = 0
    mem_gb: float = 4.0
    array_parallelism: int = 64  # array tasks running at once
    blocks_per_task: int = 1  # ground truth: blocks of ground_truth.batch subsets per array task
    setup: tuple = ()  # shell lines each task runs first (module load ..., source venv/bin/activate)
    sbatch: dict = field(default_factory=dict)  # extra sbatch options, e.g. {constraint: a100}
    max_retries: int = 2  # resubmissions of a failed, cancelled, timed-out or preempted task
    poll_s: float = 2.0  # seconds between looks at the cluster and the run directory
    folder: str = "slurm"  # submitit's job files and logs (<folder>/<run name>/<stage>); shared by the nodes

    def __post_init__(self):
        _choice("launcher.name", self.name, LAUNCHERS)
        for key in ("time_min", "cpus_per_task", "array_parallelism", "blocks_per_task"):
            _check(getattr(self, key) >= 1, f"launcher.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("gpus_per_task", "max_retries"):
            _check(getattr(self, key) >= 0, f"launcher.{key} must be >= 0, got {getattr(self, key)}")
        _check(self.mem_gb > 0 and self.poll_s > 0, "launcher.mem_gb and launcher.poll_s must be > 0")
        _check(isinstance(self.sbatch, dict), f"launcher.sbatch must be a mapping, got {self.sbatch!r}")
        _check(all(isinstance(line, str) for line in self.setup), "launcher.setup must be a list of shell lines")


@dataclass(frozen=True)
class Config:
    """The validated config of one run. `raw` is the resolved YAML tree as plain dicts."""

    seed: int
    dtype: str
    device: str
    threads: int
    name: str
    out_dir: str
    dataset: dict  # {"name": ..., **builder options}; validated against the dataset registry
    model: dict  # {"name": ..., **builder options}; validated against the model registry
    optimizer: OptimizerConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    attribute: AttributeConfig
    ground_truth: GroundTruthConfig
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    smoothness: SmoothnessConfig = field(default_factory=SmoothnessConfig)
    plugins: tuple = ()  # user plugins (.py files or module names) that register models and datasets
    raw: dict = field(repr=False, compare=False, default_factory=dict)
    overrides: tuple = field(repr=False, compare=False, default=())  # as given to compose (train records them)

    def __post_init__(self):
        _check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _check(self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        _check(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.name or "") is not None and ".." not in self.name,
               f"name must be a word of letters, digits, _ . - (it names the run folder), got {self.name!r}")
        _check(isinstance(self.out_dir, str) and self.out_dir.strip() not in ("", "."),
               f"out_dir must name a run folder, got {self.out_dir!r} (an empty value would mean the current "
               "directory)")
        _check_registry_options("dataset", self.dataset, DATASETS)
        _check_registry_options("model", self.model, MODELS)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir)

    def training_slice(self) -> dict:
        """The part of the config that determines training, with every file it reads replaced by
        the file's content hash (a folder: its files' names and contents)."""
        import copy

        sl = copy.deepcopy({k: self.raw[k] for k in TRAINING_KEYS})
        for group, key in OPTIONAL_KEYS:  # left at null/empty: the fingerprint of runs from before the key
            if sl[group].get(key, "absent") in (None, [], ()):
                del sl[group][key]
        files = [("train", "data_weights", None), ("train", "order_file", None), ("model", "init_from", None)]
        files += [("dataset", key, None) for key in ("path", "train_path", "test_path")]
        files.append(("dataset", "tokenizer", False))
        if self.model.get("name") == "hf_causal_lm":
            files.append(("model", "path", True))
        for group, key, hub_weights in files:
            value = sl[group].get(key)
            if value is None:
                continue
            if hub_weights is not None:  # may be a Hugging Face hub name: the snapshot it resolves to

                value = str(resolve_path(value, weights=hub_weights))
            sl[group][key] = _content_hash(value, f"{group}.{key}")
        if self.plugins:  # the plugins' sources, so a changed plugin refuses runs trained with the old one

            sl["plugins"] = {spec: f"sha256:{plugin_digest(spec)}" for spec in self.plugins}
        return sl

    def fingerprint(self) -> str:
        return fingerprint_of(self.training_slice())


def _content_hash(path: str, key: str) -> str:
    """sha256 of a file, or of a folder's files (names and contents), for the fingerprint."""
    try:
        if Path(path).is_dir():
            return "sha256:" + sha256_tree(path)
        return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        raise ConfigError(f"{key}: no such file {path!r}") from None
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None


def fingerprint_of(training_slice: dict) -> str:
    text = json.dumps(training_slice, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, as 'key: a -> b'."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        key = f"{prefix}{k}"
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key}: {va} -> {vb}")
    return out


def _check_registry_options(group: str, options: dict, registry: dict) -> None:
    import inspect

    _check(isinstance(options, dict), f"{group} must be a mapping with a name")
    name = options.get("name")
    _choice(f"{group}.name", name, registry)
    params = inspect.signature(registry[name]).parameters
    valid = [p for p, spec in params.items() if spec.kind == spec.KEYWORD_ONLY]
    for key in options:
        if key != "name":
            _check(key in valid, f"unknown key {group}.{key} for {group}={name}; valid keys: "
                   f"{', '.join(valid) or '(none)'}")


def _build(cls, data: Any, prefix: str):
    """Build dataclass `cls` from a plain dict, refusing unknown keys by their dotted name."""
    _check(isinstance(data, dict), f"{prefix} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("raw", "overrides")]
    kwargs = {}
    for key, value in data.items():
        _check(key in names, f"unknown key {prefix}{key}; valid keys: {', '.join(prefix + n for n in names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, f"{prefix}{key}.")
        elif hint is tuple and isinstance(value, list):
            value = tuple(value)
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if hint in (int, float, bool, str) and not isinstance(value, hint) or (
                hint is int and isinstance(value, bool)):
            raise ConfigError(f"{prefix}{key} must be {hint.__name__}, got {value!r}")
        if hint is float and not math.isfinite(value):  # lr=inf trains to NaN, eps=nan poisons everything
            raise ConfigError(f"{prefix}{key} must be a finite number, got {value!r}")
        kwargs[key] = value
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.name not in ("raw", "overrides")
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    _check(not missing, f"missing key {prefix}{missing[0] if missing else ''}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a wrongly typed value reaching a comparison in __post_init__
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def conf_dir() -> Path:
    """The packaged `conf/` folder (shipped inside the wheel as package data)."""
    import importlib.resources

    return Path(str(importlib.resources.files(CONF_PACKAGE)))


# Path values (dotted keys; `plugins` is a list of them): `~` is expanded in each, here and only here.
PATH_KEYS = ("out_dir", "plugins", "dataset.path", "dataset.train_path", "dataset.test_path", "dataset.tokenizer",
             "dataset.cache_dir", "model.path", "model.init_from", "train.data_weights", "train.order_file",
             "launcher.folder", "ground_truth.groups")
# Groups whose keys come from the chosen builder's signature (the model's or dataset's own options),
# not from the group's YAML: an override may set any of them (checked against the builder later).
OPEN_GROUPS = ("model", "dataset")


def prepare_overrides(overrides) -> list[str]:
    """The user's overrides as Hydra should read them: `~` expanded at the start of a value (or of
    a list element) as a shell would; a key of an open group added if the YAML lacks it (`++`),
    so that `model.init_from=...` works for every module model; Hydra's own settings refused."""
    out = []
    for override in overrides:
        key, eq, value = str(override).partition("=")
        bare = key.lstrip("+~")
        if bare == "hydra" or bare.startswith("hydra."):
            raise ConfigError(f"{bare}: magic does not use Hydra's own settings (hydra.*); out_dir is where magic "
                              "writes (e.g. out_dir=runs/mine)")
        if eq:
            value = re.sub(r"(^|[\[,]\s*)~(?=/|$|[,\]])", lambda m: m.group(1) + expand_path("~"), value)
            if key == bare and "." in bare and bare.split(".")[0] in OPEN_GROUPS:
                key = "++" + bare
        out.append(key + eq + value)
    return out


def expand_paths(raw: dict) -> dict:
    """A config tree with `~` expanded in every path value (PATH_KEYS)."""
    import copy

    raw = copy.deepcopy(raw)
    for dotted in PATH_KEYS:
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or node.get(leaf) is None:
            continue
        value = node[leaf]
        node[leaf] = [expand_path(v) for v in value] if isinstance(value, list) else expand_path(value)
    return raw


def compose(overrides: list[str] | tuple = (), config_dir: str | None = None, explain: bool = True):
    """Compose conf/ (+ a user's config folder) with Hydra overrides; returns a DictConfig.

    A user's folder is searched first: its files replace packaged files of the same name and
    add new ones. Hydra's own `hydra.searchpath` puts extra folders after the primary one (and
    cannot hold the primary config), so the two folders are overlaid into a temporary folder
    of links instead, user files winning.
    """
    import tempfile

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    overrides = prepare_overrides(overrides)
    with tempfile.TemporaryDirectory(prefix="magic-conf-") as tmp:
        origin = _overlay(Path(tmp), conf_dir(), Path(config_dir) if config_dir is not None else None)
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=tmp, version_base="1.3"):
                return hydra_compose(config_name="config", overrides=overrides)
        except YAMLError as e:
            raise ConfigError(_one_line_yaml_error(e, Path(tmp), origin)) from None
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            raise ConfigError(_one_line_hydra_error(e, overrides) if explain else " ".join(str(e).split())) from None
        finally:
            GlobalHydra.instance().clear()


def _overlay(target: Path, packaged: Path, user: Path | None) -> dict:
    """Link every YAML of `packaged`, then of `user` (replacing), into target; {rel path: source}."""
    origin = {}
    if user is not None:
        _check(user.is_dir(), f"--config-dir: no such folder {str(user)!r}")
    for base in (packaged, user):
        if base is None:
            continue
        for src in sorted(base.resolve().rglob("*.yaml")):
            rel = src.relative_to(base.resolve())
            origin[rel] = src
    for rel, src in origin.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).symlink_to(src)
    return origin


def _one_line_yaml_error(e: Exception, tmp: Path, origin: dict) -> str:
    """'FILE:LINE: problem' for a YAML syntax error, naming the user's file, not the overlay."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e)
    if mark is None:
        return f"YAML error: {' '.join(str(e).split())}"
    name = Path(mark.name)
    try:
        name = origin.get(name.relative_to(tmp), name)
    except ValueError:
        pass
    return f"{name}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {problem}"


def _one_line_hydra_error(e: Exception, overrides: list[str]) -> str:
    from hydra.errors import MissingConfigException

    if isinstance(e, MissingConfigException) and getattr(e, "options", None):
        group = str(e.missing_cfg_file).split("/")[0] if e.missing_cfg_file else "group"
        bad = next((o for o in overrides if o.lstrip("+~").split("=")[0] == group), group)
        return f"{bad}: no such option; choose one of: {', '.join(sorted(e.options))}"

    text = " ".join(str(e).split())
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if m:
        key = m.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        choices = [o for o in overrides if "." not in o.split("=")[0] and o.lstrip("+~").split("=")[0] != key]
        return f"unknown key {key}; valid keys{' under ' + parent if parent else ''}: {_valid_keys(parent, choices)}"
    return text


def _valid_keys(parent: str, choices: list[str]) -> str:
    """The keys of `parent` (dotted) in the config of the chosen options (e.g. experiment=X,
    optimizer=sgd), for error messages; composed once, never explaining its own errors again."""
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.to_container(compose(choices, explain=False))
    except ConfigError:  # the message is still useful without the list
        return "(see `magic config show`)"
    path = ""
    for part in [p for p in parent.split(".") if p]:
        if not isinstance(node.get(part), dict):
            keys = ", ".join(f"{path}{k}" for k, v in node.items() if isinstance(v, dict))
            where = f" under {path.rstrip('.')}" if path else ""
            return f"(none: there is no group {path}{part}; groups{where}: {keys})"
        node, path = node[part], f"{path}{part}."
    return ", ".join(str(k) for k in node)


def load(overrides: list[str] | tuple = (), config_dir: str | None = None) -> Config:
    """Compose and validate: the one entry point the commands use."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = compose(overrides, config_dir)
    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(" ".join(str(e).split())) from None
    return dataclasses.replace(from_dict(raw), overrides=tuple(overrides))


def with_values(config: Config, dotlist: list[str]) -> Config:
    """The config with some values replaced (`attribute.method=trak`), validated again."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.create(config.raw), OmegaConf.from_dotlist(list(dotlist)))
    return dataclasses.replace(from_dict(OmegaConf.to_container(merged, resolve=True)), overrides=config.overrides)


def from_dict(raw: dict) -> Config:
    """Validate a resolved config tree (as saved in a run's config.yaml)."""
    _check(isinstance(raw, dict), "config must be a mapping")
    raw = expand_paths(raw)
    if raw.get("plugins"):  # before validation: plugins add names to the model and dataset registries

        load_plugins(raw["plugins"])
    config = dataclasses.replace(_build(Config, raw, ""), raw=raw)
    _check_applicable(raw)
    return config


def _check_applicable(raw: dict) -> None:
    """Refuse keys that the chosen option does not read (they would be fingerprinted silently)."""
    opt = raw["optimizer"]
    others = {k for name, keys in OPTIMIZER_KEYS.items() if name != opt["name"] for k in keys}
    for key in opt:
        _check(key not in others or key in OPTIMIZER_KEYS[opt["name"]],
               f"optimizer.{key} does not apply to optimizer={opt['name']}; remove it")
    ck = raw.get("checkpoint", {})
    _check("k" not in ck or ck.get("name") == "replay",
           f"checkpoint.k applies only to checkpoint=replay, not checkpoint={ck.get('name')}; remove it")
    _check("memory" not in ck or ck.get("name") == "binomial",
           f"checkpoint.memory applies only to checkpoint=binomial, not checkpoint={ck.get('name')}; remove it")


def to_yaml(raw: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(raw))


def _int_or_none(text: str, token: str) -> int | None:
    try:
        return int(text) if text.strip() else None
    except ValueError:
        raise ConfigError(f"--test-ids: {token!r} is not an id, a slice like 0:50, or @file") from None


def parse_test_ids(spec: str, n_test: int) -> list[int]:
    """Test ids from '3', '0,5,9', '0:50', '0:50:5' (Python slice syntax) or '@file' (one per line)."""
    from pathlib import Path

    spec = spec.strip()
    if spec.startswith("@"):
        path = Path(spec[1:])
        _check(path.is_file(), f"--test-ids: no such file {spec[1:]!r}")
        parts = [line.split("#")[0].strip() for line in read_text(path, "--test-ids").splitlines()]
        tokens = [p for p in parts if p]
    else:
        tokens = [t.strip() for t in spec.split(",") if t.strip()]
    _check(len(tokens) > 0, f"--test-ids {spec!r} selects no test ids")
    ids: list[int] = []
    for token in tokens:
        fields = [_int_or_none(f, token) for f in token.split(":")]
        if len(fields) == 1:
            _check(fields[0] is not None, f"--test-ids: {token!r} is not an id")
            ids.append(fields[0])
            continue
        _check(len(fields) <= 3, f"--test-ids: bad slice {token!r}")
        start, stop = fields[0], fields[1]
        _check(start is None or 0 <= start < n_test,
               f"--test-ids: {token!r} starts outside the test split (0..{n_test - 1})")
        _check(stop is None or 0 <= stop <= n_test,
               f"--test-ids: {token!r} ends outside the test split (0..{n_test})")
        _check(len(fields) < 3 or fields[2] is None or fields[2] > 0, f"--test-ids: bad step in {token!r}")
        ids += list(range(n_test))[slice(*fields)]
    bad = [i for i in ids if not 0 <= i < n_test]
    _check(not bad, f"--test-ids: id {bad[0] if bad else ''} is outside the test split (0..{n_test - 1})")
    _check(len(ids) > 0, f"--test-ids {spec!r} selects no test ids")
    return list(dict.fromkeys(ids))  # unique, in the given order
