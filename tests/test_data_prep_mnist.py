"""IDX reading and the MNIST converter: synthetic IDX files, corrupt inputs, the real MNIST."""

import gzip
import json
import struct

import h5py
import numpy as np
import pytest
from helpers import shared_data
from test_data_prep_cli import assert_failed, run_prep

from data_prep import mnist
from data_prep.cli import main
from data_prep.errors import PrepError
from data_prep.idx import read_idx
from data_prep.splits import SplitOptions
from ddmpi.data.schema import read_info

TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}


def idx_bytes(array):
    array = np.asarray(array)
    header = bytes([0, 0, TYPE_CODES[array.dtype], array.ndim])
    return header + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array, gz=True, cut=0):
    data = idx_bytes(array)
    data = data[:len(data) - cut]
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_mnist(folder, n_train=60, n_test=20, seed=0, gz=True, splits=("train", "t10k")):
    """Small MNIST-layout IDX files with every class present; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        if split not in splits:
            continue
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = "-ubyte.gz" if gz else "-ubyte"
        write_idx(folder / f"{split}-images-idx3{suffix}", images, gz)
        write_idx(folder / f"{split}-labels-idx1{suffix}", labels, gz)
        made[split] = (images, labels)
    return made


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    values = np.arange(-6, 18, dtype=np.int16).reshape(2, 3, 4) * 1000
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a", values, gz)), values)
    floats = np.linspace(0, 1, 5, dtype=np.float32)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "b", floats, gz)), floats)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_rejects_truncated_and_oversized(tmp_path, gz):
    images = np.zeros((5, 28, 28), np.uint8)
    path = write_idx(tmp_path / "cut", images, gz, cut=100)
    with pytest.raises(PrepError, match=r"cut: truncated: 3836 bytes.*5x28x28"):
        read_idx(path)
    path = tmp_path / "long"
    data = idx_bytes(images) + b"\0\0\0"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(PrepError, match="long: 3 bytes beyond the 5x28x28 array"):
        read_idx(path)
    path = write_idx(tmp_path / "header", images, gz, cut=len(idx_bytes(images)) - 10)
    with pytest.raises(PrepError, match="header: truncated IDX header"):
        read_idx(path)


def test_read_idx_rejects_bad_magic_and_broken_gzip(tmp_path):
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(PrepError, match="png: not an IDX file .magic number 89504e47"):
        read_idx(tmp_path / "png")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(PrepError, match="empty: not an IDX file"):
        read_idx(tmp_path / "empty")
    data = gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))
    (tmp_path / "halfgz").write_bytes(data[:len(data) // 2])
    with pytest.raises(PrepError, match="halfgz: corrupt or truncated gzip"):
        read_idx(tmp_path / "halfgz")
    with pytest.raises(PrepError, match="absent: cannot read"):
        read_idx(tmp_path / "absent")


def test_official_test_split_is_kept(tmp_path):
    made = make_mnist(tmp_path / "src")
    out = tmp_path / "m.h5"
    mnist.convert(out, src=tmp_path / "src", split_options=SplitOptions(val_fraction=0.2))
    info = read_info(out)
    assert info.splits == {"train": 48, "val": 12, "test": 20}
    assert info.spatial_shape == (28, 28) and info.channels == 1
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["test/images"][:, 0],
                                      made["t10k"][0].astype(np.float32) / 255)
        np.testing.assert_array_equal(f["test/labels"], made["t10k"][1])
        assert np.bincount(f["val/labels"][()], minlength=10).min() == 1  # stratified
        ids = f["val/ids"].asstr()[()]
        assert all(i.startswith("train-images-idx3-ubyte:") for i in ids)
        rows = [int(i.split(":")[1]) for i in ids]
        np.testing.assert_array_equal(f["val/images"][:, 0],
                                      made["train"][0][rows].astype(np.float32) / 255)
    prov = json.loads(info.attrs["provenance"])
    assert len(prov["sources"]) == 4 and all(len(s["sha256"]) == 64 for s in prov["sources"])
    assert prov["options"]["official_test_kept"] is True


def test_only_test_files_are_split_fresh(tmp_path):
    make_mnist(tmp_path / "src", n_test=100, gz=False, splits=("t10k",))
    out = tmp_path / "m.h5"
    mnist.convert(out, src=tmp_path / "src", variant="fashion",
                  split_options=SplitOptions(val_fraction=0.1, test_fraction=0.2, seed=1))
    info = read_info(out)
    assert info.splits == {"train": 70, "val": 10, "test": 20}
    assert info.classes[0] == "T-shirt/top"


def test_fresh_split_limit_and_test_fraction_rule(tmp_path):
    make_mnist(tmp_path / "src", n_train=100, n_test=50)
    with pytest.raises(PrepError, match="official test split.*--fresh-split"):
        mnist.convert(tmp_path / "a.h5", src=tmp_path / "src",
                      split_options=SplitOptions(test_fraction=0.3))
    assert not (tmp_path / "a.h5").exists()
    mnist.convert(tmp_path / "b.h5", src=tmp_path / "src", fresh_split=True,
                  split_options=SplitOptions(val_fraction=0.2, test_fraction=0.2, limit=40))
    assert read_info(tmp_path / "b.h5").splits == {"train": 48, "val": 16, "test": 16}


def test_mislabelled_pairs_are_errors(tmp_path):
    made = make_mnist(tmp_path / "src", splits=("train",))
    write_idx(tmp_path / "src" / "train-labels-idx1-ubyte.gz", made["train"][1][:-1])
    with pytest.raises(PrepError, match="train-labels-idx1-ubyte.gz: 59 labels for the 60"):
        mnist.convert(tmp_path / "o.h5", src=tmp_path / "src")
    write_idx(tmp_path / "src" / "train-labels-idx1-ubyte.gz", made["train"][1] + 5)
    with pytest.raises(PrepError, match="label 14 outside 0..9"):
        mnist.convert(tmp_path / "o.h5", src=tmp_path / "src")
    (tmp_path / "src" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(PrepError, match="train-labels-idx1-ubyte.*missing"):
        mnist.convert(tmp_path / "o.h5", src=tmp_path / "src")
    with pytest.raises(PrepError, match="empty: no MNIST IDX files.*--download"):
        mnist.convert(tmp_path / "o.h5", src=tmp_path / "empty")
    assert not (tmp_path / "o.h5").exists()


def test_cli_truncated_idx_fails_cleanly(tmp_path, capsys):
    make_mnist(tmp_path / "gz")
    bad = write_idx(tmp_path / "gz" / "t10k-images-idx3-ubyte.gz", np.zeros((20, 28, 28),
                                                                            np.uint8), cut=500)
    out = tmp_path / "out.h5"
    result = run_prep("mnist", "--src", tmp_path / "gz", "--out", out)
    assert_failed(result.returncode, result.stderr, bad, out)
    assert "truncated" in result.stderr
    make_mnist(tmp_path / "raw", gz=False)
    bad = write_idx(tmp_path / "raw" / "train-labels-idx1-ubyte", np.zeros(60, np.uint8), False,
                    cut=1)
    status = main(["mnist", "--src", str(tmp_path / "raw"), "--out", str(out)])
    assert_failed(status, capsys.readouterr().err, bad, out)


def _raw_idx(path):
    data = gzip.decompress(path.read_bytes())
    return np.frombuffer(data, np.uint8, offset=16 if data[3] == 3 else 8)


def test_real_mnist_test10k(tmp_path):
    src = shared_data("mnist-test10k")
    out = tmp_path / "m10k.h5"
    result = run_prep("mnist", "--src", src, "--out", out)
    assert result.returncode == 0, result.stderr
    info = read_info(out)
    assert sum(info.splits.values()) == 10_000 and info.spatial_shape == (28, 28)
    raw = _raw_idx(src / "t10k-images-idx3-ubyte.gz").reshape(10_000, 28, 28)
    labels = _raw_idx(src / "t10k-labels-idx1-ubyte.gz")
    with h5py.File(out, "r") as f:
        for split in ("train", "val", "test"):
            rows = [int(i.split(":")[1]) for i in f[f"{split}/ids"].asstr()[:50]]
            np.testing.assert_array_equal(f[f"{split}/images"][:50, 0],
                                          raw[rows].astype(np.float32) / 255)
            np.testing.assert_array_equal(f[f"{split}/labels"][:50], labels[rows])


def test_real_mnist_full(tmp_path):
    src = shared_data("mnist")
    out = tmp_path / "mnist.h5"
    mnist.convert(out, src=src)
    info = read_info(out)
    assert info.splits == {"train": 54_000, "val": 6_000, "test": 10_000}
    assert abs(float(info.mean[0]) - 0.1307) < 0.001 and abs(float(info.std[0]) - 0.3081) < 0.001
    raw = _raw_idx(src / "t10k-images-idx3-ubyte.gz").reshape(10_000, 28, 28)
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["test/images"][-3:, 0],
                                      raw[-3:].astype(np.float32) / 255)
        assert set(np.unique(f["val/labels"][()])) == set(range(10))
