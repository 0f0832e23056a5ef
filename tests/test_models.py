"""ddmpi.models.cnn: shapes, down-sampling rules, width factor, per-stage blocks, presets and
parameter counts against torchvision's layouts, determinism, validation."""

import pytest
import torch
from torch import nn

from ddmpi.models.cnn import (CNN, PRESETS, CoarseDNN, build_cnn, count_parameters, preset_kwargs,
                              scaled_width)

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
    ({"stem": "imagenet"}, "stem"),  # a ResNet option given to VGG
    ({"depth": 2, "blocks": [2, 2, 2]}, "blocks"),
    ({"depth": 2, "blocks": [2, 0]}, "blocks"),
    ({"depth": 2, "blocks": 2}, "blocks"),
    ({"depth": 2, "blocks": [2, 2], "convs_per_stage": 2}, "blocks"),
    ({"max_width_factor": 0}, "max_width_factor"),
    ({"family": "resnet", "stem": "bogus"}, "stem"),
    ({"family": "resnet", "stem": "imagenet", "stem_stride": 2}, "stem_stride"),
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


# --------------------------------------------------------------------------------------------
# per-stage blocks, presets, and parameter counts against torchvision's layouts

# torchvision's VGG configurations ("M": max-pool) and ResNet basic-block layers.
TV_VGG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}
TV_RESNET = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}


def tv_vgg_features(cfg, batchnorm, in_channels=3):
    """Parameters of torchvision's ``vgg*.features`` (3x3 convs with bias, BN optional)."""
    total, cin = 0, in_channels
    for v in cfg:
        if v != "M":
            total += cin * v * 9 + v + (2 * v if batchnorm else 0)
            cin = v
    return total


def tv_resnet(layers, num_classes=1000, in_channels=3, width=64, dims=2):
    """Parameters of torchvision's basic-block ResNet (generalised to 3D and any width)."""
    total = in_channels * width * 7 ** dims + 2 * width  # conv1 (no bias) + bn1
    cin = width
    for i, n in enumerate(layers):
        c = width * 2 ** i
        for j in range(n):
            total += cin * c * 3 ** dims + 2 * c + c * c * 3 ** dims + 2 * c
            if cin != c or (i > 0 and j == 0):
                total += cin * c + 2 * c  # downsample: 1x1 conv + BN
            cin = c
    return total + cin * num_classes + num_classes


def body_parameters(model):
    """Parameters of the convolutional body (stem + stages), i.e. without the head."""
    return count_parameters(model.stem) + count_parameters(model.stages)


def test_published_torchvision_counts_match_the_formulas():
    assert tv_vgg_features(TV_VGG["vgg16"], batchnorm=False) == 14_714_688
    assert tv_vgg_features(TV_VGG["vgg16"], batchnorm=True) == 14_723_136
    assert tv_resnet(TV_RESNET["resnet18"]) == 11_689_512
    assert tv_resnet(TV_RESNET["resnet34"]) == 21_797_672


@pytest.mark.parametrize("name", ["vgg11", "vgg13", "vgg16", "vgg19"])
def test_vgg_presets_match_torchvision_features(name):
    """Without BN the conv body is torchvision's ``features`` exactly; with BN the convs drop
    their (redundant) bias, so it is ``vgg*_bn.features`` less one bias per conv channel."""
    kwargs = dict(spatial_dims=2, in_channels=3, num_classes=1000, input_shape=(32, 32),
                  width=64, **preset_kwargs(name))
    plain = build_cnn(**kwargs, batchnorm=False)
    assert body_parameters(plain) == tv_vgg_features(TV_VGG[name], batchnorm=False)
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [v for v in TV_VGG[name] if v != "M"]
    assert len(convs) == sum(PRESETS[name]["blocks"])
    biases = sum(c.out_channels for c in convs)
    bn = build_cnn(**kwargs, batchnorm=True)
    assert body_parameters(bn) == tv_vgg_features(TV_VGG[name], batchnorm=True) - biases
    if name == "vgg16":
        assert len(convs) == 13
        assert body_parameters(plain) == 14_714_688
        assert body_parameters(bn) == 14_723_136 - 4_224


@pytest.mark.parametrize("name, published", [("resnet18", 11_689_512),
                                             ("resnet34", 21_797_672)])
def test_resnet_presets_match_torchvision_exactly(name, published):
    model = build_cnn(spatial_dims=2, in_channels=3, num_classes=1000, input_shape=(224, 224),
                      width=64, **preset_kwargs(name))
    assert count_parameters(model) == published
    assert model.stem.conv.kernel_size == (7, 7) and model.stem.conv.stride == (2, 2)
    assert model.stem.conv.bias is None and isinstance(model.stem.pool, nn.MaxPool2d)
    blocks = [m for m in model.modules() if m.__class__.__name__ == "BasicBlock"]
    assert len(blocks) == sum(TV_RESNET[name])
    # torchvision's feature-map sizes: 224 -> 112 (conv1) -> 56 (max-pool) -> 56, 28, 14, 7
    assert model.feature_shapes == ((56, 56), (56, 56), (28, 28), (14, 14), (7, 7))
    assert model.head.fc.in_features == 512 and model.head.fc.bias is not None


def test_resnet18_cifar_stem():
    model = build_cnn(spatial_dims=2, in_channels=3, num_classes=10, input_shape=(32, 32),
                      width=64, **preset_kwargs("resnet18", stem="cifar"))
    assert model.stem.conv.kernel_size == (3, 3) and model.stem.stride == (1, 1)
    assert not hasattr(model.stem, "pool")
    assert model.feature_shapes == ((32, 32), (32, 32), (16, 16), (8, 8), (4, 4))
    assert count_parameters(model) == tv_resnet([2, 2, 2, 2], num_classes=10) - 3 * 64 * (49 - 9)


def test_imagenet_stem_forward_shapes():
    torch.manual_seed(0)
    model = build_cnn(spatial_dims=2, in_channels=3, num_classes=5, input_shape=(65, 50),
                      width=4, **preset_kwargs("resnet18"))
    x = torch.randn(2, 3, 65, 50)
    h = model.stem(x)
    assert tuple(h.shape[2:]) == model.feature_shapes[0] == (17, 13)
    for stage, shape in zip(model.stages, model.feature_shapes[1:]):
        h = stage(h)
        assert tuple(h.shape[2:]) == shape
    assert model(x).shape == (2, 5)


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_3d_resnet_presets(name):
    torch.manual_seed(0)
    model = build_cnn(spatial_dims=3, in_channels=1, num_classes=2, input_shape=(16, 32, 32),
                      width=8, **preset_kwargs(name))
    assert isinstance(model.stem.conv, nn.Conv3d) and model.stem.conv.kernel_size == (7, 7, 7)
    assert count_parameters(model) == tv_resnet(TV_RESNET[name], num_classes=2, in_channels=1,
                                                width=8, dims=3)
    assert model.feature_shapes[0] == (4, 8, 8)
    out = model(torch.randn(2, 1, 16, 32, 32))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_3d_vgg16_and_small_axes():
    torch.manual_seed(0)
    model = build_cnn(spatial_dims=3, in_channels=1, num_classes=2, input_shape=(4, 16, 16),
                      width=4, **preset_kwargs("vgg16"))
    assert sum(isinstance(m, nn.Conv3d) for m in model.modules()) == 13
    assert model.feature_shapes[-1] == (2, 2, 2)
    assert model(torch.randn(2, 1, 4, 16, 16)).shape == (2, 2)
    # the imagenet stem leaves axes shorter than 3 alone
    tiny = build_cnn(spatial_dims=3, in_channels=1, num_classes=2, input_shape=(1, 2, 9),
                     width=4, **preset_kwargs("resnet18"))
    assert tiny.feature_shapes[0] == (1, 2, 3)
    assert tiny(torch.randn(2, 1, 1, 2, 9)).shape == (2, 2)


def test_blocks_per_stage_layout():
    model = build_cnn("vgg", 2, 1, 10, (16, 16), depth=3, width=4, blocks=[1, 3, 2])
    assert [sum(isinstance(m, nn.Conv2d) for m in stage.modules())
            for stage in model.stages] == [0, 3, 2]  # stage 0: the stem only
    assert model.config["blocks"] == (1, 3, 2)
    model = build_cnn("resnet", 2, 1, 10, (16, 16), depth=3, width=4, blocks=[1, 3, 2])
    assert [len(stage) for stage in model.stages] == [1, 3, 2]


@pytest.mark.parametrize("family, option", [("vgg", "convs_per_stage"),
                                            ("resnet", "blocks_per_stage")])
def test_uniform_option_is_blocks(family, option):
    a = build_cnn(family, 2, 1, 10, (8, 8), depth=3, width=4, **{option: 3})
    b = build_cnn(family, 2, 1, 10, (8, 8), depth=3, width=4, blocks=[3, 3, 3])
    assert a.config == b.config and a.config["blocks"] == (3, 3, 3)
    assert {k: v.shape for k, v in a.state_dict().items()} == \
        {k: v.shape for k, v in b.state_dict().items()}


def test_preset_config_rebuilds_model():
    model = build_cnn(spatial_dims=3, in_channels=1, num_classes=2, input_shape=(8, 16, 16),
                      width=4, **preset_kwargs("resnet18"))
    again = build_cnn(**model.config)
    again.load_state_dict(model.state_dict())
    assert again.config == model.config and model.config["stem"] == "imagenet"


def test_presets_and_scaled_width():
    assert set(PRESETS) >= {"vgg11", "vgg16", "resnet18", "resnet34"}
    assert all("width" not in p for p in PRESETS.values())
    kwargs = preset_kwargs("resnet18", stem="cifar")
    assert kwargs["stem"] == "cifar" and PRESETS["resnet18"]["stem"] == "imagenet"
    with pytest.raises(ValueError, match="vgg16"):
        preset_kwargs("vgg17")
    assert [scaled_width(64, s) for s in (1, 4, 9, 16)] == [64, 32, 21, 16]
    assert scaled_width(2, 100) == 1
    # S local ResNet-18s at width 64 / sqrt(S) carry about the parameters of the global one
    glob = build_cnn(spatial_dims=2, in_channels=3, num_classes=10, input_shape=(32, 32),
                     width=64, **preset_kwargs("resnet18", stem="cifar"))
    loc = build_cnn(spatial_dims=2, in_channels=3, num_classes=10, input_shape=(16, 16),
                    width=scaled_width(64, 4), **preset_kwargs("resnet18", stem="cifar"))
    assert 0.24 < count_parameters(loc) / count_parameters(glob) < 0.26
