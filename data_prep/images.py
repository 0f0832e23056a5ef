"""Image folders (PNG, JPEG, PGM, BMP, TIFF, ... via Pillow) -> (N, C, H, W) in [0, 1].

The single-file loaders live in :mod:`ddmpi.data.inputs` (``ddmpi predict`` uses them too).
"""

from pathlib import Path

from data_prep import fileset, sources
from data_prep.errors import PrepError
from data_prep.splits import SplitOptions
from ddmpi.data.inputs import CHANNELS, MODES, is_image, load_image, probe, resize  # noqa: F401


def convert(out, *, src=None, manifest=None, image_column="image", label_column="label",
            group_column=None, label_regex=None, classes=None, size=None, mode="auto",
            split_column=None, split_options=SplitOptions(), name=None, dtype="float32"):
    """Convert labelled image files to ``out``; return a one-line summary.

    Sources (see :func:`data_prep.sources.collect`): class sub-folders of ``src``, a flat ``src``
    with ``label_regex``, or a CSV ``manifest``. ``size=(H, W)`` None requires all images to have
    one size; ``mode`` ``auto`` is ``rgb`` if any image has colour, else ``grey``.
    """
    records = sources.collect(is_image, src=src, manifest=manifest, image_column=image_column,
                              label_column=label_column, group_column=group_column,
                              label_regex=label_regex, split_column=split_column)
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
               "size": list(size), "mode": mode, "split_column": split_column, "dtype": dtype}
    return fileset.convert(out, records, classes, labels,
                           lambda path: (load_image(path, size, mode), {}),
                           converter="data_prep.images", options=options, root=root,
                           split_options=split_options, name=name or root.name,
                           manifest=manifest, libraries=("Pillow",), dtype=dtype)
