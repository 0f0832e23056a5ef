"""Epoch hooks of :func:`ddmpi.training.loop.fit`: checkpoints, early stopping, progress,
kernel rescaling."""

import torch

from ddmpi.training.checkpoint import save_checkpoint
from ddmpi.training.loop import Hook
from ddmpi.training.optim import make_optimizer, make_scheduler


class Checkpoint(Hook):
    """Resumable state after every epoch and on interruption (``extra``: plain values)."""

    def __init__(self, path, enabled=True, extra=None):
        self.path, self.enabled, self.extra = path, enabled, extra or {}

    def save(self, trainer):
        if self.enabled:
            save_checkpoint(self.path, {**trainer.state_dict(), **self.extra,
                                        "model_config": trainer.model.config})

    def epoch_end(self, trainer, record):
        self.save(trainer)

    def interrupted(self, trainer):
        self.save(trainer)


class EarlyStopping(Hook):
    """Stop after ``patience`` epochs without a better validation accuracy."""

    def __init__(self, patience):
        self.patience = patience

    def epoch_end(self, trainer, record):
        if trainer.resolution == "full" and record.epoch - trainer.best["epoch"] > self.patience:
            trainer.stop = True


class Report(Hook):
    """Calls ``callback(record)`` after every epoch (progress lines, scalars)."""

    def __init__(self, callback):
        self.callback = callback

    def epoch_end(self, trainer, record):
        self.callback(record)


class Rescaling(Hook):
    """Kernel rescaling: train on 1/s inputs, switch to full resolution once (exactly)."""

    def __init__(self, rescaler, local_cfg, trainer):
        self.rescaler, self.cfg, self.trainer = rescaler, local_cfg, trainer

    @property
    def low(self):
        return self.trainer.resolution != "full"

    def prepare(self, x):
        return self.rescaler.downsample(x) if self.low else x

    def epoch_end(self, trainer, record):
        if not self.low:
            return
        last = record.epoch == trainer.epochs
        if not (last or self.rescaler.should_switch(record.epoch - 1,
                                                    [r.val_accuracy for r in trainer.history])):
            return
        device = next(trainer.model.parameters()).device
        trainer.model = self.rescaler.to_full_resolution(trainer.model).to(device)
        trainer.resolution = "full"
        trainer.optimizer, trainer.scheduler = self._continued(trainer)
        trainer.consider(record, force=True)  # the switch is exact: same validation figures

    def _continued(self, trainer):
        """Optimizer and schedule of the switched network, carrying on where the old ones
        were: same learning rate and schedule position, same moments for every parameter
        the switch kept (all but the stem kernel, whose state starts afresh)."""
        optimizer = make_optimizer(trainer.model.parameters(), self.cfg.optimizer)
        optimizer.load_state_dict(trainer.optimizer.state_dict())
        for p in trainer.model.parameters():
            state = optimizer.state.get(p, {})
            if any(torch.is_tensor(v) and v.dim() and v.shape != p.shape
                   for v in state.values()):
                del optimizer.state[p]
        scheduler = make_scheduler(optimizer, self.cfg.scheduler, trainer.epochs)
        scheduler.load_state_dict(trainer.scheduler.state_dict())
        return optimizer, scheduler
