"""Geometry of the grid of subdomains: tiling, cover, overlap, numbering, validation."""

import itertools
import pickle

import numpy as np
import pytest

from ddmpi.data.decomposition import Decomposition, parse_grid, parse_overlap

CASES = [
    ((28, 28), (2, 2), 0),
    ((28, 28), (2, 2), 2),
    ((28, 28), (4, 4), 2),
    ((28, 28), (3, 3), 3),      # non-divisible: cores 9, 9, 10
    ((8, 8), (2, 2), 1),
    ((32, 32), (4, 2), (3, 1)),  # per-axis overlap
    ((29, 31), (3, 5), 2),       # non-divisible along both axes
    ((7, 5), (7, 5), 0),         # one pixel per subdomain
    ((28, 28), (1, 2), 2),       # one part along an axis: overlap only across the cut
    ((16, 28, 28), (2, 2, 2), 2),
    ((17, 23, 30), (3, 2, 4), (1, 2, 3)),
    ((12, 10, 9), (1, 1, 1), 0),
]


def _cover_counts(dec, core):
    counts = np.zeros(dec.image_shape, dtype=np.int64)
    for s in dec:
        counts[dec.core_slices(s) if core else dec.slices(s)] += 1
    return counts


def test_paper_example_28x28_2x2_overlap2():
    dec = Decomposition((28, 28), (2, 2), overlap=2)
    assert dec.num_subdomains == 4
    assert dec.slices((1, 0)) == (slice(12, 28), slice(0, 16))
    assert dec.slices(2) == (slice(12, 28), slice(0, 16))
    assert dec.slices(0) == (slice(0, 16), slice(0, 16))
    assert dec.slices(1) == (slice(0, 16), slice(12, 28))
    assert dec.slices(3) == (slice(12, 28), slice(12, 28))
    assert dec.core_slices((1, 0)) == (slice(14, 28), slice(0, 14))
    assert [dec.subdomain_shape(s) for s in range(4)] == [(16, 16)] * 4
    assert tuple(s.stop - s.start for s in dec.core_slices(3)) == (14, 14)


@pytest.mark.parametrize("shape, grid, overlap", CASES)
def test_cores_tile_the_image_exactly_once(shape, grid, overlap):
    dec = Decomposition(shape, grid, overlap)
    assert (_cover_counts(dec, core=True) == 1).all()


@pytest.mark.parametrize("shape, grid, overlap", CASES)
def test_subdomains_cover_the_image_and_contain_their_cores(shape, grid, overlap):
    dec = Decomposition(shape, grid, overlap)
    counts = _cover_counts(dec, core=False)
    assert (counts >= 1).all()
    assert counts.sum() == sum(np.prod(dec.subdomain_shape(s)) for s in dec)
    for s in dec:
        for sub, core, n in zip(dec.slices(s), dec.core_slices(s), dec.image_shape):
            assert 0 <= sub.start <= core.start < core.stop <= sub.stop <= n


@pytest.mark.parametrize("shape, grid, overlap", CASES)
def test_subdomain_is_core_extended_by_overlap_clamped_at_border(shape, grid, overlap):
    dec = Decomposition(shape, grid, overlap)
    for s in dec:
        index = dec.index(s)
        for a, (sub, core) in enumerate(zip(dec.slices(s), dec.core_slices(s))):
            o, n, g = dec.overlap[a], shape[a], grid[a]
            k = index[a]
            assert core.start == k * n // g and core.stop == (k + 1) * n // g
            assert sub.start == (0 if k == 0 else core.start - o)
            assert sub.stop == (n if k == g - 1 else core.stop + o)


@pytest.mark.parametrize("shape, grid, overlap", CASES)
def test_neighbours_share_exactly_twice_the_overlap(shape, grid, overlap):
    dec = Decomposition(shape, grid, overlap)
    for s in dec:
        index = dec.index(s)
        for a in range(dec.ndim):
            if index[a] + 1 == grid[a]:
                continue
            nb = list(index)
            nb[a] += 1
            mine, theirs = dec.slices(s)[a], dec.slices(tuple(nb))[a]
            shared = min(mine.stop, theirs.stop) - max(mine.start, theirs.start)
            assert shared == 2 * dec.overlap[a]
            # the other axes are identical for neighbours along axis a
            for b in range(dec.ndim):
                if b != a:
                    assert dec.slices(s)[b] == dec.slices(tuple(nb))[b]


@pytest.mark.parametrize("shape, grid, overlap", CASES)
def test_numbering_is_c_order_and_invertible(shape, grid, overlap):
    dec = Decomposition(shape, grid, overlap)
    expected = list(itertools.product(*(range(g) for g in grid)))
    assert dec.indices() == expected
    assert list(dec) == list(range(len(expected))) and len(dec) == len(expected)
    for linear, index in enumerate(expected):
        assert dec.index(linear) == index
        assert dec.linear(index) == linear
        assert dec.slices(linear) == dec.slices(index)


def test_numbering_matches_architecture_convention():
    dec = Decomposition((28, 30), (2, 3), 1)
    assert dec.linear((1, 2)) == 1 * 3 + 2
    dec3 = Decomposition((8, 9, 10), (2, 3, 2), 0)
    assert dec3.linear((1, 2, 1)) == (1 * 3 + 2) * 2 + 1
    assert dec3.index(11) == (1, 2, 1)


def test_non_divisible_sizes():
    dec = Decomposition((28, 28), (3, 3), 3)
    assert [dec.core_bounds(0, k) for k in range(3)] == [(0, 9), (9, 18), (18, 28)]
    assert [dec.bounds(0, k) for k in range(3)] == [(0, 12), (6, 21), (15, 28)]
    assert dec.subdomain_shape((1, 2)) == (15, 13)


def test_3d_example():
    dec = Decomposition((16, 28, 28), (2, 2, 2), overlap=2)
    assert dec.ndim == 3 and dec.num_subdomains == 8
    assert dec.slices((1, 0, 1)) == (slice(6, 16), slice(0, 16), slice(12, 28))
    assert dec.subdomain_shape(5) == (10, 16, 16)


def test_extract_slices_the_trailing_spatial_axes():
    dec = Decomposition((28, 28), (2, 2), 2)
    a = np.arange(5 * 3 * 28 * 28).reshape(5, 3, 28, 28)
    np.testing.assert_array_equal(dec.extract(a, 2), a[:, :, 12:28, 0:16])
    np.testing.assert_array_equal(dec.extract(a[0, 0], 2, core=True), a[0, 0, 14:28, 0:14])
    with pytest.raises(ValueError, match="image shape 28x28"):
        dec.extract(np.zeros((3, 27, 28)), 0)


def test_frozen_hashable_picklable_and_str():
    dec = Decomposition((28, 28), "2x2", overlap=2)
    assert dec == Decomposition([28, 28], [2, 2], [2, 2])
    assert hash(dec) == hash(Decomposition((28, 28), (2, 2), 2))
    assert pickle.loads(pickle.dumps(dec)) == dec
    with pytest.raises(AttributeError):
        dec.grid = (4, 4)
    assert str(dec) == "2x2 grid over 28x28, overlap 2"
    assert dec.overlap == (2, 2) and dec.grid == (2, 2) and dec.image_shape == (28, 28)
    assert isinstance(Decomposition((np.int64(28), 28), (np.int32(2), 2)).grid[0], int)


@pytest.mark.parametrize("value, ndim, expected", [
    ("2x2", None, (2, 2)), ("2X2x2", None, (2, 2, 2)), ("4, 4", 2, (4, 4)), ("3×1", 2, (3, 1)),
    ([2, 2], 2, (2, 2)), ((1, 2, 3), 3, (1, 2, 3)), (2, 3, (2, 2, 2)),
    (np.array([2, 4]), 2, (2, 4)),
])
def test_parse_grid(value, ndim, expected):
    assert parse_grid(value, ndim) == expected


@pytest.mark.parametrize("value, match", [
    ("2 by 2", "not of the form"), ("", "not of the form"), ("2x2.5", "not of the form"),
    ([2, 2.0], r"grid\[1\] must be an integer"), ([2, "2"], "must be an integer"),
    ([2, True], "must be an integer"), (2, "single number"),
    ([0, 2], r"grid\[0\] must be at least 1"),
    (None, "sequence of integers"),
])
def test_parse_grid_errors(value, match):
    with pytest.raises(ValueError, match=match):
        parse_grid(value)


def test_parse_overlap():
    assert parse_overlap(2, 3) == (2, 2, 2)
    assert parse_overlap([1, 0], 2) == (1, 0)
    with pytest.raises(ValueError, match="2 entries but the image has 3"):
        parse_overlap([1, 0], 3)
    with pytest.raises(ValueError, match="overlap must be an integer"):
        parse_overlap(1.5, 2)
    with pytest.raises(ValueError, match="must not be negative"):
        parse_overlap(-1, 2)


@pytest.mark.parametrize("args, match", [
    (((28, 28), (2, 2, 2)), "3 entries but the image has 2"),
    (((28, 28), (2,)), "1 entries but the image has 2"),
    (((28,), (2,)), "must be 2D"),
    (((2, 2, 2, 2), (1, 1, 1, 1)), "must be 2D"),
    (((28, 0), (1, 1)), r"image_shape\[1\] must be positive"),
    (((28.0, 28), (2, 2)), r"image_shape\[0\] must be an integer"),
    (((28, 28), (29, 2)), "29 parts along axis 0 .* only 28 pixels"),
    (((8, 8, 3), (2, 2, 4)), "4 parts along axis 2"),
    (((28, 28), (2, 2), -1), "must not be negative"),
    (((28, 28), (2, 2), 14), "overlap 14 along axis 0 is too large .* smallest core \\(14"),
    (((28, 28), (3, 3), 9), "smallest core \\(9 pixels\\)"),
    (((28, 28), (1, 4), (30, 7)), "overlap 7 along axis 1"),
    (((28, 28), (2, 2), 2.5), "overlap must be an integer"),
    (((28, 28), (2, 2), "2"), "overlap must be an integer"),
    (((28, 28), (2, 0)), r"grid\[1\] must be at least 1"),
])
def test_validation_errors(args, match):
    with pytest.raises(ValueError, match=match):
        Decomposition(*args)


def test_overlap_just_below_the_smallest_core_is_allowed():
    dec = Decomposition((28, 28), (3, 3), 8)  # smallest core 9
    assert dec.bounds(0, 1) == (1, 26)
    # one part along an axis: no interior boundary there, any overlap is harmless
    assert Decomposition((28, 28), (1, 2), (100, 2)).slices(0) == (slice(0, 28), slice(0, 16))


@pytest.mark.parametrize("bad, exc_match", [
    (4, "subdomain 4 is out of range for a 2x2 grid"),
    (-1, "subdomain -1 is out of range"),
    ((2, 0), "out of range along axis 0"),
    ((0, 0, 0), "has 3 entries"),
    (1.0, "must be a sequence of integers"),
])
def test_bad_subdomain(bad, exc_match):
    dec = Decomposition((28, 28), (2, 2), 2)
    with pytest.raises(ValueError, match=exc_match):
        dec.slices(bad)
