"""Load one input file the way a prepared data set's samples were made (for ``ddmpi predict``)."""

import json

from data_prep.images import load_image
from data_prep.nifti import is_nifti, load_volume


def load_sample(path, info):
    """``path`` as one sample of the data set described by ``info`` (``ddmpi.data.schema.DatasetInfo``).

    NIfTI files are resampled to the data set's (D, H, W) with the window recorded in its
    provenance; other files are read as images of its (H, W), grey or RGB by its channel count.
    Returns (C, H, W) or (C, D, H, W) float32 in [0, 1], unnormalised like the stored images.
    """
    if is_nifti(path):
        options = json.loads(info.attrs.get("provenance", "{}")).get("options", {})
        return load_volume(path, info.spatial_shape, options.get("window"))
    return load_image(path, info.spatial_shape, "grey" if info.channels == 1 else "rgb")
