"""Stop signals (SIGUSR1/SIGTERM, as Slurm and ``mpirun`` deliver them) never kill a rank of
``ddmpi train`` or ``ddmpi compare``: at start-up the run stops at its first batch, during
rank 0's coarse phase it finishes, and ``compare`` exits 75 naming the run it stopped and the
command that resumes it. The rank logs record preemption, resume and fatal errors."""

import signal
import subprocess
import textwrap
import time

import pytest
from conftest import write_digits_h5
from helpers import mpirun

SMALL = ["--set", "local.model.width=8", "--set", "run.threads_per_rank=1",
         "--set", "run.device=cpu", "--set", "coarse.epochs=30"]

# each rank signals itself when it first imports torch: a signal during start-up
SIGNAL_AT_START_UP = textwrap.dedent("""
    import os, signal, sys

    class SignalOnTorchImport:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGUSR1)

    sys.meta_path.insert(0, SignalOnTorchImport())
    from ddmpi.cli import main
    sys.exit(main(sys.argv[1:]))
""")

# rank 0 announces its coarse phase in a file, then gives the test time to signal the job
SLOW_COARSE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mpi4py import MPI
    import ddmpi.strategies.cnn_dnn as cnn_dnn

    original = cnn_dnn.train_coarse
    def slow(*args, **kwargs):
        Path(sys.argv[1]).write_text("coarse")
        time.sleep(8)
        return original(*args, **kwargs)
    if MPI.COMM_WORLD.rank == 0:
        cnn_dnn.train_coarse = slow
    from ddmpi.cli import main
    sys.exit(main(sys.argv[2:]))
""")

# every rank signals itself as it starts its first local CNN (srun signals every task)
SIGNAL_IN_LOCAL_TRAINING = textwrap.dedent("""
    import os, signal, sys
    import ddmpi.strategies.local as local

    original = local.train_subdomain
    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return original(*args, **kwargs)
    local.train_subdomain = signalled
    from ddmpi.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _script(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.timeout(300)
def test_signal_at_start_up_stops_the_run_which_resumes(tmp_path):
    data = write_digits_h5(tmp_path / "digits.h5")
    run = tmp_path / "run"
    args = ["train", "--config", "quickstart", "--set", f"data.path={data}", "--set",
            "local.epochs=1", *SMALL, "--run-dir", str(run)]
    cmd, env = mpirun(2, "python", _script(tmp_path, "start.py", SIGNAL_AT_START_UP), *args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert "exited on signal" not in proc.stdout + proc.stderr
    for rank, sub in ((0, 0), (1, 2)):
        assert (f"[ddmpi rank {rank}] stopped by SIGUSR1 (subdomain {sub}: stopped at epoch 1, batch 1)"
                in proc.stdout)
        log = (run / "logs" / f"rank_{rank:05d}.log").read_text()
        assert f"WARNING stopped by SIGUSR1 (subdomain {sub}: stopped at epoch 1, batch 1)" in log

    cmd, env = mpirun(2, "python", "-m", "ddmpi", "train", "--resume", str(run))
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    log = (run / "logs" / "rank_00001.log").read_text()
    assert "subdomain 2: resumed from" in log and "continuing epoch 1 after batch 1" in log


@pytest.mark.timeout(300)
def test_signal_during_the_coarse_phase_lets_the_run_finish(tmp_path):
    """Rank 1 is done and waits in MPI's finalisation while rank 0 trains the coarse model."""
    data = write_digits_h5(tmp_path / "digits.h5")
    run, marker = tmp_path / "run", tmp_path / "coarse_started"
    cmd, env = mpirun(2, "python", _script(tmp_path, "coarse.py", SLOW_COARSE), str(marker),
                      "train", "--config", "quickstart", "--set", f"data.path={data}",
                      "--set", "local.epochs=1", *SMALL, "--run-dir", str(run))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 150
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(3)
    proc.send_signal(signal.SIGUSR1)  # mpirun forwards it to every rank
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert (run / "metrics.json").exists()
    assert "stop signal received after the local CNNs were done" in output


@pytest.mark.timeout(300)
def test_compare_stopped_by_a_signal_exits_75_without_traceback(tmp_path):
    data = write_digits_h5(tmp_path / "digits.h5")
    run = tmp_path / "cmp"
    cmd, env = mpirun(2, "python", _script(tmp_path, "local.py", SIGNAL_IN_LOCAL_TRAINING),
                      "compare", "--config", "quickstart", "--set", f"data.path={data}",
                      *SMALL, "--strategies", "cnn_dnn", "--seeds", "1", "--run-dir", str(run))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 75, output
    assert "Traceback" not in output and "MPI_ABORT" not in output
    message = ("ddmpi compare stopped by SIGUSR1 in cnn_dnn, seed 0 (subdomain 0: stopped at "
               f"epoch 1, batch 1); to resume (2 ranks): ddmpi compare --resume {run} "
               "(exit 75)")
    assert f"[ddmpi rank 0] {message}" in proc.stdout
    assert message in (run / "seed0" / "cnn_dnn" / "logs" / "rank_00000.log").read_text()


def test_the_stop_is_named_by_its_signal(monkeypatch):
    """segments.json and the exit message say which signal stopped the run, not 'preempted':
    a SIGTERM may also be the launcher ending the job after another rank failed."""
    from ddmpi.training import preemption

    monkeypatch.setitem(preemption._requested, "signal", None)
    assert preemption.describe() == "a stop on another rank"
    monkeypatch.setitem(preemption._requested, "signal", signal.SIGUSR1)
    assert preemption.describe() == "SIGUSR1"
    monkeypatch.setitem(preemption._requested, "signal", signal.SIGTERM)
    assert preemption.describe().startswith("SIGTERM (") and "another rank failed" in (
        preemption.describe())
