"""Run configuration: typed sections, validation that names the field, ``--set`` overrides.

Choices are ``Literal`` types and bounds sit next to the field they constrain (``bounded``);
unknown keys, wrong types and values out of bounds are errors naming the dotted field.
"""

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional, Union

import yaml

# YAML 1.1 (PyYAML) reads 5e-4 and 1e3 as strings; a float field takes them as numbers
FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names it."""


def bounded(default, lo=None, hi=None, *, lo_open=False, hi_open=False, **kwargs):
    """A dataclass field whose (non-None) value must lie in ``[lo, hi]`` (ends open if asked)."""
    if callable(default):
        kwargs["default_factory"] = default
    else:
        kwargs["default"] = default
    return field(metadata={"bounds": (lo, hi, lo_open, hi_open)}, **kwargs)


@dataclass
class AugmentConfig:
    """Augmentation of the whole image before it is cut (off unless a field is set)."""
    shift: int = bounded(0, 0)              # random shift (pad-and-crop) per axis, pixels/voxels
    flip_axes: List[int] = field(default_factory=list)  # spatial axes flipped at random (-1: W)
    brightness: float = bounded(0.0, 0.0, 1.0)  # colour jitter: x + U(-b, b) (normalised units)
    contrast: float = bounded(0.0, 0.0, 1.0)    # colour jitter: x * U(1 - c, 1 + c)


@dataclass
class DataConfig:
    path: str = ""                      # prepared HDF5 data set (python -m data_prep ...)
    in_memory: Union[bool, Literal["auto"]] = "auto"  # hold a rank's slices in RAM, or stream
    # per rank: "auto" holds a box's splits in RAM while they fit; streamed blocks fit in it
    memory_budget_gb: float = bounded(2.0, 0.0, lo_open=True)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class DecompositionConfig:
    grid: List[int] = field(default_factory=lambda: [2, 2])  # subdomains per spatial axis
    overlap: int = bounded(0, 0)        # pixels/voxels past each interior boundary


@dataclass
class ModelConfig:
    family: Literal["vgg", "resnet"] = "vgg"
    depth: int = bounded(2, 1)          # stages
    width: int = bounded(16, 1)         # channels of the first stage
    blocks: Optional[List[int]] = None  # conv layers (vgg) / residual blocks (resnet) per stage
    max_width_factor: Optional[int] = bounded(None, 1)  # stage i: width * min(2**i, this)
    stem: Literal["cifar", "imagenet"] = "cifar"  # resnet: "imagenet" = 7x7/2 conv + max-pool
    dropout: float = bounded(0.0, 0.0, 1.0, hi_open=True)
    batchnorm: bool = True


@dataclass
class OptimizerConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = bounded(1e-3, 0.0, lo_open=True)
    weight_decay: float = bounded(0.0, 0.0)
    momentum: float = bounded(0.9, 0.0, 1.0)  # sgd only


@dataclass
class SchedulerConfig:
    name: Literal["cosine", "step", "none"] = "cosine"
    step_size: int = bounded(10, 1)     # step only
    gamma: float = bounded(0.1, 0.0, lo_open=True)  # step only


@dataclass
class RescalingConfig:
    factor: int = bounded(1, 1)         # 1: off; s >= 2: start at 1/s resolution
    switch_epoch: Optional[int] = bounded(None, 1)  # fixed switch epoch, or
    patience: Optional[int] = bounded(None, 1)      # switch when low-res val accuracy stalls


@dataclass
class LocalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = bounded(10, 1)
    batch_size: int = bounded(64, 1)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    early_stopping_patience: Optional[int] = bounded(None, 1)  # epochs without val improvement
    rescaling: RescalingConfig = field(default_factory=RescalingConfig)


@dataclass
class CoarseConfig:
    hidden: List[int] = field(default_factory=lambda: [64])
    dropout: float = bounded(0.1, 0.0, 1.0, hi_open=True)
    epochs: int = bounded(200, 1)
    batch_size: int = bounded(128, 1)
    lr: float = bounded(3e-3, 0.0, lo_open=True)
    weight_decay: float = bounded(1e-4, 0.0)
    # which local decisions train it: train + val (the regime study's choice, see
    # benchmarks/RESULTS-coarse.md), held-out val, train, or cross-fitted train + val
    train_on: Literal["val", "train", "train+val", "crossfit"] = "train+val"
    folds: int = bounded(4, 2)          # crossfit: K folds of out-of-fold training decisions
    fold_epochs: Optional[int] = bounded(None, 1)  # crossfit: epochs per fold (None: local's)
    inputs: Literal["log", "prob"] = "log"  # log-probabilities or probabilities as input
    skip: bool = True                   # start from averaged log-probabilities, learn a correction
    holdout_fraction: float = bounded(0.2, 0.0, 1.0, lo_open=True, hi_open=True)
    patience: int = bounded(20, 1)      # early stopping on the holdout part (epochs)
    fallback: bool = True               # use the best combiner on the holdout if it beats the DNN


@dataclass
class RunConfig:
    dir: str = "runs/ddmpi"
    seed: int = bounded(0, 0, 2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads_per_rank: Union[int, Literal["auto"]] = bounded("auto", 1)
    amp: Union[bool, Literal["auto"]] = "auto"  # bf16 autocast: auto = on for CUDA
    channels_last: Union[bool, Literal["auto"]] = "auto"  # memory format: auto = on for CUDA 2D
    compile: bool = False               # torch.compile the CNNs
    gather_chunk_mb: int = bounded(64, 1)  # largest single Gatherv message
    tensorboard: bool = False           # per-epoch scalars as TensorBoard events too


Strategy = Literal["global_ddp", "cnn_dnn", "coherent", "coherent_transfer"]
COMPARE_STRATEGIES = typing.get_args(Strategy)


@dataclass
class CompareConfig:
    """``ddmpi compare`` only: the strategies run side by side and their baselines."""
    strategies: List[Strategy] = field(default_factory=lambda: list(COMPARE_STRATEGIES))
    # global CNN widths: "compute" matches the training FLOPs of all local CNNs together,
    # "parameters" their parameter count; an integer is an explicit width
    global_widths: List[Union[int, Literal["compute", "parameters"]]] = field(
        default_factory=lambda: ["compute", "parameters"])
    seeds: int = bounded(1, 1)          # every strategy run with run.seed, run.seed + 1, ...
    coherent_epochs: Optional[int] = bounded(None, 0)  # None: local.epochs
    coherent_lr: Optional[float] = bounded(None, 0.0, lo_open=True)  # None: local lr
    transfer_lr_factor: float = bounded(1.0, 0.0, lo_open=True)  # local CNNs' lr when transferred
    transfer_coarse_lr_factor: Optional[float] = bounded(None, 0.0, lo_open=True)
    transfer_from: Optional[str] = None  # finished decomposed run dir; None: this cnn_dnn run
    target_accuracy: Optional[float] = bounded(None, 0.0, 1.0, lo_open=True)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    coarse: CoarseConfig = field(default_factory=CoarseConfig)
    run: RunConfig = field(default_factory=RunConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


def load_config(path=None, overrides=()):
    """Read a YAML file (optional), apply ``key=value`` overrides, validate, return a Config.

    An error the file causes on its own (whatever the overrides) names the file.
    """
    if path is None:
        raw = {}
    else:
        path, raw = _read_file(path)
    merged = copy.deepcopy(raw)
    for item in overrides:
        apply_override(merged, item)
    try:
        return from_dict(merged)
    except ConfigError as err:
        if path is not None and _fails_alike(raw, err):
            raise ConfigError(f"{path}: {err}") from None
        raise


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (instead of keeping
    the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_file(path):
    """``(path, raw dict)`` of a YAML file, or of a packaged configuration given by name."""
    path = Path(path)
    packaged = Path(__file__).parent / "configs" / f"{path}.yaml"
    if not path.exists() and packaged.exists():
        path = packaged  # a configuration shipped with ddmpi, by name ("quickstart")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), UniqueKeyLoader) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read configuration ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of sections")
    return path, raw


def _fails_alike(raw, err):
    """Whether ``raw`` alone (no overrides) fails validation with the error ``err``."""
    try:
        from_dict(copy.deepcopy(raw))
    except ConfigError as own:
        return str(own) == str(err)
    return False


def yaml_problem(err):
    """A YAML parser error on one line: ``line L, column C: problem``."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


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
        node[parts[-1]] = yaml.load(value, UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: value is not valid YAML "
                          f"({yaml_problem(err)})") from None


def from_dict(raw):
    """Build a validated :class:`Config` from nested dicts."""
    config = _build(Config, raw, "")
    _check_relations(config)
    return config


def to_dict(config):
    """The resolved configuration as plain nested dicts (for YAML, JSON, checkpoints)."""
    return dataclasses.asdict(config)


def dump(config):
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def differences(a, b, prefix=""):
    """``(dotted key, a value, b value)`` for every leaf where the dicts ``a`` and ``b`` differ."""
    for key in a:
        if isinstance(a[key], dict):
            yield from differences(a[key], b[key], f"{prefix}{key}.")
        elif a[key] != b.get(key):
            yield f"{prefix}{key}", a[key], b.get(key)


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
            _check_bounds(f, values[f.name], prefix + f.name)
    return cls(**values)


def _check_bounds(f, value, name):
    lo, hi, lo_open, hi_open = f.metadata.get("bounds", (None, None, False, False))
    if isinstance(value, str) or value is None:
        return
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"config field '{name}': {value!r} must be {'>' if lo_open else '>='} "
                          f"{lo}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ConfigError(f"config field '{name}': {value!r} must be {'<' if hi_open else '<='} "
                          f"{hi}")


def _coerce(tp, value, name):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(arg, value, name)
                except ConfigError:
                    pass
        raise ConfigError(f"config field '{name}': {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise ConfigError(f"config field '{name}': {value!r} is not one of "
                          f"{', '.join(map(str, args))}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{name}': expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if _matches(tp, value):
        if tp is not float:
            return value
        if not math.isfinite(float(value)):
            raise ConfigError(f"config field '{name}': {value!r} is not a finite number")
        return float(value)
    raise ConfigError(f"config field '{name}': expected {_type_name(tp)}, got {value!r}")


def _matches(tp, value):
    if isinstance(value, bool):
        return tp is bool
    if tp is float:
        return isinstance(value, (int, float)) or (isinstance(value, str)
                                                   and FLOAT_TEXT.fullmatch(value) is not None)
    return tp in (int, str) and isinstance(value, tp)


def _type_name(tp):
    if typing.get_origin(tp) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def _check_relations(config):
    """Checks that involve more than one field (or list items)."""
    grid = config.decomposition.grid
    if len(grid) not in (2, 3) or any(g < 1 for g in grid):
        raise ConfigError(f"config field 'decomposition.grid': expected 2 or 3 positive "
                          f"integers, got {grid}")
    if not config.data.path:
        raise ConfigError("config field 'data.path': required (a data set prepared with "
                          "'python -m data_prep')")
    resc = config.local.rescaling
    if resc.factor > 1 and resc.switch_epoch is None and resc.patience is None:
        raise ConfigError("config field 'local.rescaling': with factor > 1 give switch_epoch "
                          "or patience")
    blocks = config.local.model.blocks
    if blocks is not None and (len(blocks) != config.local.model.depth or min(blocks) < 1):
        raise ConfigError(f"config field 'local.model.blocks': {blocks} needs one positive "
                          f"count per stage (local.model.depth = {config.local.model.depth})")
    model = config.local.model
    if model.stem == "imagenet" and (model.family != "resnet" or resc.factor > 1):
        raise ConfigError("config field 'local.model.stem': 'imagenet' is a ResNet stem "
                          "(local.model.family: resnet) and not rescaled (local.rescaling."
                          "factor: 1)")
    if any(h < 1 for h in config.coarse.hidden):
        raise ConfigError("config field 'coarse.hidden': layer sizes must be at least 1")
    _check_compare(config.compare)


def _check_compare(cmp):
    if not cmp.strategies or len(set(cmp.strategies)) != len(cmp.strategies):
        raise ConfigError(f"config field 'compare.strategies': {cmp.strategies} must be distinct "
                          f"names out of {', '.join(COMPARE_STRATEGIES)}")
    if ("coherent_transfer" in cmp.strategies and "cnn_dnn" not in cmp.strategies
            and not cmp.transfer_from):
        raise ConfigError("config field 'compare.strategies': coherent_transfer needs cnn_dnn "
                          "(or compare.transfer_from, a finished 'ddmpi train' run directory)")
    if any(isinstance(w, int) and w < 1 for w in cmp.global_widths):
        raise ConfigError("config field 'compare.global_widths': widths must be at least 1")
