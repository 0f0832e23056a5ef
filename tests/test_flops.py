"""Training FLOPs by formula for single layers, and width matching for a small VGG."""

import pytest
import torch
from torch import nn

from ddmpi.models.cnn import build_cnn
from ddmpi.models.flops import matched_width, matched_width_by_parameters, training_flops


def test_linear_flops_by_formula():
    # Forward 2*in*out per sample; backward only the weight gradient (input needs no grad).
    assert training_flops(nn.Linear(7, 5), (), 7) == 2 * 7 * 5 + 2 * 7 * 5
    # The second layer also propagates the gradient to its input: 3 products.
    net = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    assert training_flops(net, (), 7) == 2 * (2 * 7 * 5) + 3 * (2 * 5 * 3)


def test_conv2d_flops_by_formula():
    conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    forward = 2 * 3 * 4 * 3 * 3 * 6 * 6  # 2 * Cin * Cout * k*k * H_out * W_out
    assert training_flops(conv, (6, 6), 3) == 2 * forward
    net = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 2, kernel_size=1))
    assert training_flops(net, (6, 6), 3) == 2 * forward + 3 * (2 * 4 * 2 * 6 * 6)


def test_training_flops_leaves_model_state_alone():
    torch.manual_seed(0)
    model = build_cnn("vgg", 2, 1, 3, (8, 8), depth=2, width=4, dropout=0.5)
    model.eval()
    model.head.train()
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert training_flops(model, (8, 8), 1) > 0
    assert not model.training and model.head.training and not model.stem.training
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(torch.get_rng_state(), rng)
    fresh = build_cnn("vgg", 2, 1, 3, (8, 8), depth=2, width=4)
    training_flops(fresh, (8, 8), 1)
    assert all(p.grad is None for p in fresh.parameters())


def _vgg(width):
    return build_cnn("vgg", 2, 1, 10, (16, 16), depth=2, width=width)


class _Counting:
    """A builder that counts its calls."""

    def __init__(self, build):
        self.build, self.calls = build, 0

    def __call__(self, width):
        self.calls += 1
        return self.build(width)


def test_matched_width_by_flops():
    flops = {w: training_flops(_vgg(w), (16, 16), 1) for w in range(10, 14)}
    assert all(flops[w] < flops[w + 1] for w in range(10, 13))
    builder = _Counting(_vgg)
    assert matched_width(builder, flops[12]) == 12
    assert builder.calls <= 12  # ~log2(1024) builds
    for target in (flops[11] + (flops[12] - flops[11]) // 4,
                   flops[12] - (flops[12] - flops[11]) // 4):
        width = matched_width(_vgg, target, lo=1, hi=64)
        assert width in (11, 12)
        gap = abs(flops[width] - target)
        assert gap <= abs(flops[width - 1] - target)
        assert gap <= abs(flops[width + 1] - target)
    assert matched_width(_vgg, 1, lo=3, hi=40) == 3
    assert matched_width(_vgg, 10 ** 15, lo=3, hi=40) == 40


def test_matched_width_by_parameters():
    params = {w: sum(p.numel() for p in _vgg(w).parameters()) for w in (19, 20, 21)}
    builder = _Counting(_vgg)
    assert matched_width_by_parameters(builder, params[20]) == 20
    assert builder.calls <= 12
    target = params[20] + (params[21] - params[20]) // 3
    assert matched_width_by_parameters(_vgg, target) == 20
    target = params[21] - (params[21] - params[20]) // 3
    assert matched_width_by_parameters(_vgg, target) == 21


def test_matched_width_keeps_global_rng_and_checks_range():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    matched_width(_vgg, 10 ** 6, lo=1, hi=32)
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(ValueError):
        matched_width(_vgg, 10 ** 6, lo=5, hi=4)
    with pytest.raises(ValueError):
        matched_width(lambda w: nn.Linear(w, 2), 100)
