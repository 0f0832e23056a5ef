"""Batch sources: in-memory vs streamed batches, epoch orders, bytes read, memory bound, pinning."""

import pickle
import threading
import time

import numpy as np
import pytest
import torch

from ddmpi.config import ConfigError
from ddmpi.data import schema
from ddmpi.data.decomposition import Decomposition
from ddmpi.data.reader import load_subdomain, read_box
from ddmpi.data.schema import DatasetError, DatasetWriter, read_info
from ddmpi.data.sources import (
    STREAM_FRACTION,
    StreamingSource,
    TensorSource,
    block_rows_for_budget,
    box_nbytes,
    open_source,
    open_splits,
)

N_TRAIN, N_VAL = 500, 37


def _write(path, images, labels, dtype):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(schema, "CHUNK_TARGET_BYTES", 2048)  # many chunk rows
        with DatasetWriter(path, name="t", classes=[str(c) for c in range(5)],
                           converter="tests.test_sources", dtype=dtype) as writer:
            writer.write_split("train", images[:N_TRAIN], labels[:N_TRAIN])
            writer.write_split("val", images[N_TRAIN:], labels[N_TRAIN:])
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same 8-bit 2x32x32 images stored as float32 and as uint8."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (N_TRAIN + N_VAL, 2, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 5, len(raw))
    folder = tmp_path_factory.mktemp("sources")
    return (_write(folder / "f32.h5", raw, labels, "float32"),
            _write(folder / "u8.h5", raw, labels, "uint8"), raw, labels)


BOX = Decomposition((32, 32), (2, 2), 2).slices(3)  # rows 14:32, cols 14:32


def _stack(batches):
    xs, ys, idx = zip(*batches)
    return torch.cat(xs), torch.cat(ys), torch.cat(idx)


def test_uint8_storage_matches_float32(pair):
    f32, u8, raw, _ = pair
    a, b = read_info(f32), read_info(u8)
    assert (a.storage_dtype, b.storage_dtype) == ("float32", "uint8")
    assert a.version == b.version == schema.FORMAT_VERSION == 2
    assert b.scale == pytest.approx(1 / 255) and a.scale == 1.0
    x8, _ = read_box(u8, "train", BOX)
    assert x8.dtype == np.uint8
    np.testing.assert_array_equal(x8, raw[:N_TRAIN, :, 14:32, 14:32])
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6)
    dec = Decomposition((32, 32), (2, 2), 2)
    for normalize in (True, False):
        xa, ya = load_subdomain(f32, "val", dec, 1, normalize=normalize)
        xb, yb = load_subdomain(u8, "val", dec, 1, normalize=normalize)
        assert xb.dtype == np.float32
        np.testing.assert_allclose(xa, xb, atol=1 / 255 / a.std.min())
        np.testing.assert_array_equal(ya, yb)
    assert u8.stat().st_size < f32.stat().st_size / 3


@pytest.mark.parametrize("which", [0, 1], ids=["float32", "uint8"])
def test_streaming_equals_in_memory(pair, which):
    path = pair[which]
    mem = open_source(path, "train", BOX, in_memory=True)
    stream = open_source(path, "train", BOX, in_memory=False, block_rows=50, prefetch=2)
    assert isinstance(mem, TensorSource) and isinstance(stream, StreamingSource)
    assert mem.x.dtype == (torch.float32, torch.uint8)[which]
    assert mem.box == stream.box == BOX and len(mem) == len(stream) == N_TRAIN
    assert torch.equal(mem.labels, stream.labels)
    for order in (stream.epoch_order(3, 1), torch.arange(N_TRAIN), mem.epoch_order(0, 0)[:77]):
        xm, ym, im = _stack(mem.batches(order, 64))
        xs, ys, is_ = _stack(stream.batches(order, 64))
        assert torch.equal(im, order) and torch.equal(is_, order)
        assert torch.equal(xm, xs) and torch.equal(ym, ys)
        assert xs.dtype == torch.float32 and xs.shape == (len(order), 2, 18, 18)
    x, y = mem.take([5, 2])
    assert torch.equal(x, stream.take([5, 2])[0]) and torch.equal(y, mem.labels[[5, 2]])
    stream.close()


def test_sources_of_both_dtypes_agree(pair):
    f32, u8, _, _ = pair
    a = open_source(f32, "train", BOX, in_memory=False)
    b = open_source(u8, "train", BOX, in_memory=True)
    order = a.epoch_order(1, 2)
    xa, _, _ = _stack(a.batches(order, 100))
    xb, _, _ = _stack(b.batches(order, 100))
    np.testing.assert_allclose(xa.numpy(), xb.numpy(), atol=1 / 255 / read_info(f32).std.min())
    assert b.nbytes * 4 == box_nbytes(read_info(f32), "train", BOX) == N_TRAIN * 2 * 18 * 18 * 4


def test_epoch_orders(pair):
    stream = StreamingSource(pair[0], "train", BOX, block_rows=40, prefetch=3)
    a, b = stream.epoch_order(7, 1), stream.epoch_order(7, 1)
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert not torch.equal(a, stream.epoch_order(7, 2))
    assert torch.equal(torch.sort(a).values, torch.arange(N_TRAIN))
    rows = stream.block_rows  # a multiple of the chunk rows, at least 40
    assert rows >= 40 and rows % 4 == 0
    runs, _ = stream._runs(a.numpy())  # windows of `prefetch` whole blocks: each block once
    assert len(runs) == -(-stream.num_blocks // stream.prefetch)
    assert sorted(b for _, _, _, new in runs for b in new) == list(range(stream.num_blocks))
    mem = open_source(pair[0], "val", BOX)
    expected = torch.randperm(N_VAL, generator=torch.Generator().manual_seed(5 * 100_003 + 4))
    assert torch.equal(mem.epoch_order(5, 4), expected)


def test_bytes_read_are_the_share_of_the_subdomain(pair):
    """One epoch of a 2x2 subdomain without overlap (16x16 of 32x32, whole 4x4 tiles) reads a
    quarter of the split's image bytes, plus the padding of the last chunk row."""
    for path in pair[:2]:
        info = read_info(path)
        box = Decomposition((32, 32), (2, 2), 0).slices(2)
        stream = StreamingSource(path, "train", box, prefetch=2)
        with schema.open_h5(path) as f:
            chunk_rows = f["train/images"].chunks[0]
        stored = N_TRAIN * 2 * 32 * 32 * info.itemsize
        padded = -(-N_TRAIN // chunk_rows) * chunk_rows / N_TRAIN
        for _ in stream.batches(stream.epoch_order(0, 0), 32):
            pass
        assert stored / 4 <= stream.bytes_read <= stored / 4 * padded, stream.bytes_read
        stream.close()


def test_prefetch_bounds_the_blocks_alive(pair):
    stream = StreamingSource(pair[1], "train", BOX, block_rows=20, prefetch=2)
    assert stream.num_blocks == 8  # blocks of one whole uint8 chunk row (63 samples)
    for _ in stream.batches(stream.epoch_order(0, 0), 16):
        time.sleep(0.002)  # a slow consumer: the reader thread would run ahead if unbounded
    assert stream.peak_queued == stream.prefetch
    assert stream.prefetch <= stream.peak_blocks <= stream.prefetch + 2
    sequential = StreamingSource(pair[1], "train", BOX, block_rows=20, prefetch=2)
    for _ in sequential.batches(torch.arange(N_TRAIN), 16):
        pass
    assert stream.bytes_read == sequential.bytes_read  # every block read once per epoch
    resumed = StreamingSource(pair[1], "train", BOX, block_rows=20, prefetch=2)
    order = resumed.epoch_order(0, 1)
    xs, _, _ = _stack(resumed.batches(order[90:], 16))  # a resumed epoch: mid-window start
    assert resumed.bytes_read <= sequential.bytes_read
    assert torch.equal(xs, resumed.take(order[90:])[0])


def test_abandoned_epoch_stops_the_reader(pair):
    stream = StreamingSource(pair[1], "train", BOX, block_rows=20, prefetch=2)
    before = threading.active_count()
    it = stream.batches(stream.epoch_order(0, 0), 8)
    next(it)
    it.close()
    assert threading.active_count() == before
    clone = pickle.loads(pickle.dumps(stream))  # picklable: no handle, no thread
    assert torch.equal(next(clone.batches(torch.arange(4), 4))[0],
                       next(stream.batches(torch.arange(4), 4))[0])


def test_open_splits_share_the_budget(pair):
    f32 = pair[0]
    info = read_info(f32)
    box = Decomposition((32, 32), (2, 2), 0).slices(0)
    val = box_nbytes(info, "val", box)
    with schema.open_h5(f32) as f:
        rows = f["train/images"].chunks[0]
    stream = 4 * rows * 2 * 16 * 16 * 4 / STREAM_FRACTION  # 4 blocks of one chunk row
    sources = open_splits(f32, box, memory_budget_gb=(val + stream) / 1024 ** 3)
    assert isinstance(sources["val"], TensorSource)
    assert isinstance(sources["train"], StreamingSource)
    assert sources["train"].block_rows == rows  # streamed in what val left
    with pytest.raises(ConfigError, match="left after val in memory"):
        open_splits(f32, box, memory_budget_gb=(val + stream - 1) / 1024 ** 3)
    assert all(isinstance(s, TensorSource) for s in open_splits(f32, box).values())
    small = open_source(f32, "val", box, memory_budget_gb=(val - 1) / 1024 ** 3, block_rows=1)
    assert isinstance(small, StreamingSource)
    with pytest.raises(ConfigError, match="data.memory_budget_gb"):  # nor can its blocks fit
        open_source(f32, "val", box, memory_budget_gb=(val - 1) / 1024 ** 3)


@pytest.mark.parametrize("sample_bytes,chunk_rows,budget,sources,prefetch", [
    (1024, 3858, 0.1 * 1024 ** 3, 3, 2), (1024, 3858, 2 * 1024 ** 3, 3, 2),
    (648, 63, 10 ** 6, 1, 1), (2592, 7, 3 * 10 ** 7, 6, 4), (1, 1, 8, 1, 2)])
def test_block_rows_for_budget_fit_the_budget(sample_bytes, chunk_rows, budget, sources,
                                              prefetch):
    rows = block_rows_for_budget(sample_bytes, chunk_rows, budget, sources, prefetch)
    alive = sources * (prefetch + 2)
    assert rows >= chunk_rows and rows % chunk_rows == 0
    assert alive * rows * sample_bytes <= STREAM_FRACTION * budget  # all alive blocks fit
    assert alive * (rows + chunk_rows) * sample_bytes > STREAM_FRACTION * budget  # the most


def test_block_rows_for_budget_too_small_a_budget():
    need = 3 * 4 * 3858 * 1024 / STREAM_FRACTION  # one chunk per alive block of 3 sources
    assert block_rows_for_budget(1024, 3858, need, 3, 2) == 3858
    with pytest.raises(ConfigError, match=r"data.memory_budget_gb: .* too small to stream 3 "
                                          r"source\(s\): 12 blocks .*give at least 0.08"):
        block_rows_for_budget(1024, 3858, need - 1, 3, 2)


def test_open_source_and_open_splits_size_blocks_from_the_budget(pair):
    f32 = pair[0]
    info = read_info(f32)
    with schema.open_h5(f32) as f:
        chunks = {s: f[s]["images"].chunks[0] for s in ("train", "val")}
    sample = 2 * 18 * 18 * info.itemsize  # BOX is 18x18
    budget = 4 * 4 * chunks["train"] * sample / STREAM_FRACTION  # 4 chunks per block, 1 source
    gb = budget / 1024 ** 3
    one = open_source(f32, "train", BOX, in_memory=False, memory_budget_gb=gb)
    assert one.block_rows == block_rows_for_budget(sample, chunks["train"], budget, 1, 2)
    assert one.block_rows == 4 * chunks["train"] and one.num_blocks > 1
    for _ in one.batches(one.epoch_order(0, 0), 50):
        pass
    assert one.peak_blocks * one.block_nbytes <= STREAM_FRACTION * budget
    assert open_source(f32, "train", BOX, in_memory=False, memory_budget_gb=gb,
                       block_rows=1).block_rows == chunks["train"]  # the override wins
    both = open_splits(f32, BOX, in_memory=False, memory_budget_gb=gb)  # 2 streamed sources
    for s, src in both.items():
        assert src.block_rows == block_rows_for_budget(sample, chunks[s], budget, 2, 2)
    huge = open_source(f32, "train", BOX, in_memory=False, memory_budget_gb=100.0)
    assert huge.num_blocks == 1 and huge.block_rows == -(-N_TRAIN // chunks["train"]) * chunks[
        "train"]  # no bigger than the split
    with pytest.raises(ConfigError, match="data.memory_budget_gb"):
        open_splits(f32, BOX, in_memory=False, memory_budget_gb=gb / 8)


def test_errors(pair):
    f32 = pair[0]
    with pytest.raises(DatasetError, match="f32.h5: no split 'test'"):
        open_source(f32, "test", BOX)
    with pytest.raises(DatasetError, match="f32.h5: box axis 1: 20:40 is empty or outside 0:32"):
        open_source(f32, "train", (slice(0, 8), slice(20, 40)))
    with pytest.raises(DatasetError, match="box .* has 3 axes"):
        StreamingSource(f32, "train", (slice(0, 8),) * 3)
    mem = open_source(f32, "val", BOX)
    with pytest.raises(IndexError, match="out of range for 37"):
        next(mem.batches(torch.tensor([0, 37]), 4))
    with pytest.raises(ValueError, match="batch_size"):
        next(mem.batches(torch.arange(3), 0))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="pinned memory and device copies need CUDA (torch.cuda unavailable)")
def test_pinned_batches_and_device_copy(pair):
    for path in pair[:2]:
        mem = open_source(path, "train", BOX, pin=True)
        order = mem.epoch_order(0, 0)
        plain = open_source(path, "train", BOX)
        device = torch.device("cuda")
        got = []
        for (x, y, _), (xp, yp, _) in zip(mem.batches(order, 64), plain.batches(order, 64)):
            assert x.is_pinned() and y.is_pinned()
            assert torch.equal(x, xp) and torch.equal(y, yp)
            got.append(x.to(device, non_blocking=True))
        torch.cuda.synchronize()
        on_gpu = mem.to(device)
        xg, yg, _ = _stack(on_gpu.batches(order, 64))
        assert xg.device.type == "cuda" and on_gpu.x.dtype == mem.x.dtype
        torch.testing.assert_close(xg, torch.cat(got), rtol=0, atol=1e-6)
        torch.testing.assert_close(xg.cpu(), _stack(plain.batches(order, 64))[0], rtol=0,
                                   atol=1e-6)


def test_pin_without_cuda_is_an_error(pair):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: pinning works here")
    with pytest.raises(ValueError, match="pin=True needs CUDA"):
        open_source(pair[0], "val", BOX, pin=True)


def test_local_open_sources_share_the_rank_budget(pair, tmp_path):
    """``ddmpi.strategies.local.open_sources``: the three splits of a box share the rank's
    budget, divided among the boxes it holds at once (``share``)."""
    from types import SimpleNamespace

    from ddmpi.config import load_config
    from ddmpi.strategies.local import open_sources

    _, _, raw, labels = pair
    f32 = tmp_path / "three.h5"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(schema, "CHUNK_TARGET_BYTES", 2048)
        with DatasetWriter(f32, name="t", classes=[str(c) for c in range(5)],
                           converter="tests.test_sources", dtype="float32") as writer:
            for split, rows in (("train", slice(0, 400)), ("val", slice(400, 450)),
                                ("test", slice(450, None))):
                writer.write_split(split, raw[rows], labels[rows])
    info = read_info(f32)
    with schema.open_h5(f32) as f:
        rows = f["train/images"].chunks[0]
    budget = 2 * 3 * 4 * rows * 2 * 18 * 18 * 4 / STREAM_FRACTION  # 2 boxes, 3 x 4 blocks
    cfg = load_config(None, [f"data.path={f32}", "data.in_memory=false",
                             f"data.memory_budget_gb={budget / 1024 ** 3}"])
    ctx = SimpleNamespace(config=cfg, info=info, device=torch.device("cpu"))
    sources, augment = open_sources(ctx, BOX, share=2)
    assert augment is None and sorted(sources) == ["test", "train", "val"]
    assert sources["train"].block_rows == block_rows_for_budget(
        2 * 18 * 18 * 4, rows, budget / 2, 3, 2) == rows
    with pytest.raises(ConfigError, match="4 boxes at once, each with 1/4 of data.memory_budget_gb"):
        open_sources(ctx, BOX, share=4)
