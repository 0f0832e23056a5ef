"""A corrupt or truncated data set file: every read of it (header, labels, images, streamed
blocks, predict's inputs, the resume fingerprint) fails with a DatasetError naming the file and
the object, one line from the CLI, serially and under MPI."""

import subprocess
import sys

import numpy as np
import pytest
from helpers import corrupt_h5, mpirun

from ddmpi.data.decomposition import Decomposition
from ddmpi.data.inputs import load_inputs
from ddmpi.data.reader import SubdomainDataset, read_box
from ddmpi.data.schema import DatasetError, dataset_fingerprint, read_info, read_labels
from ddmpi.data.sources import StreamingSource, open_source

BOX = (slice(0, 8), slice(0, 8))
IMAGES = r"bad.h5: cannot read /{}/images \(.*B-tree"


@pytest.mark.parametrize("target", ["/train/labels", "/train/images", "/classes",
                                    "/normalization"])
def test_a_corrupt_object_header_names_the_file_and_object(digits_h5, tmp_path, target):
    bad = corrupt_h5(digits_h5, tmp_path / "bad.h5", target)
    with pytest.raises(DatasetError, match=rf"^{bad}: cannot read {target} \(.*bad object "
                                           rf"header version number\)\)$"):
        read_info(bad)


def test_every_read_of_corrupt_images_names_the_file_and_dataset(digits_h5, tmp_path):
    bad = corrupt_h5(digits_h5, tmp_path / "bad.h5")
    assert read_info(bad).splits["train"] > 0          # the header is intact
    assert len(read_labels(bad, "test")) > 0
    reads = {
        "read_box": lambda: read_box(bad, "train", BOX),
        "in memory": lambda: open_source(bad, "val", BOX, in_memory=True),
        "streamed": lambda: open_source(bad, "val", BOX, in_memory=False).take(np.arange(3)),
        "subdomain": lambda: SubdomainDataset(bad, "test", Decomposition((8, 8), (2, 2)), 1,
                                              in_memory=False).read_block([0, 1]),
        "predict": lambda: load_inputs([bad], {"classes": [str(d) for d in range(10)],
                                               "channels": 1, "spatial_shape": [8, 8]}, "test"),
        "fingerprint": lambda: dataset_fingerprint(bad),
    }
    for name, read in reads.items():
        with pytest.raises(DatasetError, match=IMAGES.format("(train|val|test)")):
            read()
            pytest.fail(f"{name}: no error")


def test_a_file_corrupted_while_streaming_fails_on_the_next_block(digits_h5, tmp_path):
    """The prefetch thread's read error reaches the training loop as the same one line."""
    path = tmp_path / "bad.h5"
    path.write_bytes(digits_h5.read_bytes())
    source = StreamingSource(path, "train", BOX, block_rows=64)
    batches = source.batches(np.arange(len(source)), 32)
    next(batches)
    source.close()
    corrupt_h5(digits_h5, path)
    with pytest.raises(DatasetError, match=IMAGES.format("train")):
        list(source.batches(np.arange(len(source)), 32))


@pytest.mark.parametrize("ranks", [1, 2])
def test_cli_train_on_a_corrupt_file_is_one_line(digits_h5, tmp_path, ranks):
    bad = corrupt_h5(digits_h5, tmp_path / "bad.h5")
    args = ["python", "-m", "ddmpi", "train", "--config", "quickstart", "--set",
            f"data.path={bad}", "--set", f"run.dir={tmp_path / 'run'}"]
    if ranks == 1:
        cmd, env = [sys.executable, *args[1:]], None
    else:
        cmd, env = mpirun(ranks, *args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors and all(line.endswith(")") and f"error: {bad}: cannot read /" in line
                          for line in errors), proc.stderr
