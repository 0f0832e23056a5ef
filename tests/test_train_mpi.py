"""A full tiny decomposed run under MPI, against the same run in a single process."""

import json

import pytest
from helpers import assert_all
from mpi4py import MPI

from ddmpi.config import load_config
from ddmpi.parallel.group import Group
from ddmpi.parallel.layout import assign_subdomains
from ddmpi.strategies.base import run
from ddmpi.strategies.cnn_dnn import CNNDNN

OVERRIDES = ["local.epochs=2", "decomposition.grid=[2, 2]", "decomposition.overlap=1",
             "local.model.width=8", "coarse.epochs=20", "run.threads_per_rank=1",
             "run.device=cpu"]
COMBINERS = {"cnn_dnn", "average_log_probabilities", "majority_vote", "average_probabilities",
             "chosen"}


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(600)
def test_world_run_equals_single_process_run(mpi_tmp_path, mpi_digits):
    comm = MPI.COMM_WORLD
    overrides = [f"data.path={mpi_digits}", *OVERRIDES]
    result = run(CNNDNN, load_config(None, overrides + [f"run.dir={mpi_tmp_path / 'world'}"]),
                 Group.world())
    same = result is None
    if comm.rank == 0:
        single = run(CNNDNN, load_config(None, overrides + [f"run.dir={mpi_tmp_path / 'self'}"]),
                     Group.single())
        same = (set(single.combiners) == COMBINERS
                and all(result.combiners[n]["accuracy"] == single.combiners[n]["accuracy"]
                        for n in single.combiners)
                and all(result.extra["local"][s]["accuracy"] == v["accuracy"]
                        for s, v in single.extra["local"].items())
                and result.parameters == single.parameters)
    assert_all(comm, same, "accuracies differ between the MPI run and the single-process run")

    ok = True
    if comm.rank == 0:
        path = mpi_tmp_path / "world"
        written = json.loads((path / "metrics.json").read_text())
        owners = assign_subdomains(4, comm.size)
        ok = (written["ranks"] == comm.size and written["strategy"] == "cnn_dnn"
              and all(written["extra"]["local"][str(s)]["rank"] == r
                      for r, subs in enumerate(owners) for s in subs)
              and set(written["combiners"]) == COMBINERS
              and len(written["timings"]) == comm.size
              and len(written["peak_memory_mb"]) == comm.size
              and all((path / "checkpoints" / f"local_{s:03d}.pt").exists() for s in range(4))
              and (path / "checkpoints" / "coarse.pt").exists()
              and (path / "config.yaml").exists() and (path / "history.json").exists()
              and all((path / "plots" / p).exists() for p in (
                  "training_curves.png", "accuracy_by_combiner.png", "confusion_cnn_dnn.png"))
              and all((path / "logs" / f"rank_{r:05d}.log").exists()
                      for r in range(comm.size)))
    assert_all(comm, ok, "run directory incomplete")
