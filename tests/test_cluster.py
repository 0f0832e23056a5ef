"""Launcher detection and device/thread binding from fake environments (CPU only, no MPI run).

GPU counts are injected, so the GPU binding rules are covered on machines without a GPU.
"""

import os

import pytest
import torch

from ddmpi.parallel import cluster
from ddmpi.parallel.cluster import (
    BindingError, ClusterEnvironment, MPICHEnvironment, OpenMPIEnvironment, PMIxEnvironment,
    SlurmEnvironment, bind_threads, describe_binding, node_local_rank, parse_tasks_per_node,
    select_device, slurm_gpus, threads_per_rank)

OMPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
MPICH = {"PMI_RANK": "6", "PMI_SIZE": "8", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "4"}
PALS = {"PMIX_RANK": "7", "PALS_SIZE": "8", "PALS_LOCAL_RANKID": "3", "PALS_LOCAL_SIZE": "4"}
SLURM = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "12",
         "SLURM_STEP_NUM_TASKS": "12", "SLURM_STEP_TASKS_PER_NODE": "4(x3)",
         "SLURM_NODEID": "2", "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "8"}


class FakeComm:
    """Just enough of a communicator for the consistency check (rank and size)."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def allreduce(self, value, op=None):        # one rank: the reduction is the value
        return value


# --------------------------------------------------------------------------- detection
@pytest.mark.parametrize("environ, cls, expected", [
    (OMPI, OpenMPIEnvironment, (5, 8, 1, 4)),
    (MPICH, MPICHEnvironment, (6, 8, 2, 4)),
    (PALS, PMIxEnvironment, (7, 8, 3, 4)),
    (SLURM, SlurmEnvironment, (9, 12, 1, 4)),
])
def test_each_launcher_is_detected_with_its_numbers(environ, cls, expected):
    env = ClusterEnvironment.detect(environ)
    assert type(env) is cls
    assert (env.world_rank(), env.world_size(), env.local_rank(), env.local_size()) == expected
    assert env.is_complete()


def test_nothing_detected_without_launcher_variables():
    assert ClusterEnvironment.detect({"HOME": "/root"}) is None
    assert ClusterEnvironment.detect({"PMIX_RANK": "0"}) is None   # srun --mpi=pmix: no local


def test_cray_pals_rank_without_pmix_and_cray_mpich_local_rank():
    env = ClusterEnvironment.detect({"PALS_RANKID": "3", "PALS_LOCAL_RANKID": "1",
                                     "PALS_LOCAL_SIZE": "2", "PMI_SIZE": "4"})
    assert type(env) is PMIxEnvironment and env.world_rank() == 3 and env.local_rank() == 1
    env = ClusterEnvironment.detect({"PMIX_RANK": "3", "PMI_LOCAL_RANK": "1",
                                     "PMI_LOCAL_SIZE": "2", "PMI_SIZE": "4"})
    assert type(env) is PMIxEnvironment and (env.local_rank(), env.local_size()) == (1, 2)


def test_launcher_variables_win_over_stale_slurm_ones():
    # mpirun inside an sbatch allocation: every rank inherits the batch shell's SLURM_PROCID=0.
    environ = {**SLURM, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", **OMPI}
    assert type(ClusterEnvironment.detect(environ)) is OpenMPIEnvironment
    environ = {**SLURM, **MPICH}
    assert type(ClusterEnvironment.detect(environ)) is MPICHEnvironment


def test_junk_values_count_as_absent():
    assert ClusterEnvironment.detect({"OMPI_COMM_WORLD_LOCAL_RANK": "x"}) is None
    env = ClusterEnvironment.detect({**OMPI, "OMPI_COMM_WORLD_LOCAL_SIZE": ""})
    assert env.local_size() is None and not env.is_complete()


@pytest.mark.parametrize("value, expected", [
    ("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("1,3(x2)", [1, 3, 3]), ("", None),
    (None, None), ("abc", None), ("2(x)", None),
])
def test_parse_tasks_per_node(value, expected):
    assert parse_tasks_per_node(value) == expected


def test_slurm_local_size_of_uneven_layout_uses_the_node_id():
    environ = {**SLURM, "SLURM_STEP_TASKS_PER_NODE": "3,2(x2)", "SLURM_NODEID": "1",
               "SLURM_STEP_NUM_TASKS": "7", "SLURM_PROCID": "4"}
    assert SlurmEnvironment(environ).local_size() == 2
    environ["SLURM_NODEID"] = "0"
    assert SlurmEnvironment(environ).local_size() == 3
    del environ["SLURM_NODEID"]
    assert SlurmEnvironment(environ).local_size() is None      # unknown: not complete
    # Job-level layout when the step-level one is absent.
    environ = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_TASKS_PER_NODE"}
    environ["SLURM_TASKS_PER_NODE"] = "4(x3)"
    assert SlurmEnvironment(environ).local_size() == 4


def test_node_local_rank_checks_the_environment_against_the_communicator():
    assert node_local_rank(FakeComm(5, 8), OMPI) == (1, 4, "openmpi")
    assert node_local_rank(FakeComm(9, 12), SLURM) == (1, 4, "slurm")
    # Stale Slurm variables (batch shell: PROCID 0, 12 tasks) on rank 5 of 8 are not trusted;
    # Open MPI's are, when consistent.
    assert node_local_rank(FakeComm(5, 8), {**SLURM, **OMPI}) == (1, 4, "openmpi")


def test_node_local_rank_falls_back_to_the_shared_memory_split_on_a_mismatch():
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() != 1:
        pytest.skip("single-process check (the MPI suite covers the split under mpirun)")
    # COMM_WORLD of one process against variables claiming 8 ranks: inconsistent -> split.
    assert node_local_rank(MPI.COMM_WORLD, OMPI) == (0, 1, "shared-memory")
    assert node_local_rank(MPI.COMM_WORLD, {}) == (0, 1, "shared-memory")


def test_node_local_rank_without_mpi():
    assert node_local_rank(None, OMPI) == (1, 4, "openmpi")
    assert node_local_rank(None, {}) == (0, 1, "single-process")


# --------------------------------------------------------------------------- device
@pytest.mark.parametrize("local_rank, num_gpus, expected", [
    (0, 4, "cuda:0"), (3, 4, "cuda:3"), (5, 4, "cuda:1"),   # modulo the visible devices
    (2, 1, "cuda:0"),                                        # --gpus-per-task=1: sees one
    (1, 2, "cuda:1"),
])
def test_auto_device_is_local_rank_modulo_visible_gpus(local_rank, num_gpus, expected):
    assert select_device(local_rank, "auto", num_gpus, environ={}) == torch.device(expected)
    assert select_device(local_rank, "cuda", num_gpus, environ={}) == torch.device(expected)


def test_auto_and_cpu_without_gpus_give_the_cpu():
    assert select_device(0, "auto", 0, environ={}) == torch.device("cpu")
    assert select_device(3, "cpu", 4, environ={}) == torch.device("cpu")


def test_cuda_requested_without_a_gpu_is_an_error_naming_the_field():
    with pytest.raises(BindingError, match=r"run\.device.*no CUDA device is visible"):
        select_device(0, "cuda", 0, environ={"CUDA_VISIBLE_DEVICES": ""})
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=''"):
        select_device(0, "cuda:0", 0, environ={"CUDA_VISIBLE_DEVICES": ""})


def test_auto_with_slurm_gpus_but_none_visible_is_an_error():
    environ = {"SLURM_JOB_GPUS": "0,1", "CUDA_VISIBLE_DEVICES": "0,1"}
    with pytest.raises(BindingError, match=r"Slurm allocated GPUs 0,1.*CPU-only torch"):
        select_device(0, "auto", 0, environ=environ)
    assert select_device(0, "cpu", 0, environ=environ) == torch.device("cpu")


def test_explicit_index_beyond_the_visible_devices_is_an_error():
    assert select_device(0, "cuda:1", 2, environ={}) == torch.device("cuda:1")
    with pytest.raises(BindingError, match=r"only 2 CUDA device\(s\).*cuda:0\.\.cuda:1"):
        select_device(0, "cuda:2", 2, environ={})


def test_more_ranks_than_gpus_share_them_round_robin():
    assert [select_device(r, "auto", 2, environ={}) for r in range(4)] == [
        torch.device(f"cuda:{i}") for i in (0, 1, 0, 1)]


def test_bad_device_strings_are_errors():
    for bad in ("gpu", "cuda:x", "tpu", "cuda:-1"):
        with pytest.raises(BindingError, match=r"'run\.device'"):
            select_device(0, bad, 1, environ={})


def test_num_gpus_defaults_to_what_torch_sees(monkeypatch):
    monkeypatch.setattr(cluster, "visible_gpu_count", lambda: 0)
    assert select_device(0, "auto", environ={}) == torch.device("cpu")
    monkeypatch.setattr(cluster, "visible_gpu_count", lambda: 3)
    assert select_device(4, "auto", environ={}) == torch.device("cuda:1")


def test_slurm_gpus_prefers_the_step_list():
    assert slurm_gpus({"SLURM_JOB_GPUS": "0,1,2,3", "SLURM_STEP_GPUS": "2"}) == ["2"]
    assert slurm_gpus({"SLURM_JOB_GPUS": "0,1"}) == ["0", "1"]
    assert slurm_gpus({}) == []


# --------------------------------------------------------------------------- threads
def test_threads_from_slurm_cpus_per_task_first():
    environ = {"SLURM_CPUS_PER_TASK": "8", "OMP_NUM_THREADS": "2"}
    assert threads_per_rank(4, "auto", environ, cpus=64) == 8


def test_threads_from_omp_num_threads_next():
    assert threads_per_rank(4, "auto", {"OMP_NUM_THREADS": "3"}, cpus=64) == 3
    assert threads_per_rank(4, "auto", {"OMP_NUM_THREADS": "6,2"}, cpus=64) == 6
    assert threads_per_rank(4, "auto", {"OMP_NUM_THREADS": "junk"}, cpus=64) == 16


def test_threads_share_the_affinity_mask_otherwise():
    assert threads_per_rank(4, "auto", {}, cpus=64) == 16
    assert threads_per_rank(3, "auto", {}, cpus=8) == 2
    assert threads_per_rank(4, "auto", {}, cpus=2) == 1            # never 0
    assert threads_per_rank(None, "auto", {}, cpus=6) == 6
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    assert threads_per_rank(2, "auto", {}) == expected


def test_explicit_thread_count_wins_and_is_validated():
    assert threads_per_rank(4, 5, {"SLURM_CPUS_PER_TASK": "8"}) == 5
    assert threads_per_rank(4, "7", {}) == 7
    for bad in (0, -2, "many", 1.5, True):
        with pytest.raises(BindingError, match=r"'run\.threads_per_rank'"):
            threads_per_rank(4, bad, {})


def test_bind_threads_sets_torch_and_omp(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        assert bind_threads(2) == 2
        assert torch.get_num_threads() == 2
        assert os.environ["OMP_NUM_THREADS"] == "2"
    finally:
        torch.set_num_threads(before)
    with pytest.raises(BindingError):
        bind_threads(0)


# --------------------------------------------------------------------------- log line
def test_describe_binding_is_one_line_with_every_fact():
    line = describe_binding(9, 12, 1, 4, torch.device("cuda:1"), 8, "slurm", host="gpu017",
                            environ={"SLURM_JOB_ID": "4242", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert "\n" not in line
    for part in ("host=gpu017", "rank=9/12", "local_rank=1/4", "device=cuda:1", "threads=8",
                 "local_rank_source=slurm", "slurm_job=4242", "CUDA_VISIBLE_DEVICES=0,1,2,3"):
        assert part in line
    line = describe_binding(0, 1, 0, 1, torch.device("cpu"), 2, "single-process", environ={})
    assert "device=cpu" in line and "slurm_job" not in line and "CUDA_VISIBLE" not in line


def test_bind_process_on_cpu_without_mpi():
    before = torch.get_num_threads()
    try:
        binding = cluster.bind_process(None, "auto", "auto", environ={"SLURM_CPUS_PER_TASK": "1"},
                                       num_gpus=0)
    finally:
        torch.set_num_threads(before)
    assert binding.device == torch.device("cpu") and binding.threads == 1
    assert (binding.local_rank, binding.local_size, binding.source) == (0, 1, "single-process")
    assert str(binding).startswith("binding: host=")
