"""ddmpi.models.cnn: shapes, down-sampling rules, width factor, determinism, validation."""

import pytest
import torch
from torch import nn

from ddmpi.models.cnn import CNN, CoarseDNN, build_cnn, count_parameters

FAMILIES = ("vgg", "resnet")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(28, 28), (16, 16), (5, 5), (4, 4), (1, 1), (3, 7), (2, 9)])
def test_2d_logits_for_any_input_shape(family, shape):
    model = build_cnn(family, 2, 1, 10, shape, depth=3, width=8)
    assert isinstance(model, CNN)
    out = model(torch.randn(3, 1, *shape))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    # never down-sample an axis below 2 (or at all when it is already < 3)
    for feat in model.feature_shapes:
        assert all(f >= min(2, n) for f, n in zip(feat, shape))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(8, 16, 16), (16, 16, 8), (3, 5, 5), (1, 1, 1)])
def test_3d_logits_anisotropic(family, shape):
    model = build_cnn(family, 3, 2, 2, shape, depth=3, width=4)
    assert model(torch.randn(2, 2, *shape)).shape == (2, 2)
    assert any(isinstance(m, nn.Conv3d) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm3d) for m in model.modules())


def test_downsampling_per_axis_only_while_at_least_two():
    model = build_cnn("vgg", 3, 1, 2, (16, 16, 8), depth=4, width=4)
    # 8 -> 4 -> 2 -> stays 2, while 16 -> 8 -> 4 -> 2
    assert model.feature_shapes == ((16, 16, 8), (16, 16, 8), (8, 8, 4), (4, 4, 2), (2, 2, 2))
    model = build_cnn("resnet", 2, 1, 10, (5, 5), depth=4, width=4)
    assert model.feature_shapes == ((5, 5), (5, 5), (3, 3), (2, 2), (2, 2))
    # the recorded shapes are the real ones
    x = torch.randn(1, 1, 5, 5)
    h = model.stem(x)
    for stage, shape in zip(model.stages, model.feature_shapes[1:]):
        h = stage(h)
        assert tuple(h.shape[2:]) == shape


def test_vgg_structure():
    model = build_cnn("vgg", 2, 3, 10, (16, 16), depth=3, width=8, dropout=0.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6  # 2 per stage, the stem is the first of stage 0
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    assert model.head.dropout.p == 0.5
    assert model.head.fc.in_features == 32


def test_resnet_projection_shortcuts():
    model = build_cnn("resnet", 2, 1, 10, (16, 16), depth=3, width=8, blocks_per_stage=2)
    blocks = [m for m in model.modules() if m.__class__.__name__ == "BasicBlock"]
    assert len(blocks) == 6
    projections = [b for b in blocks if not isinstance(b.shortcut, nn.Identity)]
    assert len(projections) == 2  # first block of stages 1 and 2


def test_width_factor_scales_parameters():
    """Halving the width quarters (about) the parameters: a local net of a 2x2 decomposition at
    half width carries about 1/4 of the global network's parameters."""
    global_net = build_cnn("vgg", 2, 1, 10, (28, 28), depth=3, width=32)
    local_net = build_cnn("vgg", 2, 1, 10, (16, 16), depth=3, width=16)
    ratio = count_parameters(local_net) / count_parameters(global_net)
    assert 0.23 < ratio < 0.27
    assert count_parameters(global_net) == 288170
    assert count_parameters(local_net) == 72666


def test_head_independent_of_resolution():
    small = build_cnn("resnet", 2, 1, 10, (8, 8), depth=2, width=8)
    big = build_cnn("resnet", 2, 1, 10, (32, 32), depth=2, width=8)
    assert count_parameters(small) == count_parameters(big)
    big.load_state_dict(small.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_init(family):
    torch.manual_seed(3)
    a = build_cnn(family, 2, 1, 10, (8, 8))
    torch.manual_seed(3)
    b = build_cnn(family, 2, 1, 10, (8, 8))
    torch.manual_seed(4)
    c = build_cnn(family, 2, 1, 10, (8, 8))
    for (ka, va), (kb, vb), (_, vc) in zip(a.state_dict().items(), b.state_dict().items(),
                                           c.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not torch.equal(a.stem.conv.weight, c.stem.conv.weight)


def test_config_rebuilds_model():
    model = build_cnn("resnet", 3, 1, 2, (16, 16, 8), depth=2, width=4, dropout=0.2,
                      stem_kernel_size=(6, 6, 3), stem_stride=(2, 2, 1))
    again = build_cnn(**model.config)
    again.load_state_dict(model.state_dict())
    assert again.config == model.config


def test_no_batchnorm():
    model = build_cnn("vgg", 2, 1, 10, (8, 8), batchnorm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_strided_stem_pads_non_multiple_shapes():
    model = build_cnn("vgg", 2, 1, 10, (5, 7), stem_kernel_size=6, stem_stride=2)
    assert model.feature_shapes[0] == (3, 4)
    assert model(torch.randn(2, 1, 5, 7)).shape == (2, 10)


def test_wrong_input_rank_is_reported():
    model = build_cnn("vgg", 2, 1, 10, (8, 8))
    with pytest.raises(ValueError, match="spatial_dims=2"):
        model(torch.randn(2, 1, 8, 8, 8))


@pytest.mark.parametrize("kwargs, name", [
    ({"family": "alexnet"}, "family"),
    ({"spatial_dims": 1}, "spatial_dims"),
    ({"in_channels": 0}, "in_channels"),
    ({"num_classes": 0}, "num_classes"),
    ({"input_shape": (8,)}, "input_shape"),
    ({"input_shape": (8, 0)}, "input_shape"),
    ({"input_shape": 8}, "input_shape"),
    ({"depth": 0}, "depth"),
    ({"width": 2.5}, "width"),
    ({"dropout": 1.0}, "dropout"),
    ({"batchnorm": "yes"}, "batchnorm"),
    ({"kernel_size": 4}, "kernel_size"),
    ({"stem_stride": (2, 2, 2)}, "stem_stride"),
    ({"blocks_per_stage": 2}, "blocks_per_stage"),  # a ResNet option given to VGG
    ({"bogus": 1}, "bogus"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    args = {"family": "vgg", "spatial_dims": 2, "in_channels": 1, "num_classes": 10,
            "input_shape": (8, 8), **kwargs}
    with pytest.raises(ValueError, match=name):
        build_cnn(**args)


def test_coarse_dnn():
    torch.manual_seed(0)
    net = CoarseDNN(4 * 10, 10, hidden=(64, 32), dropout=0.1)
    assert net(torch.rand(5, 40)).shape == (5, 10)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(40, 64), (64, 32), (32, 10)]
    assert count_parameters(net) == 40 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10
    linear = CoarseDNN(40, 10, hidden=())
    assert count_parameters(linear) == 410
    # (B, n_sub, K) decisions are flattened
    assert linear(torch.rand(5, 4, 10)).shape == (5, 10)


@pytest.mark.parametrize("kwargs, name", [
    ({"in_features": 0}, "in_features"), ({"num_classes": -1}, "num_classes"),
    ({"hidden": (64, 0)}, "hidden"), ({"hidden": "64"}, "hidden"), ({"dropout": -0.1}, "dropout"),
])
def test_coarse_dnn_bad_arguments(kwargs, name):
    args = {"in_features": 40, "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=name):
        CoarseDNN(**args)


def test_count_parameters_trainable_only():
    net = CoarseDNN(4, 2, hidden=())
    net.net[0].bias.requires_grad_(False)
    assert count_parameters(net) == 10
    assert count_parameters(net, trainable_only=True) == 8
