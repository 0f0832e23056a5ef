"""ScalarWriter: CSV round trip, resumed files, column errors and TensorBoard events."""

import csv
import math
import sys

import numpy as np
import pytest
import torch

from ddmpi.report.scalars import ScalarWriter


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_csv_round_trip(tmp_path):
    with ScalarWriter(tmp_path, "local_rank0") as writer:
        writer.add(1, {"train_loss": 0.5, "val_accuracy": 0.25})
        writer.add(2, {"val_accuracy": np.float32(0.75), "train_loss": torch.tensor(0.125)})
        writer.add(3, {"train_loss": float("nan")})
    rows = _read(tmp_path / "scalars" / "local_rank0.csv")
    assert rows[0] == ["epoch", "train_loss", "val_accuracy"]
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3]
    assert [float(r[1]) for r in rows[1:3]] == [0.5, 0.125]
    assert [float(r[2]) for r in rows[1:3]] == [0.25, 0.75]
    assert math.isnan(float(rows[3][1])) and rows[3][2] == ""


def test_rows_are_flushed_and_resumed_file_keeps_header(tmp_path):
    writer = ScalarWriter(tmp_path, "coarse")
    writer.add(1, {"loss": 1.0, "acc": 0.1})
    assert _read(tmp_path / "scalars" / "coarse.csv")[1] == ["1", "1.0", "0.1"]  # before close
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.add(2, {"loss": 0.5})
    with ScalarWriter(tmp_path, "coarse") as resumed:
        resumed.add(2, {"acc": 0.2, "loss": 0.5})
    assert _read(tmp_path / "scalars" / "coarse.csv") == [
        ["epoch", "loss", "acc"], ["1", "1.0", "0.1"], ["2", "0.5", "0.2"]]
    with ScalarWriter(tmp_path, "fresh") as writer:
        writer.add(1, {"loss": 1.0})
        with pytest.raises(ValueError, match="new_metric"):  # a new file's columns are fixed
            writer.add(2, {"loss": 0.4, "new_metric": 1.0})


def test_bad_arguments(tmp_path):
    with ScalarWriter(tmp_path, "x") as writer:
        with pytest.raises(ValueError, match="epoch"):
            writer.add(1, {"epoch": 1.0})
        with pytest.raises(TypeError):
            writer.add(1.5, {"a": 1.0})
        with pytest.raises(TypeError):
            writer.add(1, {"a": "high"})
    with pytest.raises(ValueError):
        ScalarWriter(tmp_path, "a/b")


def test_tensorboard_events(tmp_path):
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is not installed")
    with ScalarWriter(tmp_path, "local_rank1", tensorboard=True) as writer:
        for epoch, loss in [(1, 0.9), (2, 0.6), (3, 0.3)]:
            writer.add(epoch, {"train_loss": loss, "val_accuracy": 1.0 - loss})
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard" / "local_rank1"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train_loss", "val_accuracy"]
    loss = events.Scalars("train_loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([0.9, 0.6, 0.3])
    assert [e.value for e in events.Scalars("val_accuracy")] == pytest.approx([0.1, 0.4, 0.7])
    assert len(_read(tmp_path / "scalars" / "local_rank1.csv")) == 4


def test_missing_tensorboard_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.raises(ImportError, match="pip install tensorboard.*run.tensorboard false"):
        ScalarWriter(tmp_path, "y", tensorboard=True)
    with ScalarWriter(tmp_path, "y") as writer:  # CSV alone still works
        writer.add(1, {"a": 1.0})


def test_resumed_file_of_an_older_version_keeps_its_columns(tmp_path, caplog):
    """A run resumed after an upgrade that added a scalar: its CSV keeps the old header."""
    path = tmp_path / "scalars" / "subdomain_0.csv"
    path.parent.mkdir()
    path.write_text("epoch,train_loss\n1,0.9\n")
    with ScalarWriter(tmp_path, "subdomain_0") as writer:
        writer.add(2, {"train_loss": 0.5, "resolution": 1.0})
        writer.add(3, {"train_loss": 0.4, "resolution": 1.0})
    assert _read(path) == [["epoch", "train_loss"], ["1", "0.9"], ["2", "0.5"], ["3", "0.4"]]
    assert sum("left out" in r.message for r in caplog.records) == 1
