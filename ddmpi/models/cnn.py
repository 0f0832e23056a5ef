"""Networks of ddmpi: VGG-/ResNet-style CNNs (2D and 3D) and the coarse dense network.

A CNN is ``stem -> stages -> head``, built by :func:`build_cnn`; see docs/models.md.
"""

import math
from numbers import Integral

import torch.nn.functional as F
from torch import nn

__all__ = ["FAMILIES", "PRESETS", "STEMS", "build_cnn", "preset_kwargs", "scaled_width", "CNN",
           "CoarseDNN", "count_parameters"]

FAMILIES = ("vgg", "resnet")
STEMS = ("cifar", "imagenet")

# Options accepted by each family beyond the common arguments of build_cnn, with defaults.
_COMMON_OPTIONS = {"kernel_size": 3, "stem_kernel_size": None, "stem_stride": None,
                   "max_width_factor": None}
_FAMILY_OPTIONS = {
    "vgg": {"convs_per_stage": None},
    "resnet": {"blocks_per_stage": None, "stem": "cifar"},
}
_UNIFORM_OPTION = {"vgg": "convs_per_stage", "resnet": "blocks_per_stage"}
_DEFAULT_REPEATS = {"vgg": 2, "resnet": 1}

# Standard layouts (torchvision's); the caller chooses the width (64 is the standard one).
PRESETS = {
    "vgg11": {"family": "vgg", "depth": 5, "blocks": (1, 1, 2, 2, 2), "max_width_factor": 8},
    "vgg13": {"family": "vgg", "depth": 5, "blocks": (2, 2, 2, 2, 2), "max_width_factor": 8},
    "vgg16": {"family": "vgg", "depth": 5, "blocks": (2, 2, 3, 3, 3), "max_width_factor": 8},
    "vgg19": {"family": "vgg", "depth": 5, "blocks": (2, 2, 4, 4, 4), "max_width_factor": 8},
    "resnet18": {"family": "resnet", "depth": 4, "blocks": (2, 2, 2, 2), "stem": "imagenet"},
    "resnet34": {"family": "resnet", "depth": 4, "blocks": (3, 4, 6, 3), "stem": "imagenet"},
}


def preset_kwargs(name, **overrides):
    """``build_cnn`` keyword arguments of preset ``name`` (family, depth, blocks[, stem]),
    updated by ``overrides`` (e.g. ``stem="cifar"`` for small images)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return {**PRESETS[name], **overrides}


def scaled_width(width, n_subdomains):
    """Width of a local CNN for ``n_subdomains`` subdomains: ``round(width / sqrt(S))``, >= 1."""
    width = _check_int("width", width, 1)
    n_subdomains = _check_int("n_subdomains", n_subdomains, 1)
    return max(1, int(round(width / math.sqrt(n_subdomains))))


# --------------------------------------------------------------------------------------------
# validation helpers

def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _per_axis(name, value, dims, minimum=1):
    """An int or a sequence of ``dims`` ints (each >= minimum) as a tuple of ``dims`` ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != dims:
            raise ValueError(f"{name} must have {dims} entries (one per spatial axis), "
                             f"got {value!r}")
        return tuple(_check_int(name, v, minimum) for v in value)
    return (_check_int(name, value, minimum),) * dims


def _squeeze(values):
    """A per-axis tuple as one int when all entries agree (the form stored in ``config``)."""
    return values[0] if len(set(values)) == 1 else values


def _conv(dims):
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _norm(dims, channels, batchnorm):
    if not batchnorm:
        return nn.Identity()
    return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)


def _max_pool(dims):
    return nn.MaxPool2d if dims == 2 else nn.MaxPool3d


def _halvable(shape):
    """Per-axis down-sampling factor (2 or 1): halve only axes that keep >= 2 voxels."""
    return tuple(2 if n >= 3 else 1 for n in shape)


def _halve(shape, factors):
    return tuple(math.ceil(n / f) for n, f in zip(shape, factors))


def _stage_width(config, i):
    """Channels of stage ``i``: ``width * 2**i``, the factor capped at ``max_width_factor``."""
    cap = config["max_width_factor"]
    return config["width"] * (2 ** i if cap is None else min(2 ** i, cap))


# --------------------------------------------------------------------------------------------
# building blocks

class Stem(nn.Module):
    """Small-image ("cifar") stem: one convolution + BN + ReLU; with stride > 1 the input is
    first edge-padded at the high end to a multiple of the stride (kernel rescaling needs it)."""

    def __init__(self, dims, in_channels, out_channels, kernel_size, stride, batchnorm):
        super().__init__()
        self.dims = dims
        self.stride = stride
        padding = tuple(max(0, (k - s) // 2) for k, s in zip(kernel_size, stride))
        self.conv = _conv(dims)(in_channels, out_channels, kernel_size, stride=stride,
                                padding=padding, bias=not batchnorm)
        self.bn = _norm(dims, out_channels, batchnorm)
        self.relu = nn.ReLU(inplace=True)

    def pad_to_stride(self, x):
        """Pad ``x`` (edge replication, high end) so every spatial axis is a multiple of stride."""
        pads = []
        for n, s in zip(reversed(x.shape[2:]), reversed(self.stride)):
            pads += [0, (-n) % s]
        if any(pads):
            x = F.pad(x, pads, mode="replicate")
        return x

    def output_shape(self, shape):
        """Spatial shape after the stem for an input of spatial shape ``shape``."""
        out = []
        for n, k, s, p in zip(shape, self.conv.kernel_size, self.stride, self.conv.padding):
            n = math.ceil(n / s) * s
            out.append((n + 2 * p - k) // s + 1)
        return tuple(out)

    def forward(self, x):
        if any(s > 1 for s in self.stride):
            x = self.pad_to_stride(x)
        return self.relu(self.bn(self.conv(x)))


class ImageNetStem(nn.Module):
    """torchvision's ResNet stem: 7x7 conv stride 2 (pad 3) + BN + ReLU + 3x3 max-pool stride 2
    (pad 1); an axis is strided only while it keeps >= 2 voxels (``input_shape`` decides)."""

    def __init__(self, dims, in_channels, out_channels, input_shape, batchnorm):
        super().__init__()
        self.dims = dims
        self.stride = _halvable(input_shape)
        self.pool_stride = _halvable(_halve(input_shape, self.stride))
        self.conv = _conv(dims)(in_channels, out_channels, 7, stride=self.stride, padding=3,
                                bias=not batchnorm)
        self.bn = _norm(dims, out_channels, batchnorm)
        self.relu = nn.ReLU(inplace=True)
        self.pool = _max_pool(dims)(3, stride=self.pool_stride, padding=1)

    def output_shape(self, shape):
        """Spatial shape after the stem for an input of spatial shape ``shape``."""
        shape = tuple((n + 6 - 7) // s + 1 for n, s in zip(shape, self.stride))
        return tuple((n + 2 - 3) // s + 1 for n, s in zip(shape, self.pool_stride))

    def forward(self, x):
        return self.pool(self.relu(self.bn(self.conv(x))))


def _conv_bn_relu(dims, cin, cout, kernel_size, batchnorm):
    return nn.Sequential(
        _conv(dims)(cin, cout, kernel_size, padding=kernel_size // 2, bias=not batchnorm),
        _norm(dims, cout, batchnorm),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN + shortcut, ReLU; projection shortcut (1x1 conv
    with the block's stride + BN) when channels or spatial shape change."""

    def __init__(self, dims, cin, cout, stride, kernel_size, batchnorm):
        super().__init__()
        conv = _conv(dims)
        pad = kernel_size // 2
        self.conv1 = conv(cin, cout, kernel_size, stride=stride, padding=pad, bias=not batchnorm)
        self.bn1 = _norm(dims, cout, batchnorm)
        self.conv2 = conv(cout, cout, kernel_size, padding=pad, bias=not batchnorm)
        self.bn2 = _norm(dims, cout, batchnorm)
        self.relu = nn.ReLU(inplace=True)
        if cin != cout or any(s != 1 for s in stride):
            self.shortcut = nn.Sequential(
                conv(cin, cout, 1, stride=stride, bias=not batchnorm),
                _norm(dims, cout, batchnorm))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CNN(nn.Module):
    """A VGG- or ResNet-style classifier; build it with :func:`build_cnn`.

    Attributes: ``stem``, ``stages`` (``nn.Sequential``), ``head`` (pool, dropout, ``fc``),
    ``config`` (``build_cnn(**config)`` rebuilds it), ``feature_shapes`` (after stem and stages).
    """

    def __init__(self, config, stem, stages, head, feature_shapes):
        super().__init__()
        self.config = config
        self.stem = stem
        self.stages = stages
        self.head = head
        self.feature_shapes = feature_shapes

    def forward(self, x):
        dims = self.config["spatial_dims"]
        if x.dim() != dims + 2:
            raise ValueError(f"expected input of shape (B, C, {'D, ' if dims == 3 else ''}H, W)"
                             f" for spatial_dims={dims}, got {tuple(x.shape)}")
        return self.head(self.stages(self.stem(x)))


# --------------------------------------------------------------------------------------------
# argument checking

def _check_common(family, spatial_dims, in_channels, num_classes, input_shape, depth, width,
                  dropout, batchnorm):
    """The validated common arguments of :func:`build_cnn` as a ``config`` dict."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if not isinstance(input_shape, (list, tuple)):
        raise ValueError(f"input_shape must be a sequence of {spatial_dims} ints, "
                         f"got {input_shape!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(batchnorm, bool):
        raise ValueError(f"batchnorm must be true or false, got {batchnorm!r}")
    return {"family": family, "spatial_dims": spatial_dims,
            "in_channels": _check_int("in_channels", in_channels, 1),
            "num_classes": _check_int("num_classes", num_classes, 1),
            "input_shape": _per_axis("input_shape", tuple(input_shape), spatial_dims),
            "depth": _check_int("depth", depth, 1), "width": _check_int("width", width, 1),
            "dropout": float(dropout), "batchnorm": batchnorm}


def _check_blocks(family, depth, blocks, uniform):
    """Per-stage counts from ``blocks`` or the uniform ``convs_per_stage``/``blocks_per_stage``."""
    name = _UNIFORM_OPTION[family]
    if blocks is None:
        repeats = _DEFAULT_REPEATS[family] if uniform is None else uniform
        return (_check_int(name, repeats, 1),) * depth
    if uniform is not None:
        raise ValueError(f"give either blocks or {name}, not both")
    if not isinstance(blocks, (list, tuple)) or len(blocks) != depth:
        raise ValueError(f"blocks must be a list of {depth} ints (one per stage, depth={depth}),"
                         f" got {blocks!r}")
    return tuple(_check_int("blocks", b, 1) for b in blocks)


def _check_options(family, dims, depth, blocks, options):
    """Validated family options (kernel and stem settings, per-stage counts) as a dict."""
    allowed = {**_COMMON_OPTIONS, **_FAMILY_OPTIONS[family]}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for family {family!r}; "
                         f"allowed: {sorted(allowed)}")
    opts = {**allowed, **options}
    kernel_size = _check_int("kernel_size", opts["kernel_size"], 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    cap = opts["max_width_factor"]
    out = {"kernel_size": kernel_size,
           "blocks": _check_blocks(family, depth, blocks, opts[_UNIFORM_OPTION[family]]),
           "max_width_factor": None if cap is None else _check_int("max_width_factor", cap, 1)}
    stem = opts.get("stem", "cifar")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if stem == "imagenet":
        if opts["stem_kernel_size"] is not None or opts["stem_stride"] is not None:
            raise ValueError("stem_kernel_size / stem_stride apply to the 'cifar' stem only, "
                             "not to stem='imagenet' (7x7, stride 2, max-pool)")
        out.update(stem_kernel_size=None, stem_stride=None)
    else:
        k = kernel_size if opts["stem_kernel_size"] is None else opts["stem_kernel_size"]
        s = 1 if opts["stem_stride"] is None else opts["stem_stride"]
        out.update(stem_kernel_size=_squeeze(_per_axis("stem_kernel_size", k, dims)),
                   stem_stride=_squeeze(_per_axis("stem_stride", s, dims)))
    if family == "resnet":
        out["stem"] = stem
    return out


# --------------------------------------------------------------------------------------------
# assembly

def _make_stem(config):
    """The stem of ``config`` and the spatial shape after it."""
    dims, shape = config["spatial_dims"], config["input_shape"]
    args = (dims, config["in_channels"], config["width"])
    if config.get("stem") == "imagenet":
        stem = ImageNetStem(*args, shape, config["batchnorm"])
    else:
        kernel = _per_axis("stem_kernel_size", config["stem_kernel_size"], dims)
        stride = _per_axis("stem_stride", config["stem_stride"], dims)
        stem = Stem(*args, kernel, stride, config["batchnorm"])
    out = stem.output_shape(shape)
    if min(out) < 1:
        raise ValueError(f"stem_kernel_size {config['stem_kernel_size']} / stem_stride "
                         f"{config['stem_stride']} leave no output for input_shape {shape}")
    return stem, out


def _vgg_stage(config, i, cin, shape):
    """Stage ``i``: 2x max-pool (stages 1..) and ``blocks[i]`` convs (stage 0: the stem + rest)."""
    dims, cout = config["spatial_dims"], _stage_width(config, i)
    layers = nn.Sequential()
    factors = _halvable(shape)
    if i > 0 and any(f > 1 for f in factors):
        layers.add_module("pool", _max_pool(dims)(factors, stride=factors, ceil_mode=True))
        shape = _halve(shape, factors)
    n_convs = config["blocks"][i] - (1 if i == 0 else 0)
    for j in range(n_convs):
        layers.add_module(f"conv{j}", _conv_bn_relu(dims, cin, cout, config["kernel_size"],
                                                    config["batchnorm"]))
        cin = cout
    return layers, shape


def _resnet_stage(config, i, cin, shape):
    """Stage ``i``: ``blocks[i]`` basic blocks; the first of stages 1.. strides by 2."""
    dims, cout = config["spatial_dims"], _stage_width(config, i)
    layers = nn.Sequential()
    for j in range(config["blocks"][i]):
        stride = _halvable(shape) if (i > 0 and j == 0) else (1,) * dims
        layers.add_module(f"block{j}", BasicBlock(dims, cin, cout, stride, config["kernel_size"],
                                                  config["batchnorm"]))
        shape = _halve(shape, stride)
        cin = cout
    return layers, shape


def _make_head(dims, channels, num_classes, dropout):
    head = nn.Sequential()
    head.add_module("pool", (nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d)(1))
    head.add_module("flatten", nn.Flatten(1))
    head.add_module("dropout", nn.Dropout(dropout))
    head.add_module("fc", nn.Linear(channels, num_classes))
    return head


def build_cnn(family, spatial_dims, in_channels, num_classes, input_shape, depth=2, width=16,
              dropout=0.0, batchnorm=True, blocks=None, **options):
    """Build a VGG- or ResNet-style CNN returning logits ``(B, num_classes)``.

    ``blocks``: per-stage counts (``depth`` ints): VGG conv layers (the stem is the first of
    stage 0), ResNet basic blocks. Arguments, options and presets: docs/models.md.
    """
    config = _check_common(family, spatial_dims, in_channels, num_classes, input_shape, depth,
                           width, dropout, batchnorm)
    config.update(_check_options(family, spatial_dims, config["depth"], blocks, options))
    stem, shape = _make_stem(config)
    make_stage = _vgg_stage if family == "vgg" else _resnet_stage
    feature_shapes, stages, channels = [shape], [], config["width"]
    for i in range(config["depth"]):
        stage, shape = make_stage(config, i, channels, shape)
        stages.append(stage)
        feature_shapes.append(shape)
        channels = _stage_width(config, i)
    head = _make_head(spatial_dims, channels, config["num_classes"], config["dropout"])
    model = CNN(config, stem, nn.Sequential(*stages), head, tuple(feature_shapes))
    _init_weights(model)
    return model


def _init_weights(model):
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CoarseDNN(nn.Module):
    """Dense feed-forward network on the concatenated local decisions; returns logits.

    ``in_features`` is typically ``n_subdomains * num_classes``; ``hidden`` the widths of the
    hidden layers (each Linear + ReLU + dropout); ``hidden=()`` gives a linear classifier.
    """

    def __init__(self, in_features, num_classes, hidden=(64,), dropout=0.0):
        super().__init__()
        in_features = _check_int("in_features", in_features, 1)
        num_classes = _check_int("num_classes", num_classes, 1)
        if isinstance(hidden, Integral) and not isinstance(hidden, bool):
            hidden = (hidden,)
        if not isinstance(hidden, (list, tuple)):
            raise ValueError(f"hidden must be a sequence of layer widths, got {hidden!r}")
        hidden = tuple(_check_int("hidden", h, 1) for h in hidden)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.config = {"in_features": in_features, "num_classes": num_classes,
                       "hidden": hidden, "dropout": float(dropout)}
        layers = []
        cin = in_features
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            cin = h
        layers.append(nn.Linear(cin, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


def count_parameters(model, trainable_only=False):
    """Number of parameters of ``model`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
