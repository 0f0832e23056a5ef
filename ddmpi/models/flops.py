"""Training cost of a network in FLOPs, and widths that match a FLOP or parameter budget.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products and
convolutions, forward and backward); element-wise operations are not counted.
"""

import logging

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["matched_width", "matched_width_by_parameters", "training_flops"]

log = logging.getLogger(__name__)

# Counted on a batch of 2 (BatchNorm in train mode needs more than one value per channel);
# every counted operation is linear in the batch size, so the count is halved exactly.
_BATCH = 2


def _device_dtype(model):
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _fork_rng(device):
    """Leave the global RNG (and the CUDA one of ``device``) as it was."""
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def training_flops(model, input_shape, in_channels):
    """FLOPs of one training step (forward + backward of the summed logits) on one sample.

    The model's train/eval modes, gradients, buffers and the global RNG are left unchanged.
    """
    device, dtype = _device_dtype(model)
    modes = {module: module.training for module in model.modules()}
    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    x = torch.zeros((_BATCH, in_channels, *tuple(input_shape)), device=device, dtype=dtype)
    try:
        with _fork_rng(device):
            model.train()
            for p in params:
                p.grad = None
            with FlopCounterMode(display=False) as counter:
                out = model(x).sum()
                if out.requires_grad:
                    out.backward()
        return int(counter.get_total_flops()) // _BATCH
    finally:
        for module, training in modes.items():
            module.training = training
        for p, grad in zip(params, grads):
            p.grad = grad
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def _build_meta(build, width):
    """``build(width)`` on the meta device (no memory, no arithmetic, global RNG untouched)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build(width)


def _model_flops(build, width, input_shape, in_channels):
    try:
        model = _build_meta(build, width)
        shape, channels = _input_of(model, input_shape, in_channels)
        return training_flops(model, shape, channels)
    except (NotImplementedError, RuntimeError) as error:
        log.debug("meta-device FLOP count failed (%s); counting on the real model", error)
    with torch.random.fork_rng(devices=[]):
        model = build(width)
    shape, channels = _input_of(model, input_shape, in_channels)
    return training_flops(model, shape, channels)


def _input_of(model, input_shape, in_channels):
    """Input spatial shape and channels: the given ones, else those in ``model.config``."""
    config = getattr(model, "config", None) or {}
    shape = input_shape if input_shape is not None else config.get("input_shape")
    channels = in_channels if in_channels is not None else config.get("in_channels")
    if shape is None or channels is None:
        raise ValueError("pass input_shape and in_channels for a model without a "
                         "build_cnn config")
    return tuple(shape), int(channels)


def _closest_width(measure, target, lo, hi):
    """Integer width in [lo, hi] whose monotone ``measure`` is closest to ``target``."""
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= lo <= hi, got lo={lo}, hi={hi}")
    cache = {}

    def value(width):
        if width not in cache:
            cache[width] = measure(width)
        return cache[width]

    a, b = lo, hi
    while a < b:  # smallest width with value >= target (or hi)
        mid = (a + b) // 2
        if value(mid) < target:
            a = mid + 1
        else:
            b = mid
    candidates = [w for w in (a - 1, a) if lo <= w <= hi]
    best = min(candidates, key=lambda w: (abs(value(w) - target), w))
    log.debug("width %d matches %s (measured %d widths)", best, target, len(cache))
    return best


def matched_width(build, target_flops, lo=1, hi=1024, *, input_shape=None, in_channels=None):
    """Width whose ``build(width)`` network has training FLOPs closest to ``target_flops``.

    Input shape and channels default to the built model's ``config`` (``build_cnn`` models).
    """
    return _closest_width(
        lambda w: _model_flops(build, w, input_shape, in_channels), target_flops, lo, hi)


def matched_width_by_parameters(build, target_params, lo=1, hi=1024):
    """Width whose ``build(width)`` network has a parameter count closest to ``target_params``."""
    return _closest_width(
        lambda w: sum(p.numel() for p in _build_meta(build, w).parameters()),
        target_params, lo, hi)
