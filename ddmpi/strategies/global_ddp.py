"""The global baseline: one CNN on the full images, trained data-parallel over the P ranks.

The yardstick of the decomposed CNN-DNN (Klawonn, Lanser & Weber 2024 compare with the global
CNN): the same CNN family and depth as the local networks (``config.local.model``), applied to
the whole image (the decomposition ``[1] * ndim``, subdomain 0), trained with the same optimizer,
schedule, epochs, batch size and best-state-by-validation rule (:func:`ddmpi.training.loop.
train_local`), data-parallel over all ranks of ``comm`` with torch ``DistributedDataParallel``
on a process group built from the MPI job (:func:`ddmpi.parallel.torch_dist.torch_distributed`; gloo on
CPU, NCCL on GPU; no second launcher).

Width of the global CNN (:func:`global_width`): ``compare.global_width`` if set, else
``round(local.model.width * factor)`` with ``factor = compare.global_width_factor``, by default
``sqrt(S)`` for S subdomains. The parameters of these CNNs grow with the square of the width and
not with the input size (global average pooling before the classifier), so with the default each
local CNN has about 1/S of the global CNN's parameters and all S local CNNs together about as
many as the global one: the paper's "local networks with proportionally fewer parameters", and
an equal parameter budget for the comparison. The convolutions' cost grows with pixels times
width squared, so per sample the global CNN costs about ``(image pixels / subimage pixels) *
factor**2 / S`` times all S local CNNs together (MNIST, 2x2 subdomains overlapping by 2 pixels:
28x28 at width 32 against four 16x16 at width 16, about 3x); benchmarks/RESULTS-compare.md
measures it.

Who owns what
-------------
* Every rank holds an identical replica of the global CNN and all training images (the sample
  order of an epoch is a permutation drawn from ``(seed, epoch)`` and sharded over the ranks, so
  each rank's shard changes every epoch); ``local.batch_size`` is the *global* batch, each rank
  takes ``ceil(batch_size / P)`` of it per step.
* DDP all-reduces (averages) the gradients during the backward pass. BatchNorm running
  statistics are averaged over the ranks after every step (:class:`DDPParallel`); plain DDP only
  broadcasts rank 0's buffers at the *start* of each forward, which leaves the replicas'
  statistics different after the epoch's last step, so they would evaluate (and pick their best
  epoch) differently.
* Rank 0 writes the checkpoint, metrics and plots; the test split is predicted in contiguous
  shares by all ranks and gathered on rank 0.

Run directory (``run_dir``)::

    config.yaml, dataset.json, logs/rank_XXXXX.log
    checkpoints/global.pt   best state (``best_model``, ``model_config``) + resumable state
    metrics.json            test accuracy, per-class accuracy, confusion matrix, wall time per
                            phase and rank, parameter count, history with timestamps
    history.json            per-epoch curve (``elapsed``: seconds since the start of the run)
    plots/training_curves.png, plots/confusion_global.png
"""

import contextlib
import inspect
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ddmpi.coarse import combiners

from ddmpi.report import output as report
from ddmpi.training.checkpoint import load_checkpoint, save_checkpoint
from ddmpi.config import to_dict
from ddmpi.data.decomposition import Decomposition
from ddmpi.parallel.hybrid import GroupDataParallel, average_buffers
from ddmpi.training.loop import TensorSource, predict_proba, train_local
from ddmpi.models.cnn import count_parameters
from ddmpi.data.reader import load_subdomain
from ddmpi.strategies.context import SPLITS, PhaseTimer, metrics_head, open_run
from ddmpi.data.schema import read_info


def global_width(config, num_subdomains):
    """Width of the global CNN (see module docstring): explicit, or local width * factor."""
    cmp = config.compare
    if cmp.global_width is not None:
        return int(cmp.global_width)
    factor = (math.sqrt(num_subdomains) if cmp.global_width_factor == "auto"
              else float(cmp.global_width_factor))
    return max(1, int(round(config.local.model.width * factor)))


def global_build_kwargs(config, info):
    """``build_cnn`` arguments of the global CNN: the local family/depth on the full image."""
    m = config.local.model
    s_total = int(np.prod(config.decomposition.grid))
    return dict(family=m.family, spatial_dims=info.spatial_dims, in_channels=info.channels,
                num_classes=info.num_classes, input_shape=tuple(info.spatial_shape),
                depth=m.depth, width=global_width(config, s_total), dropout=m.dropout,
                batchnorm=m.batchnorm)


def load_global(path, split, info=None):
    """Full images ``(x, y)`` of ``split``: the one-subdomain decomposition, normalised."""
    info = info or read_info(path)
    whole = Decomposition(tuple(info.spatial_shape), [1] * info.spatial_dims, 0)
    return load_subdomain(path, split, whole, 0)


class DDPParallel(GroupDataParallel):
    """:class:`ddmpi.parallel.hybrid.GroupDataParallel` with ``ddp=True`` whose replicas stay identical
    in every state: after each optimizer step the floating buffers (BatchNorm running statistics)
    are averaged over the group (one small all-reduce on the torch group), as the non-DDP path
    does. DDP's own buffer broadcast is switched off (it would only copy identical values)."""

    def __init__(self, group_comm, torch_group):
        super().__init__(group_comm, torch_group=torch_group, ddp=True)

    def wrap(self, model):
        ddp = torch.nn.parallel.DistributedDataParallel
        # parameters and buffers are broadcast from rank 0 at construction either way
        off = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
        return ddp(model, process_group=self.torch_group, **off)

    def after_step(self, model):
        average_buffers(model, self.comm, self.torch_group)


def train_global_ddp(config, comm, build_kwargs, train, val, device, *, amp=False,
                     checkpoint_path=None, on_epoch=None, log=print, timer=None):
    """Collective over ``comm``: train the global CNN data-parallel with torch DDP.

    ``train``/``val`` are :class:`~ddmpi.training.loop.TensorSource` of the full images (the
    same on every rank). Builds the torch process group from ``comm`` for the duration of the
    training (phase ``ddp_setup`` of ``timer``: the rendezvous plus a first, throw-away DDP
    wrap, which imports torch's DDP machinery once per process, seconds on a busy CPU; phase
    ``training``: the epochs). Returns ``(model, history, best_epoch)``, identical replicas on
    every rank.
    """
    import torch.distributed as dist

    from ddmpi.parallel.torch_dist import torch_distributed

    timer = timer or PhaseTimer()
    with contextlib.ExitStack() as stack:
        with timer("ddp_setup"):
            stack.enter_context(torch_distributed(comm, device))
            torch.nn.parallel.DistributedDataParallel(
                torch.nn.Linear(1, 1).to(device), process_group=dist.group.WORLD)
        with timer("training"):
            parallel = DDPParallel(comm, torch_group=dist.group.WORLD)
            return train_local(build_kwargs, train, val, config.local, device=device,
                               seed=config.run.seed, amp=amp, checkpoint_path=checkpoint_path,
                               on_epoch=on_epoch, log=log, parallel=parallel)


def predict_sharded(model, source, comm, device, amp=False):
    """Collective: softmax probabilities of all of ``source`` on rank 0 (None elsewhere); each
    rank predicts a contiguous share."""
    n = len(source)
    lo, hi = comm.rank * n // comm.size, (comm.rank + 1) * n // comm.size
    x, y = source.take(torch.arange(lo, hi))
    mine = predict_proba(model, TensorSource(x, y), device, amp=amp) if hi > lo else None
    parts = comm.gather(mine, root=0)
    if comm.rank != 0:
        return None
    return np.concatenate([p for p in parts if p is not None])


def run_baseline(config, comm, run_dir=None):
    """Train and evaluate the global CNN data-parallel on the ranks of ``comm``; write the run
    directory (``run_dir``, default ``config.run.dir``). Returns the metrics on rank 0, None
    elsewhere."""
    start = time.perf_counter()
    timer = PhaseTimer()
    rank = comm.rank
    run_dir = Path(run_dir or config.run.dir)
    with timer("setup"):
        ctx = open_run(config, comm, run_dir)
        log, info, device, amp = ctx.log, ctx.info, ctx.device, ctx.amp
        build_kwargs = global_build_kwargs(config, info)
        log.info(f"global CNN {build_kwargs['family']} depth {build_kwargs['depth']} width "
                 f"{build_kwargs['width']} on {'x'.join(map(str, info.spatial_shape))} images, "
                 f"data-parallel (torch DDP) over {comm.size} ranks")
    with timer("load_data"):
        pin = device.type == "cuda"
        sources = {split: TensorSource(*(torch.from_numpy(a) for a in load_global(
            config.data.path, split, info)), pin=pin) for split in SPLITS}

    curve = []

    def on_epoch(record):
        entry = asdict(record)
        entry["elapsed"] = time.perf_counter() - start
        curve.append(entry)
        log.info(f"global epoch {record.epoch}/{config.local.epochs}: train loss "
                 f"{record.train_loss:.4f}, val accuracy {record.val_accuracy:.4f} "
                 f"({record.seconds:.1f} s)")

    ckpt = run_dir / "checkpoints" / "global.pt"
    model, history, best_epoch = train_global_ddp(
        config, comm, build_kwargs, sources["train"], sources["val"], device, amp=amp,
        checkpoint_path=ckpt, on_epoch=on_epoch, log=log.info, timer=timer)
    with timer("evaluate"):
        probs = predict_sharded(model, sources["test"], comm, device, amp=amp)
    timings = comm.gather(timer.seconds, root=0)
    if rank != 0:
        return None
    with timer("report"):
        results = combiners.class_results(probs.argmax(1), sources["test"].y.numpy(),
                                          info.classes)
        state = load_checkpoint(ckpt)
        state.update(best_model=model.state_dict(), model_config=model.config,
                     config=to_dict(config))
        save_checkpoint(ckpt, state)
        timings[0] = dict(timer.seconds)
        metrics = {
            "strategy": "global_ddp",
            **metrics_head(config, info, comm.size),
            "model": {k: (list(v) if isinstance(v, tuple) else v)
                      for k, v in model.config.items()},
            "parallelism": "torch DistributedDataParallel, "
                           f"{'nccl' if device.type == 'cuda' else 'gloo'}, {comm.size} ranks",
            "global": {"global_ddp": results},
            "test_accuracy": results["test_accuracy"],
            "best_epoch": best_epoch,
            "epochs": len(history),
            "parameters": count_parameters(model),
            "history": curve,
            "timings_seconds": {str(r): t for r, t in enumerate(timings)},
            "wall_seconds": time.perf_counter() - start,
        }
        report.write_metrics(run_dir / "metrics.json", metrics)
        report.write_metrics(run_dir / "history.json", {"global": curve})
        report.plot_training_curves(run_dir / "plots" / "training_curves.png",
                                    {"global": curve})
        report.plot_confusion(run_dir / "plots" / "confusion_global.png",
                              results["confusion_matrix"], info.classes, "global CNN (test)")
        log.info(f"global CNN (DDP): test accuracy {100 * results['test_accuracy']:.2f} % "
                 f"(best epoch {best_epoch}, {metrics['parameters']} parameters, "
                 f"{metrics['wall_seconds']:.1f} s)")
    return metrics
