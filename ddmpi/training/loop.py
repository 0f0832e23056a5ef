"""The training loop of one CNN on one set of (sub)images: plain, resumable, no communication.

Every local CNN of a decomposed run is trained by :func:`train_local` on its own rank,
independently of all others. The loop keeps the best state by validation accuracy, checkpoints
atomically after every epoch (and mid-epoch when asked to stop, e.g. on preemption), and can be
resumed from such a checkpoint with bit-identical results on CPU: the sample order of every epoch
is drawn from ``(seed, epoch)`` alone, and the dropout RNG state travels in the checkpoint.
"""

import contextlib
import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ddmpi.training.checkpoint import load_checkpoint, save_checkpoint
from ddmpi.models.cnn import build_cnn


class Preempted(Exception):
    """Training stopped on request (signal) after writing a resumable checkpoint."""


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float
    resolution: str = "full"


class TensorSource:
    """Samples held in memory: ``take(indices)`` returns the (x, y) batch."""

    def __init__(self, x, y, pin=False):
        self.x = torch.as_tensor(x)
        self.y = torch.as_tensor(y, dtype=torch.int64)
        if pin:
            self.x, self.y = self.x.pin_memory(), self.y.pin_memory()

    def __len__(self):
        return len(self.y)

    def take(self, indices):
        return self.x[indices], self.y[indices]


def make_optimizer(params, cfg):
    """Optimizer from an :class:`~ddmpi.config.OptimizerConfig`."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg, epochs):
    """Per-epoch learning-rate schedule from a :class:`~ddmpi.config.SchedulerConfig`."""
    if cfg.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    if cfg.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size,
                                               gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def epoch_order(n, seed, epoch):
    """The shuffled sample order of one epoch, a function of (seed, epoch) only."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen)


def autocast(device, enabled):
    """Mixed precision (bfloat16) on CUDA when enabled; a no-op context elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_proba(model, source, device, batch_size=512, amp=False, transform=None):
    """Softmax probabilities (N, K) float32 of ``model`` on every sample of ``source``."""
    model.eval()
    out = []
    for start in range(0, len(source), batch_size):
        x, _ = source.take(torch.arange(start, min(start + batch_size, len(source))))
        x = x.to(device, non_blocking=True)
        if transform is not None:
            x = transform(x)
        with autocast(device, amp):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out).numpy()


def evaluate(model, source, device, batch_size=512, amp=False, transform=None):
    """(mean cross-entropy, accuracy) of ``model`` on ``source``."""
    probs = predict_proba(model, source, device, batch_size, amp, transform)
    labels = source.y.numpy() if hasattr(source, "y") else source.take(
        torch.arange(len(source)))[1].numpy()
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()
    return float(nll), float((probs.argmax(1) == labels).mean())


class _Resolution:
    """Which resolution the loop trains at: full, or 1/s before a kernel-rescaling switch."""

    def __init__(self, rescaling_cfg, build_kwargs):
        self.rescaler = None
        self.low = False
        if rescaling_cfg is not None and rescaling_cfg.factor > 1:
            from ddmpi.models.rescaling import KernelRescaling

            self.rescaler = KernelRescaling(rescaling_cfg.factor,
                                            switch_epoch=rescaling_cfg.switch_epoch,
                                            patience=rescaling_cfg.patience)
            self.low = True
        self.build_kwargs = build_kwargs

    def build(self):
        if self.rescaler is None:
            return build_cnn(**self.build_kwargs)
        if self.low:
            return self.rescaler.build_low_resolution_model(**self.build_kwargs)
        return self.rescaler.build_full_resolution_model(**self.build_kwargs)

    def transform(self, x):
        return self.rescaler.downsample(x) if self.low else x

    @property
    def name(self):
        return f"1/{self.rescaler.factor}" if self.low else "full"


def train_local(build_kwargs, train, val, cfg, *, device, seed, amp=False, checkpoint_path=None,
                resume=False, on_epoch=None, should_stop=None, log=print, parallel=None):
    """Train one CNN; return ``(model with the best state, history, best_epoch)``.

    ``build_kwargs`` go to :func:`ddmpi.models.cnn.build_cnn`; ``train``/``val`` provide
    ``take(indices)`` and ``len``; ``cfg`` is a :class:`~ddmpi.config.LocalConfig`.
    ``on_epoch(record)`` is called after every epoch; ``should_stop()`` is polled after every
    batch and, when true, a mid-epoch checkpoint is written and :class:`Preempted` raised.
    ``parallel`` (e.g. :class:`ddmpi.parallel.hybrid.GroupDataParallel`) trains the model data-parallel
    over a group of ranks: every member calls this with the same arguments.
    """
    torch.manual_seed(seed)
    resolution = _Resolution(cfg.rescaling, build_kwargs)
    model = resolution.build().to(device)
    optimizer = make_optimizer(model.parameters(), cfg.optimizer)
    scheduler = make_scheduler(optimizer, cfg.scheduler, cfg.epochs)
    history, best = [], {"accuracy": -1.0, "loss": float("inf"), "epoch": -1, "state": None}
    start_epoch, skip_batches, partial = 0, 0, None

    state = load_checkpoint(checkpoint_path) if (resume and checkpoint_path) else None
    if state is not None:
        if state["low_resolution"] != resolution.low:
            resolution.low = state["low_resolution"]
            model = resolution.build().to(device)
            optimizer = make_optimizer(model.parameters(), cfg.optimizer)
            scheduler = make_scheduler(optimizer, cfg.scheduler, cfg.epochs)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = [EpochRecord(**r) for r in state["history"]]
        best = state["best"]
        start_epoch, skip_batches, partial = state["epoch"], state["batch"], state["partial"]
        torch.set_rng_state(state["rng"])
        log(f"resumed at epoch {start_epoch + 1}, batch {skip_batches}")
        if state.get("finished"):
            start_epoch = cfg.epochs

    def save(epoch, batch, partial_sums, finished=False):
        if checkpoint_path is None or (parallel is not None and not parallel.writes_checkpoints):
            return
        save_checkpoint(checkpoint_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "history": [asdict(r) for r in history],
            "best": best, "epoch": epoch, "batch": batch, "partial": partial_sums,
            "rng": torch.get_rng_state(), "low_resolution": resolution.low,
            "finished": finished, "model_config": model.config})

    bs = cfg.batch_size if parallel is None else parallel.local_batch_size(cfg.batch_size)
    net = model if parallel is None else parallel.wrap(model)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        sums = partial or {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        order = epoch_order(len(train), seed, epoch)
        if parallel is not None:
            order = parallel.shard(order)
        for b, start in enumerate(range(0, len(order), bs)):
            if b < skip_batches:
                continue
            x, y = train.take(order[start:start + bs])
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = resolution.transform(x)
            with autocast(device, amp):
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if parallel is not None:
                parallel.after_backward(model)
            optimizer.step()
            if parallel is not None:
                parallel.after_step(model)
            sums["loss"] += loss.item() * len(y)
            sums["correct"] += int((logits.argmax(1) == y).sum())
            sums["seen"] += len(y)
            stop = should_stop is not None and should_stop()
            if parallel is not None:
                stop = parallel.any_stop(stop)
            if stop:
                sums["seconds"] += time.perf_counter() - t0
                save(epoch, b + 1, sums)
                raise Preempted(f"stopped at epoch {epoch + 1}, batch {b + 1}; checkpoint "
                                f"{checkpoint_path}")
        skip_batches, partial = 0, None
        if parallel is not None:  # the epoch's training figures over all replicas' shards
            sums["loss"], sums["correct"], sums["seen"] = parallel.sum(
                [sums["loss"], sums["correct"], sums["seen"]])
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val_loss, val_acc = evaluate(model, val, device, amp=amp, transform=resolution.transform)
        record = EpochRecord(epoch + 1, sums["loss"] / sums["seen"], sums["correct"] / sums["seen"],
                             val_loss, val_acc, lr,
                             sums["seconds"] + time.perf_counter() - t0, resolution.name)
        history.append(record)
        if not resolution.low and (val_acc, -val_loss) > (best["accuracy"], -best["loss"]):
            best = {"accuracy": val_acc, "loss": val_loss, "epoch": epoch + 1,
                    "state": copy.deepcopy(model.state_dict())}
        if resolution.low and (epoch + 1 == cfg.epochs or resolution.rescaler.should_switch(
                epoch, [r.val_accuracy for r in history])):
            # always end at full resolution: callers evaluate the returned model on full inputs
            model = resolution.rescaler.to_full_resolution(model).to(device)
            net = model if parallel is None else parallel.wrap(model)
            resolution.low = False
            # the switch is exact (full(x) == low(A_s x)): the switched network is the first
            # full-resolution state, with this epoch's validation figures; early stopping
            # counts from here
            best = {"accuracy": val_acc, "loss": val_loss, "epoch": epoch + 1,
                    "state": copy.deepcopy(model.state_dict())}
            optimizer = _carry_lr(make_optimizer(model.parameters(), cfg.optimizer), optimizer)
            scheduler = make_scheduler(optimizer, cfg.scheduler, cfg.epochs - epoch - 1)
            log(f"kernel rescaling: switched to full resolution after epoch {epoch + 1}")
        stop_early = (cfg.early_stopping_patience is not None and not resolution.low
                      and epoch + 1 - best["epoch"] > cfg.early_stopping_patience)
        save(epoch + 1, 0, None, finished=stop_early or epoch + 1 == cfg.epochs)
        if on_epoch is not None:
            on_epoch(record)
        if stop_early:
            log(f"early stopping after epoch {epoch + 1} (best {best['epoch']})")
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return model, history, best["epoch"]


def _carry_lr(new_optimizer, old_optimizer):
    """Continue the learning rate where the low-resolution phase left it."""
    for group in new_optimizer.param_groups:
        group["lr"] = old_optimizer.param_groups[0]["lr"]
        group["initial_lr"] = group["lr"]
    return new_optimizer
