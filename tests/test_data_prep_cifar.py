"""The CIFAR converter on small pickled batches written like the official ones."""

import json
import pickle

import h5py
import numpy as np
import pytest

from data_prep import cifar
from data_prep.cli import main
from data_prep.errors import PrepError
from data_prep.splits import SplitOptions
from ddmpi.data.schema import read_info


def batch(n, label_key, num_classes, seed):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"synthetic",
            label_key.encode(): [int(i % num_classes) for i in range(n)],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}


def dump(obj, path, protocol=2):
    """Pickle ``obj``; protocol 2 with numpy 1.x module names, like the official Python 2 files."""
    data = pickle.dumps(obj, protocol=protocol)
    if protocol == 2:  # GLOBAL opcodes are plain text lines here: safe to rename
        data = data.replace(b"numpy._core.", b"numpy.core.")
    path.write_bytes(data)


def make_cifar10(folder, per_batch=20):
    folder.mkdir(parents=True)
    for i in range(1, 6):
        dump(batch(per_batch, "labels", 10, i), folder / f"data_batch_{i}")
    dump(batch(per_batch, "labels", 10, 0), folder / "test_batch")
    dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072},
         folder / "batches.meta")


def test_cifar10_official_split_and_pixels(tmp_path):
    make_cifar10(tmp_path / "raw" / "cifar-10-batches-py")
    out = tmp_path / "c10.h5"
    cifar.convert(out, src=tmp_path / "raw", split_options=SplitOptions(val_fraction=0.2))
    info = read_info(out)
    assert info.splits == {"train": 80, "val": 20, "test": 20}
    assert info.channels == 3 and info.spatial_shape == (32, 32)
    assert info.classes == [f"class{i}" for i in range(10)]
    expected = batch(20, "labels", 10, 0)[b"data"].reshape(20, 3, 32, 32)
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["test/images"][()], expected.astype(np.float32) / 255)
        assert f["test/ids"].asstr()[0] == "img_0_0.png"
    prov = json.loads(info.attrs["provenance"])
    assert len(prov["sources"]) == 7 and prov["options"]["variant"] == "cifar10"


def test_cifar100_fine_and_coarse(tmp_path):
    src = tmp_path / "c100"
    src.mkdir()
    for name, n, seed in (("train", 200, 1), ("test", 40, 2)):
        b = batch(n, "fine_labels", 100, seed)
        b[b"coarse_labels"] = [i % 20 for i in range(n)]
        dump(b, src / name, protocol=4)
    dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
          b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}, src / "meta")
    cifar.convert(tmp_path / "fine.h5", src=src, fresh_split=True,
                  split_options=SplitOptions(val_fraction=0.1, test_fraction=0.1))
    assert read_info(tmp_path / "fine.h5").num_classes == 100
    cifar.convert(tmp_path / "coarse.h5", src=src, label_type="coarse")
    info = read_info(tmp_path / "coarse.h5")
    assert info.classes[:2] == ["c0", "c1"] and info.splits["test"] == 40


def test_wrong_keys_and_bad_pickles(tmp_path, capsys):
    make_cifar10(tmp_path / "raw")
    bad = tmp_path / "raw" / "data_batch_3"
    dump({b"pixels": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, bad)
    out = tmp_path / "o.h5"
    assert main(["cifar", "--src", str(tmp_path / "raw"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: not a CIFAR batch" in err and "missing key(s) ['data']" in err
    assert not out.exists()
    bad.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 12]}))
    with pytest.raises(PrepError, match="data_batch_3: labels outside 0..9"):
        cifar.convert(out, src=tmp_path / "raw")
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(PrepError, match="data_batch_3: not a readable python pickle"):
        cifar.convert(out, src=tmp_path / "raw")
    bad.write_bytes(pickle.dumps({"data": print}))
    with pytest.raises(PrepError, match="refusing to load builtins.print"):
        cifar.convert(out, src=tmp_path / "raw")
    dump(batch(5, "labels", 10, 3), bad)
    (tmp_path / "raw" / "data_batch_5").unlink()
    with pytest.raises(PrepError, match="data_batch_5: missing"):
        cifar.convert(out, src=tmp_path / "raw")
    assert not out.exists()


def test_missing_batches_hint_download(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepError, match="empty: no cifar10 or cifar100 python batches.*--download"):
        cifar.convert(tmp_path / "o.h5", src=tmp_path / "empty")
