"""``ddmpi compare`` and transfer learning into the coherent CNN-DNN, on real digits (run with
``mpirun -n 2|4 python -m pytest --with-mpi -m mpi tests/test_compare_mpi.py``).

Two ranks decompose the 8x8 digits into 2x2 subdomains (two per rank); four ranks into 1x2
subdomains, so the CNN-DNN runs hybrid (two data-parallel ranks per subdomain) and the coherent
CNN-DNN on the first two ranks.
"""

import json

import numpy as np
import pytest
import torch
from conftest import write_digits_h5
from helpers import assert_all, assert_on_root
from mpi4py import MPI

from ddmpi.coarse import combiners
from ddmpi.training.checkpoint import load_checkpoint
from ddmpi.strategies.coherent import TransferError, load_transfer, run_coherent
from ddmpi.commands.compare import format_table, run_compare
from ddmpi.config import load_config
from ddmpi.commands.predict import predict
from ddmpi.data.schema import read_labels

pytestmark = [pytest.mark.mpi(min_size=2)]

TINY = ["local.model.width=4", "local.batch_size=64", "coarse.epochs=10",
        "decomposition.overlap=1", "run.threads_per_rank=1", "run.device=cpu"]
GRIDS = {2: [2, 2], 4: [1, 2]}


def _grid():
    size = MPI.COMM_WORLD.size
    if size not in GRIDS:
        pytest.skip(f"written for 2 or 4 ranks, not {size}")   # same decision on every rank
    return GRIDS[size]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A directory every rank sees, holding the digits data set."""
    comm = MPI.COMM_WORLD
    path = tmp_path_factory.mktemp("compare") if comm.rank == 0 else None
    path = comm.bcast(path, root=0)
    if comm.rank == 0:
        write_digits_h5(path / "digits.h5")
    comm.Barrier()
    return path


def _config(shared, name, *extra):
    return load_config(None, [f"data.path={shared / 'digits.h5'}", f"run.dir={shared / name}",
                              f"decomposition.grid={_grid()}", *TINY, *extra])


@pytest.fixture(scope="module")
def compared(shared):
    """One tiny ``ddmpi compare`` run of all strategies (shared by the tests of this module):
    the comparison on rank 0 (None elsewhere) and its directory."""
    config = _config(shared, "compare", "local.epochs=2", "compare.coherent_epochs=2")
    return run_compare(config, MPI.COMM_WORLD), shared / "compare"


@pytest.fixture(scope="module")
def decomposed(compared):
    """The CNN-DNN run made by ``ddmpi compare``: its directory and test accuracy (all ranks)."""
    run_dir = compared[1] / "cnn_dnn"
    acc = MPI.COMM_WORLD.bcast(json.loads((run_dir / "metrics.json").read_text())[
        "global"]["cnn_dnn"]["test_accuracy"] if MPI.COMM_WORLD.rank == 0 else None, root=0)
    return run_dir, acc


@pytest.mark.timeout(300)
def test_transfer_loads_exactly_the_trained_weights(shared, decomposed):
    comm = MPI.COMM_WORLD
    run_dir, cnn_dnn_accuracy = decomposed
    s_total = int(np.prod(_grid()))
    transfer = load_transfer(run_dir, range(s_total))
    models = transfer.local_models()
    same = all(torch.equal(models[s].state_dict()[key], value)
               for s in range(s_total)
               for key, value in load_checkpoint(
                   run_dir / "checkpoints" / f"local_{s:03d}.pt")["best_model"].items())
    stored = load_checkpoint(run_dir / "checkpoints" / "coarse.pt")["model"]
    coarse = transfer.coarse_model()
    same &= all(torch.equal(coarse.state_dict()[k], v) for k, v in stored.items())
    assert_all(comm, same, "transferred weights differ from the checkpoints")

    # The coherent model before any training is the trained CNN-DNN: same test probabilities.
    config = _config(shared, "transfer0", "compare.coherent_epochs=0")
    metrics = run_coherent(config, comm, transfer_from=run_dir)
    assert_all(comm, (metrics is None) == (comm.rank != 0), "metrics on a non-root rank")

    def checks():
        decisions = np.stack([np.load(run_dir / "decisions" / f"local_{s:03d}.npz")["test"]
                              for s in range(s_total)])
        ref = combiners.coarse_predict(coarse, decisions, transfer.inputs)
        probs = np.load(shared / "transfer0" / "test_probabilities.npy")
        one = 1.0 / len(probs)                 # float rounding may flip a near-tie at most
        return {f"max |p - p_cnn_dnn| {float(np.abs(probs - ref).max()):.3g} < 1e-5":
                float(np.abs(probs - ref).max()) < 1e-5,
                f"accuracy {metrics['test_accuracy']} vs CNN-DNN {cnn_dnn_accuracy}":
                abs(metrics["test_accuracy"] - cnn_dnn_accuracy) <= one,
                "initial = final": metrics["initial"]["test_accuracy"]
                == metrics["test_accuracy"],
                "coarse inputs log": metrics["coarse_inputs"] == "log",
                "best epoch 0": metrics["best_epoch"] == 0}

    assert_on_root(comm, checks, "coherent model from the CNN-DNN run differs")


@pytest.mark.timeout(60)
def test_transfer_rejects_a_run_with_another_decomposition(shared, decomposed):
    comm = MPI.COMM_WORLD
    other = "[2, 1]" if _grid() == [1, 2] else "[1, 2]"
    config = _config(shared, "transfer_bad", "compare.coherent_epochs=0")
    config.decomposition.grid = json.loads(other)
    raised = False
    try:
        run_coherent(config, comm, transfer_from=decomposed[0])
    except TransferError as err:
        raised = "grid" in str(err)
    assert_all(comm, raised, "a run of another decomposition was accepted")


@pytest.mark.timeout(300)
def test_compare_end_to_end(shared, compared):
    comm = MPI.COMM_WORLD
    s_total = int(np.prod(_grid()))
    comparison, run_dir = compared
    assert_all(comm, (comparison is None) == (comm.rank != 0), "comparison on a non-root rank")

    def checks():
        written = json.loads((run_dir / "comparison.json").read_text())
        rows = {r["strategy"]: r for r in written["rows"]}
        cnn_dnn = json.loads((run_dir / "cnn_dnn" / "metrics.json").read_text())
        owners = sorted(v["rank"] for v in cnn_dnn["local"].values())
        table = format_table(comparison)
        # the coherent runs' directories are ddmpi run directories: ddmpi predict reads them
        probs, _ = predict(run_dir / "coherent_transfer", [str(shared / "digits.h5")],
                           MPI.COMM_SELF)
        labels = read_labels(shared / "digits.h5", "test")
        return {
            "strategies": set(rows) == {"global_ddp", "cnn_dnn", "majority_vote",
                                        "average_probabilities", "coherent",
                                        "coherent_transfer"},
            "files": all((run_dir / f).stat().st_size > 0 for f in (
                "comparison.json", "comparison.md", "comparison.png", "config.yaml")),
            "runs": all((run_dir / s / "metrics.json").exists() for s in (
                "global_ddp", "cnn_dnn", "coherent", "coherent_transfer")),
            "accuracies": all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows.values()),
            "pretraining": rows["coherent_transfer"]["pretraining_seconds"]
            == rows["cnn_dnn"]["wall_seconds"],
            "ratio": rows["global_ddp"]["time_vs_global"] == 1.0,
            "curves": [len(written["curves"][s]["points"]) for s in (
                "global_ddp", "coherent", "coherent_transfer")] == [2, 2, 2],
            "target": written["target_accuracy"] is not None and all(
                rows[s]["time_to_target_seconds"] is not None for s in (
                    "global_ddp", "coherent")),
            # the CNN-DNN's coarse DNN trained on the validation decisions (coarse.train_on:
            # val): the transfer run has no held-out validation, keeps its last epoch
            "transfer selection": not written["curves"]["coherent_transfer"]["held_out"]
            and rows["coherent_transfer"]["time_to_target_seconds"] is None
            and rows["coherent_transfer"]["best_epoch"] == 2,
            "coherent ranks": rows["coherent"]["ranks_used"] == min(comm.size, s_total),
            # 4 ranks, 2 subdomains: hybrid groups, leaders 0 and 2 own the local CNNs
            "owners": owners == ([0, 2] if comm.size == 4 else [0, 0, 1, 1]),
            "table": "coherent CNN-DNN, transfer" in table and "time to target" in table,
            "json": [r["strategy"] for r in written["rows"]] == [
                r["strategy"] for r in comparison["rows"]],
            "markdown": "| global CNN (DDP) |" in (run_dir / "comparison.md").read_text(),
            "predict": abs(combiners.accuracy(probs.argmax(1), labels) - rows[
                "coherent_transfer"]["test_accuracy"]) <= 1.0 / len(labels),  # a near-tie
        }

    assert_on_root(comm, checks, "comparison checks failed")
