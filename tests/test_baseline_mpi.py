"""The global data-parallel baseline (torch DDP from the MPI job) on real digits (run with
``mpirun -n 2|4 python -m pytest --with-mpi -m mpi tests/test_baseline_mpi.py``)."""

import json

import pytest
import torch
from helpers import assert_all, assert_on_root
from mpi4py import MPI

from ddmpi.strategies.global_ddp import global_build_kwargs, load_global, run_baseline, train_global_ddp
from ddmpi.models.coherent import max_replica_difference
from ddmpi.config import load_config
from ddmpi.training.loop import TensorSource
from ddmpi.data.schema import read_info

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]

OVERRIDES = ["local.epochs=2", "local.model.width=4", "local.batch_size=64",
             "decomposition.grid=[2, 2]", "run.threads_per_rank=1", "run.device=cpu"]


def test_ddp_replicas_stay_identical(mpi_digits):
    """Parameters *and* BatchNorm statistics equal on every rank after DDP training, so every
    replica validates alike and keeps the same best epoch."""
    comm = MPI.COMM_WORLD
    config = load_config(None, [f"data.path={mpi_digits}", *OVERRIDES])
    info = read_info(mpi_digits)
    kwargs = global_build_kwargs(config, info)
    assert_all(comm, kwargs["width"] == 8 and kwargs["input_shape"] == (8, 8), str(kwargs))
    train, val = (TensorSource(*map(torch.from_numpy, load_global(mpi_digits, s, info)))
                  for s in ("train", "val"))
    model, history, best = train_global_ddp(config, comm, kwargs, train, val,
                                            torch.device("cpu"), log=lambda msg: None)
    diff = max_replica_difference(comm, model)          # parameters and floating buffers
    assert_all(comm, diff == 0.0, f"DDP replicas differ by {diff}")
    vals = comm.allgather(([r.val_accuracy for r in history], best))
    assert_all(comm, all(v == vals[0] for v in vals), f"replicas validate differently: {vals}")
    assert_all(comm, history[-1].train_loss < history[0].train_loss, "no learning")
    assert_all(comm, not torch.distributed.is_initialized(), "process group left behind")


def test_run_baseline_writes_its_run_directory(mpi_digits, mpi_tmp_path):
    comm = MPI.COMM_WORLD
    run_dir = mpi_tmp_path / "global"
    config = load_config(None, [f"data.path={mpi_digits}", f"run.dir={run_dir}", *OVERRIDES,
                                "compare.global_width=6"])
    metrics = run_baseline(config, comm)
    assert_all(comm, (metrics is None) == (comm.rank != 0), "non-root rank got metrics")

    def checks():
        written = json.loads((run_dir / "metrics.json").read_text())
        ckpt = torch.load(run_dir / "checkpoints" / "global.pt", weights_only=False)
        n_test = written["dataset"]["splits"]["test"]
        matrix = written["global"]["global_ddp"]["confusion_matrix"]
        return {
            "test accuracy": 0.0 <= written["test_accuracy"] <= 1.0,
            "per-class": len(written["global"]["global_ddp"]["per_class_accuracy"]) == 10,
            "confusion": sum(map(sum, matrix)) == n_test,
            "width": written["model"]["width"] == 6 and ckpt["model_config"]["width"] == 6,
            "parameters": written["parameters"] > 0,
            "timings": len(written["timings_seconds"]) == comm.size and all(
                "training" in t for t in written["timings_seconds"].values()),
            "history": [h["epoch"] for h in written["history"]] == [1, 2] and all(
                "elapsed" in h for h in written["history"]),
            "checkpoint": "best_model" in ckpt,
            "files": all((run_dir / p).exists() for p in (
                "config.yaml", "dataset.json", "history.json", "plots/training_curves.png",
                "plots/confusion_global.png", "logs/rank_00000.log")),
        }

    assert_on_root(comm, checks, "run directory checks failed")
