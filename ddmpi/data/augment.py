"""Data augmentation of the whole image, evaluated on one rank's window of it.

Every rank holds only a *window* (a box of the full image) of each sample; augmentation is
defined on the FULL image and each rank computes the augmented image restricted to its own
output *box* (its subdomain), so all local CNNs see cuts of the same augmented image and the
global baseline (window = box = full image) gets the same augmentation.

Definition, per sample, along spatial axis ``a`` of length ``L`` (output coordinate ``y``)::

    y' = L - 1 - y  if the sample is flipped along a (only axes in flip_axes), else  y
    src = y' + d_a  with d_a a uniform integer in [-shift, shift]
    S[y] = I[src]   (product over the axes), 0 where src lies outside [0, L) on any axis

i.e. ``S = flip(crop(pad(I, shift, 0)))``: zero padding by ``shift`` (0 = the padding value in
normalised units), a random crop at offset ``shift + d`` (the CIFAR random crop), then the
random flip (probability 1/2 per axis in ``flip_axes``); ``shift`` must be less than half the
smallest side, so that every shifted image keeps more than half of each side in view. Colour
jitter follows, on every pixel of ``S`` (padding included), every channel alike::

    A = S * c + b,   c ~ U(1 - contrast, 1 + contrast),   b ~ U(-brightness, brightness)

(skipped when both are 0). All parameters are a pure function of ``(seed, epoch, index)``
(a splitmix64 hash; ``index`` = the sample's index in its split), so every rank computes the
same ones for a sample whatever its batch. The images are moved by index gathers, exact copies,
on whatever device ``x`` is on.
"""

import numbers

import numpy as np
import torch

__all__ = ["Augmenter", "uniforms"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1

# parameter numbers fed to the hash (fixed slots: turning one transform on changes no other)
_P_FLIP = 0        # + axis
_P_SHIFT = 8       # + axis
_P_BRIGHTNESS = 16
_P_CONTRAST = 17


def _mix(z):
    """splitmix64 step on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _u64(value):
    """A Python/numpy integer (or array of them) as uint64, wrapping negatives."""
    arr = np.asarray(value)
    if arr.dtype.kind == "i":
        return arr.astype(np.int64).view(np.uint64) if arr.ndim else np.uint64(int(arr) & _MASK64)
    return np.asarray(arr, dtype=np.uint64) if arr.ndim else np.uint64(int(arr) & _MASK64)


def uniforms(seed, epoch, indices, params):
    """Uniforms in [0, 1), float64 array (B, P): hash of (seed, epoch, index, parameter number)."""
    idx = _u64(np.asarray(indices, dtype=np.int64)).reshape(-1, 1)
    par = _u64(np.asarray(params, dtype=np.int64)).reshape(1, -1)
    h = _mix(_mix(_mix(_mix(_u64(seed)) ^ _u64(epoch)) ^ idx) ^ par)
    return (h >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


def _upload(t, device):
    """``t`` (host) on ``device``; to CUDA through pinned memory without waiting for the copy."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _field(cfg, name, default):
    return default if cfg is None else getattr(cfg, name, default)


class AugmentError(ValueError):
    """A setting of ``data.augment`` that does not fit; ``field`` names it (e.g. "flip_axes")."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


class Augmenter:
    """Random shift (pad-and-crop), flips and colour jitter of whole images, on a window."""

    def __init__(self, cfg, image_shape, seed):
        self.image_shape = tuple(int(n) for n in image_shape)
        ndim = len(self.image_shape)
        if ndim not in (2, 3):
            raise ValueError(f"image_shape must be 2D or 3D, got {self.image_shape}")
        self.shift = int(_field(cfg, "shift", 0))
        if self.shift < 0:
            raise AugmentError("shift", f"must not be negative, got {self.shift}")
        side = min(self.image_shape)
        if 2 * self.shift >= side:
            raise AugmentError("shift", f"{self.shift} is not less than half the smallest side of "
                                        f"the {'x'.join(map(str, self.image_shape))} images "
                                        f"({side}); a shifted image must keep more than half "
                                        f"of each side in view")
        axes = []
        for a in _field(cfg, "flip_axes", []) or []:
            if isinstance(a, bool) or not isinstance(a, numbers.Integral) \
                    or not -ndim <= a < ndim:
                raise AugmentError("flip_axes", f"{a!r} is not a spatial axis of a {ndim}D "
                                                f"image (0..{ndim - 1} or negative)")
            axes.append(int(a) % ndim)
        self.flip_axes = tuple(sorted(set(axes)))
        self.brightness = float(_field(cfg, "brightness", 0.0))
        self.contrast = float(_field(cfg, "contrast", 0.0))
        if self.brightness < 0 or self.contrast < 0:
            raise AugmentError("brightness" if self.brightness < 0 else "contrast",
                               "must not be negative")
        self.seed = int(seed)

    @property
    def ndim(self):
        return len(self.image_shape)

    @property
    def active(self):
        """False when no transform is switched on (then the augmenter is the identity)."""
        return bool(self.shift or self.flip_axes or self.brightness or self.contrast)

    @property
    def spatial(self):
        """True when a transform moves pixels (shift or flip)."""
        return bool(self.shift or self.flip_axes)

    def _check_box(self, box, what):
        if len(box) != self.ndim:
            raise ValueError(f"{what} {box} has {len(box)} slices, the image has "
                             f"{self.ndim} axes")
        out = []
        for a, (s, n) in enumerate(zip(box, self.image_shape)):
            start, stop, step = s.indices(n)
            if step != 1 or s.start is not None and not 0 <= s.start <= n \
                    or s.stop is not None and not 0 <= s.stop <= n or stop <= start:
                raise ValueError(f"{what} {box} is not a non-empty box of the image "
                                 f"{self.image_shape} along axis {a}")
            out.append(slice(start, stop))
        return tuple(out)

    def window(self, box):
        """Smallest box of the image holding every source pixel of the output ``box``."""
        box = self._check_box(box, "box")
        out = []
        for a, (s, n) in enumerate(zip(box, self.image_shape)):
            lo, hi = s.start, s.stop - 1
            if a in self.flip_axes:
                lo, hi = min(lo, n - 1 - hi), max(hi, n - 1 - lo)
            out.append(slice(max(0, lo - self.shift), min(n, hi + self.shift + 1)))
        return tuple(out)

    def params(self, indices, epoch, device=None):
        """Per-sample parameters: flips (B, n_flip_axes) bool, shifts (B, ndim) int64,
        brightness (B,), contrast (B,) float64; on ``device`` (default: that of ``indices``)."""
        if device is None:
            device = indices.device if isinstance(indices, torch.Tensor) else "cpu"
        idx = torch.as_tensor(indices).detach().cpu().numpy().astype(np.int64).reshape(-1)
        slots = ([_P_FLIP + a for a in self.flip_axes]
                 + [_P_SHIFT + a for a in range(self.ndim)] + [_P_BRIGHTNESS, _P_CONTRAST])
        u = uniforms(self.seed, epoch, idx, slots)
        nf, s = len(self.flip_axes), self.shift
        shifts = np.minimum(np.floor(u[:, nf:nf + self.ndim] * (2 * s + 1)), 2 * s) - s
        values = {"flips": (u[:, :nf] < 0.5, torch.bool),
                  "shifts": (shifts, torch.int64),
                  "brightness": ((2.0 * u[:, -2] - 1.0) * self.brightness, torch.float64),
                  "contrast": (1.0 + (2.0 * u[:, -1] - 1.0) * self.contrast, torch.float64)}
        return {k: _upload(torch.as_tensor(np.ascontiguousarray(v), dtype=dt), device)
                for k, (v, dt) in values.items()}

    def _sources(self, a, out_slice, params):
        """Full-image source coordinates (B, n) along axis ``a`` of the output ``out_slice``."""
        n = self.image_shape[a]
        shifts = params["shifts"]
        y = torch.arange(out_slice.start, out_slice.stop, device=shifts.device)
        y = y.unsqueeze(0).expand(shifts.shape[0], -1)
        if a in self.flip_axes:
            flip = params["flips"][:, self.flip_axes.index(a)].unsqueeze(1)
            y = torch.where(flip, n - 1 - y, y)
        return y + shifts[:, a:a + 1]

    def __call__(self, x, window, box, indices, epoch):
        """Augmented samples cut to ``box``: x (B, C, *window shape) -> (B, C, *box shape)."""
        window = self._check_box(window, "window")
        box = self._check_box(box, "box")
        wshape = tuple(s.stop - s.start for s in window)
        if x.dim() != 2 + self.ndim or tuple(x.shape[2:]) != wshape:
            raise ValueError(f"x of shape {tuple(x.shape)} is not (B, C) + window shape {wshape}")
        if not self.spatial:
            if any(b.start < w.start or b.stop > w.stop for b, w in zip(box, window)):
                raise ValueError(f"box {box} is not inside the window {window}")
            out = x[(Ellipsis,) + tuple(slice(b.start - w.start, b.stop - w.start)
                                        for b, w in zip(box, window))]
            if not self.active:
                return out
        if len(indices) != x.shape[0]:
            raise ValueError(f"{len(indices)} indices for {x.shape[0]} samples")
        params = self.params(indices, epoch, device=x.device)
        if self.spatial:
            out = self._gather(x, window, box, params)
        if self.brightness or self.contrast:
            view = (-1,) + (1,) * (x.dim() - 1)
            c = params["contrast"].to(x.dtype).view(view)
            b = params["brightness"].to(x.dtype).view(view)
            out = out * c + b  # two roundings on every device (no fused multiply-add)
        return out

    def _gather(self, x, window, box, params):
        """Spatial part: one index gather per axis, zero outside the image."""
        need = self.window(box)
        covered = all(w.start <= q.start and q.stop <= w.stop for w, q in zip(window, need))
        out = x
        for a in range(self.ndim):
            src = self._sources(a, box[a], params)
            n, w = self.image_shape[a], window[a]
            valid = (src >= 0) & (src < n)
            if not covered and bool(((src < w.start) | (src >= w.stop))[valid].any()):
                raise ValueError(f"window {window} misses source pixels of box {box} along "
                                 f"axis {a}; use Augmenter.window(box)")
            local = (src - w.start).clamp(0, w.stop - w.start - 1)
            shape = [src.shape[0]] + [1] * (self.ndim + 1)
            shape[2 + a] = src.shape[1]
            target = list(out.shape)
            target[2 + a] = src.shape[1]
            out = torch.gather(out, 2 + a, local.view(shape).expand(target))
            out = torch.where(valid.view(shape), out, out.new_zeros(()))
        return out
