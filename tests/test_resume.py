"""Checkpoint/restart: a 2-rank run killed with SIGKILL (or preempted by SIGUSR1) mid local
training, then resumed, ends with the same metrics as an uninterrupted run, and its progress
reaches 100 %; a rank killed by a signal ends the job."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import write_digits_h5
from helpers import mpirun

EPOCHS = 8
ARGS = ["train", "--config", "quickstart", "--set", f"local.epochs={EPOCHS}",
        "--set", "local.model.width=8", "--set", "run.threads_per_rank=1",
        "--set", "coarse.epochs=30",
        "--set", "run.device=cpu"]


def _train(data, run_dir, *extra):
    cmd, env = mpirun(2, "python", "-m", "ddmpi", *ARGS, "--set", f"data.path={data}",
                      "--run-dir", str(run_dir), *extra)
    return cmd, env


def _epochs_done(checkpoint):
    try:
        return torch.load(checkpoint, weights_only=True)["epoch"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


def _kill_session(sid):
    """SIGKILL every process of session ``sid`` (Open MPI puts each rank in its own group)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _comparable(metrics):
    """Everything but wall times and paths."""
    local = metrics["extra"]["local"]
    return (metrics["combiners"], local, metrics["parameters"], metrics["extra"]["chosen"],
            {name: [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")}
                   for r in records]
             for name, records in metrics["history"].items()})


def _check_resumed_log(run, killed_at):
    """The resumed run continued subdomain 0 after ``killed_at`` epochs (no epoch of it was
    trained twice), and its progress reached 100 % of all epochs."""
    log = (run / "logs" / "rank_00000.log").read_text()
    for epoch in range(1, EPOCHS + 1):
        assert log.count(f"subdomain 0 epoch {epoch}:") <= 1, f"epoch {epoch} trained twice"
    assert f"subdomain 0 epoch {EPOCHS}:" in log
    if killed_at is not None:
        assert f"subdomain 0 epoch {killed_at + 1}:" in log
    progress = [line for line in log.splitlines() if " epochs " in line and "%]" in line]
    total = 4 * EPOCHS
    assert f"[{total}/{total} epochs 100.0%]" in progress[-1], progress[-3:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Data set and metrics of the uninterrupted 2-rank run."""
    base = tmp_path_factory.mktemp("reference")
    data = write_digits_h5(base / "digits.h5")
    cmd, env = _train(data, base / "run")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    return data, json.loads((base / "run" / "metrics.json").read_text())


@pytest.mark.timeout(400)
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, reference):
    data, reference = reference

    run = tmp_path / "killed"
    cmd, env = _train(data, run)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 200
    while _epochs_done(run / "checkpoints" / "local_000.pt") < 2:
        assert proc.poll() is None, "run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _kill_session(proc.pid)  # launcher and every rank at once, as a node failure would
    proc.wait(timeout=30)
    assert not (run / "metrics.json").exists()
    killed_at = _epochs_done(run / "checkpoints" / "local_000.pt")
    assert 2 <= killed_at < EPOCHS

    cmd, env = mpirun(2, "python", "-m", "ddmpi", "train", "--resume", str(run))
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _check_resumed_log(run, killed_at)
    final = json.loads((run / "metrics.json").read_text())
    assert _comparable(final) == _comparable(reference)
    killed, resumed = final["segments"]  # the killed segment's end went unrecorded
    assert (killed["resumed"], killed["end"], killed["wall_seconds"]) == (False, None, None)
    assert (resumed["resumed"], resumed["end"]) == (True, "finished")
    assert final["wall_seconds"] == resumed["wall_seconds"]


@pytest.mark.timeout(120)
def test_rank_killed_by_signal_ends_the_job(tmp_path):
    data = write_digits_h5(tmp_path / "digits.h5")
    script = tmp_path / "die.py"
    script.write_text(
        "import os, signal, sys\n"
        "from mpi4py import MPI\n"
        "import ddmpi.strategies.local\n"
        "original = ddmpi.strategies.local.train_subdomain\n"
        "def die(*a, **k):\n"
        "    if MPI.COMM_WORLD.rank == 1:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return original(*a, **k)\n"
        "ddmpi.strategies.local.train_subdomain = die\n"
        "from ddmpi.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    cmd, env = mpirun(4, "python", str(script), "train", "--config", "quickstart",
                      "--set", f"data.path={data}", "--set", "local.epochs=20",
                      "--run-dir", str(tmp_path / "run"))
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode != 0
    assert time.monotonic() - start < 60


@pytest.mark.timeout(200)
def test_resume_with_a_different_config_is_refused(tmp_path):
    data = write_digits_h5(tmp_path / "digits.h5")
    cmd, env = _train(data, tmp_path / "run", "--set", "local.epochs=1")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=150)
    cmd, env = _train(data, tmp_path / "run", "--set", "local.epochs=2", "--resume")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "config field 'local.epochs'" in proc.stderr


def _ranks_of_session(sid):
    """PIDs of the ddmpi ranks (not the launcher) in session ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                if os.getsid(int(entry)) == sid and b"ddmpi" in cmdline and b"prte" not in cmdline:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                pass
    return pids


@pytest.mark.timeout(400)
def test_sigusr1_checkpoints_exits_75_and_resumes_to_the_same_metrics(tmp_path, reference):
    """Slurm's warning signal (what srun forwards to every task) mid local training."""
    data, reference = reference

    run = tmp_path / "preempted"
    cmd, env = _train(data, run, "--resume")  # as the batch script launches it, every time
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 200
    while _epochs_done(run / "checkpoints" / "local_000.pt") < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    for pid in _ranks_of_session(proc.pid):
        os.kill(pid, signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "exiting with 75 for requeue" in output
    assert not (run / "metrics.json").exists()

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    state = torch.load(run / "checkpoints" / "local_000.pt", weights_only=True)
    assert state["finished"] and state["epoch"] == EPOCHS
    _check_resumed_log(run, None)
    final = json.loads((run / "metrics.json").read_text())
    assert _comparable(final) == _comparable(reference)

    segments = final["segments"]
    assert [(s["resumed"], s["end"]) for s in segments] == [
        (False, "signal"), (True, "finished")]
    assert final["wall_seconds"] == pytest.approx(sum(s["wall_seconds"] for s in segments))
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr  # a finished run: nothing to do, said so
    assert f"{run}: the run finished in an earlier job, nothing to resume" in again.stdout
    assert json.loads((run / "metrics.json").read_text()) == final
