"""The run directory's lock under MPI (``mpirun -n 2|4 python -m pytest --with-mpi -m mpi
tests/test_run_dir_mpi.py``): rank 0 takes it, and another job's hold is an error on every
rank, not a hang."""

import pytest
from helpers import assert_all

from ddmpi.config import load_config
from ddmpi.parallel.group import Group
from ddmpi.strategies.base import open_run
from ddmpi.strategies.rundir import RunDirError, RunDirLock

pytestmark = [pytest.mark.mpi(min_size=2)]


@pytest.mark.timeout(120)
def test_a_run_dir_in_use_is_refused_on_every_rank(mpi_tmp_path, mpi_digits):
    world = Group.world()
    run_dir = mpi_tmp_path / "run"
    config = load_config("quickstart", [f"data.path={mpi_digits}", f"run.dir={run_dir}",
                                        "run.device=cpu", "run.threads_per_rank=1"])
    other = RunDirLock(run_dir if world.rank == 0 else None)  # another job's hold
    message = ""
    try:
        open_run(config, world)
    except RunDirError as err:
        message = str(err)
    assert_all(world, message.startswith(f"{run_dir} is in use by another job (pid "),
               f"not refused with the holder named: {message!r}")
    other.close()
    with open_run(config, world).lock:
        assert_all(world, (run_dir / "config.yaml").is_file(), "the freed directory not opened")
