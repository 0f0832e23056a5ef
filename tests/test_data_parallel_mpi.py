"""Data-parallel local training (hybrid groups, global DDP baseline): replicas stay identical."""

import json

import pytest
import torch
import torch.distributed as dist
from helpers import assert_all, digits_arrays
from mpi4py import MPI

from ddmpi.models.coherent import max_replica_difference
from ddmpi.config import LocalConfig, ModelConfig, load_config
from ddmpi.parallel.hybrid import GroupDataParallel
from ddmpi.training.loop import TensorSource, train_local
from ddmpi.parallel.torch_dist import torch_distributed
from ddmpi.strategies.cnn_dnn import run_train

BUILD = dict(family="vgg", spatial_dims=2, in_channels=1, num_classes=10, input_shape=(8, 8),
             depth=2, width=4)


def _sources():
    x, y = digits_arrays()
    x = torch.from_numpy((x - 0.3) / 0.4)
    return TensorSource(x[:600], y[:600]), TensorSource(x[600:800], y[600:800])


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("ddp", [False, True])
def test_replicas_identical_after_training(ddp):
    comm = MPI.COMM_WORLD
    cfg = LocalConfig(model=ModelConfig(width=4), epochs=2, batch_size=64)
    train, val = _sources()
    if ddp:
        with torch_distributed(comm):
            parallel = GroupDataParallel(comm, torch_group=dist.group.WORLD, ddp=True)
            model, history, _ = train_local(BUILD, train, val, cfg, device=torch.device("cpu"),
                                            seed=1, parallel=parallel)
    else:
        model, history, _ = train_local(BUILD, train, val, cfg, device=torch.device("cpu"),
                                        seed=1, parallel=GroupDataParallel(comm))
    diff = max_replica_difference(comm, model)
    assert_all(comm, diff == 0.0, f"replicas differ by {diff}")
    assert_all(comm, history[-1].train_loss < history[0].train_loss, "no learning")
    records = comm.allgather([(r.train_loss, r.val_accuracy, r.val_loss) for r in history])
    assert_all(comm, all(r == records[0] for r in records), "histories differ between replicas")


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(300)
def test_hybrid_run_two_ranks_per_subdomain(mpi_tmp_path, mpi_digits):
    comm = MPI.COMM_WORLD
    if comm.size % 2:
        pytest.skip("needs an even number of ranks")
    data = mpi_digits
    grid = "[1, 1]" if comm.size == 2 else f"[1, {comm.size // 2}]"
    config = load_config(None, [f"data.path={data}", f"run.dir={mpi_tmp_path / 'hybrid'}",
                                f"decomposition.grid={grid}", "local.epochs=2",
                                "local.model.width=4", "coarse.epochs=10",
                                "run.threads_per_rank=1"])
    metrics = run_train(config, comm)
    ok = metrics is None
    if comm.rank == 0:
        written = json.loads((mpi_tmp_path / "hybrid" / "metrics.json").read_text())
        leaders = [2 * s for s in range(comm.size // 2)]
        ok = sorted(int(s) for s in written["local"]) == list(range(comm.size // 2)) and [
            written["local"][str(s)]["rank"] for s in range(comm.size // 2)] == leaders
    assert_all(comm, ok, "hybrid run: wrong subdomain owners in metrics")
