"""Single-file inputs (images, NIfTI volumes, CIFAR batches) and the package layering."""

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ddmpi.data.inputs import InputError, load_inputs, load_pickle, read_cifar_batch
from ddmpi.data.schema import DatasetInfo

ROOT = Path(__file__).resolve().parents[1]


def _info(channels, shape, window=None):
    return DatasetInfo(path=Path("d.h5"), name="d", classes=[str(i) for i in range(10)],
                       channels=channels, spatial_shape=shape, splits={"train": 1},
                       mean=np.zeros(channels, np.float32), std=np.ones(channels, np.float32),
                       attrs={"provenance": f'{{"options": {{"window": {window or "null"}}}}}'})


def test_images_and_volumes_follow_the_data_set(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(np.full((20, 10, 3), 51, np.uint8)).save(png)
    x, ids, labels = load_inputs([png, png], _info(1, (8, 4)))
    assert x.shape == (2, 1, 8, 4) and x.dtype == np.float32 and ids == [str(png)] * 2
    assert labels is None
    np.testing.assert_allclose(x, 0.2, atol=1e-6)
    vol = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.full((6, 6, 4), 400, np.int16), np.eye(4)), vol)
    dataset_json = {"channels": 1, "spatial_shape": [2, 3, 3],
                    "preprocessing": {"window": [-1000, 400]}}  # a run's dataset.json
    for info in (dataset_json, _info(1, (2, 3, 3), [-1000, 400])):
        v, _, _ = load_inputs([vol], info)
        assert v.shape == (1, 1, 2, 3, 3)
        np.testing.assert_allclose(v, 1.0)


def _cifar_batch(path, n=4, labels=True, protocol=2, filenames=False):
    rng = np.random.default_rng(0)
    batch = {b"batch_label": b"testing batch 1 of 1",
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    if labels:
        batch[b"labels"] = list(range(n))
    if filenames:
        batch[b"filenames"] = [f"cat_s_{i:06d}.png".encode() for i in range(n)]
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    return batch[b"data"]


@pytest.mark.parametrize("protocol", [0, 1, 2, 4])
def test_cifar_batches_of_every_pickle_protocol(tmp_path, protocol):
    data = _cifar_batch(tmp_path / "batch", n=3, protocol=protocol)
    x, _, labels = load_inputs([tmp_path / "batch"], _info(3, (32, 32)))
    np.testing.assert_array_equal(x, data.reshape(3, 3, 32, 32).astype(np.float32) / 255)
    assert labels.tolist() == [0, 1, 2]
    _cifar_batch(tmp_path / "empty", n=0, protocol=protocol)
    with pytest.raises(InputError, match="empty: the CIFAR batch holds no images"):
        load_inputs([tmp_path / "empty"], _info(3, (32, 32)))


def test_cifar_test_batch_gives_all_its_samples(tmp_path):
    data = _cifar_batch(tmp_path / "test_batch", n=5)
    png = tmp_path / "b.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    x, ids, labels = load_inputs([tmp_path / "test_batch", png], _info(3, (32, 32)))
    assert x.shape == (6, 3, 32, 32) and ids[0] == f"{tmp_path / 'test_batch'}:0"
    assert labels is None  # the PNG has none
    _, _, labels = load_inputs([tmp_path / "test_batch"], _info(3, (32, 32)))
    assert labels.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(x[:5], data.reshape(5, 3, 32, 32).astype(np.float32) / 255)
    with pytest.raises(InputError, match="test_batch: CIFAR images are 3x32x32, the data set's "
                                         "are 1x8x8"):
        load_inputs([tmp_path / "test_batch"], _info(1, (8, 8)))
    images, labels, _ = read_cifar_batch(tmp_path / "test_batch")
    assert images.dtype == np.uint8 and labels.tolist() == [0, 1, 2, 3, 4]


def test_cifar_ids_are_the_batch_filenames(tmp_path):
    """As in data_prep's CIFAR data sets, so predictions on a batch and on its converted split
    name the same images alike; ``path:i`` only where the batch has no filenames."""
    _cifar_batch(tmp_path / "test_batch", n=3, filenames=True)
    _, ids, _ = load_inputs([tmp_path / "test_batch"], _info(3, (32, 32)))
    assert ids == ["cat_s_000000.png", "cat_s_000001.png", "cat_s_000002.png"]
    assert read_cifar_batch(tmp_path / "test_batch")[2] == ids  # data_prep's ids


def test_refuses_code_and_unknown_files(tmp_path):
    evil = tmp_path / "evil_batch"
    evil.write_bytes(pickle.dumps({"data": print}, protocol=2))
    with pytest.raises(InputError,
                       match="evil_batch: .*refusing to load (__builtin__|builtins).print"):
        load_inputs([evil], _info(3, (32, 32)))
    with pytest.raises(InputError, match="refusing to load (__builtin__|builtins).print"):
        load_pickle(evil)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(InputError, match="notes.txt: unsupported input type"):
        load_inputs([notes], _info(3, (32, 32)))
    with pytest.raises(InputError, match="gone.png: input file not found"):
        load_inputs([tmp_path / "gone.png"], _info(3, (32, 32)))
    with pytest.raises(InputError, match="a directory, not an input file"):
        load_inputs([tmp_path], _info(3, (32, 32)))


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_ddmpi_never_imports_data_prep():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "ddmpi").rglob("*.py")
                 if any(m.split(".")[0] == "data_prep" for m in _imports(p))]
    assert not offenders
    code = ("import sys, ddmpi.data.inputs, ddmpi.data.sources, ddmpi.data.reader; "
            "print([m for m in sys.modules if m.startswith('data_prep')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"


def test_hdf5_split_in_unit_range(tmp_path):
    from ddmpi.data.schema import DatasetWriter, read_info

    raw = np.random.default_rng(1).integers(0, 256, (6, 3, 4, 4), dtype=np.uint8)
    for dtype in ("float32", "uint8"):
        path = tmp_path / f"{dtype}.h5"
        with DatasetWriter(path, name="d", classes=["a", "b"], converter="t", dtype=dtype) as w:
            w.write_split("train", raw, np.arange(6) % 2, ids=[f"s{i}" for i in range(6)])
        x, ids, labels = load_inputs([path], read_info(path), split="train")
        np.testing.assert_array_equal(x, raw.astype(np.float32) / 255)
        assert ids[0] == "s0" and labels.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(InputError, match="uint8.h5: no split 'test'"):
        load_inputs([path], read_info(path))
