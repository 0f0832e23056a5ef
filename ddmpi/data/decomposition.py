"""Geometry of a grid of subdomains over a 2D or 3D image (domain decomposition).

Definition (the standard one of overlapping domain decomposition methods): along an axis of
length ``n`` cut into ``g`` parts, core ``k`` (``0 <= k < g``) is the half-open interval::

    core_k = [floor(k * n / g), floor((k + 1) * n / g))

so the ``g`` cores tile the axis exactly once, also when ``g`` does not divide ``n`` (core
lengths then differ by at most one). Subdomain ``k`` is its core extended by ``overlap`` pixels
(voxels) past each of its *interior* boundaries, clamped at the image border::

    sub_k = [max(0, core_start - overlap), min(n, core_stop + overlap))

A subdomain of the grid is the Cartesian product of these intervals, one per axis. Two
neighbouring subdomains therefore share ``2 * overlap`` pixels across their common boundary
(fewer only if an extension is clamped at the border, which cannot happen under the validation
below). The overlap must be smaller than the smallest core along every axis cut into more than
one part, so that no subdomain reaches past its neighbour's core.

Example: 28x28 image, 2x2 grid, overlap 2. Cores are rows/cols 0:14 and 14:28; subdomain (0, 0)
is rows 0:16, cols 0:16; subdomain (1, 0) is rows 12:28, cols 0:16; each is 16x16, and
subdomains (0, 0) and (1, 0) share rows 12:16 (4 = 2 * overlap rows).

With non-divisible sizes subdomains differ in shape (28 over 3 parts: cores 0:9, 9:18, 18:28);
every subdomain has its own local network, so each only needs its own :meth:`subdomain_shape`.

Subdomains are numbered in C order over the grid: ``(i, j)`` of a ``(gi, gj)`` grid has linear
number ``i * gj + j``; ``(i, j)`` index (rows, columns), ``(i, j, k)`` (depth, rows, columns),
matching the spatial axes of ``(N, C, H, W)`` / ``(N, C, D, H, W)`` arrays.
"""

import math
import numbers
import re
from dataclasses import dataclass

__all__ = ["Decomposition", "parse_grid", "parse_overlap"]


def _as_int(value, what):
    """``value`` as an int; ValueError naming ``what`` for bools, floats, strings, ..."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def _as_int_tuple(value, what):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{what} must be a sequence of integers, got {value!r}")
    return tuple(_as_int(v, f"{what}[{a}]") for a, v in enumerate(value))


def parse_grid(value, ndim=None, what="grid"):
    """Grid of subdomains from a config value: ``[2, 2]``, ``(2, 2, 2)``, ``"2x2"``, ``"2,2"``.

    A bare integer ``g`` means ``g`` parts along every axis and needs ``ndim``. Returns a tuple
    of ints (not yet checked against an image; :class:`Decomposition` does that).
    """
    if isinstance(value, str):
        parts = [p for p in re.split(r"[x×,\s]+", value.strip().lower()) if p]
        if not parts or not all(re.fullmatch(r"[+-]?\d+", p) for p in parts):
            raise ValueError(f"{what} {value!r} is not of the form '2x2' or '2x2x2'")
        grid = tuple(int(p) for p in parts)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if ndim is None:
            raise ValueError(f"{what} {value!r} is a single number; give one per axis "
                             f"(e.g. [{value}, {value}])")
        grid = (int(value),) * ndim
    else:
        grid = _as_int_tuple(value, what)
    if ndim is not None and len(grid) != ndim:
        raise ValueError(f"{what} {value!r} has {len(grid)} entries but the image has {ndim} "
                         f"spatial dimensions")
    for a, g in enumerate(grid):
        if g < 1:
            raise ValueError(f"{what}[{a}] must be at least 1, got {g}")
    return grid


def parse_overlap(value, ndim, what="overlap"):
    """Overlap from a config value: one integer for all axes, or one per axis."""
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__")
                                            and not isinstance(value, (str, bytes))):
        overlap = _as_int_tuple(value, what)
        if len(overlap) != ndim:
            raise ValueError(f"{what} {value!r} has {len(overlap)} entries but the image has "
                             f"{ndim} spatial dimensions")
    else:
        overlap = (_as_int(value, what),) * ndim
    for a, o in enumerate(overlap):
        if o < 0:
            raise ValueError(f"{what} must not be negative, got {o} along axis {a}")
    return overlap


@dataclass(frozen=True)
class Decomposition:
    """A grid of (optionally overlapping) subdomains over images of spatial shape ``image_shape``.

    ``image_shape``: spatial shape ``(H, W)`` or ``(D, H, W)`` (no sample or channel axis).
    ``grid``: parts per axis, same length (a sequence, or a string like ``"2x2"``).
    ``overlap``: pixels (voxels) by which each subdomain extends past its interior core
    boundaries; one integer for all axes or one per axis. See the module docstring for the
    exact definition. Raises ``ValueError`` naming the offending value.

    A subdomain is addressed by its linear number (C order) or its grid index tuple; iterating
    over a decomposition yields the linear numbers ``0 .. num_subdomains - 1``.
    """

    image_shape: tuple
    grid: tuple
    overlap: tuple = 0

    def __post_init__(self):
        shape = _as_int_tuple(self.image_shape, "image_shape")
        if len(shape) not in (2, 3):
            raise ValueError(f"image_shape must be 2D (H, W) or 3D (D, H, W), got {shape}")
        for a, n in enumerate(shape):
            if n < 1:
                raise ValueError(f"image_shape[{a}] must be positive, got {n}")
        ndim = len(shape)
        grid = parse_grid(self.grid, ndim)
        overlap = parse_overlap(self.overlap, ndim)
        for a, (n, g, o) in enumerate(zip(shape, grid, overlap)):
            if g > n:
                raise ValueError(f"grid {_fmt(grid)} has {g} parts along axis {a} but the image "
                                 f"({_fmt(shape)}) is only {n} pixels long there")
            smallest = n // g  # the shortest core along this axis
            if g > 1 and o >= smallest:
                raise ValueError(
                    f"overlap {o} along axis {a} is too large for grid {_fmt(grid)} on image "
                    f"{_fmt(shape)}: it must be smaller than the smallest core ({smallest} "
                    f"pixels), or a subdomain would reach past its neighbour's core")
        object.__setattr__(self, "image_shape", shape)
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "overlap", overlap)

    # -- numbering ---------------------------------------------------------------------------

    @property
    def ndim(self):
        """Number of spatial dimensions (2 or 3)."""
        return len(self.image_shape)

    @property
    def num_subdomains(self):
        return math.prod(self.grid)

    def __len__(self):
        return self.num_subdomains

    def __iter__(self):
        return iter(range(self.num_subdomains))

    def index(self, linear):
        """Grid index tuple ``(i, j[, k])`` of subdomain number ``linear`` (C order)."""
        linear = _as_int(linear, "subdomain")
        if not 0 <= linear < self.num_subdomains:
            raise ValueError(f"subdomain {linear} is out of range for a {_fmt(self.grid)} grid "
                             f"({self.num_subdomains} subdomains, numbered from 0)")
        index = []
        for g in reversed(self.grid):
            linear, r = divmod(linear, g)
            index.append(r)
        return tuple(reversed(index))

    def linear(self, index):
        """Linear number (C order) of the subdomain with grid index ``(i, j[, k])``."""
        index = self._check_index(index)
        linear = 0
        for i, g in zip(index, self.grid):
            linear = linear * g + i
        return linear

    def indices(self):
        """All grid index tuples, in C order (the order of the linear numbers)."""
        return [self.index(s) for s in range(self.num_subdomains)]

    def _check_index(self, index):
        index = _as_int_tuple(index, "subdomain index")
        if len(index) != self.ndim:
            raise ValueError(f"subdomain index {index} has {len(index)} entries, the grid "
                             f"{_fmt(self.grid)} has {self.ndim}")
        for a, (i, g) in enumerate(zip(index, self.grid)):
            if not 0 <= i < g:
                raise ValueError(f"subdomain index {index} is out of range along axis {a} for "
                                 f"a {_fmt(self.grid)} grid")
        return index

    def as_index(self, subdomain):
        """Grid index tuple of a subdomain given by its linear number or its index tuple."""
        if isinstance(subdomain, numbers.Integral) and not isinstance(subdomain, bool):
            return self.index(subdomain)
        return self._check_index(subdomain)

    # -- geometry ----------------------------------------------------------------------------

    def core_bounds(self, axis, k):
        """``(start, stop)`` of core ``k`` along ``axis``: floor(k n / g) .. floor((k+1) n / g)."""
        n, g = self.image_shape[axis], self.grid[axis]
        return k * n // g, (k + 1) * n // g

    def bounds(self, axis, k):
        """``(start, stop)`` of subdomain ``k`` along ``axis``: its core extended by the overlap
        past interior boundaries, clamped at the border."""
        start, stop = self.core_bounds(axis, k)
        o = self.overlap[axis]
        return max(0, start - o), min(self.image_shape[axis], stop + o)

    def slices(self, subdomain):
        """Spatial slices of a subdomain (including its overlap), one per axis."""
        index = self.as_index(subdomain)
        return tuple(slice(*self.bounds(a, k)) for a, k in enumerate(index))

    def core_slices(self, subdomain):
        """Spatial slices of a subdomain's core (no overlap); the cores tile the image."""
        index = self.as_index(subdomain)
        return tuple(slice(*self.core_bounds(a, k)) for a, k in enumerate(index))

    def subdomain_shape(self, subdomain):
        """Spatial shape of a subdomain (including its overlap)."""
        return tuple(s.stop - s.start for s in self.slices(subdomain))

    def extract(self, array, subdomain, core=False):
        """The subdomain of ``array`` whose last ``ndim`` axes are the image's spatial axes
        (``(H, W)``, ``(C, H, W)``, ``(N, C, H, W)``, ...): a numpy view / torch view."""
        spatial = tuple(array.shape[-self.ndim:])
        if spatial != self.image_shape:
            raise ValueError(f"array of shape {tuple(array.shape)} does not end in the image "
                             f"shape {_fmt(self.image_shape)} of this decomposition")
        sl = self.core_slices(subdomain) if core else self.slices(subdomain)
        return array[(Ellipsis,) + sl]

    def __str__(self):
        return (f"{_fmt(self.grid)} grid over {_fmt(self.image_shape)}, "
                f"overlap {_fmt(self.overlap) if len(set(self.overlap)) > 1 else self.overlap[0]}")


def _fmt(shape):
    return "x".join(str(s) for s in shape)
