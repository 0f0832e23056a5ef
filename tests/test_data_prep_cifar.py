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


def test_training_batches_alone_draw_the_test_split(tmp_path):
    make_cifar10(tmp_path / "raw" / "cifar-10-batches-py", per_batch=40)
    (tmp_path / "raw" / "cifar-10-batches-py" / "test_batch").unlink()
    out = tmp_path / "c10.h5"
    for src in (tmp_path / "raw", tmp_path / "raw" / "cifar-10-batches-py"):
        assert main(["cifar", "--src", str(src), "--out", str(out), "--test-fraction", "0.25",
                     "--dtype", "uint8", "--quiet"]) == 0
        info = read_info(out)
        assert info.splits == {"train": 130, "val": 20, "test": 50}
        assert info.storage_dtype == "uint8"
        prov = json.loads(info.attrs["provenance"])
        assert prov["test_split"] == "drawn from the training batches (seeded, stratified)"
        assert prov["files_missing"] == ["test_batch"]
        assert prov["options"]["test_fraction"] == 0.25
        assert not prov["options"]["official_test_kept"]
        with h5py.File(out, "r") as f:
            test_labels = f["test/labels"][()]
            ids = set(f["train/ids"].asstr()[()]) | set(f["val/ids"].asstr()[()])
            assert not ids & set(f["test/ids"].asstr()[()])
        assert np.bincount(test_labels, minlength=10).tolist() == [5] * 10  # stratified
        out.unlink()


def test_official_layout_keeps_the_test_batch(tmp_path):
    make_cifar10(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "c10.h5"
    cifar.convert(out, src=tmp_path, dtype="uint8")
    prov = json.loads(read_info(out).attrs["provenance"])
    assert prov["test_split"] == "official test batch" and prov["files_missing"] == []
    with h5py.File(out, "r") as f:
        expected = batch(20, "labels", 10, 0)[b"data"].reshape(20, 3, 32, 32)
        np.testing.assert_array_equal(f["test/images"][()], expected)  # uint8: exact
    with pytest.raises(PrepError, match="official test split"):
        cifar.convert(out, src=tmp_path, split_options=SplitOptions(test_fraction=0.2))


def test_real_cifar10_training_batches(tmp_path):
    """The shared CIFAR-10 folder holds data_batch_1..5 and batches.meta but no test_batch."""
    from helpers import shared_data

    src = shared_data("cifar10")
    out = tmp_path / "cifar10.h5"
    assert main(["cifar", "--src", str(src), "--out", str(out), "--limit", "1000",
                 "--dtype", "uint8", "--quiet"]) == 0
    info = read_info(out)
    assert info.splits == {"train": 700, "val": 100, "test": 200}
    assert info.classes[:3] == ["airplane", "automobile", "bird"]
    prov = json.loads(info.attrs["provenance"])
    assert prov["files_missing"] == ["test_batch"]
    assert len(prov["files_present"]) == 6 and prov["splits"]["test"] == 200
    first = cifar.read_batch(src / "cifar-10-batches-py" / "data_batch_1", "labels", 10)
    with h5py.File(out, "r") as f:
        for split in ("train", "test"):
            ids = f[f"{split}/ids"].asstr()[()]
            k = next(k for k, s in enumerate(ids) if s.startswith("data_batch_1:"))
            i = int(ids[k].split(":")[1])
            np.testing.assert_array_equal(f[f"{split}/images"][k], first[0][i])
            assert f[f"{split}/labels"][k] == first[1][i]
    np.testing.assert_allclose(info.mean * 255, [125.3, 123.0, 113.9], atol=3)
