"""A full tiny decomposed run under MPI, against the same run in a single process."""

import json

import pytest
from helpers import assert_all
from mpi4py import MPI

from ddmpi.config import load_config
from ddmpi.parallel.mapping import assign_subdomains
from ddmpi.strategies.cnn_dnn import run_train

OVERRIDES = ["local.epochs=2", "decomposition.grid=[2, 2]", "decomposition.overlap=1",
             "local.model.width=8", "coarse.epochs=20", "run.threads_per_rank=1"]


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(600)
def test_world_run_equals_single_process_run(mpi_tmp_path, mpi_digits):
    comm = MPI.COMM_WORLD
    data = mpi_digits
    overrides = [f"data.path={data}", *OVERRIDES]
    metrics = run_train(load_config(None, overrides + [f"run.dir={mpi_tmp_path / 'world'}"]),
                        comm)
    same = True
    if comm.rank == 0:
        single = run_train(load_config(None, overrides + [f"run.dir={mpi_tmp_path / 'self'}"]),
                           MPI.COMM_SELF)
        same = all(metrics["global"][name]["test_accuracy"] ==
                   single["global"][name]["test_accuracy"] for name in single["global"])
        same &= all(metrics["local"][s]["accuracy"] == single["local"][s]["accuracy"]
                    for s in single["local"])
    assert_all(comm, same, "accuracies differ between the MPI run and the single-process run")

    ok = metrics is None
    if comm.rank == 0:
        run = mpi_tmp_path / "world"
        written = json.loads((run / "metrics.json").read_text())
        owners = assign_subdomains(4, comm.size)
        ok = (written["ranks"] == comm.size
              and all(written["local"][str(s)]["rank"] == r
                      for r, subs in enumerate(owners) for s in subs)
              and set(written["global"]) == {"cnn_dnn", "majority_vote",
                                             "average_probabilities"}
              and len(written["timings_seconds"]) == comm.size
              and all((run / "checkpoints" / f"local_{s:03d}.pt").exists() for s in range(4))
              and (run / "checkpoints" / "coarse.pt").exists()
              and (run / "config.yaml").exists()
              and all((run / "plots" / p).exists() for p in (
                  "training_curves.png", "accuracy_by_combiner.png", "confusion_cnn_dnn.png"))
              and all((run / "logs" / f"rank_{r:05d}.log").exists() for r in range(comm.size)))
    assert_all(comm, ok, "run directory incomplete")
