"""Networks of ddmpi: VGG-/ResNet-style CNNs (2D and 3D) and the coarse dense network.

Local and global CNNs come from one factory, :func:`build_cnn`. A network is

    stem -> stages -> head

* **stem**: one convolution (``stem_kernel_size``, ``stem_stride``) + BN + ReLU, ``in_channels ->
  width``. For VGG it is the first convolution of the first stage; for ResNet it is the usual
  stem convolution before the residual stages. With ``stem_stride > 1`` the input is first padded
  (edge replication, at the high end of every axis) to a multiple of the stride, so that the stem
  sees whole ``stride``-blocks; this is what kernel rescaling (:mod:`ddmpi.models.rescaling`) relies on.
* **stages**: ``depth`` stages with ``width * 2**i`` channels. VGG: ``convs_per_stage`` convs
  3x3(x3) + BN + ReLU per stage (the stem counts as the first conv of stage 0), a 2x max-pool
  between stages. ResNet: ``blocks_per_stage`` basic residual blocks per stage, the first block
  of stages 1.. strides by 2 (projection shortcut 1x1 conv + BN when the shape changes).
* **head**: global adaptive average pool -> dropout -> linear -> logits. The head does not depend
  on the input resolution.

Down-sampling between stages (max-pool for VGG, stride for ResNet) acts per axis and only along
axes that keep at least 2 voxels (``ceil`` rounding: an axis of length ``n >= 3`` becomes
``ceil(n / 2)``, shorter axes are left alone). Any input shape with every axis >= 1 therefore
works: 5x5 sub-images of 8x8 digits, anisotropic 16x16x8 CT crops, single pixels.

Parameters are initialised deterministically from torch's global RNG (Kaiming-normal convs,
BN weight 1 / bias 0, PyTorch's default for linear layers), so ``torch.manual_seed(s)`` before
``build_cnn`` gives the same network every time.

Every CNN carries ``model.config``: the keyword arguments that rebuild it with
``build_cnn(**model.config)`` (store it beside a checkpoint's state dict).
"""

import math
from numbers import Integral

import torch.nn.functional as F
from torch import nn

__all__ = ["FAMILIES", "build_cnn", "CNN", "CoarseDNN", "count_parameters"]

FAMILIES = ("vgg", "resnet")

# Options accepted by each family beyond the common arguments of build_cnn, with defaults.
_COMMON_OPTIONS = {"kernel_size": 3, "stem_kernel_size": None, "stem_stride": 1}
_FAMILY_OPTIONS = {
    "vgg": {"convs_per_stage": 2},
    "resnet": {"blocks_per_stage": 1},
}


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


def _conv(dims):
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _norm(dims, channels, batchnorm):
    if not batchnorm:
        return nn.Identity()
    return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)


def _halvable(shape):
    """Per-axis down-sampling factor (2 or 1): halve only axes that keep >= 2 voxels."""
    return tuple(2 if n >= 3 else 1 for n in shape)


def _halve(shape, factors):
    return tuple(math.ceil(n / f) for n, f in zip(shape, factors))


# --------------------------------------------------------------------------------------------
# building blocks

class Stem(nn.Module):
    """First convolution (+ BN + ReLU). With stride > 1 the input is edge-padded to a multiple of
    the stride at the high end of every axis, so every output voxel sees whole stride-blocks."""

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


def _conv_bn_relu(dims, cin, cout, kernel_size, batchnorm):
    return nn.Sequential(
        _conv(dims)(cin, cout, kernel_size, padding=kernel_size // 2, bias=not batchnorm),
        _norm(dims, cout, batchnorm),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN + shortcut, ReLU. Projection shortcut (1x1 conv
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

    Attributes: ``stem`` (:class:`Stem`), ``stages`` (``nn.Sequential`` of stages, VGG stages
    end with a ``pool``), ``head`` (pool, dropout, ``fc``), ``config`` (the ``build_cnn``
    keyword arguments), ``feature_shapes`` (spatial shape after the stem and after each stage).
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


def build_cnn(family, spatial_dims, in_channels, num_classes, input_shape, depth=2, width=16,
              dropout=0.0, batchnorm=True, **options):
    """Build a VGG- or ResNet-style CNN returning logits ``(B, num_classes)``.

    Parameters
    ----------
    family : {"vgg", "resnet"}
    spatial_dims : 2 or 3; inputs are ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
    in_channels, num_classes : int >= 1.
    input_shape : spatial shape of the inputs (``spatial_dims`` ints >= 1); it decides along
        which axes and how often the network down-samples (only while an axis keeps >= 2).
    depth : number of stages (>= 1).
    width : channels of the first stage, doubled per stage; the width factor that lets a local
        network carry proportionally fewer parameters than the global one.
    dropout : dropout probability in [0, 1) before the classifier.
    batchnorm : BN after every convolution (convolutions then have no bias).

    Family options (all optional):
    kernel_size : odd int, kernel of the body convolutions (default 3).
    stem_kernel_size : int or per-axis tuple, kernel of the first convolution (default
        ``kernel_size``).
    stem_stride : int or per-axis tuple, stride of the first convolution (default 1). Kernel
        rescaling (:mod:`ddmpi.models.rescaling`) builds full-resolution networks with
        ``stem_kernel_size = s * k`` and ``stem_stride = s``.
    convs_per_stage : VGG only, convolutions per stage (default 2).
    blocks_per_stage : ResNet only, basic residual blocks per stage (default 1).

    Raises ``ValueError`` naming the offending argument.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    in_channels = _check_int("in_channels", in_channels, 1)
    num_classes = _check_int("num_classes", num_classes, 1)
    if not isinstance(input_shape, (list, tuple)):
        raise ValueError(f"input_shape must be a sequence of {spatial_dims} ints, "
                         f"got {input_shape!r}")
    input_shape = _per_axis("input_shape", tuple(input_shape), spatial_dims)
    depth = _check_int("depth", depth, 1)
    width = _check_int("width", width, 1)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(batchnorm, bool):
        raise ValueError(f"batchnorm must be true or false, got {batchnorm!r}")

    allowed = {**_COMMON_OPTIONS, **_FAMILY_OPTIONS[family]}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for family {family!r}; "
                         f"allowed: {sorted(allowed)}")
    opts = {**allowed, **options}
    kernel_size = _check_int("kernel_size", opts["kernel_size"], 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    stem_kernel = _per_axis("stem_kernel_size", kernel_size if opts["stem_kernel_size"] is None
                            else opts["stem_kernel_size"], spatial_dims)
    stem_stride = _per_axis("stem_stride", opts["stem_stride"], spatial_dims)
    if family == "vgg":
        repeats = _check_int("convs_per_stage", opts["convs_per_stage"], 1)
    else:
        repeats = _check_int("blocks_per_stage", opts["blocks_per_stage"], 1)

    config = {"family": family, "spatial_dims": spatial_dims, "in_channels": in_channels,
              "num_classes": num_classes, "input_shape": input_shape, "depth": depth,
              "width": width, "dropout": float(dropout), "batchnorm": batchnorm,
              "kernel_size": kernel_size,
              "stem_kernel_size": stem_kernel if len(set(stem_kernel)) > 1 else stem_kernel[0],
              "stem_stride": stem_stride if len(set(stem_stride)) > 1 else stem_stride[0],
              ("convs_per_stage" if family == "vgg" else "blocks_per_stage"): repeats}

    dims = spatial_dims
    stem = Stem(dims, in_channels, width, stem_kernel, stem_stride, batchnorm)
    shape = stem.output_shape(input_shape)
    if min(shape) < 1:
        raise ValueError(f"stem_kernel_size {stem_kernel} / stem_stride {stem_stride} leave no "
                         f"output for input_shape {input_shape}")
    feature_shapes = [shape]
    stages = []
    channels = width
    for i in range(depth):
        cout = width * 2 ** i
        layers = nn.Sequential()
        if family == "vgg":
            if i > 0:
                factors = _halvable(shape)
                if any(f > 1 for f in factors):
                    pool = (nn.MaxPool2d if dims == 2 else nn.MaxPool3d)(
                        factors, stride=factors, ceil_mode=True)
                    layers.add_module("pool", pool)
                    shape = _halve(shape, factors)
            n_convs = repeats - 1 if i == 0 else repeats
            for j in range(n_convs):
                layers.add_module(f"conv{j}", _conv_bn_relu(dims, channels, cout, kernel_size,
                                                            batchnorm))
                channels = cout
        else:
            for j in range(repeats):
                stride = _halvable(shape) if (i > 0 and j == 0) else (1,) * dims
                layers.add_module(f"block{j}", BasicBlock(dims, channels, cout, stride,
                                                          kernel_size, batchnorm))
                shape = _halve(shape, stride)
                channels = cout
        stages.append(layers)
        feature_shapes.append(shape)

    head = nn.Sequential()
    head.add_module("pool", (nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d)(1))
    head.add_module("flatten", nn.Flatten(1))
    head.add_module("dropout", nn.Dropout(dropout))
    head.add_module("fc", nn.Linear(channels, num_classes))

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
