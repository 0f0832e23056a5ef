r"""Kernel rescaling: train first at low resolution, then continue at full resolution.

After Porto Buarque de Gusmão, Francini, Lepsøy & Magli, "Fast Training of Convolutional Neural
Networks via Kernel Rescaling" (arXiv:1610.03623, 2016): a network is first trained on inputs
down-sampled by a factor ``s`` with correspondingly smaller kernels; its kernels are then
rescaled to the full resolution and training continues there. See docs/kernel-rescaling.md.

Derivation
----------
*Continuous scaling property.* Let ``y = x * g`` in ``R^d`` and write ``f_s(u) = f(u / s)``. With
the substitution ``v = s w``::

    (x_s * g_s)(u) = \int x(v/s) g((u - v)/s) dv = s^d \int x(w) g(u/s - w) dw = s^d y(u / s).

So if ``g`` was learned on inputs down-sampled by ``s`` (the image ``x`` is seen as ``x(s .)``
on the coarse grid), the kernel that gives the *same response* on the full-resolution input is
``G = g(. / s) / s^d``: the kernel stretched by ``s`` with its values divided by ``s^d``.

*Discrete version used here.* Down-sampling is average pooling ``A_s`` by ``s`` (per axis; axes
not divisible by ``s`` are first edge-padded at the high end), and the stretched kernel is the
box (nearest-neighbour) resampling of ``g``, i.e. the Kronecker product::

    G = g (x) 1_s / s^d          (shape s*k along each axis; G[s a + b] = g[a] / s^d)

which is exactly ``g(. / s) / s^d`` for ``g`` read as piecewise constant on its pixels. ``A_s``
and box resampling are adjoint, and two exact identities follow (``p = (k - 1) / 2`` the padding
of the ``k``-kernel, ``U_s`` nearest-neighbour up-sampling, ``L_s`` linear interpolation):

(i)  stride ``s``, padding ``s p``:   ``conv_s(X, G) = conv(A_s X, g)``     for every input X;
(ii) stride 1,   padding ``s p``:   ``conv(U_s x, G) = L_s conv(x, g)``.

(i) says that a convolution with the rescaled kernel and stride ``s`` on the full-resolution
image reproduces the low-resolution response *exactly*, so the feature-map geometry after it is
the low-resolution geometry. (ii) is the discrete scaling property: run at stride 1, the rescaled
kernel on an up-sampled input gives the up-sampled low-resolution response (linearly
interpolated between coarse samples, equal to it on the coarse grid); against ``U_s y`` the
difference is at most ``(s - 1)/s * sum_axes max |Delta y|``, an ``O(h)`` interpolation error
for smooth inputs.

Variant for 3x3 kernels (the choice made here)
----------------------------------------------
The networks of :mod:`ddmpi.models.cnn` use 3x3(x3) kernels throughout; the literal method (every
kernel learned at size ``k / s`` and stretched to ``k``) would need 1.5x1.5 kernels for ``s = 2``
and 1x1 kernels (no spatial extent to rescale) for ``s = 3``. As in the paper's experiments,
where the rescaled layer is the large-kernel, strided *first* layer and every deeper layer sees
feature maps of the same size in both phases, only the **stem** (first convolution) is rescaled:

* low-resolution phase: ``build_cnn(..., input_shape=ceil(shape / s))`` on ``A_s x``: the
  ordinary network, 3x3 stem at stride 1;
* full-resolution phase: the same network with the stem kernel ``s*k`` (6x6 for ``s = 2``) at
  stride ``s``, weights ``G = g (x) 1_s / s^d`` (identity (i)); every other weight, bias and BN
  statistic is copied unchanged, because every later layer sees exactly the feature map it saw
  at low resolution. Pooling/striding decisions therefore coincide (checked), and the head is
  resolution independent anyway (global average pool).

Consequences: the switch is exactly continuous, ``full(X) == low(A_s X)`` for every input (up
to float rounding), in training and evaluation mode, so the validation accuracy right after the
switch equals the last low-resolution one; after the switch the stem's ``(s k)^d`` weights are
free, so the network learns from the sub-``s`` detail the low-resolution phase could not see.
The final architecture is the strided-stem network (``full_resolution_kwargs``), which is
cheaper than a stride-1 network at full resolution; rebuild it from ``model.config`` (or
``full_resolution_kwargs``) when loading checkpoints.

Anisotropic data (CT crops with few slices) take a per-axis factor, e.g. ``(1, 2, 2)`` down-samples
only in-plane.
"""

import math
from numbers import Integral

import torch
import torch.nn.functional as F

from ddmpi.models.cnn import build_cnn

__all__ = ["KernelRescaling", "rescale_kernel"]


def _factor_tuple(factor, dims):
    if isinstance(factor, (list, tuple)):
        if len(factor) != dims:
            raise ValueError(f"factor {tuple(factor)} has {len(factor)} entries but the data "
                             f"have {dims} spatial axes")
        return tuple(int(f) for f in factor)
    return (int(factor),) * dims


def rescale_kernel(weight, factor):
    """Full-resolution kernel ``g (x) 1_s / s^d`` of a kernel ``weight`` (Cout, Cin, *k) learned
    on inputs down-sampled by ``factor`` (int or per-axis tuple): each tap repeated ``s`` times
    along every axis, values divided by ``prod(s)`` (the discrete ``g(. / s) / s^d``)."""
    dims = weight.dim() - 2
    factor = _factor_tuple(factor, dims)
    out = weight
    for axis, s in enumerate(factor):
        out = out.repeat_interleave(s, dim=2 + axis)
    return out / math.prod(factor)


class KernelRescaling:
    """Schedule and conversions of kernel-rescaling training.

    Parameters
    ----------
    factor : int >= 2, or a per-axis tuple of ints >= 1 with at least one > 1 (e.g. ``(1, 2, 2)``
        for anisotropic CT): the down-sampling factor ``s`` of the low-resolution phase.
    switch_epoch : int >= 1 or None: number of low-resolution epochs (switch after the epoch with
        0-based index ``switch_epoch - 1``). With ``patience`` too, it is the maximum.
    patience : int >= 1 or None: switch automatically once the low-resolution validation
        accuracy has not improved (by more than ``min_delta``) for ``patience`` epochs.
    min_delta : float >= 0, the improvement that counts for ``patience``.

    At least one of ``switch_epoch`` and ``patience`` is required.
    """

    def __init__(self, factor, switch_epoch=None, patience=None, min_delta=0.0):
        if isinstance(factor, (list, tuple)):
            if not factor or any(isinstance(f, bool) or not isinstance(f, Integral) or f < 1
                                 for f in factor) or max(factor) < 2:
                raise ValueError(f"factor must be an int >= 2 or per-axis ints >= 1 with one "
                                 f">= 2, got {factor!r}")
            factor = tuple(int(f) for f in factor)
        elif isinstance(factor, bool) or not isinstance(factor, Integral) or factor < 2:
            raise ValueError(f"factor must be an int >= 2 or per-axis ints >= 1 with one >= 2, "
                             f"got {factor!r}")
        else:
            factor = int(factor)
        for name, value in (("switch_epoch", switch_epoch), ("patience", patience)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, Integral)
                                      or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if switch_epoch is None and patience is None:
            raise ValueError("kernel rescaling needs switch_epoch or patience (or both) to know "
                             "when to switch to full resolution")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) \
                or min_delta < 0:
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.factor = factor
        self.switch_epoch = switch_epoch
        self.patience = patience
        self.min_delta = float(min_delta)

    def __repr__(self):
        return (f"KernelRescaling(factor={self.factor!r}, switch_epoch={self.switch_epoch!r}, "
                f"patience={self.patience!r}, min_delta={self.min_delta!r})")

    def factors(self, spatial_dims):
        """The factor as a per-axis tuple for ``spatial_dims`` axes."""
        return _factor_tuple(self.factor, spatial_dims)

    # ---------------------------------------------------------------- data

    def low_resolution_shape(self, input_shape):
        """Spatial shape of the down-sampled inputs: ``ceil(n / s)`` per axis."""
        input_shape = tuple(int(n) for n in input_shape)
        return tuple(math.ceil(n / s) for n, s in
                     zip(input_shape, self.factors(len(input_shape))))

    def downsample(self, x):
        """Average-pool a batch ``(B, C, H, W)`` or ``(B, C, D, H, W)`` by the factor.

        Axes not divisible by ``s`` are first edge-padded at the high end (exactly as the
        full-resolution stem pads), so every input voxel is used and the output has
        :meth:`low_resolution_shape`.
        """
        dims = x.dim() - 2
        if dims not in (2, 3):
            raise ValueError(f"downsample expects a batch (B, C, H, W) or (B, C, D, H, W), "
                             f"got shape {tuple(x.shape)}")
        factor = self.factors(dims)
        pads = []
        for n, s in zip(reversed(x.shape[2:]), reversed(factor)):
            pads += [0, (-n) % s]
        if any(pads):
            x = F.pad(x, pads, mode="replicate")
        pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
        return pool(x, factor, stride=factor)

    # ---------------------------------------------------------------- models

    def _stem_kernel(self, kwargs):
        dims = kwargs["spatial_dims"]
        stride = kwargs.get("stem_stride", 1)
        if stride not in (1, (1,) * dims, [1] * dims):
            raise ValueError(f"stem_stride must be 1 for kernel rescaling (the full-resolution "
                             f"network gets stride {self.factor}), got {stride!r}")
        k = kwargs.get("stem_kernel_size")
        if k is None:
            k = kwargs.get("kernel_size", 3)
        k = _factor_tuple(k, dims)
        if any(int(v) % 2 == 0 for v in k):
            raise ValueError(f"stem_kernel_size must be odd for kernel rescaling, got {k}")
        return k

    def full_resolution_kwargs(self, **build_cnn_kwargs):
        """``build_cnn`` keyword arguments of the network after the switch: the given ones
        (``input_shape`` = full resolution) with the stem kernel ``s*k`` at stride ``s``."""
        kwargs = dict(build_cnn_kwargs)
        if "spatial_dims" not in kwargs or "input_shape" not in kwargs:
            raise ValueError("kernel rescaling needs the build_cnn arguments spatial_dims and "
                             "input_shape")
        k = self._stem_kernel(kwargs)
        factor = self.factors(kwargs["spatial_dims"])
        kwargs["stem_kernel_size"] = tuple(s * v for s, v in zip(factor, k))
        kwargs["stem_stride"] = factor
        return kwargs

    def build_low_resolution_model(self, **build_cnn_kwargs):
        """The network of the low-resolution phase: ``build_cnn`` with the given arguments
        (``input_shape`` is the *full*-resolution shape) on :meth:`low_resolution_shape`."""
        full_kwargs = self.full_resolution_kwargs(**build_cnn_kwargs)
        low_kwargs = dict(build_cnn_kwargs)
        low_kwargs["input_shape"] = self.low_resolution_shape(build_cnn_kwargs["input_shape"])
        model = build_cnn(**low_kwargs)
        model.rescaling_full_kwargs = full_kwargs
        return model

    def build_full_resolution_model(self, **build_cnn_kwargs):
        """A (freshly initialised) network with the post-switch architecture, e.g. to load a
        checkpoint saved after the switch."""
        return build_cnn(**self.full_resolution_kwargs(**build_cnn_kwargs))

    def to_full_resolution(self, low_model, input_shape=None):
        """Full-resolution network carrying the low-resolution model's weights, stem rescaled.

        ``low_model`` comes from :meth:`build_low_resolution_model` (or is a ``build_cnn``
        network at low resolution, then ``input_shape`` gives the full-resolution shape). All
        weights, biases and BN running statistics except the stem kernel are copied unchanged;
        the stem kernel becomes :func:`rescale_kernel` of it. The result is on the same device
        and dtype and in the same train/eval mode, and satisfies
        ``full(x) == low_model(self.downsample(x))``. The global RNG state is not consumed.
        Create a new optimizer for it.
        """
        config = getattr(low_model, "config", None)
        if config is None or "family" not in config:
            raise ValueError("to_full_resolution needs a network built by build_cnn / "
                             "build_low_resolution_model")
        if input_shape is not None:
            full_kwargs = self.full_resolution_kwargs(**{**config,
                                                         "input_shape": tuple(input_shape)})
        else:
            full_kwargs = getattr(low_model, "rescaling_full_kwargs", None)
            if full_kwargs is None:
                raise ValueError("low_model was not built by build_low_resolution_model; pass "
                                 "the full-resolution input_shape")
        expected = self.low_resolution_shape(full_kwargs["input_shape"])
        if tuple(config["input_shape"]) != expected:
            raise ValueError(f"low_model's input_shape {tuple(config['input_shape'])} is not the "
                             f"low-resolution shape {expected} of input_shape "
                             f"{tuple(full_kwargs['input_shape'])}")

        with torch.random.fork_rng(devices=[]):
            full = build_cnn(**full_kwargs)
        if full.feature_shapes != low_model.feature_shapes:
            raise RuntimeError(f"feature-map geometry differs after rescaling: "
                               f"{full.feature_shapes} vs {low_model.feature_shapes}")

        low_state = low_model.state_dict()
        state = {}
        for key, value in full.state_dict().items():
            source = low_state[key]
            if key == "stem.conv.weight":
                source = rescale_kernel(source, self.factors(config["spatial_dims"]))
            if source.shape != value.shape:
                raise RuntimeError(f"cannot carry {key}: {tuple(source.shape)} vs "
                                   f"{tuple(value.shape)}")
            state[key] = source.detach().clone()
        full.load_state_dict(state)
        ref = next(low_model.parameters())
        full = full.to(device=ref.device, dtype=ref.dtype)
        full.train(low_model.training)
        return full

    # ---------------------------------------------------------------- schedule

    def should_switch(self, epoch, val_accuracies):
        """Whether to switch to full resolution after the epoch with 0-based index ``epoch``.

        ``val_accuracies``: the low-resolution validation accuracies of epochs ``0..epoch``.
        True once ``switch_epoch`` low-resolution epochs are done, or once the best accuracy
        is ``patience`` or more epochs old (an epoch counts as an improvement when it beats
        the best before it by more than ``min_delta``).
        """
        if self.switch_epoch is not None and epoch + 1 >= self.switch_epoch:
            return True
        if self.patience is not None:
            accs = list(val_accuracies)
            if not accs:
                return False
            best, best_epoch = accs[0], 0
            for i, a in enumerate(accs[1:], start=1):
                if a > best + self.min_delta:
                    best, best_epoch = a, i
            return len(accs) - 1 - best_epoch >= self.patience
        return False
