"""A failure on one rank ends the whole MPI job quickly with a non-zero exit: no hung ranks."""

import re
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import write_digits_h5
from helpers import mpirun

FAILING_RANK_SCRIPT = textwrap.dedent("""
    import sys
    from mpi4py import MPI
    import ddmpi.strategies.local

    if MPI.COMM_WORLD.rank == int(sys.argv[1]):
        def missing_file(*args, **kwargs):
            raise FileNotFoundError("/scratch/lost/digits.h5: seen by this rank alone")
        ddmpi.strategies.local.train_subdomain = missing_file
    from ddmpi.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _run(n, args, tmp_path, timeout=120):
    script = tmp_path / "inject.py"
    script.write_text(FAILING_RANK_SCRIPT)
    cmd, env = mpirun(n, "python", str(script), *args)
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


@pytest.mark.timeout(180)
def test_exception_on_one_rank_of_four_aborts_the_job(tmp_path):
    data = write_digits_h5(tmp_path / "digits.h5")
    proc, seconds = _run(4, ["3", "train", "--config", "quickstart", "--set",
                             f"data.path={data}", "--run-dir", str(tmp_path / "run"),
                             "--set", "local.epochs=50"], tmp_path)
    assert proc.returncode != 0
    assert "[ddmpi rank 3/4] error: /scratch/lost/digits.h5: seen by this rank alone" in proc.stderr
    log = (tmp_path / "run" / "logs" / "rank_00003.log").read_text()  # the rank's log too
    assert "rank 3 ERROR error: /scratch/lost/digits.h5: seen by this rank alone" in log
    # far below the 50 epochs the other ranks would train (and the test's timeout): the
    # failure ended the job; start-up of 4 ranks on a loaded 2-core machine takes ~40 s
    assert seconds < 120, f"job took {seconds:.1f}s to end after the failure"


@pytest.mark.timeout(120)
def test_bad_config_fails_on_every_rank_with_the_field_named(tmp_path):
    cmd, env = mpirun(2, "python", "-m", "ddmpi", "train", "--config", "quickstart",
                      "--set", "local.epochs=zero", "--run-dir", str(tmp_path / "run"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode != 0
    assert "config field 'local.epochs'" in proc.stderr


def _bad_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    return ["--config", str(tmp_path / "bad.yaml")], (
        f"{tmp_path / 'bad.yaml'}: not valid YAML (line 2, column 1: expected ',' or ']', "
        f"but got '<stream end>')")


def _unknown_key(tmp_path):
    (tmp_path / "foo.yaml").write_text("data: {path: x.h5}\nfoo: 1\n")
    return ["--config", str(tmp_path / "foo.yaml")], (
        f"{tmp_path / 'foo.yaml'}: config field 'foo': unknown key (known in this section: ")


def _directory_as_data(tmp_path):
    return (["--config", "quickstart", "--set", f"data.path={tmp_path}"],
            f"{tmp_path}: a directory, not an HDF5 data set file")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", [_bad_yaml, _unknown_key, _directory_as_data])
def test_input_errors_are_one_line_per_rank_naming_the_file(tmp_path, case):
    args, message = case(tmp_path)
    cmd, env = mpirun(2, "python", "-m", "ddmpi", "train", *args,
                      "--run-dir", str(tmp_path / "run"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100)
    errors = re.findall(r"\[ddmpi rank \d/2\] error: (.*)", proc.stderr)  # amid MPI's banner
    assert proc.returncode == 1 and 1 <= len(errors) <= 2, proc.stderr
    assert all(error.startswith(message) for error in errors), proc.stderr
    assert "Traceback" not in proc.stderr and "^" not in proc.stderr


@pytest.mark.timeout(60)
def test_serial_error_exit_code_and_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddmpi", "train", "--config", "quickstart",
                           "--set", f"data.path={tmp_path / 'absent.h5'}",
                           "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 1
    assert f"{tmp_path / 'absent.h5'}: data set file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(60)
def test_unwritable_run_dir_is_a_clear_error_before_training(tmp_path):
    data = write_digits_h5(tmp_path / "digits.h5")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = subprocess.run([sys.executable, "-m", "ddmpi", "train", "--config", "quickstart",
                           "--set", f"data.path={data}", "--run-dir", str(blocker / "run")],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 1
    assert "is not writable" in proc.stderr
