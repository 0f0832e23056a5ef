"""``ddmpi predict``: a trained run directory (CNN-DNN, coherent CNN-DNN or global CNN)
classifies HDF5 samples, image files and NIfTI volumes, serially and under MPI, exactly as the
training run's evaluation did."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_digits_h5
from helpers import corrupt_h5, mpirun, shared_data

from ddmpi.commands.predict import predict
from ddmpi.config import load_config
from ddmpi.data.schema import DatasetError, open_h5, read_labels
from ddmpi.parallel.group import Group
from ddmpi.strategies.base import run as run_strategy
from ddmpi.strategies.cnn_dnn import CNNDNN
from ddmpi.strategies.coherent import Coherent
from ddmpi.strategies.global_ddp import global_strategy

SELF = Group.single()


def run_train(config):
    return run_strategy(CNNDNN, config, SELF)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    data = write_digits_h5(base / "digits.h5")
    config = load_config("quickstart", [f"data.path={data}", f"run.dir={base / 'run'}",
                                        "local.epochs=3", "coarse.epochs=30",
                                        "run.threads_per_rank=1"])
    result = run_train(config)
    return base / "run", data, result


def _other_run(trained, strategy, name, *overrides):
    """A run of ``strategy`` on the fixture's data, 2 epochs."""
    data = trained[1]
    run_dir = trained[0].parent / name
    config = load_config("quickstart", [f"data.path={data}", f"run.dir={run_dir}",
                                        "local.epochs=2", "run.threads_per_rank=1", *overrides])
    return run_dir, data, run_strategy(strategy, config, SELF)


@pytest.fixture(scope="module")
def global_run(trained):
    return _other_run(trained, global_strategy(8), "global_ddp")


def test_hdf5_split_reproduces_training_metrics(trained):
    run, data, result = trained
    labels = read_labels(data, "test")
    for combiner in ("cnn_dnn", "average_log_probabilities", "majority_vote",
                     "average_probabilities", "chosen"):
        probs, ids, got = predict(run, [str(data)], SELF, "test", combiner)
        assert probs.shape == (len(labels), 10) and len(ids) == len(labels)
        np.testing.assert_array_equal(got, labels)
        accuracy = float((probs.argmax(1) == labels).mean())
        assert accuracy == pytest.approx(result.combiners[combiner]["accuracy"])


def test_global_and_coherent_runs_reproduce_their_test_accuracy(trained, global_run):
    """A global-model run has checkpoints/global.pt, no local CNNs; a coherent run has the
    CNN-DNN's layout."""
    for run, data, result in (global_run, _other_run(trained, Coherent, "coherent")):
        labels = read_labels(data, "test")
        probs, ids, got = predict(run, [str(data)], SELF)
        assert probs.shape == (len(labels), 10) and len(ids) == len(labels)
        np.testing.assert_array_equal(got, labels)
        accuracy = float((probs.argmax(1) == labels).mean())
        assert accuracy == pytest.approx(result.combiners[result.strategy]["accuracy"])
    with pytest.raises(DatasetError, match=r"global_ddp: a global-model run .*; --combiner "
                                           r"majority_vote applies to CNN-DNN runs only"):
        predict(global_run[0], [str(data)], SELF, combiner="majority_vote")


def test_image_files_match_stored_samples(trained, tmp_path):
    from PIL import Image

    run, data, _ = trained
    with open_h5(data) as f:
        images = f["test/images"][:6]
    files = []
    for i, image in enumerate(images):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(np.round(image[0] * 255).astype(np.uint8)).save(path)
        files.append(str(path))
    from_files, ids, labels = predict(run, files, SELF)
    from_h5, _, _ = predict(run, [str(data)], SELF)
    assert ids == files and labels is None
    np.testing.assert_allclose(from_files, from_h5[:6], atol=0.02)  # 8-bit PNG quantisation


@pytest.mark.parametrize("kind", ["trained", "global_run"])
def test_cli_under_mpi_equals_serial(kind, request, tmp_path):
    run, data, _ = request.getfixturevalue(kind)
    serial = tmp_path / "serial.csv"
    subprocess.run([sys.executable, "-m", "ddmpi", "predict", str(run), str(data),
                    "--out", str(serial)], check=True, capture_output=True, timeout=120)
    parallel = tmp_path / "parallel.csv"
    cmd, env = mpirun(2, "python", "-m", "ddmpi", "predict", str(run), str(data),
                      "--out", str(parallel))
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    rows = list(csv.reader(serial.open()))
    assert rows[0][:2] == ["id", "prediction"] and len(rows) == 1 + len(read_labels(data, "test"))
    assert parallel.read_text() == serial.read_text()
    assert b"\r" not in serial.read_bytes()                 # plain LF lines, on stdout too


def test_more_ranks_than_subdomains_predict_as_serial(trained, tmp_path):
    """4 ranks (a hybrid layout train accepts) for a 2-subdomain run: the surplus ranks idle."""
    run, data, _ = _other_run(trained, CNNDNN, "two_subdomains", "decomposition.grid=[1, 2]",
                              "coarse.epochs=5")
    serial, _, _ = predict(run, [str(data)], SELF)
    out = tmp_path / "parallel.csv"
    cmd, env = mpirun(4, "python", "-m", "ddmpi", "predict", str(run), str(data), "--out",
                      str(out))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(out.open()))[1:]
    assert len(rows) == len(serial)
    np.testing.assert_allclose([[float(v) for v in row[2:]] for row in rows], serial, atol=1e-6)


def test_errors_name_the_input(trained, tmp_path):
    run, _, _ = trained
    proc = subprocess.run([sys.executable, "-m", "ddmpi", "predict", str(run),
                           str(tmp_path / "missing.png")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "missing.png: input file not found" in proc.stderr
    odd = tmp_path / "notes.txt"
    odd.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "ddmpi", "predict", str(run), str(odd)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "notes.txt: unsupported input type" in proc.stderr


def test_a_corrupt_input_file_is_one_line_naming_it(trained, tmp_path):
    run, data, _ = trained
    bad = corrupt_h5(data, tmp_path / "bad.h5")
    proc = subprocess.run([sys.executable, "-m", "ddmpi", "predict", str(run), str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {bad}: cannot read /test/images (" in proc.stderr


def test_foreign_labels_and_nan_pixels_are_refused_as_in_training(trained, tmp_path):
    """A label outside the classes (or a NaN pixel) is one line naming the file and split,
    not a traceback from the metrics."""
    import shutil

    import h5py

    run, data, _ = trained
    labels, nan = tmp_path / "badlab.h5", tmp_path / "nan.h5"
    for path in (labels, nan):
        shutil.copy(data, path)
    with h5py.File(labels, "r+") as f:
        f["train/labels"][3] = 15
    with h5py.File(nan, "r+") as f:
        f["test/images"][2, 0, 1, 1] = np.nan
    proc = subprocess.run([sys.executable, "-m", "ddmpi", "predict", str(run), str(labels),
                           "--split", "train"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {labels}: train/labels holds 15, not a class index 0..9" in proc.stderr
    with pytest.raises(DatasetError, match=r"nan.h5: test/images holds NaN or infinite"):
        predict(run, [str(nan)], SELF)


def test_nifti_volumes_of_a_3d_run(tmp_path):
    lidc = shared_data("lidc-nodules")
    data = tmp_path / "lidc.h5"
    subprocess.run([sys.executable, "-m", "data_prep", "nifti", "--manifest",
                    str(lidc / "labels.csv"), "--group-column", "patient", "--limit", "120",
                    "--shape", "12", "12", "6", "--window", "-1000", "400", "--out", str(data),
                    "--quiet"], check=True, capture_output=True, timeout=120)
    config = load_config(None, [f"data.path={data}", f"run.dir={tmp_path / 'run'}",
                                "decomposition.grid=[2, 2, 2]", "decomposition.overlap=1",
                                "local.epochs=1", "local.model.width=4", "coarse.epochs=5",
                                "run.threads_per_rank=1"])
    run_train(config)
    with open_h5(data) as f:
        ids = list(f["test/ids"].asstr()[:3])
    files = [str(lidc / "image" / name) if not name.startswith("image/")
             else str(lidc / name) for name in (i.split(":")[-1] for i in ids)]
    from_files, _, _ = predict(tmp_path / "run", files, SELF)
    from_h5, _, _ = predict(tmp_path / "run", [str(data)], SELF)
    np.testing.assert_allclose(from_files, from_h5[:3], atol=1e-4)
    assert json.loads((tmp_path / "run" / "dataset.json").read_text())["preprocessing"][
        "window"] == [-1000, 400]


def _nifti(path, shape=(6, 6, 4)):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape, dtype=np.float32),
                             np.eye(4)), str(path))
    return path


def test_inputs_of_another_kind_or_other_classes_are_refused(trained, tmp_path):
    from ddmpi.data.inputs import InputError
    from ddmpi.data.schema import DatasetWriter

    run, data, _ = trained
    with pytest.raises(InputError, match=r"vol.nii.gz: a NIfTI volume \(3D\), but the data "
                       r"set's samples are 1x8x8 \(2D\)"):
        predict(run, [str(_nifti(tmp_path / "vol.nii.gz"))], SELF)
    with pytest.raises(InputError, match="digits.h5: an HDF5 data set must be the only input"):
        predict(run, [str(data), str(data)], SELF)
    renamed = tmp_path / "renamed.h5"
    with DatasetWriter(renamed, name="d", classes=[f"c{i}" for i in range(10)],
                       converter="test") as writer:
        for split in ("train", "test"):
            writer.write_split(split, np.zeros((2, 1, 8, 8), np.float32), np.arange(2))
    with pytest.raises(InputError, match=r"renamed.h5: classes \['c0', .* differ from the "
                       r"run's \['0', '1'"):
        predict(run, [str(renamed)], SELF)


def test_resized_images_are_reported(trained, tmp_path, caplog):
    from PIL import Image

    run, _, _ = trained
    Image.new("RGB", (28, 28), (200, 10, 10)).save(tmp_path / "big.png")
    probs, _, _ = predict(run, [str(tmp_path / "big.png")], SELF)
    assert probs.shape == (1, 10)
    assert "1 input image(s) resized or converted to the data set's 1x8x8" in caplog.text
    assert "big.png: rgb 28x28" in caplog.text


def test_out_naming_a_directory_is_a_one_line_error(trained, tmp_path):
    run, data, _ = trained
    proc = subprocess.run([sys.executable, "-m", "ddmpi", "predict", str(run), str(data),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"a directory, not a file to write: '{tmp_path}'" in proc.stderr
