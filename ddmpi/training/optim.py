"""Optimizer and learning-rate schedule from the configuration."""

import torch


def make_optimizer(params, cfg, lr=None):
    """Optimizer from an :class:`~ddmpi.config.OptimizerConfig` (``lr`` overrides its rate)."""
    lr = cfg.lr if lr is None else lr
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg, epochs):
    """Per-epoch schedule from a :class:`~ddmpi.config.SchedulerConfig`."""
    if cfg.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    if cfg.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size,
                                               gamma=cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
