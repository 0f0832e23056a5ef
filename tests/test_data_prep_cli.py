"""data_prep command line: help of every command, digits quick start, exit codes, load_sample."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from data_prep.cli import RUNNERS, build_parser, main
from ddmpi.data.schema import read_info

REPO = Path(__file__).resolve().parents[1]


def run_prep(*args):
    """Run ``python -m data_prep ARGS`` in a subprocess; return the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "data_prep", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def assert_failed(status, stderr, named, out):
    """A failed run: exit status 1, one error line naming ``named``, no traceback, no ``out``."""
    assert status == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert ": error: " in last and str(named) in last
    assert "Traceback" not in stderr
    assert not Path(out).exists()
    assert not list(Path(out).parent.glob(f".{Path(out).name}.*")), "temporary file left"


@pytest.mark.parametrize("command", sorted(RUNNERS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text and "--val-fraction" in text and len(text.splitlines()) > 10


def test_usage_error_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["digits", "--out", str(tmp_path / "d.h5"), "--val-fraction", "1.5"])
    assert exit_info.value.code == 2
    assert "not in [0, 1)" in capsys.readouterr().err


def test_out_naming_a_directory_is_an_error_naming_it(tmp_path, capsys):
    assert main(["digits", "--out", str(tmp_path)]) == 1
    assert f"a directory, not a file to write: '{tmp_path}'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_digits_quick_start(tmp_path, capsys):
    out = tmp_path / "digits.h5"
    assert main(["digits", "--out", str(out), "--val-fraction", "0.15",
                 "--test-fraction", "0.15", "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    info = read_info(out)
    assert info.classes == [str(d) for d in range(10)] and info.spatial_shape == (8, 8)
    assert sum(info.splits.values()) == 1797
    assert info.splits["test"] == round(0.15 * 1797)
    prov = json.loads(info.attrs["provenance"])
    assert prov["converter"] == "data_prep.digits" and len(prov["sources"][0]["sha256"]) == 64
    assert prov["options"]["seed"] == 3
    from sklearn.datasets import load_digits

    digits = load_digits()
    with h5py.File(out, "r") as f:
        ids = [int(i.split(":")[1]) for i in f["test/ids"].asstr()[:5]]
        np.testing.assert_allclose(f["test/images"][:5, 0], digits.images[ids] / 16, atol=1e-6)
        np.testing.assert_array_equal(f["test/labels"][:5], digits.target[ids])


def test_digits_resized(tmp_path):
    out = tmp_path / "digits28.h5"
    assert main(["digits", "--out", str(out), "--size", "28x28", "--limit", "200"]) == 0
    info = read_info(out)
    assert info.spatial_shape == (28, 28) and sum(info.splits.values()) == 200
    with h5py.File(out, "r") as f:
        x = f["train/images"][()]
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9


def test_unwritable_output_is_one_clean_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["digits", "--out", str(blocker / "d.h5"), "--limit", "50"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_load_sample_follows_the_data_set(tmp_path):
    from PIL import Image

    from ddmpi.data.inputs import load_sample

    out = tmp_path / "digits.h5"
    assert main(["digits", "--out", str(out), "--size", "16x12", "--limit", "100"]) == 0
    png = tmp_path / "x.png"
    Image.fromarray(np.full((40, 30, 3), 255, np.uint8)).save(png)
    sample = load_sample(png, read_info(out))
    assert sample.shape == (1, 16, 12) and sample.dtype == np.float32
    np.testing.assert_allclose(sample, 1.0)
