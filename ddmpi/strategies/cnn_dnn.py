"""``ddmpi train``: the decomposed CNN-DNN pipeline, one rank per subdomain (or several per rank).

    config -> decomposition -> data -> local training -> gather -> coarse model -> report

Ownership: every rank of ``comm`` owns the subdomains :func:`ddmpi.parallel.mapping.assign_subdomains`
gives it, reads only their hyperslabs, trains their local CNNs without any communication, and
writes their checkpoints and local decisions. Rank 0 alone receives the gathered decisions,
trains the coarse DNN and writes the report. Every phase leaves files in the run directory that
``--resume`` picks up, so a killed or preempted job continues where it stopped.
"""

import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ddmpi.coarse import combiners

from ddmpi.training import preemption

from ddmpi.report import output as report
from ddmpi.data.atomic import atomic_path
from ddmpi.training.checkpoint import load_checkpoint, save_checkpoint
from ddmpi.config import ConfigError, load_config, to_dict
from ddmpi.parallel.gather import gather_decisions
from ddmpi.training.loop import Preempted, TensorSource, predict_proba, train_local
from ddmpi.parallel.hybrid import GroupDataParallel, HybridError, form_groups
from ddmpi.parallel.mapping import MappingError, assign_subdomains
from ddmpi.models.cnn import count_parameters
from ddmpi.parallel.progress import Progress
from ddmpi.data.reader import load_subdomain
from ddmpi.strategies.context import SPLITS, PhaseTimer, decomposition_of, metrics_head, open_run
from ddmpi.data.schema import read_labels


def resolve_config(config_path, overrides, resume_dir):
    """The configuration of this run: from ``--config``/``--set``, or stored in ``resume_dir``.

    Resuming with a configuration that differs from the stored one is an error naming the
    first differing field, since the checkpoints belong to the stored one.
    """
    if resume_dir is None:
        if config_path is None:
            raise ConfigError("ddmpi train: give --config FILE (or --resume RUN_DIR)")
        return load_config(config_path, overrides)
    stored = Path(resume_dir) / "config.yaml"
    if config_path is None:
        if not stored.exists():
            raise ConfigError(f"{resume_dir}: no config.yaml to resume from")
        return load_config(stored, [f"run.dir={resume_dir}", *overrides])
    config = load_config(config_path, [f"run.dir={resume_dir}", *overrides])
    if stored.exists():
        previous = to_dict(load_config(stored))
        for key, (a, b) in _differences(previous, to_dict(config)):
            raise ConfigError(f"config field '{key}': {b!r} differs from {a!r} stored in "
                              f"{stored}; resume with the stored configuration")
    return config


def _differences(a, b, prefix=""):
    for key in a:
        if isinstance(a[key], dict):
            yield from _differences(a[key], b[key], f"{prefix}{key}.")
        elif a[key] != b[key]:
            yield f"{prefix}{key}", (a[key], b[key])


def run_train(config, comm, resume=False):
    """Train the decomposed CNN-DNN described by ``config`` on the ranks of ``comm``.

    Returns the metrics dict on rank 0, ``None`` elsewhere.
    """
    wall_start = time.perf_counter()
    timer = PhaseTimer()
    rank, size = comm.rank, comm.size
    run_dir = Path(config.run.dir)

    with timer("setup"):
        ctx = open_run(config, comm, run_dir, keep_stored_config=resume)
        log, info, device, amp = ctx.log, ctx.info, ctx.device, ctx.amp
        decomposition = decomposition_of(config, info)
        owned, parallel, decision_comm = _layout(comm, decomposition.num_subdomains)
        log.info(f"{decomposition}; rank {rank} owns subdomains {owned}" + (
            f" (data-parallel replica {parallel.rank} of {parallel.size})" if parallel else ""))
        preemption.install()
        import torch._dynamo  # noqa: F401  (torch.optim's first step imports it: ~2 s start-up)

    progress = Progress(comm, decomposition.num_subdomains * config.local.epochs,
                        printer=log.info)
    local_info = {}
    for sub in owned:
        summary = _train_subdomain(config, info, decomposition, sub, rank, device, amp,
                                   resume, run_dir, timer, progress, log, parallel)
        if summary is not None:  # None: a data-parallel replica other than the group leader
            local_info[sub] = summary
    progress.rank_done(sum(config.local.epochs - len(v["history"]) for v in local_info.values()))
    progress.wait_all()

    with timer("gather"):
        gathered = {}
        for split in _splits_for_coarse(config):
            if decision_comm is None:
                continue  # a data-parallel replica: its group leader sends the decisions
            local = {sub: _load_decisions(run_dir, sub)[split] for sub in owned}
            gathered[split] = gather_decisions(decision_comm, local,
                                               decomposition.num_subdomains,
                                               chunk_bytes=config.run.gather_chunk_mb << 20)
        all_local = comm.gather(local_info, root=0)
    timings = comm.gather(timer.seconds, root=0)  # rank 0 replaces its own entry at the end

    if rank != 0:
        return None
    with timer("coarse"):
        labels = {split: read_labels(info.path, split) for split in gathered}
        results = _combine(config, gathered, labels, info, device, run_dir)
    with timer("report"):
        local_all = {sub: v for part in all_local for sub, v in part.items()}
        timings[0] = dict(timer.seconds)
        metrics = _metrics(config, info, decomposition, size, local_all, results, timings,
                           time.perf_counter() - wall_start)
        _write_outputs(run_dir, metrics, local_all, results, info)
        log.info("\n" + report.results_table(
            {name: r["test_accuracy"] for name, r in results.items() if name != "_coarse"}))
        log.info(f"run directory: {run_dir}")
    return metrics


def _checkpoint_path(run_dir, sub):
    return run_dir / "checkpoints" / f"local_{sub:03d}.pt"


def _decisions_path(run_dir, sub):
    return run_dir / "decisions" / f"local_{sub:03d}.npz"


def _load_decisions(run_dir, sub):
    with np.load(_decisions_path(run_dir, sub)) as data:
        return {split: data[split] for split in SPLITS}


def _splits_for_coarse(config):
    """The splits whose decisions rank 0 needs: the coarse DNN's training data, val, test."""
    return [split for split in SPLITS
            if split != "train" or "train" in config.coarse.train_on.split("+")]


def _layout(comm, num_subdomains):
    """``(owned subdomains, data-parallel group or None, communicator of the decisions)``.

    P <= S ranks: the balanced blocks of :func:`assign_subdomains`, decisions gathered over
    ``comm``. P = k*S > S: hybrid parallelism, one group of k ranks per subdomain training its
    local CNN data-parallel; the group leaders' communicator carries the decisions (None on the
    other replicas).
    """
    if comm.size <= num_subdomains:
        return assign_subdomains(num_subdomains, comm.size)[comm.rank], None, comm
    try:
        groups = form_groups(comm, num_subdomains)
    except HybridError as err:
        raise MappingError(str(err)) from err
    return [groups.subdomain], GroupDataParallel(groups.group_comm), groups.leader_comm


def _train_subdomain(config, info, decomposition, sub, rank, device, amp, resume, run_dir,
                     timer, progress, log, parallel=None):
    """Train (or resume) the local CNN of subdomain ``sub``; write its decisions; return info."""
    shape = decomposition.subdomain_shape(sub)
    build_kwargs = dict(family=config.local.model.family, spatial_dims=info.spatial_dims,
                        in_channels=info.channels, num_classes=info.num_classes,
                        input_shape=shape, depth=config.local.model.depth,
                        width=config.local.model.width, dropout=config.local.model.dropout,
                        batchnorm=config.local.model.batchnorm)
    ckpt_path = _checkpoint_path(run_dir, sub)
    done = load_checkpoint(ckpt_path) if resume and _decisions_path(run_dir, sub).exists() else None
    leader = parallel is None or parallel.writes_checkpoints
    if done is not None and "best_model" in done:
        log.info(f"subdomain {sub}: finished in an earlier run, skipping")
        return done["summary"] if leader else None

    with timer("load_data"):
        data = {split: load_subdomain(info.path, split, decomposition, sub) for split in SPLITS}
        pin = device.type == "cuda"
        sources = {split: TensorSource(torch.from_numpy(x), torch.from_numpy(y), pin=pin)
                   for split, (x, y) in data.items()}
    log.info(f"subdomain {sub}: slices {decomposition.slices(sub)}, input {shape}, "
             f"{len(sources['train'])} train samples")
    def on_epoch(record):
        log.debug(f"subdomain {sub}: {asdict(record)}")
        if leader:
            progress.epoch_done(sub, record)

    with timer("local_training"):
        model, history, best_epoch = train_local(
            build_kwargs, sources["train"], sources["val"], config.local, device=device,
            seed=config.run.seed + sub, amp=amp, checkpoint_path=ckpt_path, resume=resume,
            on_epoch=on_epoch, should_stop=preemption.requested, log=log.info,
            parallel=parallel)
    with timer("local_inference"):
        decisions = {split: predict_proba(model, sources[split], device, amp=amp)
                     for split in SPLITS}
        accuracies = {split: float((decisions[split].argmax(1) == sources[split].y.numpy()).mean())
                      for split in SPLITS}
    summary = {"subdomain": sub, "rank": rank,
               "slices": [[s.start, s.stop] for s in decomposition.slices(sub)],
               "input_shape": list(shape), "parameters": count_parameters(model),
               "best_epoch": best_epoch, "history": [asdict(r) for r in history],
               "accuracy": accuracies, "device": str(device)}
    if not leader:
        return None
    with atomic_path(_decisions_path(run_dir, sub)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **decisions)
    state = load_checkpoint(ckpt_path)
    state.update(best_model=model.state_dict(), summary=summary, config=to_dict(config))
    save_checkpoint(ckpt_path, state)
    log.info(f"subdomain {sub}: test accuracy {accuracies['test']:.4f} (best epoch {best_epoch})")
    return summary


def _combine(config, gathered, labels, info, device, run_dir):
    """All global decisions on the test split: CNN-DNN, majority vote, averaged probabilities."""
    k = info.num_classes
    train_on = config.coarse.train_on
    if train_on == "train+val":
        coarse_x = np.concatenate([gathered["train"], gathered["val"]], axis=1)
        coarse_y = np.concatenate([labels["train"], labels["val"]])
    else:
        coarse_x, coarse_y = gathered[train_on], labels[train_on]
    coarse, history = combiners.train_coarse(coarse_x, coarse_y, config.coarse,
                                             seed=config.run.seed, device=device,
                                             val_probs=gathered["val"], val_labels=labels["val"])
    save_checkpoint(run_dir / "checkpoints" / "coarse.pt",
                    {"model": coarse.state_dict(), "in_features": coarse_x.shape[0] * k,
                     "num_classes": k, "config": to_dict(config), "history": history})
    test_probs, y = gathered["test"], labels["test"]
    predictions = {
        "cnn_dnn": combiners.coarse_predict(coarse, test_probs, config.coarse.inputs,
                                            device).argmax(1),
        "majority_vote": combiners.majority_vote(test_probs),
        "average_probabilities": combiners.average_probabilities(test_probs).argmax(1),
    }
    results = {name: combiners.class_results(pred, y, info.classes)
               for name, pred in predictions.items()}
    results["_coarse"] = {"train_on": train_on, "history": history,
                          "parameters": count_parameters(coarse)}
    return results


def _metrics(config, info, decomposition, size, local_all, results, timings, wall):
    coarse = results["_coarse"]
    return {
        **metrics_head(config, info, size, decomposition),
        "global": {name: r for name, r in results.items() if name != "_coarse"},
        "local": {str(sub): {k: v for k, v in info_.items() if k != "history"}
                  for sub, info_ in sorted(local_all.items())},
        "coarse": {"train_on": coarse["train_on"], "parameters": coarse["parameters"],
                   "final_train_loss": coarse["history"][-1]["train_loss"]},
        "parameters": {"local_each": {str(s): v["parameters"] for s, v in local_all.items()},
                       "local_total": sum(v["parameters"] for v in local_all.values()),
                       "coarse": coarse["parameters"]},
        "timings_seconds": {str(r): t for r, t in enumerate(timings)},
        "wall_seconds": wall,
    }


def _write_outputs(run_dir, metrics, local_all, results, info):
    report.write_metrics(run_dir / "metrics.json", metrics)
    report.write_metrics(run_dir / "history.json",
                         {str(s): v["history"] for s, v in sorted(local_all.items())})
    plots = run_dir / "plots"
    report.plot_training_curves(plots / "training_curves.png",
                                {s: v["history"] for s, v in local_all.items()})
    report.plot_accuracy_by_combiner(
        plots / "accuracy_by_combiner.png",
        {n: r["test_accuracy"] for n, r in results.items() if n != "_coarse"},
        {s: v["accuracy"]["test"] for s, v in local_all.items()})
    report.plot_confusion(plots / "confusion_cnn_dnn.png",
                          results["cnn_dnn"]["confusion_matrix"], info.classes,
                          "CNN-DNN (test)")


RESUME_IF_POSSIBLE = "<run.dir>"


def main(args, comm):
    """Entry of ``ddmpi train`` (arguments parsed by :mod:`ddmpi.cli`).

    ``--resume RUN_DIR`` continues that run with its stored configuration; ``--resume`` alone
    continues the configured run directory if it holds a run and starts it otherwise, so one
    batch script serves the first submission and every requeue.
    """
    overrides = list(args.set or []) + ([f"run.dir={args.run_dir}"] if args.run_dir else [])
    resume_dir = args.resume
    if resume_dir == RESUME_IF_POSSIBLE:
        configured = Path(load_config(args.config, overrides).run.dir)
        resume_dir = configured if (configured / "config.yaml").exists() else None
    config = resolve_config(args.config, overrides, resume_dir)
    try:
        run_train(config, comm, resume=resume_dir is not None)
    except Preempted as stop:
        print(f"[ddmpi rank {comm.rank}] preempted ({stop}); exiting with "
              f"{preemption.EXIT_PREEMPTED} for requeue", flush=True)
        os._exit(preemption.EXIT_PREEMPTED)
