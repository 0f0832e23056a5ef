"""Real MNIST end to end: the CLI-converted file's subdomain (1, 0) of a 2x2 grid with overlap
2 holds exactly the original IDX pixels, read by hyperslab from the prepared file."""

import gzip
import subprocess
import sys

import numpy as np
from helpers import shared_data

from ddmpi.data.decomposition import Decomposition
from ddmpi.data.reader import load_subdomain
from ddmpi.data.schema import open_h5


def test_subdomain_1_0_equals_original_pixels(tmp_path):
    src = shared_data("mnist-test10k")
    out = tmp_path / "mnist10k.h5"
    subprocess.run([sys.executable, "-m", "data_prep", "mnist", "--src", str(src), "--out",
                    str(out), "--val-fraction", "0.1", "--test-fraction", "0.1", "--quiet"],
                   check=True, timeout=120)
    raw = np.frombuffer(gzip.open(src / "t10k-images-idx3-ubyte.gz").read()[16:], np.uint8)
    raw = raw.reshape(10000, 28, 28)
    labels = np.frombuffer(gzip.open(src / "t10k-labels-idx1-ubyte.gz").read()[8:], np.uint8)

    decomposition = Decomposition((28, 28), (2, 2), 2)
    assert decomposition.slices((1, 0)) == (slice(12, 28), slice(0, 16))
    for split, n in (("train", 8000), ("val", 1000), ("test", 1000)):
        x, y = load_subdomain(out, split, decomposition, (1, 0), normalize=False)
        with open_h5(out) as f:
            index = [int(i.rsplit(":", 1)[1]) for i in f[split]["ids"].asstr()[()]]
        assert x.shape == (n, 1, 16, 16)
        np.testing.assert_array_equal(x[:, 0], raw[index, 12:28, 0:16] / np.float32(255))
        np.testing.assert_array_equal(y, labels[index])
