"""The sbatch scripts in slurm/: shell syntax, #SBATCH headers, and real runs without Slurm.

The scripts run under plain bash with SLURM_* variables set and the stand-ins of tests/bin first
on PATH: ``srun`` (runs the command directly for one task, under ``mpirun -n N`` for N tasks)
and ``scontrol`` (records its arguments). ``DDMPI_CMD``/``DATA_PREP_CMD`` point the scripts at
``tests/bin/fake-ddmpi``, which records its argv and environment per rank and, for the requeue
tests, waits for a signal and exits 75 like ``ddmpi train`` does after checkpointing.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
BIN = Path(__file__).resolve().parent / "bin"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
TRAIN_SCRIPTS = ["train_gpu.sbatch", "train_cpu.sbatch", "param_study.sbatch"]
SHELL_FILES = SCRIPTS + sorted((SLURM / "lib").glob("*.sh")) + sorted(BIN.iterdir()) + [
    ROOT / "tests" / "run.sh"]
TIMEOUT = 180


def test_every_expected_script_is_there():
    names = {p.name for p in SCRIPTS}
    assert {"prepare_data.sbatch", *TRAIN_SCRIPTS} <= names
    assert (SLURM / "lib" / "requeue.sh").is_file()


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_syntax(path):
    assert path.is_file(), path
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if path.parent == BIN or path.suffix == ".sbatch":
        assert path.read_text().startswith("#!"), f"{path.name}: no shebang line"
    if path.parent == BIN:
        assert os.access(path, os.X_OK), f"{path} is not executable"


# --------------------------------------------------------------------------- #SBATCH headers
def sbatch_directives(path):
    """The #SBATCH options sbatch would read: those before the first command line."""
    options, after = [], []
    seen_command = False
    for line in path.read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#SBATCH"):
            (after if seen_command else options).append(stripped[len("#SBATCH"):].split("#")[0]
                                                        .strip())
        elif stripped and not stripped.startswith("#"):
            seen_command = True
    return options, after


def directive(options, name):
    values = [o.split("=", 1)[1] if "=" in o else "" for o in options
              if o == name or o.startswith(name + "=")]
    return values[-1] if values else None


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_header(path):
    options, after = sbatch_directives(path)
    assert not after, f"{path.name}: #SBATCH lines after the first command are ignored: {after}"
    assert options, f"{path.name}: no #SBATCH directives"
    for option in options:
        assert re.fullmatch(r"--[a-z][a-z-]*(=\S+)?", option), f"{path.name}: odd {option!r}"
    names = [o.split("=", 1)[0] for o in options]
    assert len(names) == len(set(names)), f"{path.name}: repeated directive in {names}"
    for required in ("--job-name", "--time", "--output"):
        assert directive(options, required), f"{path.name}: no {required}"
    assert re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", directive(options, "--time"))
    # The header documents what the script does, how to submit it and what to edit.
    header = path.read_text().split("#SBATCH", 1)[0]
    assert f"sbatch slurm/{path.name}" in header, f"{path.name}: no submit line in the header"
    assert "Edit" in header and "What it does" in header


@pytest.mark.parametrize("name", TRAIN_SCRIPTS)
def test_training_scripts_ask_for_the_requeue_signal(name):
    options, _ = sbatch_directives(SLURM / name)
    signal_opt = directive(options, "--signal")
    match = re.fullmatch(r"B:USR1@(\d+)", signal_opt or "")
    assert match and int(match.group(1)) >= 120, f"{name}: --signal={signal_opt}"
    assert "--requeue" in options
    assert directive(options, "--open-mode") == "append"     # requeued runs append the log
    assert directive(options, "--cpus-per-task")
    text = (SLURM / name).read_text()
    assert "srun --kill-on-bad-exit=1" in text and "--resume" in text
    assert "export HDF5_USE_FILE_LOCKING=FALSE" in text
    assert "lib/requeue.sh" in text


def test_gpu_script_binds_one_rank_per_gpu():
    options, _ = sbatch_directives(SLURM / "train_gpu.sbatch")
    assert directive(options, "--gpus-per-task") == "1" or "gpu" in (directive(options, "--gres")
                                                                      or "")
    assert directive(options, "--ntasks-per-node")
    assert "# module load" in (SLURM / "train_gpu.sbatch").read_text()


def test_param_study_array_matches_its_combinations():
    result = subprocess.run(["bash", str(SLURM / "param_study.sbatch"), "--list"],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 0, result.stderr
    rows = result.stdout.strip().splitlines()[1:]
    assert len(rows) == 12
    assert len({row.split("\t")[4] for row in rows}) == 12          # one run dir per task
    options, _ = sbatch_directives(SLURM / "param_study.sbatch")
    array = directive(options, "--array")
    assert re.fullmatch(rf"0-{len(rows) - 1}(%\d+)?", array), array


# Slurm reads --export=ALL,NAME=value,... as a comma-separated list; a value cannot hold a comma.
FAKE_SBATCH = """#!{python}
import json, os, re, sys
args = sys.argv[1:]
export = ([a.split("=", 1)[1] for a in args if a.startswith("--export=")] or ["ALL"])[-1]
env = {{}}
for item in export.split(","):
    name, sep, value = item.partition("=")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        sys.exit(f"sbatch: --export={{export}}: {{item!r}} is not NAME or NAME=value")
    if name == "ALL":
        env.update(os.environ)
    elif name != "NONE":
        env[name] = value if sep else os.environ.get(name, "")
script = [a for a in args if not a.startswith("-")][0]
with open({log!r}, "a") as log:
    log.write(json.dumps({{"script": script, "EXTRA_ARGS": env.get("EXTRA_ARGS"),
                          "OUT": env.get("OUT")}}) + "\\n")
print("1234" if "--parsable" in args else "Submitted batch job 1234")
"""


def header_examples(path):
    """The submit commands of a script's header (continuation lines joined)."""
    header = path.read_text().split("#SBATCH", 1)[0]
    block = header.split("Submit from", 1)[1].split("# Edit", 1)[0]
    commands, current = [], ""
    for line in (line[1:].strip() for line in block.splitlines() if line.startswith("#     ")):
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def submit_header_examples(path, tmp_path):
    """Run the header's submit lines against an sbatch that reads --export as Slurm does."""
    log = tmp_path / "sbatch.log"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(FAKE_SBATCH.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    commands = header_examples(path)
    env = {k: v for k, v in os.environ.items() if k not in ("EXTRA_ARGS", "OUT")}
    env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run(["bash", "-ec", "\n".join(commands)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{commands}\n{result.stderr}"
    jobs = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(jobs) == sum(len(re.findall(r"(?:^|[\s(])sbatch\s", c)) for c in commands)
    return jobs


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_header_examples_reach_the_job_whole(path, tmp_path):
    for submitted in submit_header_examples(path, tmp_path):
        assert (ROOT / submitted["script"]).is_file(), submitted
        for word in shlex.split(submitted["EXTRA_ARGS"] or ""):
            assert word.count("[") == word.count("]"), submitted


def test_prepare_data_chain_prepares_what_the_trained_config_documents(tmp_path):
    """The chained MNIST preparation uses the split the training config's header gives."""
    config = ROOT / "benchmarks" / "configs" / "mnist10k_2x2.yaml"
    header = " ".join(line.lstrip("# ").rstrip("\\ ") for line in config.read_text().splitlines()
                      if line.startswith("#"))
    documented = re.search(r"--out data/mnist10k\.h5 (--val-fraction \S+ --test-fraction \S+)",
                           header).group(1)
    jobs = submit_header_examples(SLURM / "prepare_data.sbatch", tmp_path)
    chained = [j for j in jobs if j["OUT"] == "data/mnist10k.h5"]
    assert [j["EXTRA_ARGS"] for j in chained] == [documented], jobs


# --------------------------------------------------------------------------- running them
@pytest.fixture
def job(tmp_path):
    """Environment and helpers for running one script under the stand-ins."""
    return Job(tmp_path)


class Job:
    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.fake = tmp_path / "fake"
        self.fake.mkdir()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "SRUN_", "OMPI_COMM_WORLD", "PMI", "PMIX"))}
        self.env.update({
            "PATH": f"{BIN}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                    f"{os.environ.get('PATH', '')}",
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "test", "SLURM_NTASKS": "1",
            "SLURM_CPUS_PER_TASK": "1", "SLURM_SUBMIT_DIR": str(tmp_path),
            "DDMPI_ROOT": str(ROOT), "VENV": "",
            "DDMPI_CMD": str(BIN / "fake-ddmpi"), "FAKE_DDMPI_DIR": str(self.fake),
            "CONFIG": str(tmp_path / "config.yaml"), "RUN_DIR": str(tmp_path / "run"),
            "SRUN_STANDIN_LOG": str(tmp_path / "srun.log"),
            "SCONTROL_STANDIN_LOG": str(tmp_path / "scontrol.log"),
            "OMP_NUM_THREADS": "1",
        })
        if os.geteuid() == 0:
            self.env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")

    def run(self, script, *args, **env):
        self.env.update(env)
        return subprocess.run(["bash", str(SLURM / script), *args], env=self.env,
                              cwd=self.dir, capture_output=True, text=True, timeout=TIMEOUT)

    def start(self, script, **env):
        self.env.update(env)
        return subprocess.Popen(["bash", str(SLURM / script)], env=self.env, cwd=self.dir,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def argv(self, rank=0):
        return (self.fake / f"argv.{rank}").read_text().splitlines()

    def task_env(self, rank=0):
        return dict(line.split("=", 1)
                    for line in (self.fake / f"env.{rank}").read_text().splitlines())

    def scontrol_calls(self):
        log = self.dir / "scontrol.log"
        return log.read_text().splitlines() if log.exists() else []

    def wait_for_ranks(self, proc, n):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if all((self.fake / f"pid.{r}").exists() for r in range(n)):
                return
            if proc.poll() is not None:
                pytest.fail(f"script ended early ({proc.returncode}):\n{proc.stdout.read()}")
            time.sleep(0.1)
        proc.kill()
        pytest.fail("the fake ranks never started")

    def finish(self, proc):
        try:
            out, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"script did not exit:\n{out}")
        return proc.returncode, out


def expected_train_argv(job, *extra):
    return ["train", "--config", job.env["CONFIG"], "--run-dir", job.env["RUN_DIR"],
            "--resume", *extra]


def test_train_gpu_launches_ddmpi_train_with_srun(job):
    result = job.run("train_gpu.sbatch", SLURM_CPUS_PER_TASK="3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert job.argv() == expected_train_argv(job)
    srun_call = (job.dir / "srun.log").read_text()
    assert srun_call.startswith("srun --kill-on-bad-exit=1 -- ")
    env = job.task_env()
    assert env["HDF5_USE_FILE_LOCKING"] == "FALSE"
    assert env["OMP_NUM_THREADS"] == "3" and env["SRUN_CPUS_PER_TASK"] == "3"
    assert (job.dir / "run").is_dir()
    assert job.scontrol_calls() == []


def test_train_cpu_with_two_ranks_under_mpirun(job):
    result = job.run("train_cpu.sbatch", SLURM_NTASKS="2",
                     EXTRA_ARGS="--set local.epochs=1", SRUN_ARGS="--mpi=pmix")
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        assert job.argv(rank) == expected_train_argv(job, "--set", "run.device=cpu",
                                                     "--set", "local.epochs=1")
        env = job.task_env(rank)
        assert env["SLURM_PROCID"] == str(rank) and env["SLURM_STEP_NUM_TASKS"] == "2"
        assert env["OMPI_COMM_WORLD_RANK"] == str(rank)
    assert "--mpi=pmix" in (job.dir / "srun.log").read_text()


@pytest.mark.parametrize("script, extra", [("train_gpu.sbatch", []),
                                           ("train_cpu.sbatch", ["--set", "run.device=cpu"])])
def test_compare_runs_with_the_same_resume_path(job, script, extra):
    """SUBCOMMAND=compare: the requeued job's ``ddmpi compare --resume`` continues it."""
    result = job.run(script, SUBCOMMAND="compare")
    assert result.returncode == 0, result.stdout + result.stderr
    assert job.argv() == ["compare", *expected_train_argv(job, *extra)[1:]]
    assert "ddmpi compare, config" in result.stdout


def test_default_run_dir_is_stable_across_requeues(job):
    del job.env["RUN_DIR"]
    result = job.run("train_gpu.sbatch")
    assert result.returncode == 0, result.stdout + result.stderr
    argv = job.argv()
    run_dir = argv[argv.index("--run-dir") + 1]
    assert run_dir == "runs/test-4242"                      # job name and id: same on requeue
    assert (job.dir / run_dir).is_dir()


def test_a_failing_step_fails_the_job_without_requeue(job):
    result = job.run("train_cpu.sbatch", FAKE_DDMPI_MODE="fail", FAKE_DDMPI_RC="3")
    assert result.returncode == 3
    assert "job step exited with status 3" in result.stdout
    assert job.scontrol_calls() == []


def test_missing_requeue_library_is_a_clear_error(job):
    result = job.run("train_gpu.sbatch", DDMPI_ROOT=str(job.dir))
    assert result.returncode == 2
    assert "slurm/lib/requeue.sh not found" in result.stderr


def test_param_study_task_sets_its_combination(job):
    del job.env["RUN_DIR"]
    result = job.run("param_study.sbatch", SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_JOB_ID="900",
                     SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX="11")
    assert result.returncode == 0, result.stdout + result.stderr
    # Widths vary fastest: 5 = grid 1, overlap 0, width 1.
    run_dir = "runs/study-900/grid3x3-overlap0-width32"
    assert job.argv() == ["train", "--config", job.env["CONFIG"], "--run-dir", run_dir,
                          "--resume", "--set", "decomposition.grid=[3,3]",
                          "--set", "decomposition.overlap=0", "--set", "local.model.width=32"]
    assert (job.dir / run_dir).is_dir()


def test_param_study_rejects_a_task_beyond_the_list(job):
    result = job.run("param_study.sbatch", SLURM_ARRAY_TASK_ID="12")
    assert result.returncode == 2
    assert "only 12 combinations" in result.stderr
    result = job.run("param_study.sbatch", SLURM_ARRAY_TASK_ID="")
    assert result.returncode == 2 and "SLURM_ARRAY_TASK_ID is not set" in result.stderr


@pytest.mark.parametrize("kind, env, expected", [
    ("mnist", {"SRC": "raw/mnist", "OUT": "data/mnist.h5"},
     ["mnist", "--src", "raw/mnist", "--out", "data/mnist.h5"]),
    ("nifti", {"MANIFEST": "ct/labels.csv", "OUT": "data/ct.h5",
               "EXTRA_ARGS": "--spacing 2"},
     ["nifti", "--manifest", "ct/labels.csv", "--spacing", "2", "--out", "data/ct.h5"]),
])
def test_prepare_data_runs_the_converter(job, kind, env, expected):
    result = job.run("prepare_data.sbatch", KIND=kind, DATA_PREP_CMD=str(BIN / "fake-ddmpi"),
                     **env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert job.argv() == expected
    assert job.task_env()["HDF5_USE_FILE_LOCKING"] == "FALSE"
    assert (job.dir / "data").is_dir()
    assert "srun --ntasks=1 -- " in (job.dir / "srun.log").read_text()


# --------------------------------------------------------------------------- requeue
@pytest.mark.parametrize("ntasks", [1, 2])
def test_usr1_is_forwarded_and_the_job_requeued(job, ntasks):
    proc = job.start("train_gpu.sbatch", SLURM_NTASKS=str(ntasks), FAKE_DDMPI_MODE="wait")
    job.wait_for_ranks(proc, ntasks)
    proc.send_signal(signal.SIGUSR1)                   # what --signal=B:USR1@300 does
    rc, out = job.finish(proc)
    assert rc == 0, out
    for rank in range(ntasks):
        assert (job.fake / f"signal.{rank}").read_text().strip() == "USR1", out
    assert "forwarding to the job step" in out
    assert "job step exited with status 75" in out
    assert job.scontrol_calls() == ["requeue 4242"]


def test_no_requeue_when_the_run_finished_in_the_window(job):
    proc = job.start("train_cpu.sbatch", FAKE_DDMPI_MODE="wait", FAKE_DDMPI_RC="0")
    job.wait_for_ranks(proc, 1)
    proc.send_signal(signal.SIGUSR1)
    rc, out = job.finish(proc)
    assert rc == 0 and "nothing to requeue" in out
    assert job.scontrol_calls() == []


def test_sigterm_waits_for_the_checkpoint_and_does_not_requeue(job):
    proc = job.start("train_cpu.sbatch", FAKE_DDMPI_MODE="wait")
    job.wait_for_ranks(proc, 1)
    # scancel/time limit: Slurm sends SIGTERM to the batch shell and to the step's tasks.
    proc.send_signal(signal.SIGTERM)
    os.kill(int((job.fake / "pid.0").read_text()), signal.SIGTERM)
    rc, out = job.finish(proc)
    assert rc == 75, out
    assert (job.fake / "signal.0").read_text().strip() == "TERM"
    assert job.scontrol_calls() == []


def test_requeue_limit_and_failed_requeue(job):
    proc = job.start("train_cpu.sbatch", FAKE_DDMPI_MODE="wait", SLURM_RESTART_COUNT="3",
                     DDMPI_MAX_REQUEUES="3")
    job.wait_for_ranks(proc, 1)
    proc.send_signal(signal.SIGUSR1)
    rc, out = job.finish(proc)
    assert rc == 75 and "DDMPI_MAX_REQUEUES=3" in out
    assert job.scontrol_calls() == []

    for f in job.fake.iterdir():
        f.unlink()
    proc = job.start("train_cpu.sbatch", FAKE_DDMPI_MODE="wait", SLURM_RESTART_COUNT="0",
                     SCONTROL_STANDIN_RC="1")
    job.wait_for_ranks(proc, 1)
    proc.send_signal(signal.SIGUSR1)
    rc, out = job.finish(proc)
    assert rc == 75 and "scontrol requeue 4242 failed" in out
    assert job.scontrol_calls() == ["requeue 4242"]


def test_param_study_task_requeues_itself(job):
    proc = job.start("param_study.sbatch", FAKE_DDMPI_MODE="wait", SLURM_ARRAY_TASK_ID="0",
                     SLURM_ARRAY_JOB_ID="900", SLURM_JOB_ID="901")
    job.wait_for_ranks(proc, 1)
    proc.send_signal(signal.SIGUSR1)
    rc, out = job.finish(proc)
    assert rc == 0, out
    assert job.scontrol_calls() == ["requeue 901"]


# --------------------------------------------------------------------------- real ddmpi
def real_ddmpi_train_available():
    exe = shutil.which("ddmpi", path=str(Path(sys.executable).parent)) or shutil.which("ddmpi")
    if exe is None:
        return None, "no ddmpi executable"
    try:
        out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"ddmpi --help failed: {exc}"
    if out.returncode != 0 or not re.search(r"\btrain\b", out.stdout + out.stderr):
        return None, "ddmpi --help lists no 'train' command yet"
    return exe, ""


@pytest.mark.slow
def test_real_ddmpi_preempted_requeued_and_resumed(job):
    """prepare_data.sbatch, then train_cpu.sbatch on 2 ranks with the real ddmpi: USR1 after
    the first epoch -> checkpoint, exit 75, scontrol requeue; the "requeued" run resumes."""
    exe, why = real_ddmpi_train_available()
    if exe is None:
        pytest.skip(why)
    venv = str(Path(sys.executable).parents[1])
    result = job.run("prepare_data.sbatch", KIND="digits", VENV=venv,
                     DATA_PREP_CMD=f"{sys.executable} -m data_prep")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (job.dir / "data" / "digits.h5").is_file()       # the quickstart's data.path

    # The packaged quick-start config, shortened; its data.path is relative to the submit dir.
    job.env.update(DDMPI_CMD=exe, CONFIG="quickstart", SLURM_NTASKS="2", VENV=venv,
                   EXTRA_ARGS="--set local.epochs=3 --set coarse.epochs=20")
    proc = job.start("train_cpu.sbatch")
    deadline = time.monotonic() + TIMEOUT
    out = []
    for line in proc.stdout:                       # wait until training runs (handler set)
        out.append(line)
        if "epoch 1:" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGUSR1)
    rc, rest = job.finish(proc)
    out = "".join(out) + rest
    assert "job step exited with status 75" in out, out[-4000:]
    assert rc == 0 and job.scontrol_calls() == ["requeue 4242"], out[-4000:]
    run_dir = Path(job.env["RUN_DIR"])
    assert list((run_dir / "checkpoints").glob("local_*.pt")), "no checkpoint after USR1"
    assert not (run_dir / "metrics.json").exists()

    result = job.run("train_cpu.sbatch", SLURM_RESTART_COUNT="1")   # the requeued job
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (run_dir / "metrics.json").is_file()
    assert job.scontrol_calls() == ["requeue 4242"]                  # no second requeue


# --------------------------------------------------------------------------- tests/run.sh
RUN_SH = ROOT / "tests" / "run.sh"


def fake_tools(tmp_path, rc_serial=0, rc_mpi=0):
    """A fake python (records its argv, exits 0 or the given code) and a fake Open MPI
    mpirun (records its argv, runs the command after its options)."""
    log = tmp_path / "calls.log"
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/bash
echo "python $*" >>{log}
case " $* " in *" --with-mpi "*) exit {rc_mpi} ;; *) exit {rc_serial} ;; esac
""")
    mpirun = tmp_path / "mpirun"
    mpirun.write_text(f"""#!/bin/bash
if [ "$1" = --version ]; then echo "mpirun (Open MPI) 5.0.0"; exit 0; fi
echo "mpirun $*" >>{log}
shift 2; [ "$1" = --oversubscribe ] && shift
exec "$@"
""")
    python.chmod(0o755)
    mpirun.chmod(0o755)
    return python, mpirun, log


def run_sh(tmp_path, python, mpirun, sizes="1 64", *args):
    env = {**os.environ, "PYTHON": str(python), "MPIEXEC": str(mpirun),
           "DDMPI_MPI_SIZES": sizes}
    env.pop("DDMPI_TEST_PARTS", None)  # every part, whatever the calling shell chose
    return subprocess.run(["bash", str(RUN_SH), *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_run_sh_runs_every_part_and_summarises(tmp_path):
    python, mpirun, log = fake_tools(tmp_path)
    result = run_sh(tmp_path, python, mpirun, "1 64", "-x")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().splitlines()[-1] == \
        "=== run.sh: PASSED: lint ok; serial ok; mpi-1 ok; mpi-64 ok"
    calls = log.read_text().splitlines()
    assert calls[0] == "python -m ruff check ddmpi data_prep"
    assert calls[1] == "python -m pytest -m not mpi -x"
    # --oversubscribe only where there are fewer cores than ranks (no machine here has 64).
    assert f"mpirun -n 1 {python} -m pytest --with-mpi -m mpi" in calls[2]
    assert calls[2].endswith("-o timeout_method=thread -x")
    assert f"mpirun -n 64 --oversubscribe {python} -m pytest --with-mpi -m mpi" in calls[4]


def test_run_sh_fails_when_a_part_fails_or_collects_nothing(tmp_path):
    python, mpirun, _ = fake_tools(tmp_path, rc_serial=1, rc_mpi=5)
    result = run_sh(tmp_path, python, mpirun, "2")
    assert result.returncode == 1
    assert result.stdout.rstrip().splitlines()[-1] == (
        "=== run.sh: FAILED: lint FAILED (exit 1); serial FAILED (exit 1); mpi-2 FAILED (exit 5, "
        "no tests collected)")
