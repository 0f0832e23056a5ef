"""Augmentation of the whole image evaluated on a rank's window (ddmpi.data.augment)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddmpi.config import AugmentConfig
from ddmpi.data.augment import Augmenter, AugmentError
from ddmpi.data.decomposition import Decomposition


def cfg(shift=0, flip_axes=(), brightness=0.0, contrast=0.0):
    return SimpleNamespace(shift=shift, flip_axes=list(flip_axes), brightness=brightness,
                           contrast=contrast)


def full(shape):
    return tuple(slice(0, n) for n in shape)


def images(b, c, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, c) + tuple(shape), generator=g)


CASES = [
    ((32, 32), (2, 2), 2, cfg(shift=4, flip_axes=[-1], brightness=0.2, contrast=0.3)),
    ((32, 32), (2, 2), 3, cfg(shift=9, flip_axes=[0, 1])),
    ((8, 12, 16), (2, 2, 2), 1, cfg(shift=2, flip_axes=[0, 1, 2], brightness=0.1)),
    ((8, 12, 16), (2, 2, 2), 2, cfg(shift=3, flip_axes=[-1], contrast=0.2)),
]


@pytest.mark.parametrize("shape,grid,overlap,c", CASES)
def test_subdomain_of_augmented_image_equals_augmented_window(shape, grid, overlap, c):
    aug = Augmenter(c, shape, seed=7)
    x = images(64, 2, shape)
    idx = torch.arange(100, 164)
    whole = aug(x, full(shape), full(shape), idx, epoch=3)
    assert not torch.equal(whole, x)
    dec = Decomposition(shape, grid, overlap)
    for s in dec:
        box = dec.slices(s)
        win = aug.window(box)
        local = aug(x[(Ellipsis,) + win], win, box, idx, epoch=3)
        assert torch.equal(local, whole[(Ellipsis,) + box]), f"subdomain {s}"


def test_window_definition():
    aug = Augmenter(cfg(shift=4, flip_axes=[-1]), (32, 32), seed=0)
    # rows: box widened by the shift; columns: box and its mirror 22:32, widened, clipped
    assert aug.window((slice(0, 10), slice(2, 10))) == (slice(0, 14), slice(0, 32))
    assert aug.window((slice(12, 20), slice(14, 16))) == (slice(8, 24), slice(10, 22))
    assert Augmenter(cfg(), (32, 32), 0).window((slice(3, 9), slice(0, 5))) == \
        (slice(3, 9), slice(0, 5))


def test_too_small_window_is_an_error():
    aug = Augmenter(cfg(shift=4), (32, 32), seed=0)
    box = (slice(8, 16), slice(8, 16))
    x = images(64, 1, (8, 8))
    with pytest.raises(ValueError, match="window"):
        aug(x, box, box, torch.arange(64), epoch=0)


@pytest.mark.parametrize("shape", [(32, 32), (8, 12, 16)])
def test_inactive_is_identity(shape):
    for c in (None, AugmentConfig(), cfg()):
        aug = Augmenter(c, shape, seed=1)
        assert not aug.active
        x = images(4, 3, shape)
        assert torch.equal(aug(x, full(shape), full(shape), torch.arange(4), 0), x)
        box = tuple(slice(1, n - 1) for n in shape)
        assert aug.window(box) == box
    assert Augmenter(AugmentConfig(shift=1), shape, 1).active


def test_flip_is_torch_flip_half_of_the_time():
    aug = Augmenter(cfg(flip_axes=[-1]), (32, 32), seed=3)
    x = images(400, 3, (32, 32))
    idx = torch.arange(400)
    out = aug(x, full((32, 32)), full((32, 32)), idx, epoch=0)
    flips = aug.params(idx, 0)["flips"][:, 0]
    assert 150 < int(flips.sum()) < 250
    assert torch.equal(out[flips], torch.flip(x[flips], dims=[-1]))
    assert torch.equal(out[~flips], x[~flips])


def test_3d_flips_per_axis():
    shape = (8, 12, 16)
    aug = Augmenter(cfg(flip_axes=[0, 2]), shape, seed=3)
    x = images(64, 1, shape)
    idx = torch.arange(64)
    out = aug(x, full(shape), full(shape), idx, epoch=5)
    flips = aug.params(idx, 5)["flips"]
    assert flips.shape == (64, 2) and len({tuple(f.tolist()) for f in flips}) == 4
    for i in range(64):
        dims = [d for d, f in zip((1, 3), flips[i].tolist()) if f]
        assert torch.equal(out[i], torch.flip(x[i], dims=dims) if dims else x[i])


def pad_crop_reference(x, shifts, s, flips=None):
    """Zero pad by s, crop at offset s + d per axis (then flip columns where asked)."""
    padded = F.pad(x, (s, s, s, s))
    h, w = x.shape[-2:]
    out = []
    for i, (d0, d1) in enumerate(shifts.tolist()):
        crop = padded[i, :, s + d0:s + d0 + h, s + d1:s + d1 + w]
        out.append(torch.flip(crop, dims=[-1]) if flips is not None and flips[i] else crop)
    return torch.stack(out)


def test_shift_is_pad_and_crop():
    aug = Augmenter(cfg(shift=4), (32, 32), seed=11)
    x = images(500, 3, (32, 32))
    idx = torch.arange(500)
    out = aug(x, full((32, 32)), full((32, 32)), idx, epoch=2)
    shifts = aug.params(idx, 2)["shifts"]
    assert set(shifts.flatten().tolist()) == set(range(-4, 5))
    assert torch.equal(out, pad_crop_reference(x, shifts, 4))


def test_order_is_crop_then_flip():
    aug = Augmenter(cfg(shift=4, flip_axes=[-1]), (32, 32), seed=11)
    x = images(200, 3, (32, 32))
    idx = torch.arange(200)
    out = aug(x, full((32, 32)), full((32, 32)), idx, epoch=2)
    p = aug.params(idx, 2)
    assert torch.equal(out, pad_crop_reference(x, p["shifts"], 4, p["flips"][:, 0]))


def test_params_depend_only_on_seed_epoch_index():
    aug = Augmenter(cfg(shift=4, flip_axes=[0, 1], brightness=0.2, contrast=0.2), (32, 32), 5)
    idx = torch.arange(1000, 1300)
    ref = aug.params(idx, 4)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    for sub in (perm, perm[:17], torch.tensor([299])):
        p = aug.params(idx[sub], 4)
        for k in ref:
            assert torch.equal(p[k], ref[k][sub]), k
    for other in (aug.params(idx, 5), Augmenter(cfg(shift=4, flip_axes=[0, 1], brightness=0.2,
                                                     contrast=0.2), (32, 32), 6).params(idx, 4)):
        for k in ref:
            assert not torch.equal(other[k], ref[k]), k
    again = Augmenter(cfg(shift=4, flip_axes=[0, 1], brightness=0.2, contrast=0.2), (32, 32), 5)
    assert all(torch.equal(again.params(idx, 4)[k], ref[k]) for k in ref)


def test_output_follows_sample_not_batch_position():
    aug = Augmenter(cfg(shift=3, flip_axes=[-1], brightness=0.1), (16, 16), seed=2)
    x = images(32, 2, (16, 16))
    idx = torch.arange(32) * 7
    out = aug(x, full((16, 16)), full((16, 16)), idx, epoch=1)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))[:9]
    sub = aug(x[perm], full((16, 16)), full((16, 16)), idx[perm], epoch=1)
    assert torch.equal(sub, out[perm])


def test_shift_values_roughly_uniform():
    aug = Augmenter(cfg(shift=4), (32, 32), seed=0)
    shifts = aug.params(torch.arange(18000), 0)["shifts"]
    counts = np.bincount((shifts + 4).flatten().numpy(), minlength=9)
    assert counts.min() > 3600 and counts.max() < 4400  # expected 4000 each


def test_jitter_is_affine_per_sample_and_mean_preserving():
    aug = Augmenter(cfg(brightness=0.2, contrast=0.3), (8, 8), seed=4)
    n = 4000
    x = images(1, 3, (8, 8)).expand(n, -1, -1, -1).contiguous()
    idx = torch.arange(n)
    out = aug(x, full((8, 8)), full((8, 8)), idx, epoch=0)
    p = aug.params(idx, 0)
    b, c = p["brightness"], p["contrast"]
    assert -0.2 <= b.min() < -0.19 and 0.19 < b.max() <= 0.2
    assert 0.7 <= c.min() < 0.71 and 1.29 < c.max() <= 1.3
    expect = x * c.float().view(-1, 1, 1, 1) + b.float().view(-1, 1, 1, 1)
    assert torch.allclose(out, expect, atol=1e-6)
    assert torch.allclose(out.mean(0), x[0], atol=0.03)
    assert (out.std(0) > 0.05).all()


def test_rejects_bad_config():
    for bad, field in ((cfg(flip_axes=[2]), "flip_axes"), (cfg(shift=-1), "shift"),
                       (cfg(contrast=-0.1), "contrast")):
        with pytest.raises(AugmentError) as caught:
            Augmenter(bad, (32, 32), 0)
        assert caught.value.field == field


def test_shift_must_keep_more_than_half_of_each_side():
    """Shifted by 16 of 32 pixels (or 100 of 28), an image could leave view half or wholly."""
    Augmenter(cfg(shift=15), (32, 32), 0)
    Augmenter(cfg(shift=3), (8, 12, 16), 0)
    for shift, shape in ((16, (32, 32)), (100, (28, 28)), (4, (8, 12, 16))):
        with pytest.raises(AugmentError, match=rf"^{shift} is not less than half the smallest "
                                               rf"side of the {'x'.join(map(str, shape))} images "
                                               rf"\({min(shape)}\)") as caught:
            Augmenter(cfg(shift=shift), shape, 0)
        assert caught.value.field == "shift"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape,grid,overlap,c", CASES)
def test_cuda_equals_cpu(shape, grid, overlap, c):
    aug = Augmenter(c, shape, seed=7)
    x = images(64, 2, shape)
    idx = torch.arange(64)
    dec = Decomposition(shape, grid, overlap)
    for box in [full(shape)] + [dec.slices(s) for s in dec]:
        win = aug.window(box)
        cpu = aug(x[(Ellipsis,) + win], win, box, idx, epoch=1)
        gpu = aug(x[(Ellipsis,) + win].cuda(), win, box, idx.cuda(), epoch=1)
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.cpu(), cpu)
