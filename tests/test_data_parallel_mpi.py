"""Data-parallel training of one CNN over all ranks (the global DDP CNN, and the hybrid run):
replicas stay identical. Run with
``mpirun -n 2|4 python -m pytest --with-mpi -m mpi tests/test_data_parallel_mpi.py``."""

import contextlib
import json

import pytest
import torch
from helpers import assert_all, assert_on_root, digits_arrays

from ddmpi.config import load_config
from ddmpi.data.schema import Normalization
from ddmpi.data.sources import TensorSource
from ddmpi.models.cnn import build_cnn
from ddmpi.parallel.data_parallel import DataParallel, ddp_over
from ddmpi.parallel.group import Group
from ddmpi.strategies.base import run
from ddmpi.strategies.cnn_dnn import CNNDNN
from ddmpi.training.loop import Step, Trainer, fit

CPU = torch.device("cpu")
BUILD = dict(family="vgg", spatial_dims=2, in_channels=1, num_classes=10, input_shape=(8, 8),
             depth=2, width=4)


def _sources():
    x, y = digits_arrays()
    norm = Normalization([0.3], [0.4])
    return TensorSource(x[:600], y[:600], norm), TensorSource(x[600:800], y[600:800], norm)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("ddp", [False, True])
def test_replicas_identical_after_training(ddp):
    world = Group.world()
    train, val = _sources()
    torch.manual_seed(1)
    model = build_cnn(**BUILD)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = Trainer(model, opt, torch.optim.lr_scheduler.ConstantLR(opt, 1.0), epochs=2)
    context = ddp_over(world, CPU) if ddp else contextlib.nullcontext(DataParallel(world))
    with context as parallel:
        fit(trainer, train, val, Step(CPU, parallel=parallel), batch_size=64, seed=1)
    history = trainer.history
    diff = world.max_difference(model)
    assert_all(world.comm, diff == 0.0, f"replicas differ by {diff}")
    assert_all(world.comm, history[-1].train_loss < history[0].train_loss, "no learning")
    records = world.allgather([(r.train_loss, r.val_accuracy, r.val_loss) for r in history])
    assert_all(world.comm, all(r == records[0] for r in records),
               "histories differ between replicas")


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_hybrid_run_two_ranks_per_subdomain(mpi_tmp_path, mpi_digits):
    world = Group.world()
    if world.size % 2:
        pytest.skip("needs an even number of ranks")
    grid = "[1, 1]" if world.size == 2 else f"[1, {world.size // 2}]"
    config = load_config(None, [f"data.path={mpi_digits}", f"run.dir={mpi_tmp_path / 'hybrid'}",
                                f"decomposition.grid={grid}", "local.epochs=2",
                                "local.model.width=4", "coarse.epochs=10",
                                "run.threads_per_rank=1"])
    result = run(CNNDNN, config, world)
    assert_all(world.comm, (result is not None) == (world.rank == 0), "result only on rank 0")

    def checks():
        written = json.loads((mpi_tmp_path / "hybrid" / "metrics.json").read_text())
        local = written["extra"]["local"]
        return {"every subdomain reported": sorted(map(int, local)) == list(range(world.size // 2)),
                "owners are the replica leaders": [local[str(s)]["rank"]
                                                   for s in range(world.size // 2)]
                == [2 * s for s in range(world.size // 2)],
                "ranks recorded": written["ranks"] == world.size}

    assert_on_root(world.comm, checks, "hybrid run: wrong subdomain owners in metrics")
