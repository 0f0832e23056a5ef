"""Image folders (PNG, JPEG, PGM, BMP, TIFF, ... via Pillow) -> (N, C, H, W) in [0, 1].

``load_image`` is the single-file loader that ``ddmpi predict`` uses too.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from data_prep import fileset, sources
from data_prep.errors import PrepError
from data_prep.splits import SplitOptions

MODES = ("grey", "rgb")
CHANNELS = {"grey": 1, "rgb": 3}
HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}  # 16-bit integer images: / 65535
EXIF_ORIENTATION = 0x0112  # values 5..8 mean the stored image is transposed


def convert(out, *, src=None, manifest=None, image_column="image", label_column="label",
            group_column=None, label_regex=None, classes=None, size=None, mode="auto",
            split_options=SplitOptions(), name=None):
    """Convert labelled image files to ``out``; return a one-line summary.

    Sources (see :func:`data_prep.sources.collect`): class sub-folders of ``src``, a flat ``src``
    with ``label_regex``, or a CSV ``manifest``. ``size=(H, W)`` None requires all images to have
    one size; ``mode`` ``auto`` is ``rgb`` if any image has colour, else ``grey``.
    """
    records = sources.collect(is_image, src=src, manifest=manifest, image_column=image_column,
                              label_column=label_column, group_column=group_column,
                              label_regex=label_regex)
    records, classes, labels = fileset.select(records, classes, split_options)
    if size is None or mode == "auto":
        probes = [probe(r.path) for r in records]
        if mode == "auto":
            mode = "rgb" if any(m == "rgb" for m, _ in probes) else "grey"
        if size is None:
            size = probes[0][1]
            for record, (_, other) in zip(records, probes):
                if other != size:
                    raise PrepError(f"{record.path}: {other[0]}x{other[1]} (HxW), but "
                                    f"{records[0].path} is {size[0]}x{size[1]}; give a size "
                                    f"(--size HxW) to resize all")
    root = Path(src) if src is not None else Path(manifest).parent
    options = {"src": src and str(src), "manifest": manifest and str(manifest),
               "image_column": image_column, "label_column": label_column,
               "group_column": group_column, "label_regex": label_regex, "classes": classes,
               "size": list(size), "mode": mode}
    return fileset.convert(out, records, classes, labels,
                           lambda path: (load_image(path, size, mode), {}),
                           converter="data_prep.images", options=options, root=root,
                           split_options=split_options, name=name or root.name,
                           manifest=manifest, libraries=("Pillow",))


def is_image(path):
    """Whether Pillow can open files with this extension."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    return fmt is not None and fmt in Image.OPEN


def load_image(path, size=None, mode="grey"):
    """One image file as a (C, H, W) float32 array in [0, 1]; C is 1 (``grey``) or 3 (``rgb``).

    ``size=(H, W)`` resizes (bilinear, antialiased when shrinking); None keeps the file's size.
    EXIF orientation is applied; 8-bit data is scaled by 1/255, 16-bit data by 1/65535.
    """
    if mode not in MODES:
        raise PrepError(f"image mode {mode!r}: expected one of {MODES}")
    try:
        with Image.open(path) as img:
            return _to_array(ImageOps.exif_transpose(img), size, mode)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... on bad files
        raise PrepError(f"{path}: cannot decode the image ({type(err).__name__}: {err})") \
            from err


def resize(plane, size):
    """Resize a 2D float array to ``size=(H, W)`` (bilinear, antialiased); None keeps it."""
    plane = np.asarray(plane, dtype=np.float32)
    if size is None or tuple(size) == plane.shape:
        return plane
    img = Image.fromarray(plane).resize((size[1], size[0]), Image.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def _to_array(img, size, mode):
    if img.mode in HIGH_BIT_MODES or img.mode == "F":
        scale = 1.0 if img.mode == "F" else 65535.0
        plane = resize(np.clip(np.asarray(img, dtype=np.float32) / scale, 0.0, 1.0), size)
        return np.repeat(plane[None], CHANNELS[mode], axis=0)
    img = img.convert("L" if mode == "grey" else "RGB")
    if size is not None and (size[1], size[0]) != img.size:
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    array = np.asarray(img, dtype=np.float32) / 255.0
    return array[None] if mode == "grey" else array.transpose(2, 0, 1)


def probe(path):
    """``(mode, (H, W))`` from the file header alone: ``rgb`` for colour or palette images."""
    try:
        with Image.open(path) as img:
            colour = len(img.getbands()) >= 3 or img.mode in ("P", "PA")
            width, height = img.size
            if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
    except Exception as err:
        raise PrepError(f"{path}: cannot decode the image ({type(err).__name__}: {err})") \
            from err
    return ("rgb" if colour else "grey"), (height, width)
