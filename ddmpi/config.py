"""Run configuration: typed sections, validation that names the field, ``--set`` overrides.

A configuration is a YAML mapping whose sections mirror the dataclasses below. Every value is
checked against its declared type up front; unknown keys and wrong types are errors that name the
dotted field (``local.optimizer.lr``), so a batch job fails in seconds, not after queueing.
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names it."""


@dataclass
class DataConfig:
    path: str = ""                      # prepared HDF5 data set (python -m data_prep ...)
    in_memory: Union[bool, str] = "auto"  # hold each rank's subdomain slices in memory
    memory_budget_gb: float = 2.0       # "auto": in memory when a rank's slices fit this


@dataclass
class DecompositionConfig:
    grid: List[int] = field(default_factory=lambda: [2, 2])  # subdomains per spatial axis
    overlap: int = 0                    # pixels/voxels past each interior boundary


@dataclass
class ModelConfig:
    family: str = "vgg"                 # vgg | resnet
    depth: int = 2                      # stages
    width: int = 16                     # channels of the first stage
    dropout: float = 0.0
    batchnorm: bool = True


@dataclass
class OptimizerConfig:
    name: str = "adam"                  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9               # sgd only


@dataclass
class SchedulerConfig:
    name: str = "cosine"                # cosine | step | none
    step_size: int = 10                 # step only
    gamma: float = 0.1                  # step only


@dataclass
class RescalingConfig:
    factor: int = 1                     # 1: off; s >= 2: start at 1/s resolution
    switch_epoch: Optional[int] = None  # fixed switch epoch, or
    patience: Optional[int] = None      # switch when low-res val accuracy stalls this long


@dataclass
class LocalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 10
    batch_size: int = 64
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    early_stopping_patience: Optional[int] = None  # epochs without val improvement
    rescaling: RescalingConfig = field(default_factory=RescalingConfig)


@dataclass
class CoarseConfig:
    hidden: List[int] = field(default_factory=lambda: [64])
    dropout: float = 0.1
    epochs: int = 200
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    train_on: str = "val"               # val | train | train+val: which local decisions train it
    inputs: str = "log"                 # log | prob: log-probabilities or probabilities as input


@dataclass
class RunConfig:
    dir: str = "runs/ddmpi"
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda
    threads_per_rank: Union[int, str] = "auto"
    amp: Union[bool, str] = "auto"      # mixed precision: auto = on for CUDA
    gather_chunk_mb: int = 64           # largest single Gatherv message
    log_every: int = 0                  # batches between progress lines (0: per epoch)


COMPARE_STRATEGIES = ("global_ddp", "cnn_dnn", "coherent", "coherent_transfer")


@dataclass
class CompareConfig:
    """``ddmpi compare`` only (ddmpi/compare.py): the strategies run side by side."""
    strategies: List[str] = field(default_factory=lambda: list(COMPARE_STRATEGIES))
    global_width: Optional[int] = None  # width of the global CNN; None: from the factor below
    # global width = round(local.model.width * factor); auto = sqrt(subdomains), so the global
    # CNN has about as many parameters as all local CNNs together (each local: 1/S of them)
    global_width_factor: Union[float, str] = "auto"
    coherent_epochs: Optional[int] = None  # coherent CNN-DNN epochs; None: local.epochs
    coherent_lr: Optional[float] = None  # coherent CNN-DNN learning rate; None: local lr
    # transfer learning: local CNNs' lr = coherent lr * factor (1: the same training as from
    # scratch, only the initialisation differs; < 1: gentler fine-tuning)
    transfer_lr_factor: float = 1.0
    transfer_coarse_lr_factor: Optional[float] = None  # coarse DNN's; None: transfer_lr_factor
    transfer_from: Optional[str] = None  # finished decomposed run dir; None: this cnn_dnn run
    target_accuracy: Optional[float] = None  # time-to-target (val); None: lowest best of all


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    coarse: CoarseConfig = field(default_factory=CoarseConfig)
    run: RunConfig = field(default_factory=RunConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


CHOICES = {
    "local.model.family": ("vgg", "resnet"),
    "local.optimizer.name": ("adam", "adamw", "sgd"),
    "local.scheduler.name": ("cosine", "step", "none"),
    "coarse.train_on": ("val", "train", "train+val"),
    "coarse.inputs": ("log", "prob"),
    "run.device": ("auto", "cpu", "cuda"),
    "data.in_memory": (True, False, "auto"),
    "run.amp": (True, False, "auto"),
}
POSITIVE = {"local.epochs", "local.batch_size", "local.model.depth", "local.model.width",
            "local.rescaling.factor", "coarse.epochs", "coarse.batch_size", "run.gather_chunk_mb"}


def load_config(path=None, overrides=()):
    """Read a YAML file (optional), apply ``key=value`` overrides, validate, return a Config."""
    raw = {}
    if path is not None:
        path = Path(path)
        packaged = Path(__file__).parent / "configs" / f"{path}.yaml"
        if not path.exists() and packaged.exists():
            path = packaged  # a configuration shipped with ddmpi, by name ("quickstart")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise ConfigError(f"{path}: cannot read configuration ({err.strerror})") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the configuration must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw)


def apply_override(raw, item):
    """Apply one ``dotted.key=yaml_value`` override to the nested dict ``raw``."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. local.epochs=5")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: '{part}' is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({err})") from err


def from_dict(raw):
    """Build a validated :class:`Config` from nested dicts."""
    config = _build(Config, raw, "")
    _check_values(config)
    return config


def to_dict(config):
    """The resolved configuration as plain nested dicts (for YAML, JSON, checkpoints)."""
    return dataclasses.asdict(config)


def dump(config):
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _build(cls, raw, prefix):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config field '{prefix.rstrip('.') or '<root>'}': expected a section "
                          f"(mapping), got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"config field '{prefix}{unknown[0]}': unknown key "
                          f"(known in this section: {', '.join(sorted(names))})")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _coerce(hints[f.name], raw[f.name], prefix + f.name)
    return cls(**values)


def _coerce(tp, value, name):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name + ".")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"config field '{name}': {value!r} is not of type "
                          f"{_type_name(tp)}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{name}': expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config field '{name}': expected {_type_name(tp)}, got {value!r}")


def _type_name(tp):
    if typing.get_origin(tp) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _get(config, dotted):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _check_values(config):
    for name, allowed in CHOICES.items():
        value = _get(config, name)
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise ConfigError(f"config field '{name}': {value!r} is not one of "
                              f"{', '.join(map(str, allowed))}")
    for name in POSITIVE:
        if _get(config, name) < 1:
            raise ConfigError(f"config field '{name}': must be at least 1")
    if isinstance(config.run.threads_per_rank, str) and config.run.threads_per_rank != "auto":
        raise ConfigError("config field 'run.threads_per_rank': an integer or 'auto'")
    if isinstance(config.run.threads_per_rank, int) and config.run.threads_per_rank < 1:
        raise ConfigError("config field 'run.threads_per_rank': must be at least 1")
    grid = config.decomposition.grid
    if len(grid) not in (2, 3) or any(g < 1 for g in grid):
        raise ConfigError(f"config field 'decomposition.grid': expected 2 or 3 positive "
                          f"integers, got {grid}")
    if config.decomposition.overlap < 0:
        raise ConfigError("config field 'decomposition.overlap': must be >= 0")
    for name in ("local.model.dropout", "coarse.dropout"):
        if not 0 <= _get(config, name) < 1:
            raise ConfigError(f"config field '{name}': must be in [0, 1)")
    for name in ("local.optimizer.lr", "coarse.lr"):
        if _get(config, name) <= 0:
            raise ConfigError(f"config field '{name}': must be positive")
    if not config.data.path:
        raise ConfigError("config field 'data.path': required (a data set prepared with "
                          "'python -m data_prep')")
    resc = config.local.rescaling
    if resc.factor > 1 and resc.switch_epoch is None and resc.patience is None:
        raise ConfigError("config field 'local.rescaling': with factor > 1 give switch_epoch "
                          "or patience")
    _check_compare(config.compare)


def _check_compare(cmp):
    """Validate the ``compare`` section (used by ``ddmpi compare`` only)."""
    unknown = [s for s in cmp.strategies if s not in COMPARE_STRATEGIES]
    if unknown or not cmp.strategies or len(set(cmp.strategies)) != len(cmp.strategies):
        raise ConfigError(f"config field 'compare.strategies': {cmp.strategies} must be distinct "
                          f"names out of {', '.join(COMPARE_STRATEGIES)}")
    if ("coherent_transfer" in cmp.strategies and "cnn_dnn" not in cmp.strategies
            and not cmp.transfer_from):
        raise ConfigError("config field 'compare.strategies': coherent_transfer needs cnn_dnn "
                          "(or compare.transfer_from, a finished 'ddmpi train' run directory)")
    if isinstance(cmp.global_width_factor, str) and cmp.global_width_factor != "auto":
        raise ConfigError("config field 'compare.global_width_factor': a number or 'auto'")
    if not isinstance(cmp.global_width_factor, str) and cmp.global_width_factor <= 0:
        raise ConfigError("config field 'compare.global_width_factor': must be positive")
    for name in ("global_width", "coherent_epochs"):
        value = getattr(cmp, name)
        if value is not None and value < (1 if name == "global_width" else 0):
            raise ConfigError(f"config field 'compare.{name}': must be at least "
                              f"{1 if name == 'global_width' else 0}")
    for name in ("coherent_lr", "transfer_lr_factor", "transfer_coarse_lr_factor"):
        value = getattr(cmp, name)
        if value is not None and value <= 0:
            raise ConfigError(f"config field 'compare.{name}': must be positive")
    if cmp.target_accuracy is not None and not 0 < cmp.target_accuracy <= 1:
        raise ConfigError("config field 'compare.target_accuracy': must be in (0, 1]")
