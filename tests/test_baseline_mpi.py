"""The global data-parallel baseline (torch DDP from the MPI job) on real digits (run with
``mpirun -n 2|4 python -m pytest --with-mpi -m mpi tests/test_baseline_mpi.py``)."""

import json

import pytest
import torch
from helpers import assert_all, assert_on_root

from ddmpi.config import load_config
from ddmpi.data.schema import read_info
from ddmpi.models.cnn import build_cnn
from ddmpi.models.flops import training_flops
from ddmpi.parallel.group import Group
from ddmpi.strategies.base import decomposition_of, model_title, open_run, run
from ddmpi.strategies.global_ddp import global_strategy, global_width, local_budget
from ddmpi.strategies.local import build_kwargs

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]

OVERRIDES = ["local.epochs=2", "local.model.width=4", "local.batch_size=64",
             "decomposition.grid=[2, 2]", "run.threads_per_rank=1", "run.device=cpu"]


def _config(path, run_dir, *extra):
    return load_config(None, [f"data.path={path}", f"run.dir={run_dir}", *OVERRIDES, *extra])


def test_ddp_replicas_stay_identical(mpi_digits, mpi_tmp_path):
    """Parameters *and* BatchNorm statistics equal on every rank after DDP training, so every
    replica validates alike and keeps the same best epoch."""
    world = Group.world()
    config = _config(mpi_digits, mpi_tmp_path / "replicas")
    ctx = open_run(config, world)
    strategy = global_strategy(6)(ctx)
    strategy.train()
    model = strategy.trainer.model
    assert_all(world, model.config["width"] == 6 and model.config["input_shape"] == (8, 8),
               str(model.config))
    diff = world.max_difference(model)                 # parameters and floating buffers
    assert_all(world, diff == 0.0, f"DDP replicas differ by {diff}")
    history = strategy.trainer.history
    vals = world.allgather(([r.val_accuracy for r in history], strategy.trainer.best["epoch"]))
    assert_all(world, all(v == vals[0] for v in vals), f"replicas validate differently: {vals}")
    assert_all(world, history[-1].train_loss < history[0].train_loss, "no learning")
    assert_all(world, not torch.distributed.is_initialized(), "process group left behind")
    result = strategy.evaluate()
    assert_all(world, (result is None) == (world.rank != 0), "non-root rank got a result")


def test_compute_matched_width_is_within_the_neighbour_gap(mpi_digits):
    """The compute-matched global CNN's training FLOPs per sample lie within the gap between
    neighbouring widths of the local CNNs' total (same on every rank)."""
    world = Group.world()
    config = load_config(None, [f"data.path={mpi_digits}", *OVERRIDES])
    info = read_info(mpi_digits)
    decomposition = decomposition_of(config, info)
    flops, _ = local_budget(config, info, decomposition)
    width = global_width(config, info, decomposition, "compute")

    def cost(w):
        kwargs = build_kwargs(config, info, info.spatial_shape, w)
        return training_flops(build_cnn(**kwargs), kwargs["input_shape"], kwargs["in_channels"])

    below, at, above = cost(max(1, width - 1)), cost(width), cost(width + 1)
    gap = max(above - at, at - below)
    assert_all(world, abs(at - flops) <= gap,
               f"width {width}: {at} FLOPs vs local total {flops} (gap {gap})")
    widths = world.allgather(width)
    assert_all(world, len(set(widths)) == 1, f"ranks chose different widths {widths}")


def test_run_writes_its_run_directory(mpi_digits, mpi_tmp_path):
    world = Group.world()
    run_dir = mpi_tmp_path / "global"
    result = run(global_strategy("compute"), _config(mpi_digits, run_dir), world)
    assert_all(world, (result is None) == (world.rank != 0), "non-root rank got a result")

    def checks():
        written = json.loads((run_dir / "metrics.json").read_text())
        ckpt = torch.load(run_dir / "checkpoints" / "global.pt", weights_only=False)
        n_test = sum(map(sum, written["combiners"]["global_ddp"]["confusion_matrix"]))
        metrics = written["combiners"]["global_ddp"]
        return {
            "test accuracy": 0.0 <= metrics["accuracy"] <= 1.0
            and metrics["accuracy"] == result.combiners["global_ddp"]["accuracy"],
            "per-class": len(metrics["per_class_accuracy"]) == 10,
            "confusion": n_test == len(result.test_correct["global_ddp"]),
            "width": written["extra"]["width"] == result.extra["width"]
            and written["extra"]["width_rule"] == "compute"
            and ckpt["model_config"]["width"] == result.extra["width"],
            "parameters": written["parameters"] > 0 and written["flops_per_sample"] > 0,
            # ddp_setup: the process group alone; the training its own phase within "train"
            "timings": len(written["timings"]) == world.size and all(
                t["ddp_setup"] < t["global_training"]
                and t["ddp_setup"] + t["global_training"] <= t["train"]
                for t in written["timings"].values()),
            "memory": len(written["peak_memory_mb"]) == world.size and all(
                m["rss"] > 0 for m in written["peak_memory_mb"].values()),
            "history": [h["epoch"] for h in written["history"]["global"]] == [1, 2],
            # resumable trainer state; the best state is kept in it (ddmpi predict reads it)
            "checkpoint": ckpt["finished"] and ckpt["best"]["state"] is not None
            and ckpt["best"]["epoch"] == result.extra["best_epoch"],
            "files": all((run_dir / p).exists() for p in (
                "config.yaml", "dataset.json", "history.json", "test_correct.npz",
                "plots/training_curves.png", "plots/confusion_global_ddp.png",
                "logs/rank_00000.log")),
            # one model: no accuracy-by-combiner bar chart, and plots name the global CNN
            "no combiner plot": not (run_dir / "plots/accuracy_by_combiner.png").exists(),
            "plot title": model_title(result) == f"global CNN (width {result.extra['width']})",
        }

    assert_on_root(world, checks, "run directory checks failed")
