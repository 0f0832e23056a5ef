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

from ddmpi.coarse.dnn import predict_coarse
from ddmpi.commands import compare
from ddmpi.commands.compare import run_compare
from ddmpi.config import load_config
from ddmpi.data.decomposition import Decomposition
from ddmpi.data.schema import read_info
from ddmpi.data.sources import open_source
from ddmpi.models.coherent import CoherentCNNDNN
from ddmpi.parallel.group import Group
from ddmpi.parallel.layout import assign_subdomains
from ddmpi.report.comparison import format_table
from ddmpi.strategies.base import decomposition_of, run
from ddmpi.strategies.coherent import CoherentTransfer, Joint, TransferError, load_transfer
from ddmpi.strategies.rundir import coarse_path, decisions_path, local_path
from ddmpi.training.checkpoint import load_checkpoint
from ddmpi.training.loop import Step, predict_proba

pytestmark = [pytest.mark.mpi(min_size=2)]

TINY = ["local.model.width=4", "local.batch_size=64", "coarse.epochs=10",
        "decomposition.overlap=1", "run.threads_per_rank=1", "run.device=cpu"]
GRIDS = {2: [2, 2], 4: [1, 2]}
SEEDS = 2


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
    """One tiny ``ddmpi compare`` of all strategies over 2 seeds (shared by this module's
    tests): the comparison on rank 0 (None elsewhere), its directory and configuration."""
    config = _config(shared, "compare", "local.epochs=2", "compare.coherent_epochs=2",
                     f"compare.seeds={SEEDS}")
    return run_compare(config, Group.world()), shared / "compare", config


@pytest.mark.timeout(480)        # includes the compare run (about 3 min at 4 ranks on 2 cores)
def test_compare_end_to_end(compared):
    world = Group.world()
    comparison, root, config = compared
    assert_all(world, (comparison is None) == (world.rank != 0), "comparison on a non-root rank")
    names = ("global_ddp[compute]", "global_ddp[parameters]", "cnn_dnn", "coherent",
             "coherent_transfer")

    def checks():
        written = json.loads((root / "comparison.json").read_text())
        rows = written["rows"]
        table = format_table(comparison)
        metrics = {name: json.loads((root / "seed0" / name / "metrics.json").read_text())
                   for name in names}
        cnn_flops = metrics["cnn_dnn"]["flops_per_sample"]
        compute = rows["global_ddp[compute]"]
        matched = written["matched"]
        seeds = [{name: json.loads((root / f"seed{k}" / name / "metrics.json").read_text())
                  for name in names} for k in range(SEEDS)]
        walls = [{name: m["wall_seconds"] for name, m in seed.items()} for seed in seeds]
        return {
            "rows": list(rows) == ["global_ddp[compute]", "global_ddp[parameters]", "chosen",
                                   "cnn_dnn", "average_log_probabilities",
                                   "average_probabilities", "majority_vote",
                                   "coherent", "coherent_transfer"],
            "json = returned": list(rows) == list(comparison["rows"]),
            "files": all((root / f).stat().st_size > 0 for f in (
                "comparison.json", "comparison.md", "comparison.png", "config.yaml")),
            "runs": all((root / f"seed{k}" / name / "metrics.json").exists()
                        for k in range(SEEDS) for name in names),
            "seeds": all(r["accuracy"]["n"] == SEEDS and len(r["accuracy"]["values"]) == SEEDS
                         and 0.0 <= r["accuracy"]["mean"] <= 1.0 and r["accuracy"]["std"] >= 0
                         for r in rows.values()),
            "run seeds": [json.loads((root / f"seed{k}" / "cnn_dnn" / "metrics.json")
                                     .read_text())["config"]["run"]["seed"]
                          for k in range(SEEDS)] == [config.run.seed + k for k in range(SEEDS)],
            "costs": all(r["parameters"] > 0 and r["flops_per_sample"] > 0
                         and r["peak_rss_mb"] > 0 for r in rows.values()),
            # the compute-matched global CNN costs about what the local CNNs cost together
            "compute matched": 0.5 < compute["flops_per_sample"] / cnn_flops < 2.0,
            "widths": compute["width"] == metrics["global_ddp[compute]"]["extra"]["width"]
            and rows["global_ddp[parameters]"]["width"]
            == metrics["global_ddp[parameters]"]["extra"]["width"],
            "ratio": compute["time_vs_compute_matched"] == 1.0,
            # the parameter target is the whole CNN-DNN as it ran (local CNNs + coarse DNN),
            # computed before training; the compute target the local CNNs' FLOPs
            "parameter target": matched["global_ddp[parameters]"]["target"]
            == metrics["cnn_dnn"]["parameters"]
            == matched["global_ddp[parameters]"]["local_cnns"]
            + matched["global_ddp[parameters]"]["coarse_dnn"]
            and matched["global_ddp[parameters]"]["achieved"]
            == rows["global_ddp[parameters]"]["parameters"],
            "compute target": matched["global_ddp[compute]"]["target"] == cnn_flops
            and matched["global_ddp[compute]"]["achieved"] == compute["flops_per_sample"],
            "per-seed ratios": rows["cnn_dnn"]["time_vs_compute_matched_per_seed"]
            == [w["cnn_dnn"] / w["global_ddp[compute]"] for w in walls],
            "peak RSS over seeds": rows["coherent"]["peak_rss_mb"]
            == max(m["rss"] for seed in seeds for m in seed["coherent"]["peak_memory_mb"]
                   .values()),
            "holdout": written["coarse"] == {
                "train_on": "train+val", "fraction": 0.2, "honest": True, "fallback": True,
                "sizes": [seed["cnn_dnn"]["extra"]["coarse"]["holdout"]["size"]
                          for seed in seeds]},
            "legend": "of the validation decisions only" in (root / "comparison.md")
            .read_text(),
            "paired": set(written["paired"]) == {"global_ddp[compute]",
                                                 "global_ddp[parameters]",
                                                 "average_probabilities"}
            and all((t["images"], t["seeds"]) == (len(comparison_test_labels(root)), SEEDS)
                    for t in written["paired"].values()),
            # the transfer is charged the CNN-DNN run of its seed that it starts from
            "transfer wall": rows["coherent_transfer"]["wall_seconds"]["values"] == [
                sum(json.loads((root / f"seed{k}" / name / "metrics.json").read_text())
                    ["wall_seconds"] for name in ("cnn_dnn", "coherent_transfer"))
                for k in range(SEEDS)],
            "table": all(text in table for text in (
                "global CNN, compute-matched (DDP)", "global CNN, parameter-matched (DDP)",
                "coherent CNN-DNN, transfer", "train MFLOP/sample", "peak RSS (MiB)",
                "parameters", "+-", "sign-flip test p", f"{SEEDS} seeds")),
            "table rows": table.count("CNN-DNN vs ") == 3,
            "markdown": "| global CNN, compute-matched (DDP) |" in (
                root / "comparison.md").read_text(),
            "coherent ranks": metrics["coherent"]["extra"]["ranks_used"]
            == min(world.size, int(np.prod(_grid()))),
            "transfer flag": metrics["coherent_transfer"]["extra"]["transfer"] is True,
            "curves": all(name in written["curves"] for name in (
                "coherent", "coherent_transfer")),
        }

    assert_on_root(world, checks, "comparison checks failed")


def comparison_test_labels(root):
    data = np.load(root / "seed0" / "cnn_dnn" / "test_correct.npz")
    return data["chosen"]


def _transfer_group(world, s_total):
    """The first min(P, S) ranks, each owning a block of subdomains (others inactive)."""
    group = world.split(0 if world.rank < s_total else None)
    owned = assign_subdomains(s_total, group.size)[group.rank] if group.active else []
    return group, owned


@pytest.mark.timeout(120)
def test_transfer_loads_exactly_the_trained_weights(shared, compared):
    """load_transfer gives the CNN-DNN's checkpointed weights, and the coherent model built
    from them (distributed over the ranks) predicts the CNN-DNN coarse model's test
    probabilities on the gathered local decisions."""
    world = Group.world()
    run_dir = compared[1] / "seed0" / "cnn_dnn"
    config = _config(shared, "unused")
    info = read_info(config.data.path)
    decomposition = decomposition_of(config, info)
    s_total = decomposition.num_subdomains
    group, owned = _transfer_group(world, s_total)
    same, gap, n = True, 0.0, 0
    if group.active:
        local, coarse = load_transfer(run_dir, owned, decomposition)
        same = set(local) == set(owned)
        for s in owned:
            stored = load_checkpoint(local_path(run_dir, s))["best_model"]
            same &= all(torch.equal(local[s].state_dict()[k], v) for k, v in stored.items())
        stored = load_checkpoint(coarse_path(run_dir))["model"]
        same &= all(torch.equal(coarse.state_dict()[k], v) for k, v in stored.items())
        model = CoherentCNNDNN(local, coarse, group, s_total, seed=0)
        test = Joint({s: open_source(info.path, "test", decomposition.slices(s))
                      for s in owned})
        probs = predict_proba(model, test, Step(torch.device("cpu"))).numpy().astype(np.float64)
        decisions = np.stack([np.load(decisions_path(run_dir, s))["test"]
                              for s in range(s_total)])
        ref = predict_coarse(coarse, decisions)
        gap, n = float(np.abs(probs - ref).max()), len(ref)
    assert_all(world, same, "transferred weights differ from the checkpoints")
    assert_all(world, gap < 1e-5, f"max |p_coherent - p_cnn_dnn| = {gap:.3g} on {n} samples")


@pytest.mark.timeout(120)
def test_transfer_run_without_training_is_the_cnn_dnn(shared, compared):
    """``coherent_transfer`` with 0 epochs evaluates the CNN-DNN's coarse model as it was."""
    world = Group.world()
    run_dir = compared[1] / "seed0" / "cnn_dnn"
    config = _config(shared, "transfer0", "local.epochs=2", "compare.coherent_epochs=0",
                     f"compare.transfer_from={run_dir}")
    result = run(CoherentTransfer, config, world)
    assert_all(world, (result is None) == (world.rank != 0), "result on a non-root rank")

    def checks():
        cnn_dnn = json.loads((run_dir / "metrics.json").read_text())["combiners"]["cnn_dnn"]
        mine = result.combiners["coherent_transfer"]
        one = 1.0 / len(result.test_correct["coherent_transfer"])  # a near-tie may flip
        return {f"accuracy {mine['accuracy']} vs CNN-DNN {cnn_dnn['accuracy']}":
                abs(mine["accuracy"] - cnn_dnn["accuracy"]) <= one,
                "no epochs": result.history["coherent_transfer"] == [],
                "best epoch 0": result.extra["best_epoch"] == 0,
                "transfer": result.extra["transfer"] is True}

    assert_on_root(world, checks, "coherent model from the CNN-DNN run differs")


@pytest.mark.timeout(60)
def test_transfer_rejects_a_run_with_another_decomposition(shared, compared):
    world = Group.world()
    run_dir = compared[1] / "seed0" / "cnn_dnn"
    other = [2, 1] if _grid() == [1, 2] else [1, 2]
    decomposition = Decomposition((8, 8), other, 1)
    raised = False
    try:
        load_transfer(run_dir, [0], decomposition)
    except TransferError as err:
        raised = "grid" in str(err)
    assert_all(world, raised, "a run of another decomposition was accepted")
    missing = False
    try:
        load_transfer(compared[1] / "nowhere", [0], decomposition)
    except TransferError as err:
        missing = "config.yaml" in str(err)
    assert_all(world, missing, "a missing run was accepted")


@pytest.mark.timeout(240)
def test_resume_reads_every_finished_run_back(compared, monkeypatch):
    """``--resume`` of the finished comparison trains nothing and compares the same results
    (read back from the run directories on rank 0; every rank skips the runs)."""
    world = Group.world()
    comparison, root, config = compared
    trained = []
    monkeypatch.setattr(compare, "run", lambda cls, sub, *args, **kwargs: trained.append(
        sub.run.dir))
    again = run_compare(config, world, resume=True)
    assert_all(world, not trained, f"trained again: {trained}")

    def checks():
        same = {key: again[key] == comparison[key]
                for key in ("rows", "paired", "curves", "matched", "coarse", "ranks")}
        statuses = {r["status"] for runs in again["runs"].values() for r in runs}
        return {**same, "reused": statuses == {"reused"},
                "written": json.loads((root / "comparison.json").read_text())["runs"]
                == again["runs"]}

    assert_on_root(world, checks, "resumed comparison differs")
