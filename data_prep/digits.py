"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no download needed)."""

from dataclasses import asdict
from importlib import resources

import numpy as np
from sklearn.datasets import load_digits

from data_prep import provenance
from data_prep.output import write_dataset
from data_prep.splits import DEFAULT_TEST_FRACTION, SplitOptions, split, subsample
from ddmpi.data.inputs import resize

MAX_VALUE = 16.0  # the digits' pixel values are counts 0..16


def convert(out, *, size=None, split_options=SplitOptions(), name="digits", dtype="float32"):
    """Convert the digits to ``out`` (resized to ``size=(H, W)`` if given); return a summary."""
    digits = load_digits()
    opts = split_options
    keep = subsample(digits.target, opts.limit, opts.seed)
    planes = (digits.images[keep] / MAX_VALUE).astype(np.float32)
    images = np.stack([resize(p, size) for p in planes])[:, None]
    labels = digits.target[keep].astype(np.int64)
    test = DEFAULT_TEST_FRACTION if opts.test_fraction is None else opts.test_fraction
    parts = split(labels, opts.val_fraction, test, opts.seed)
    data_file = resources.files("sklearn.datasets") / "data" / "digits.csv.gz"
    options = {"size": size and list(size), **asdict(opts), "test_fraction": test,
               "dtype": dtype}
    prov = provenance.build("data_prep.digits", options, [provenance.file_record(data_file)],
                            libraries=("scikit-learn", "Pillow"))
    return write_dataset(out, name=name, classes=[str(d) for d in range(10)],
                         converter="data_prep.digits", provenance=prov, images=images,
                         labels=labels, parts=parts, ids=[f"digits:{i}" for i in keep],
                         dtype=dtype)
