"""Coherent CNN-DNN runs on a prepared data set: from scratch, or by transfer learning from a
finished decomposed (``ddmpi train``) run, then trained end to end (arXiv 2408.14442).

:func:`run_coherent` is the pipeline around :func:`ddmpi.models.coherent.train_coherent`: every rank
reads only the subimages of the subdomains it owns (:func:`ddmpi.data.reader.load_subdomain`), builds
their local CNNs (``config.local.model``, seeds ``run.seed + s``) and a replica of the coarse DNN
(``config.coarse``), trains the composition with one loss for ``compare.coherent_epochs``
epochs (default ``local.epochs``) with the local optimizer settings (``compare.coherent_lr``,
default ``local.optimizer.lr``) and learning-rate schedule (``local.scheduler`` over the coherent
epochs, as the local CNNs and the global CNN are trained), keeps the state of the epoch with the
best validation accuracy (as :func:`ddmpi.training.loop.train_local` does) and evaluates it on
the test split.

Transfer learning (``transfer_from=RUN_DIR``): the local CNNs start from the ``best_model``
state dicts in ``RUN_DIR/checkpoints/local_XXX.pt`` (architecture from their ``model_config``)
and the coarse DNN from ``RUN_DIR/checkpoints/coarse.pt`` (``model``, ``in_features``,
``num_classes``; hidden widths and dropout from ``RUN_DIR/config.yaml``), loaded strictly: the
coherent model starts as exactly the trained CNN-DNN. The learning rate is the coherent one
times ``compare.transfer_lr_factor`` for the local CNNs and ``compare.transfer_coarse_lr_factor``
(default: the same) for the coarse DNN. The default factor 1 trains exactly as from scratch, so
that the two coherent runs differ in their initialisation only (on MNIST 2x2 a gentler 0.1 left
the CNN-DNN's accuracy unchanged, benchmarks/RESULTS-compare.md). The decomposition must be the
run's. When
the run's coarse DNN was trained on the validation decisions (``coarse.train_on`` ``val`` or
``train+val``, the default), the validation split is no longer held out from the transferred
model (its validation accuracy starts near 100 %), so choosing an epoch by it would be biased:
the transfer run then keeps its *last* epoch (``metrics["selection"]`` says which rule ran).

Coarse input. In the decomposed CNN-DNN the coarse DNN sees ``log(p + 1e-6)`` of the local
softmax decisions ``p`` when ``coarse.inputs == "log"`` (the default) and ``p`` when ``"prob"``
(:func:`ddmpi.coarse.combiners.coarse_features`). ``train_coherent`` hands the coarse module the local
probabilities; :class:`LogInputs` wraps the coarse DNN with the same ``log(p + 1e-6)``, so a
transferred coarse DNN sees exactly the kind of input it was trained on (the run's
``coarse.inputs``), and the coherent model before fine-tuning predicts what the CNN-DNN predicts
(checked by tests/test_compare_mpi.py). Runs from scratch use ``config.coarse.inputs`` too.

Ranks: with P <= S ranks for S subdomains, rank r owns the subdomains
:func:`ddmpi.parallel.mapping.assign_subdomains` gives it. With P > S (a hybrid layout for ``ddmpi
train``) the coherent model runs on the first S ranks (one subdomain each) and the others wait;
``metrics["ranks_used"]`` says so.

Run directory: the layout of ``ddmpi train`` (``config.yaml``, ``dataset.json``,
``checkpoints/local_XXX.pt`` with ``best_model``/``model_config``, ``checkpoints/coarse.pt``,
``logs/``), so ``ddmpi predict`` classifies with it too; plus ``metrics.json`` (test accuracy,
per-class accuracy, confusion matrix, wall time per phase and rank, parameters, per-epoch
history with timestamps), ``history.json``, ``test_probabilities.npy`` and ``plots/``.
"""

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from torch import nn

from ddmpi.coarse import combiners

from ddmpi.report import output as report
from ddmpi.data.atomic import atomic_path
from ddmpi.training.checkpoint import load_checkpoint, save_checkpoint
from ddmpi.models.coherent import (CoherentCNNDNN, evaluate_coherent, predict_coherent,
                            train_coherent)
from ddmpi.config import load_config, to_dict
from ddmpi.data.decomposition import Decomposition
from ddmpi.training.loop import make_scheduler
from ddmpi.parallel.mapping import assign_subdomains
from ddmpi.models.cnn import CoarseDNN, build_cnn, count_parameters
from ddmpi.data.reader import load_subdomain
from ddmpi.strategies.context import (SPLITS, PhaseTimer, collective_check, decomposition_of,
                                metrics_head, open_run)


class TransferError(ValueError):
    """A run directory cannot initialise the coherent CNN-DNN (missing or mismatched)."""


class LogInputs(nn.Module):
    """``coarse(log(p + eps))``: the decomposed CNN-DNN's coarse input for ``inputs="log"``."""

    def __init__(self, coarse, eps=combiners.EPS):
        super().__init__()
        self.coarse = coarse
        self.eps = eps

    def forward(self, x):
        return self.coarse(torch.log(x + self.eps))


def coarse_module(coarse, inputs):
    """The module the coherent model calls on the concatenated local probabilities."""
    if inputs not in ("log", "prob"):
        raise ValueError(f"coarse inputs must be 'log' or 'prob', got {inputs!r}")
    return LogInputs(coarse) if inputs == "log" else coarse


@dataclass
class Transfer:
    """Trained weights of a finished decomposed run, for the subdomains one rank owns."""

    run_dir: Path
    local_configs: Dict[int, dict]   # build_cnn keyword arguments
    local_states: Dict[int, dict]    # best_model state dicts
    coarse_state: dict
    in_features: int
    num_classes: int
    hidden: tuple
    dropout: float
    inputs: str                      # what the coarse DNN was trained on: "log" or "prob"

    def local_models(self):
        """{s: CNN with exactly the trained weights} (strict load)."""
        models = {}
        for s, cfg in self.local_configs.items():
            models[s] = build_cnn(**cfg)
            models[s].load_state_dict(self.local_states[s], strict=True)
        return models

    def coarse_model(self):
        coarse = CoarseDNN(self.in_features, self.num_classes, hidden=self.hidden,
                           dropout=self.dropout)
        coarse.load_state_dict(self.coarse_state, strict=True)
        return coarse


def _source_config(run_dir):
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise TransferError(f"{run_dir}: no config.yaml; not a finished 'ddmpi train' run")
    return load_config(path)


def load_transfer(run_dir, owned, decomposition=None):
    """Read the trained local CNNs of ``owned`` and the coarse DNN of a finished ``ddmpi train``
    run; check its decomposition equals ``decomposition`` (if given)."""
    run_dir = Path(run_dir)
    cfg = _source_config(run_dir)
    if decomposition is not None:
        theirs = Decomposition(decomposition.image_shape, cfg.decomposition.grid,
                               cfg.decomposition.overlap)
        if (theirs.grid, theirs.overlap) != (decomposition.grid, decomposition.overlap):
            raise TransferError(f"{run_dir}: trained on grid {list(theirs.grid)} overlap "
                                f"{list(theirs.overlap)}, not grid {list(decomposition.grid)} "
                                f"overlap {list(decomposition.overlap)}")
    local_configs, local_states = {}, {}
    for s in owned:
        path = run_dir / "checkpoints" / f"local_{s:03d}.pt"
        state = load_checkpoint(path)
        if state is None or "best_model" not in state:
            raise TransferError(f"{path}: missing or unfinished local checkpoint")
        arch = state.get("model_config") or state.get("build_kwargs")  # older runs: the latter
        if arch is None:
            raise TransferError(f"{path}: no model_config (architecture) in the checkpoint")
        local_configs[s] = dict(arch)
        local_states[s] = state["best_model"]
    path = run_dir / "checkpoints" / "coarse.pt"
    coarse = load_checkpoint(path)
    if coarse is None:
        raise TransferError(f"{path}: missing coarse DNN checkpoint")
    return Transfer(run_dir, local_configs, local_states, coarse["model"],
                    int(coarse["in_features"]), int(coarse["num_classes"]),
                    tuple(cfg.coarse.hidden), float(cfg.coarse.dropout), cfg.coarse.inputs)


def local_build_kwargs(config, info, decomposition, sub):
    """``build_cnn`` arguments of the local CNN of ``sub`` (as ``ddmpi train`` builds it)."""
    m = config.local.model
    return dict(family=m.family, spatial_dims=info.spatial_dims, in_channels=info.channels,
                num_classes=info.num_classes, input_shape=decomposition.subdomain_shape(sub),
                depth=m.depth, width=m.width, dropout=m.dropout, batchnorm=m.batchnorm)


def scratch_models(config, info, decomposition, owned):
    """Freshly initialised local CNNs ({s: CNN}, seeds ``run.seed + s``) and coarse DNN (seed
    ``run.seed + S``)."""
    s_total, k = decomposition.num_subdomains, info.num_classes
    local = {}
    for s in owned:
        torch.manual_seed(config.run.seed + s)
        local[s] = build_cnn(**local_build_kwargs(config, info, decomposition, s))
    torch.manual_seed(config.run.seed + s_total)
    coarse = CoarseDNN(s_total * k, k, hidden=tuple(config.coarse.hidden),
                       dropout=config.coarse.dropout)
    return local, coarse


def _coherent_comm(comm, num_subdomains):
    """The communicator of the coherent model: all ranks (P <= S) or the first S (P > S;
    MPI.COMM_NULL on the others). Collective over ``comm``."""
    from mpi4py import MPI

    if comm.size <= num_subdomains:
        return comm
    return comm.Split(0 if comm.rank < num_subdomains else MPI.UNDEFINED, comm.rank)


def _better(entry, best):
    return best is None or (entry["val_accuracy"], -entry["val_loss"]) > (
        best["val_accuracy"], -best["val_loss"])


def run_coherent(config, comm, run_dir=None, *, transfer_from=None, epochs=None, lr=None,
                 name=None):
    """Train and evaluate the coherent CNN-DNN on the ranks of ``comm`` (see module docstring).

    ``transfer_from``: a finished ``ddmpi train`` run directory to start from (None: from
    scratch). ``epochs``/``lr`` default to ``compare.coherent_epochs``/``compare.coherent_lr``,
    else ``local.epochs``/``local.optimizer.lr``; with ``transfer_from`` the learning rate is
    multiplied by ``compare.transfer_lr_factor``. Returns the metrics on rank 0, else None.
    """
    from mpi4py import MPI

    start = time.perf_counter()
    timer = PhaseTimer()
    rank = comm.rank
    run_dir = Path(run_dir or config.run.dir)
    name = name or ("coherent_transfer" if transfer_from else "coherent")
    epochs = epochs if epochs is not None else (
        config.compare.coherent_epochs if config.compare.coherent_epochs is not None
        else config.local.epochs)
    lr = lr if lr is not None else (config.compare.coherent_lr or config.local.optimizer.lr)
    local_lr = lr
    if transfer_from:
        cmp = config.compare
        local_lr = lr * cmp.transfer_lr_factor
        lr = lr * (cmp.transfer_lr_factor if cmp.transfer_coarse_lr_factor is None
                   else cmp.transfer_coarse_lr_factor)

    with timer("setup"):
        select_last = False
        if transfer_from:  # the coarse DNN is the source run's: record its settings
            collective_check(comm, _source_config, transfer_from)
            source = _source_config(transfer_from).coarse
            select_last = "val" in source.train_on
            config = copy.deepcopy(config)
            config.coarse.hidden, config.coarse.dropout = list(source.hidden), source.dropout
            config.coarse.inputs = source.inputs
        ctx = open_run(config, comm, run_dir)
        log, info, device = ctx.log, ctx.info, ctx.device
        decomposition = decomposition_of(config, info)
        s_total, k = decomposition.num_subdomains, info.num_classes
        if transfer_from:  # rank 0 checks every file first; every rank raises its error
            collective_check(comm, load_transfer, transfer_from, range(s_total), decomposition)
        ccomm = _coherent_comm(comm, s_total)
        active = ccomm != MPI.COMM_NULL
        owned = assign_subdomains(s_total, ccomm.size)[ccomm.rank] if active else []
        log.info(f"{name}: {decomposition}; rank {rank} owns subdomains {owned}"
                 + ("" if active else " (idle: more ranks than subdomains)"))

    history, initial, probs, states = [], None, None, None
    if active:
        with timer("load_data"):
            data = {split: {s: load_subdomain(info.path, split, decomposition, s)
                            for s in owned} for split in SPLITS}
            inputs = {split: {s: torch.from_numpy(x) for s, (x, _) in data[split].items()}
                      for split in SPLITS}
            labels = {split: torch.from_numpy(data[split][owned[0]][1]) for split in SPLITS}
            del data
        with timer("setup"):
            if transfer_from:
                transfer = load_transfer(transfer_from, owned, decomposition)
                local_models, coarse = transfer.local_models(), transfer.coarse_model()
                inputs_kind = transfer.inputs
                log.info(f"{name}: transfer learning from {transfer_from} (coarse inputs "
                         f"{inputs_kind}), lr {local_lr:g} (local CNNs), {lr:g} (coarse DNN)")
            else:
                local_models, coarse = scratch_models(config, info, decomposition, owned)
                inputs_kind = config.coarse.inputs
            coarse_mod = coarse_module(coarse, inputs_kind)

        def wrapper():
            return CoherentCNNDNN(local_models, coarse_mod, ccomm, s_total, seed=None,
                                  sync_coarse=False).to(device)

        def validate():
            return evaluate_coherent(wrapper(), inputs["val"], labels["val"], device=device)

        if transfer_from:
            with timer("evaluate"):
                _, initial_val = validate()
                initial_test = evaluate_coherent(wrapper(), inputs["test"], labels["test"],
                                                 device=device)[1]
            initial = {"val_accuracy": initial_val, "test_accuracy": initial_test}
            log.info(f"{name}: transferred model before training: val accuracy "
                     f"{initial_val:.4f}, test accuracy {initial_test:.4f}")
        best = None

        schedulers = []

        def make_schedule(optimizer):
            schedulers.append(make_scheduler(optimizer, config.local.scheduler, epochs))
            return schedulers[-1]

        rates = [local_lr]  # learning rate (local CNNs) of each epoch

        def on_epoch(message):
            # train_coherent calls its log once per finished epoch, on every rank at the same
            # point: validate there (collective) and keep the best state, as train_local does
            nonlocal best, states
            val_loss, val_acc = validate()
            entry = {"epoch": len(history) + 1, "val_loss": val_loss, "val_accuracy": val_acc,
                     "lr": rates[-1], "elapsed": time.perf_counter() - start}
            rates.append(schedulers[-1].get_last_lr()[-1])  # stepped: the next epoch's
            history.append(entry)
            if select_last:
                best = entry                     # the model itself holds the last state
            elif _better(entry, best):
                best = entry
                states = ({s: copy.deepcopy(m.state_dict()) for s, m in local_models.items()},
                          copy.deepcopy(coarse.state_dict()))
            log.info(f"{name}: {message.split(', val')[0]}, val loss {val_loss:.4f} accuracy "
                     f"{val_acc:.4f}")

        with timer("training"):
            raw = train_coherent(
                local_models, coarse_mod, inputs["train"], labels["train"], ccomm,
                num_subdomains=s_total, epochs=epochs, batch_size=config.local.batch_size,
                lr=lr, local_lr=local_lr, optimizer=config.local.optimizer.name,
                weight_decay=config.local.optimizer.weight_decay,
                momentum=config.local.optimizer.momentum, seed=config.run.seed,
                output="probabilities", device=device, log=on_epoch, scheduler=make_schedule)
        for i, entry in enumerate(history):
            entry.update(train_loss=raw["train_loss"][i], train_accuracy=raw["train_acc"][i],
                         seconds=raw["seconds"][i])
        if states is not None:
            for s, m in local_models.items():
                m.load_state_dict(states[0][s])
            coarse.load_state_dict(states[1])
        best_epoch = best["epoch"] if best else 0
        with timer("evaluate"):
            probs = predict_coherent(wrapper(), inputs["test"], device=device).numpy()
        with timer("report"):
            for s, m in local_models.items():
                save_checkpoint(run_dir / "checkpoints" / f"local_{s:03d}.pt",
                                {"best_model": m.state_dict(), "model_config": m.config,
                                 "best_epoch": best_epoch, "config": to_dict(config)})
            if ccomm.rank == 0:
                save_checkpoint(run_dir / "checkpoints" / "coarse.pt",
                                {"model": coarse.state_dict(), "in_features": s_total * k,
                                 "num_classes": k, "inputs": inputs_kind,
                                 "config": to_dict(config), "coherent": True})
        local_params = {s: count_parameters(m) for s, m in local_models.items()}
        coarse_params = count_parameters(coarse)
        info_rank = {"local_parameters": local_params, "coarse_parameters": coarse_params,
                     "best_epoch": best_epoch}
    else:
        info_rank = None

    comm.Barrier()
    timings = comm.gather(timer.seconds, root=0)
    parts = comm.gather(info_rank, root=0)
    if rank != 0:
        return None
    with timer("report"):
        y_test = labels["test"].numpy()
        results = combiners.class_results(probs.argmax(1), y_test, info.classes)
        local_params = {str(s): v for part in parts if part for s, v in
                        part["local_parameters"].items()}
        timings[0] = dict(timer.seconds)
        metrics = {
            "strategy": name,
            **metrics_head(config, info, comm.size, decomposition),
            "ranks_used": ccomm.size,
            "transfer_from": str(transfer_from) if transfer_from else None,
            "coarse_inputs": inputs_kind,
            "epochs": epochs,
            "lr": {"local": local_lr, "coarse": lr, "scheduler": config.local.scheduler.name},
            "global": {name: results},
            "test_accuracy": results["test_accuracy"],
            "initial": initial,
            "best_epoch": best_epoch,
            "selection": ("last epoch (the validation split trained the source run's coarse "
                          "DNN)" if select_last else "best validation accuracy"),
            "parameters": {"local_each": local_params,
                           "local_total": sum(local_params.values()),
                           "coarse": coarse_params,
                           "total": sum(local_params.values()) + coarse_params},
            "history": history,
            "timings_seconds": {str(r): t for r, t in enumerate(timings)},
            "wall_seconds": time.perf_counter() - start,
        }
        with atomic_path(run_dir / "test_probabilities.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, probs.astype(np.float32))
        report.write_metrics(run_dir / "metrics.json", metrics)
        report.write_metrics(run_dir / "history.json", {name: history})
        if history:
            report.plot_training_curves(run_dir / "plots" / "training_curves.png",
                                        {name: history})
        report.plot_confusion(run_dir / "plots" / f"confusion_{name}.png",
                              results["confusion_matrix"], info.classes, f"{name} (test)")
        log.info(f"{name}: test accuracy {100 * results['test_accuracy']:.2f} % (best epoch "
                 f"{best_epoch} of {epochs}, {metrics['wall_seconds']:.1f} s)")
    return metrics

