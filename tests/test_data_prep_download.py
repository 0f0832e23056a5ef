"""Downloads, exercised offline through file:// mirrors: md5 check, fallback, no partial files."""

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
from test_data_prep_mnist import make_mnist

from data_prep import cifar, mnist
from data_prep.download import fetch
from data_prep.errors import PrepError
from ddmpi.data.schema import read_info


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_fetch_checks_md5_and_falls_back_to_the_next_mirror(tmp_path):
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "good" / "f.bin").write_bytes(b"payload")
    (tmp_path / "bad" / "f.bin").write_bytes(b"tampered")
    mirrors = [f"file://{tmp_path}/absent/", f"file://{tmp_path}/bad/", f"file://{tmp_path}/good/"]
    dest = fetch("f.bin", mirrors, md5(tmp_path / "good" / "f.bin"), tmp_path / "dl")
    assert dest.read_bytes() == b"payload"
    with pytest.raises(PrepError, match=r"g.bin: download failed from every mirror .*md5"):
        fetch("g.bin", [f"file://{tmp_path}/bad/"], "0" * 32, tmp_path / "dl")
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["f.bin"]  # nothing partial


def test_mnist_download(tmp_path, monkeypatch):
    make_mnist(tmp_path / "mirror", n_train=30, n_test=10)
    md5s = {p.name: md5(p) for p in (tmp_path / "mirror").iterdir()}
    spec = {**mnist.VARIANTS["mnist"], "mirrors": [f"file://{tmp_path}/mirror/"], "md5": md5s}
    monkeypatch.setitem(mnist.VARIANTS, "mnist", spec)
    mnist.convert(tmp_path / "m.h5", src=tmp_path / "raw", download_missing=True)
    assert read_info(tmp_path / "m.h5").splits == {"train": 27, "val": 3, "test": 10}
    assert len(list((tmp_path / "raw").iterdir())) == 4


def test_cifar_download_extracts_only_the_batches(tmp_path, monkeypatch):
    archive = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    rng = np.random.default_rng(0)
    with tarfile.open(archive, "w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        for name in names + ["../evil"]:
            obj = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                   "labels": list(range(10)), "label_names": [f"c{i}" for i in range(10)]}
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(name if name == "../evil" else f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    spec = {**cifar.VARIANTS["cifar10"], "md5": md5(archive)}
    monkeypatch.setitem(cifar.VARIANTS, "cifar10", spec)
    monkeypatch.setattr(cifar, "MIRRORS", [f"file://{tmp_path}/mirror/"])
    cifar.convert(tmp_path / "c.h5", src=tmp_path / "raw", download_missing=True)
    assert read_info(tmp_path / "c.h5").splits == {"train": 45, "val": 5, "test": 10}
    assert not (tmp_path / "evil").exists()
    assert sorted(p.name for p in (tmp_path / "raw" / "cifar-10-batches-py").iterdir()) == \
        sorted(names)
