"""Training one CNN on one box of the images (a subdomain, or the whole image): data sources,
augmentation, kernel rescaling, checkpoints, resume. Used by the CNN-DNN and the global CNN."""

import numpy as np
import torch

from ddmpi.config import ConfigError, to_dict
from ddmpi.data.atomic import atomic_path
from ddmpi.data.augment import Augmenter
from ddmpi.data.schema import SPLITS
from ddmpi.data.sources import open_splits
from ddmpi.data.subset import Subset
from ddmpi.models.cnn import build_cnn, count_parameters
from ddmpi.models.flops import training_flops
from ddmpi.models.rescaling import KernelRescaling
from ddmpi.report.scalars import ScalarWriter
from ddmpi.strategies.rundir import decisions_path, local_path
from ddmpi.training import hooks, preemption
from ddmpi.training.checkpoint import load_checkpoint, save_checkpoint
from ddmpi.training.loop import Trainer, fit, predict_proba
from ddmpi.training.optim import make_optimizer, make_scheduler


def build_kwargs(config, info, input_shape, width=None):
    """``build_cnn`` arguments of a CNN of the configured family on ``input_shape``."""
    m = config.local.model
    stem = {"stem": m.stem} if m.family == "resnet" else {}
    return dict(family=m.family, spatial_dims=info.spatial_dims, in_channels=info.channels,
                num_classes=info.num_classes, input_shape=tuple(input_shape), depth=m.depth,
                width=m.width if width is None else width, dropout=m.dropout,
                batchnorm=m.batchnorm, blocks=m.blocks, max_width_factor=m.max_width_factor,
                **stem)


def open_sources(ctx, box, share=1):
    """Sources of the three splits for ``box`` and the training augmentation (or None).

    ``share``: boxes this rank holds at once; each gets that part of ``data.memory_budget_gb``
    (a per-rank budget), which its splits share (:func:`open_splits`).
    """
    cfg, info = ctx.config, ctx.info
    aug = Augmenter(cfg.data.augment, tuple(info.spatial_shape), cfg.run.seed)
    window = aug.window(box) if aug.active else box
    try:
        sources = open_splits(info.path, {s: window if s == "train" else box for s in SPLITS},
                              SPLITS, in_memory=cfg.data.in_memory,
                              memory_budget_gb=cfg.data.memory_budget_gb / share,
                              pin=ctx.device.type == "cuda")
    except ConfigError as err:
        if share == 1:
            raise
        raise ConfigError(f"{err} (figures per box: this rank holds {share} boxes at once, "
                          f"each with 1/{share} of data.memory_budget_gb)") from None
    if ctx.device.type == "cuda":
        sources = {s: src.to(ctx.device) if hasattr(src, "to") else src
                   for s, src in sources.items()}
    augment = (lambda x, idx, epoch: aug(x, window, box, idx, epoch)) if aug.active else None
    return sources, augment


def train_cnn(ctx, kwargs, train, val, augment, *, seed, path, epochs, parallel=None,
              progress=None, name="", writes=True):
    """Train (or resume) one CNN; return the trainer (best state loaded) and its step."""
    cfg = ctx.config.local
    torch.manual_seed(seed)
    resc = cfg.rescaling
    rescaler = (KernelRescaling(resc.factor, switch_epoch=resc.switch_epoch,
                                patience=resc.patience) if resc.factor > 1 else None)
    state = load_checkpoint(path) if ctx.resume else None
    low = rescaler is not None and (state is None or state["resolution"] != "full")
    model = (build_cnn(**kwargs) if rescaler is None else
             rescaler.build_low_resolution_model(**kwargs) if low else
             rescaler.build_full_resolution_model(**kwargs)).to(ctx.device)
    optimizer = make_optimizer(model.parameters(), cfg.optimizer)
    trainer = Trainer(model, optimizer, make_scheduler(optimizer, cfg.scheduler, epochs), epochs,
                      resolution=f"1/{rescaler.factor}" if low else "full",
                      name=name or "global CNN")
    if state is not None:
        trainer.load_state_dict(state)
        ctx.log.info(f"{trainer.name}: resumed from {path}, {resume_position(trainer)}")
        if progress is not None and writes:
            progress.epochs_resumed(trainer.epoch)
    # the switch first: the checkpoint of the switch epoch must hold the switched network
    epoch_hooks = [hooks.Rescaling(rescaler, cfg, trainer)] if rescaler is not None else []
    epoch_hooks.append(hooks.Checkpoint(path, enabled=writes))
    if progress is not None and writes:
        epoch_hooks.append(hooks.Report(lambda record: progress.epoch_done(name, record)))
    if cfg.early_stopping_patience is not None:
        epoch_hooks.append(hooks.EarlyStopping(cfg.early_stopping_patience))
    with ScalarWriter(ctx.run_dir, name.replace(" ", "_") or "global",
                      tensorboard=ctx.config.run.tensorboard and writes) as scalars:
        if writes:
            epoch_hooks.append(hooks.Report(lambda r: scalars.add(r.epoch, scalar_row(r))))
        step = ctx.step(augment=augment, parallel=parallel, hooks=tuple(epoch_hooks))
        fit(trainer, train, val, step, batch_size=cfg.batch_size, seed=seed,
            should_stop=preemption.requested)
    return trainer, step


def resume_position(trainer):
    """Where a resumed ``trainer`` continues, in words."""
    if trainer.stop or trainer.epoch >= trainer.epochs:
        return f"finished ({trainer.epoch} epochs)"
    if trainer.batch:
        return f"continuing epoch {trainer.epoch + 1} after batch {trainer.batch}"
    return f"continuing after epoch {trainer.epoch}"


def scalar_row(record):
    """An epoch record as CSV scalars: ``resolution`` as the input's scale (0.5 for "1/2")."""
    row = {k: v for k, v in vars(record).items() if k not in ("epoch", "resolution")}
    row["resolution"] = 1.0 / float(record.resolution.partition("/")[2] or 1)
    return row


def train_subdomain(ctx, decomposition, sub, parallel, progress, writes):
    """Train the local CNN of ``sub``, write its decisions (and checkpoint); return a summary."""
    config = ctx.config
    box = decomposition.slices(sub)
    sources, augment = open_sources(ctx, box)
    kwargs = build_kwargs(config, ctx.info, decomposition.subdomain_shape(sub))
    seed = config.run.seed + sub
    with ctx.timer("local_training"):
        trainer, step = train_cnn(ctx, kwargs, sources["train"], sources["val"], augment,
                                  seed=seed, path=local_path(ctx.run_dir, sub),
                                  epochs=config.local.epochs, parallel=parallel,
                                  progress=progress, name=f"subdomain {sub}", writes=writes)
    model = trainer.model
    with ctx.timer("local_inference"):
        decisions = {split: predict_proba(model, sources[split], step).numpy()
                     for split in SPLITS}
    if config.coarse.train_on == "crossfit":
        with ctx.timer("crossfit"):
            decisions["oof"] = crossfit(ctx, kwargs, sources, augment, sub, parallel, progress,
                                        writes)
    accuracy = {split: float((decisions[split].argmax(1) == sources[split].labels.cpu().numpy())
                             .mean()) for split in SPLITS}
    summary = {"subdomain": sub, "rank": ctx.world.rank,
               "slices": [[s.start, s.stop] for s in box], "input_shape": list(kwargs[
                   "input_shape"]), "parameters": count_parameters(model),
               "flops_per_sample": training_flops(model, kwargs["input_shape"],
                                                  kwargs["in_channels"]),
               "best_epoch": trainer.best["epoch"], "accuracy": accuracy,
               "history": [vars(r) for r in trainer.history], "device": str(ctx.device),
               "train_bytes_read": getattr(sources["train"], "bytes_read", None),
               "epochs_skipped": config.local.epochs - len(trainer.history)}
    if writes:
        with atomic_path(decisions_path(ctx.run_dir, sub)) as tmp, open(tmp, "wb") as f:
            np.savez(f, **decisions)
        save_checkpoint(local_path(ctx.run_dir, sub), {
            **trainer.state_dict(), "best_model": model.state_dict(),
            "model_config": model.config, "summary": summary, "config": to_dict(config)})
        ctx.log.info(f"subdomain {sub}: test accuracy {accuracy['test']:.4f} "
                     f"(best epoch {trainer.best['epoch']})")
    return summary


def crossfit(ctx, kwargs, sources, augment, sub, parallel, progress, writes):
    """Out-of-fold decisions on the training split: K CNNs, each trained without one fold."""
    cfg = ctx.config
    train = sources["train"]
    n, k = len(train), cfg.coarse.folds
    folds = np.array_split(np.random.default_rng([cfg.run.seed, sub]).permutation(n), k)
    oof = np.zeros((n, ctx.info.num_classes), np.float32)
    for i, held in enumerate(folds):
        keep = np.setdiff1d(np.arange(n), held)
        trainer, step = train_cnn(
            ctx, kwargs, Subset(train, torch.from_numpy(keep)), sources["val"], augment,
            seed=cfg.run.seed + sub + 1000 * (i + 1), path=local_path(ctx.run_dir, sub, i),
            epochs=cfg.coarse.fold_epochs or cfg.local.epochs, parallel=parallel,
            progress=progress, name=f"subdomain {sub} fold {i}", writes=writes)
        held = np.sort(held)
        oof[held] = predict_proba(trainer.model, train, step,
                                  indices=torch.from_numpy(held)).numpy()
    return oof
