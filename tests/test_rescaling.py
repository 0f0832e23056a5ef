"""ddmpi.models.rescaling: the scaling property of convolution, exact continuity of the switch, schedule,
and a real training run (scikit-learn digits) that switches resolution mid-training."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddmpi.models.cnn import build_cnn, count_parameters
from ddmpi.models.rescaling import KernelRescaling, rescale_kernel


def _conv(dims):
    return F.conv2d if dims == 2 else F.conv3d


def _nearest_up(x, factor):
    for axis, s in enumerate(factor):
        x = x.repeat_interleave(s, dim=2 + axis)
    return x


def _smooth(shape, wavelength, channels=2, seed=0):
    """Sum of a few plane waves of the given wavelength (in samples) on a grid of ``shape``."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    out = np.zeros((1, channels) + tuple(shape))
    for c in range(channels):
        for _ in range(3):
            direction = rng.normal(size=len(shape))
            direction /= np.linalg.norm(direction)
            phase = sum(d * g for d, g in zip(direction, grids))
            out[0, c] += rng.normal() * np.sin(2 * np.pi * phase / wavelength + rng.uniform(0, 6))
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- single convolution

def test_rescale_kernel_is_stretched_and_divided():
    g = torch.arange(2 * 3 * 3 * 3, dtype=torch.float64).reshape(2, 3, 3, 3)
    big = rescale_kernel(g, 2)
    assert big.shape == (2, 3, 6, 6)
    assert torch.equal(big[:, :, ::2, ::2] * 4, g)
    assert torch.equal(big[:, :, 1::2, 1::2] * 4, g)
    # the response to a constant input is unchanged: same kernel sum
    assert torch.allclose(big.sum(dim=(2, 3)), g.sum(dim=(2, 3)))
    aniso = rescale_kernel(torch.ones(1, 1, 3, 3, 3), (1, 2, 3))
    assert aniso.shape == (1, 1, 3, 6, 9)
    assert torch.allclose(aniso, torch.full_like(aniso, 1 / 6))


@pytest.mark.parametrize("dims, factor", [(2, (2, 2)), (2, (3, 3)), (3, (2, 2, 2)),
                                          (3, (1, 2, 2))])
def test_scaling_property_single_convolution(dims, factor):
    """Stride 1: the rescaled kernel on the up-sampled input gives the up-sampled low-resolution
    response. Exactly on the coarse grid and equal to its linear interpolation in between; the
    distance to the nearest-neighbour up-sampled response is the interpolation error, bounded by
    (s-1)/s * sum_axes max|Delta y| and first order in the smoothness (halves when the input's
    wavelength doubles)."""
    torch.manual_seed(0)
    m = 32 if dims == 2 else 20
    k, p = 3, 1
    g = torch.randn((3, 2) + (k,) * dims, dtype=torch.float64)
    big = rescale_kernel(g, factor)
    pad = tuple(s * p for s in factor)
    errors = []
    for wavelength in (8.0, 16.0):
        x = _smooth((m,) * dims, wavelength)
        y = _conv(dims)(x, g, padding=p)                                # low-resolution response
        Y = _conv(dims)(_nearest_up(x, factor), big, padding=pad)       # full resolution, stride 1
        assert Y.shape[2:] == tuple(s * (m - 1) + 1 for s in factor)
        # exact on the coarse grid
        coarse = Y[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in factor)]
        torch.testing.assert_close(coarse, y, rtol=0, atol=1e-12)
        # exactly the (multi)linear interpolation of y in between
        mode = "bilinear" if dims == 2 else "trilinear"
        interp = F.interpolate(y, size=Y.shape[2:], mode=mode, align_corners=True)
        torch.testing.assert_close(Y, interp, rtol=0, atol=1e-12)
        # against the nearest-neighbour up-sampled response: first-order interpolation error
        crop = (slice(None), slice(None)) + tuple(slice(0, n) for n in Y.shape[2:])
        difference = (Y - _nearest_up(y, factor)[crop]).abs()
        bound = sum((s - 1) / s * y.diff(dim=2 + a).abs().max().item()
                    for a, s in enumerate(factor))
        assert difference.max().item() <= bound + 1e-12
        # away from the border (where zero padding makes y non-smooth), relative to |y|
        interior = (slice(None), slice(None)) + tuple(slice(s, s * (m - 2)) for s in factor)
        errors.append(difference[interior].max().item() / y.abs().max().item())
    # smoother input, proportionally smaller error: it is interpolation error, O(h)
    assert 1.6 < errors[0] / errors[1] < 2.6, errors
    assert errors[1] < 0.3, errors


@pytest.mark.parametrize("dims, factor", [(2, (2, 2)), (2, (3, 3)), (3, (2, 2, 2)),
                                          (3, (2, 2, 1))])
def test_strided_rescaled_convolution_equals_low_resolution_exactly(dims, factor):
    """Stride s: conv_s(X, G) == conv(A_s X, g) for any input X (here: noise)."""
    torch.manual_seed(1)
    shape = tuple(s * n for s, n in zip(factor, (6, 5, 4)[:dims]))
    X = torch.randn((2, 2) + shape, dtype=torch.float64)
    g = torch.randn((3, 2) + (3,) * dims, dtype=torch.float64)
    rescaling = KernelRescaling(factor, switch_epoch=1)
    full = _conv(dims)(X, rescale_kernel(g, factor), stride=factor,
                       padding=tuple(factor))
    low = _conv(dims)(rescaling.downsample(X), g, padding=1)
    torch.testing.assert_close(full, low, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- data

def test_downsample_and_low_resolution_shape():
    r = KernelRescaling(2, switch_epoch=1)
    assert r.low_resolution_shape((8, 8)) == (4, 4)
    assert r.low_resolution_shape((5, 7)) == (3, 4)
    assert KernelRescaling((1, 2, 2), patience=1).low_resolution_shape((8, 16, 16)) == (8, 8, 8)
    x = torch.arange(5.0).reshape(1, 1, 1, 5).expand(1, 1, 2, 5)
    low = r.downsample(x)
    assert low.shape == (1, 1, 1, 3)
    # the last, incomplete block is edge-padded: (4 + 4) / 2
    assert low.flatten().tolist() == [0.5, 2.5, 4.0]
    x3 = torch.randn(2, 3, 5, 6, 7)
    assert r.downsample(x3).shape == (2, 3, 3, 3, 4)
    torch.testing.assert_close(r.downsample(_nearest_up(x3, (2, 2, 2))), x3)
    with pytest.raises(ValueError, match="batch"):
        r.downsample(torch.randn(3, 8))


# ----------------------------------------------------------------------------- full models

CASES = [
    ("vgg", 2, (8, 8), 2),
    ("vgg", 2, (5, 7), 2),
    ("resnet", 2, (9, 9), 3),
    ("resnet", 2, (16, 16), 2),
    ("vgg", 3, (16, 16, 8), (2, 2, 1)),
    ("resnet", 3, (5, 6, 7), 2),
]


def _low_model(family, dims, shape, factor, **extra):
    torch.manual_seed(0)
    rescaling = KernelRescaling(factor, switch_epoch=2)
    kwargs = dict(family=family, spatial_dims=dims, in_channels=2, num_classes=5,
                  input_shape=shape, depth=3, width=4, **extra)
    low = rescaling.build_low_resolution_model(**kwargs)
    # non-trivial BN running statistics and weights, as after some training
    low.train()
    with torch.no_grad():
        for _ in range(3):
            low(3 * torch.rand((8, 2) + rescaling.low_resolution_shape(shape)) + 1)
        for module in low.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return rescaling, kwargs, low


@pytest.mark.parametrize("family, dims, shape, factor", CASES)
def test_switch_is_continuous(family, dims, shape, factor):
    """After the switch the full-resolution network on X gives the low-resolution network's
    output on the down-sampled X: on smooth inputs (up-sampled low-resolution ones included) and,
    since the stem identity is exact, on any input; in eval and in train mode (BN batch stats)."""
    rescaling, kwargs, low = _low_model(family, dims, shape, factor)
    low.eval()
    full = rescaling.to_full_resolution(low)
    assert not full.training
    assert full.config["input_shape"] == shape
    assert full.feature_shapes == low.feature_shapes

    factors = rescaling.factors(dims)
    smooth = _smooth(shape, wavelength=6.0).float().expand(4, -1, *shape) \
        * torch.linspace(0.5, 2.0, 4).reshape(4, 1, *[1] * dims)
    noise = torch.randn((4, 2) + shape)
    low_x = torch.randn((4, 2) + rescaling.low_resolution_shape(shape))
    cases = [(smooth, rescaling.downsample(smooth)), (noise, rescaling.downsample(noise))]
    if all(n % s == 0 for n, s in zip(shape, factors)):
        cases.append((_nearest_up(low_x, factors), low_x))
    with torch.no_grad():
        for full_in, low_in in cases:
            torch.testing.assert_close(full(full_in), low(low_in), rtol=1e-4, atol=1e-5)
        low.train()
        full.train()
        torch.testing.assert_close(full(noise), low(rescaling.downsample(noise)),
                                   rtol=1e-4, atol=1e-5)


def test_state_carried_and_architecture_rebuildable():
    rescaling, kwargs, low = _low_model("vgg", 2, (8, 8), 2, dropout=0.3)
    full = rescaling.to_full_resolution(low)
    low_state, full_state = low.state_dict(), full.state_dict()
    assert low_state.keys() == full_state.keys()
    for key in low_state:
        if key != "stem.conv.weight":
            assert torch.equal(low_state[key], full_state[key]), key
    assert full.stem.conv.kernel_size == (6, 6) and full.stem.conv.stride == (2, 2)
    # parameters are new tensors: training one model leaves the other alone
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(low.parameters(), full.parameters()))
    extra = count_parameters(full) - count_parameters(low)
    assert extra == 4 * 2 * (36 - 9)  # only the stem kernel grew (width 4, 2 input channels)
    # a checkpoint of the full-resolution network reloads from its config or the kwargs
    build_cnn(**full.config).load_state_dict(full_state)
    rescaling.build_full_resolution_model(**kwargs).load_state_dict(full_state)
    assert rescaling.full_resolution_kwargs(**kwargs)["stem_stride"] == (2, 2)


def test_to_full_resolution_keeps_dtype_and_rng():
    rescaling, kwargs, low = _low_model("resnet", 2, (8, 8), 2)
    low = low.double()
    state = torch.random.get_rng_state()
    full = rescaling.to_full_resolution(low)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert next(full.parameters()).dtype == torch.float64
    assert full.training


def test_to_full_resolution_of_a_plain_network_needs_the_shape():
    rescaling = KernelRescaling(2, switch_epoch=1)
    plain = build_cnn("vgg", 2, 1, 10, (4, 4), depth=2, width=4)
    with pytest.raises(ValueError, match="input_shape"):
        rescaling.to_full_resolution(plain)
    with pytest.raises(ValueError, match="low-resolution shape"):
        rescaling.to_full_resolution(plain, input_shape=(16, 16))
    full = rescaling.to_full_resolution(plain, input_shape=(7, 8))
    assert full.config["input_shape"] == (7, 8)
    plain.eval()
    full.eval()
    x = torch.randn(3, 1, 7, 8)
    torch.testing.assert_close(full(x), plain(rescaling.downsample(x)), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- schedule, errors

def test_should_switch_fixed_epoch():
    r = KernelRescaling(2, switch_epoch=3)
    assert [r.should_switch(e, [0.5] * (e + 1)) for e in range(5)] == [False, False, True,
                                                                        True, True]


def test_should_switch_patience():
    r = KernelRescaling(2, patience=2)
    accs = [0.5, 0.6, 0.7, 0.69, 0.7, 0.65]
    decisions = [r.should_switch(e, accs[:e + 1]) for e in range(len(accs))]
    # best 0.7 at epoch 2; 0.7 again at epoch 4 is no improvement
    assert decisions == [False, False, False, False, True, True]
    assert not r.should_switch(0, [])
    tolerant = KernelRescaling(2, patience=2, min_delta=0.05)
    # 0.6 -> 0.62 -> 0.64: improvements smaller than min_delta do not count
    assert tolerant.should_switch(2, [0.6, 0.62, 0.64])
    capped = KernelRescaling(2, switch_epoch=3, patience=10)
    assert capped.should_switch(2, [0.1, 0.2, 0.3])


@pytest.mark.parametrize("kwargs, name", [
    ({"factor": 1}, "factor"), ({"factor": (1, 1)}, "factor"), ({"factor": 2.0}, "factor"),
    ({"factor": (2, 0)}, "factor"), ({"factor": True}, "factor"),
    ({"factor": 2, "switch_epoch": 0}, "switch_epoch"),
    ({"factor": 2, "patience": -1}, "patience"),
    ({"factor": 2, "switch_epoch": None, "patience": None}, "switch_epoch"),
    ({"factor": 2, "patience": 2, "min_delta": -1}, "min_delta"),
])
def test_bad_configuration(kwargs, name):
    kwargs = {"switch_epoch": 1, **kwargs}
    with pytest.raises(ValueError, match=name):
        KernelRescaling(**kwargs)


@pytest.mark.parametrize("extra, name", [
    ({"stem_stride": 2}, "stem_stride"),
    ({"stem_kernel_size": 4}, "stem_kernel_size"),
    ({"input_shape": (8, 8, 8)}, "factor"),
])
def test_bad_model_arguments(extra, name):
    r = KernelRescaling((2, 2), switch_epoch=1)
    kwargs = {"family": "vgg", "spatial_dims": 2, "in_channels": 1, "num_classes": 10,
              "input_shape": (8, 8), **extra}
    with pytest.raises(ValueError, match=name):
        r.build_low_resolution_model(**kwargs)


# ----------------------------------------------------------------------------- real training

def test_training_on_digits_switches_without_collapse():
    """Real data (scikit-learn's 8x8 digits): 6 epochs on 4x4 inputs, switch, 4 epochs at 8x8.

    The validation accuracy right after the switch equals the last low-resolution one (the
    switch is exact), one full-resolution epoch later it is within 3 points of it or better, and
    the full-resolution phase ends at least as good as the low-resolution phase."""
    from helpers import digits_arrays

    images, labels = digits_arrays()
    order = np.random.default_rng(0).permutation(len(images))
    n_train = int(0.7 * len(order))
    x_train, y_train = torch.from_numpy(images[order[:n_train]]), \
        torch.from_numpy(labels[order[:n_train]])
    x_val, y_val = torch.from_numpy(images[order[n_train:]]), \
        torch.from_numpy(labels[order[n_train:]])

    torch.manual_seed(0)
    rescaling = KernelRescaling(2, switch_epoch=6)
    model = rescaling.build_low_resolution_model(
        family="vgg", spatial_dims=2, in_channels=1, num_classes=10, input_shape=(8, 8),
        depth=2, width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)

    def accuracy(net, low):
        net.eval()
        with torch.no_grad():
            x = rescaling.downsample(x_val) if low else x_val
            return (net(x).argmax(1) == y_val).float().mean().item()

    low, history, switch = True, [], None
    for epoch in range(10):
        model.train()
        perm = torch.randperm(n_train, generator=generator)
        for start in range(0, n_train, 64):
            idx = perm[start:start + 64]
            x = rescaling.downsample(x_train[idx]) if low else x_train[idx]
            loss = F.cross_entropy(model(x), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append(accuracy(model, low))
        if low and rescaling.should_switch(epoch, history):
            model = rescaling.to_full_resolution(model)
            low = False
            switch = (history[-1], accuracy(model, low))
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    before, right_after = switch
    assert before > 0.8, history                       # the low-resolution phase learned
    assert abs(right_after - before) <= 1 / len(y_val), switch
    assert history[6] >= before - 0.03, history        # one full-resolution epoch later
    assert max(history[6:]) >= before, history
    assert not low and math.isfinite(loss.item())
