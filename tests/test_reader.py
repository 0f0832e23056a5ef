"""Per-rank subdomain reader: exact hyperslabs, normalisation, batches, lazy opening, errors."""

import importlib.util
import pickle
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ddmpi.data import schema
from ddmpi.data.decomposition import Decomposition
from ddmpi.data.reader import SubdomainDataset, load_subdomain, read_subdomain
from ddmpi.data.schema import DatasetError, DatasetWriter, read_info

ROOT = Path(__file__).resolve().parents[1]


def _bench_io():
    """benchmarks/bench_io.py as a module (for its counting file object), its folder on
    ``sys.path`` as when it runs as a script (it imports benchmarks/_paths.py)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_io", ROOT / "benchmarks" / "bench_io.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path, splits, classes=10):
    with DatasetWriter(path, name=path.stem, classes=[str(c) for c in range(classes)],
                       converter="tests.test_reader") as writer:
        for split, (x, y) in splits.items():
            writer.write_split(split, x, y)
    return path


def _random_splits(rng, sizes, sample_shape, classes=10):
    return {split: (rng.random((n,) + sample_shape, dtype=np.float32),
                    rng.integers(0, classes, n)) for split, n in sizes.items()}


@pytest.fixture(scope="module")
def images28(tmp_path_factory):
    """A 2-channel 28x28 set with small chunks (about 32 samples each, in equal chunk rows),
    so that block reads span several chunks and the val/test sample counts are not multiples
    of the chunk or the block."""
    rng = np.random.default_rng(1)
    splits = _random_splits(rng, {"train": 300, "val": 45, "test": 33}, (2, 28, 28))
    path = tmp_path_factory.mktemp("reader") / "img28.h5"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(schema, "CHUNK_TARGET_BYTES", 4096)
        _write(path, splits)
    with h5py.File(path, "r") as f:
        assert f["train/images"].chunks == (30, 2, 4, 4)  # 300 samples in 10 equal rows
    return path, splits


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """A 3D set (N, 1, 12, 10, 9): odd sizes along every axis."""
    rng = np.random.default_rng(2)
    splits = _random_splits(rng, {"train": 70, "test": 11}, (1, 12, 10, 9), classes=2)
    return _write(tmp_path_factory.mktemp("reader") / "vol.h5", splits, classes=2), splits


def _digits(digits_h5):
    with h5py.File(digits_h5, "r") as f:
        return {s: (f[s]["images"][()], f[s]["labels"][()]) for s in ("train", "val", "test")}


def _expected(path, images, dec, sub, normalize):
    x = np.ascontiguousarray(dec.extract(images, sub))
    if normalize:
        info = read_info(path)
        shape = (-1,) + (1,) * dec.ndim
        x = (x - info.mean.reshape(shape)) / info.std.reshape(shape)
    return x.astype(np.float32)


def _cases(request):
    """(path, splits, decomposition) of the named data set fixture."""
    name, grid, overlap = request.param
    if name == "digits":
        path = request.getfixturevalue("digits_h5")
        splits = _digits(path)
        shape = (8, 8)
    else:
        path, splits = request.getfixturevalue(name)
        shape = splits["train"][0].shape[2:]
    return path, splits, Decomposition(shape, grid, overlap)


@pytest.fixture(params=[("digits", (2, 2), 1), ("digits", (1, 3), 0), ("images28", (2, 2), 2),
                        ("images28", (4, 4), 2), ("images28", (3, 2), (3, 5)),
                        ("volumes", (2, 3, 2), 1)],
                ids=lambda p: f"{p[0]}-{'x'.join(map(str, p[1]))}")
def case(request):
    return _cases(request)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_load_subdomain_equals_numpy_slice(case, normalize):
    path, splits, dec = case
    for split, (images, labels) in splits.items():
        for sub in dec:
            x, y = load_subdomain(path, split, dec, sub, normalize=normalize, block=40)
            assert x.dtype == np.float32 and y.dtype == np.int64
            assert x.shape == (len(images), images.shape[1]) + dec.subdomain_shape(sub)
            np.testing.assert_array_equal(x, _expected(path, images, dec, sub, normalize))
            np.testing.assert_array_equal(y, labels)


@pytest.mark.parametrize("in_memory", [True, False], ids=["memory", "lazy"])
def test_dataset_items_equal_numpy_slice(case, in_memory):
    path, splits, dec = case
    images, labels = splits["train"]
    for sub in (0, dec.num_subdomains - 1):
        ds = SubdomainDataset(path, "train", dec, sub, in_memory=in_memory, block=64)
        assert ds.in_memory is in_memory
        assert len(ds) == len(images)
        expected = _expected(path, images, dec, sub, normalize=True)
        for i in (0, 1, len(ds) - 1, -1):
            x, y = ds[i]
            assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
            assert tuple(x.shape) == ds.sample_shape == expected.shape[1:]
            assert isinstance(y, int) and y == labels[i]
            np.testing.assert_array_equal(x.numpy(), expected[i])
        x_all, y_all = ds.tensors()
        np.testing.assert_array_equal(x_all.numpy(), expected)
        np.testing.assert_array_equal(y_all.numpy(), labels)
        assert y_all.dtype == torch.int64


def test_unnormalized_dataset_and_file_statistics(images28):
    path, splits = images28
    dec = Decomposition((28, 28), (2, 2), 2)
    ds = SubdomainDataset(path, "val", dec, (1, 0), normalize=False, in_memory=False)
    np.testing.assert_array_equal(ds[3][0].numpy(), splits["val"][0][3, :, 12:28, 0:16])
    # the file's statistics are those of the train split, per channel
    info = read_info(path)
    train = splits["train"][0].astype(np.float64)
    np.testing.assert_allclose(info.mean, train.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(info.std, train.std(axis=(0, 2, 3)), rtol=1e-4)


@pytest.mark.parametrize("in_memory", [True, False], ids=["memory", "lazy"])
def test_getitems_keeps_the_requested_order(images28, in_memory):
    path, _ = images28
    dec = Decomposition((28, 28), (2, 2), 2)
    ds = SubdomainDataset(path, "train", dec, 3, in_memory=in_memory)
    for indices in ([5, 2, 2, 299, 0, -1, 64], [7, 8, 9, 10], [10, 9, 8, 7], [4], []):
        batch = ds.__getitems__(indices)
        assert len(batch) == len(indices)
        for (x, y), i in zip(batch, indices):
            x_i, y_i = ds[i]
            assert torch.equal(x, x_i) and y == y_i
        xb, yb = ds.read_block(indices)
        assert tuple(xb.shape) == (len(indices),) + ds.sample_shape
        assert yb.tolist() == [ds[i][1] for i in indices]


def test_dataloader_batches_with_a_worker(images28):
    path, splits = images28
    dec = Decomposition((28, 28), (2, 2), 2)
    ds = SubdomainDataset(path, "test", dec, 1, in_memory=False)
    expected = _expected(path, splits["test"][0], dec, 1, normalize=True)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=order, num_workers=1)
    xs, ys = zip(*loader)
    assert not ds.is_open  # the worker opened its own handle, the parent none
    np.testing.assert_array_equal(torch.cat(xs).numpy(), expected[order])
    ds[0]  # now the parent holds a handle; a forked worker must not use it but open its own
    assert ds.is_open
    xs, ys = zip(*loader)
    np.testing.assert_array_equal(torch.cat(xs).numpy(), expected[order])
    np.testing.assert_array_equal(torch.cat(ys).numpy(), splits["test"][1][order])
    ds.close()


def test_lazy_opening_and_pickling(images28):
    path, _ = images28
    dec = Decomposition((28, 28), (2, 2), 2)
    ds = SubdomainDataset(path, "train", dec, 2, in_memory=False)
    assert not ds.is_open and ds._h5 is None
    clone = pickle.loads(pickle.dumps(ds))
    assert not clone.is_open
    first = ds[0][0]
    assert ds.is_open
    clone2 = pickle.loads(pickle.dumps(ds))  # picklable while open: the handle stays behind
    assert ds.is_open and not clone2.is_open
    assert torch.equal(clone[0][0], first) and torch.equal(clone2[0][0], first)
    assert clone.is_open
    ds.close()
    assert not ds.is_open
    assert torch.equal(ds[0][0], first) and ds.is_open  # reopens on demand
    ds.close()
    clone.close()
    clone2.close()


def test_in_memory_dataset_holds_no_handle_and_pickles(images28):
    path, _ = images28
    dec = Decomposition((28, 28), (2, 2), 2)
    ds = SubdomainDataset(path, "train", dec, 2, in_memory=True)
    assert not ds.is_open
    ds[5]
    assert not ds.is_open
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone.tensors()[0], ds.tensors()[0])


def test_in_memory_and_lazy_are_identical(volumes):
    path, _ = volumes
    dec = Decomposition((12, 10, 9), (2, 3, 2), 1)
    for sub in dec:
        mem = SubdomainDataset(path, "train", dec, sub, in_memory=True)
        lazy = SubdomainDataset(path, "train", dec, sub, in_memory=False)
        idx = [3, 1, 4, 1, 5, 9, 2, 6]
        assert torch.equal(mem.read_block(idx)[0], lazy.read_block(idx)[0])
        assert torch.equal(mem.tensors()[0], lazy.tensors()[0])
        assert mem.sample_shape == lazy.sample_shape == (1,) + dec.subdomain_shape(sub)
        lazy.close()


def test_auto_in_memory_follows_the_budget(images28):
    path, _ = images28
    dec = Decomposition((28, 28), (2, 2), 2)
    nbytes = 300 * 2 * 16 * 16 * 4
    ds = SubdomainDataset(path, "train", dec, 0, memory_budget=nbytes)
    assert ds.nbytes == nbytes and ds.in_memory
    assert not SubdomainDataset(path, "train", dec, 0, memory_budget=nbytes - 1).in_memory
    assert SubdomainDataset(path, "train", dec, 0).in_memory  # default budget: 2 GiB


def test_reads_only_the_tiles_of_the_subdomain(tmp_path):
    """With the schema's default chunks (4x4 tiles of a 28x28 image), one subdomain of a 2x2
    grid with overlap 2 (16x16 pixels = 4x4 of the 7x7 tiles) reads 16/49 of the image bytes."""
    bench = _bench_io()
    rng = np.random.default_rng(3)
    path = _write(tmp_path / "mnistlike.h5",
                  _random_splits(rng, {"train": 1000}, (1, 28, 28)))
    dec = Decomposition((28, 28), (2, 2), 2)
    image_bytes = 1000 * 28 * 28 * 4
    for sub in dec:
        with open(path, "rb") as raw:
            counter = bench.CountingFile(raw)
            with h5py.File(counter, "r") as f:
                x, _ = read_subdomain(f, "train", dec, sub, normalize=False)
        assert x.shape == (1000, 1, 16, 16)
        metadata = 1000 * 8 + 16384  # labels; attributes, object headers, chunk index
        assert 16 / 49 * image_bytes <= counter.bytes_read <= 16 / 49 * image_bytes + metadata, \
            counter.bytes_read


def test_errors(images28, digits_h5, tmp_path):
    path, _ = images28
    dec = Decomposition((28, 28), (2, 2), 2)
    with pytest.raises(DatasetError, match=r"img28.h5: no split 'validation' .*'train', 'val'"):
        SubdomainDataset(path, "validation", dec, 0)
    with pytest.raises(DatasetError, match="no split 'valid'"):
        load_subdomain(path, "valid", dec, 0)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["train/images"] = np.zeros((2, 1, 28, 28), np.float32)
    with pytest.raises(DatasetError, match="other.h5: not a ddmpi data set"):
        SubdomainDataset(other, "train", dec, 0)
    with pytest.raises(DatasetError, match="not a ddmpi data set"):
        load_subdomain(other, "train", dec, 0)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(DatasetError, match="notes.h5: not a readable HDF5 file"):
        SubdomainDataset(text, "train", dec, 0)
    with pytest.raises(DatasetError, match="missing.h5: data set file not found"):
        SubdomainDataset(tmp_path / "missing.h5", "train", dec, 0)
    with pytest.raises(DatasetError, match="a directory, not an HDF5 data set file"):
        SubdomainDataset(tmp_path, "train", dec, 0)
    with pytest.raises(DatasetError, match="images are 8x8 but the decomposition is for 28x28"):
        SubdomainDataset(digits_h5, "train", dec, 0)
    with pytest.raises(ValueError, match="subdomain 4 is out of range"):
        SubdomainDataset(path, "train", dec, 4)
    with pytest.raises(ValueError, match="in_memory must be"):
        SubdomainDataset(path, "train", dec, 0, in_memory="yes")
    with pytest.raises(TypeError, match="Decomposition"):
        SubdomainDataset(path, "train", (2, 2), 0)
    ds = SubdomainDataset(path, "test", dec, 0, in_memory=False)
    with pytest.raises(IndexError, match="out of range for 33 samples"):
        ds[33]
    with pytest.raises(IndexError):
        ds.read_block([0, -34])
    with pytest.raises(TypeError, match="integer"):
        ds[1.0]


def test_lazy_random_batches_read_only_their_own_bytes(tmp_path):
    """A sparse random batch (or one sample) reads only its own bytes, not the whole 256 KiB
    chunks it touches; a dense selection reads each chunk it touches once, whole."""
    bench = _bench_io()
    rng = np.random.default_rng(4)
    path = _write(tmp_path / "lazy.h5", _random_splits(rng, {"train": 2000}, (1, 28, 28)))
    dec = Decomposition((28, 28), (2, 2), 2)
    sample_bytes = 16 * 16 * 4
    with bench.counting_reader() as counters:
        ds = SubdomainDataset(path, "train", dec, 3, in_memory=False, normalize=False)
        ds[0]  # opens the file: metadata
        read = lambda: sum(c.bytes_read for c in counters)  # noqa: E731
        before = read()
        idx = rng.choice(2000, 20, replace=False)
        x, _ = ds.read_block(idx)
        sparse = read() - before
        assert sample_bytes * 20 <= sparse <= 2 * sample_bytes * 20 + 8192, sparse
        before = read()
        ds.read_block(np.arange(0, 1000))
        dense = read() - before
        assert 16 / 49 * 2000 * 28 * 28 * 4 <= dense < 1 / 3 * 2000 * 28 * 28 * 4, dense
        before = read()
        ds.read_block(rng.permutation(np.arange(500, 2000)))  # dense: the same 16 chunks again
        assert read() - before == dense
        before = read()
        single = ds[1999][0]
        assert sample_bytes <= read() - before <= sample_bytes + 4096
        ds.close()
    with h5py.File(path, "r") as f:
        full = f["train/images"][()]
    np.testing.assert_array_equal(x.numpy(), full[idx][:, :, 12:28, 12:28])
    np.testing.assert_array_equal(single.numpy(), full[1999, :, 12:28, 12:28])


@pytest.mark.parametrize("layout", ["gzip", "contiguous", "split-channels"])
def test_other_storage_layouts_fall_back_to_hyperslab_reads(images28, tmp_path, layout):
    """Files whose images are compressed, not chunked, or chunked across channels (not what
    the schema writes, but valid HDF5) are read correctly through plain hyperslabs."""
    import shutil

    src, splits = images28
    path = tmp_path / f"{layout}.h5"
    shutil.copy(src, path)
    images = splits["train"][0]
    options = {"gzip": dict(chunks=(32, 2, 4, 4), compression="gzip"),
               "contiguous": dict(chunks=None),
               "split-channels": dict(chunks=(16, 1, 7, 7))}[layout]
    with h5py.File(path, "r+") as f:
        del f["train/images"]
        f.create_dataset("train/images", data=images, **options)
    dec = Decomposition((28, 28), (2, 2), 2)
    for sub in (0, 3):
        expected = _expected(path, images, dec, sub, normalize=True)
        x, _ = load_subdomain(path, "train", dec, sub, block=50)
        np.testing.assert_array_equal(x, expected)
        ds = SubdomainDataset(path, "train", dec, sub, in_memory=False)
        for idx in ([3, 1, 250], np.arange(300)[::-1], list(range(100, 180))):
            np.testing.assert_array_equal(ds.read_block(idx)[0].numpy(), expected[idx])
        ds.close()


def _patch(path, **attrs):
    """Set (value) or delete (None) root attributes of a data set file."""
    with h5py.File(path, "r+") as f:
        for key, value in attrs.items():
            if value is None:
                del f.attrs[key]
            else:
                f.attrs[key] = value


def test_version_1_files_still_read(images28, tmp_path):
    import shutil

    src, splits = images28
    v1 = tmp_path / "v1.h5"
    shutil.copy(src, v1)
    _patch(v1, format_version=1, storage_dtype=None, scale=None)
    info = read_info(v1)
    assert info.version == 1 and info.storage_dtype == "float32" and info.scale == 1.0
    dec = Decomposition((28, 28), (2, 2), 2)
    x, _ = load_subdomain(v1, "val", dec, 2)
    np.testing.assert_array_equal(x, _expected(v1, splits["val"][0], dec, 2, True))
    with h5py.File(v1, "r+") as f:  # v1 knows only float32 images
        images = f["val/images"][()]
        del f["val/images"]
        f["val/images"] = (images * 255).astype(np.uint8)
    with pytest.raises(DatasetError, match=r"v1.h5: '/val/images' has dtype uint8, but the "
                                           r"file's storage_dtype is 'float32'"):
        read_info(v1)


def test_schema_errors_name_the_file_and_field(images28, tmp_path):
    import shutil

    src, _ = images28
    bad = tmp_path / "bad.h5"
    cases = [({"format_version": 3}, "format_version 3 is not supported"),
             ({"storage_dtype": "int16"}, "attribute 'storage_dtype' is 'int16'"),
             ({"storage_dtype": None}, "attribute 'storage_dtype' is None"),
             ({"scale": 0.5}, "attribute 'scale' is 0.5, expected 1.0 for float32"),
             ({"storage_dtype": "uint8", "scale": 1 / 255},
              "'/train/images' has dtype float32, but the file's storage_dtype is 'uint8'"),
             ({"channels": None}, "attribute 'channels' of '/' is missing")]
    for attrs, message in cases:
        shutil.copy(src, bad)
        _patch(bad, **attrs)
        with pytest.raises(DatasetError, match=f"bad.h5: {message}"):
            read_info(bad)
    shutil.copy(src, bad)
    with h5py.File(bad, "r+") as f:
        labels = f["test/labels"][()]
        del f["test/labels"]
        f["test/labels"] = labels.astype(np.float32)
    with pytest.raises(DatasetError, match="bad.h5: '/test/labels' has dtype float32"):
        read_info(bad)


def test_uint8_writer_quantises_and_chunks_by_itemsize(tmp_path):
    x = np.linspace(0, 1, 40 * 1 * 28 * 28, dtype=np.float32).reshape(40, 1, 28, 28)
    path = tmp_path / "q.h5"
    with DatasetWriter(path, name="q", classes=["a", "b"], converter="t", dtype="uint8") as w:
        w.write_split("train", x, np.arange(40) % 2)
    with h5py.File(path, "r") as f:
        stored = f["train/images"]
        assert stored.dtype == np.uint8 and f.attrs["storage_dtype"] == "uint8"
        assert stored.chunks == schema.chunk_shape(40, 1, (28, 28), itemsize=1)
        np.testing.assert_array_equal(stored[()], np.rint(x * 255).astype(np.uint8))
    dec = Decomposition((28, 28), (1, 1))
    back, _ = load_subdomain(path, "train", dec, 0, normalize=False)
    np.testing.assert_allclose(back, x, atol=0.5 / 255 + 1e-7)
    with pytest.raises(DatasetError, match="storage dtype 'int8'"):
        DatasetWriter(tmp_path / "n.h5", name="n", classes=["a"], converter="t", dtype="int8")


@pytest.mark.parametrize("in_memory", [True, False])
def test_nan_pixels_and_foreign_labels_are_refused(digits_h5, tmp_path, in_memory):
    """A file written by another tool (or bit rot: HDF5 has no checksum) must not train on
    NaN pixels or labels outside the classes; the error names the file and the split."""
    import shutil

    from ddmpi.data.sources import open_source

    box = (slice(0, 8), slice(0, 8))
    nan, label = tmp_path / "nan.h5", tmp_path / "label.h5"
    for path in (nan, label):
        shutil.copy(digits_h5, path)
    with h5py.File(nan, "r+") as f:
        f["train/images"][5, 0, 3, 3] = np.nan
    with h5py.File(label, "r+") as f:
        f["val/labels"][2] = 12
    with pytest.raises(DatasetError, match=r"nan.h5: train/images holds NaN or infinite"):
        source = open_source(nan, "train", box, in_memory=in_memory)
        source.take(np.arange(len(source)))  # streaming reads on demand
    with pytest.raises(DatasetError, match=r"label.h5: val/labels holds 12, not a class index "
                                           r"0..9"):
        open_source(label, "val", box, in_memory=in_memory)
