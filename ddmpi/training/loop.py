"""The one training loop: ``train_one_epoch``, ``evaluate``, ``fit`` with epoch hooks.

Local CNNs, the global CNN and the coherent CNN-DNN all train here. A batch's inputs are a
tensor, or ``{subdomain: tensor}`` for the coherent model. Loss and accuracy accumulate on the
device; the host synchronises once per epoch.
"""

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F


class Preempted(Exception):
    """Training stopped on request (signal) after writing a resumable checkpoint."""


class Diverged(ValueError):
    """An epoch's training or validation loss is not finite; the message names the model."""


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


@dataclass
class Trainer:
    """What the loop and its hooks share: model, optimizer, schedule, position, best state."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    epochs: int
    epoch: int = 0           # epochs finished
    batch: int = 0           # batches finished in the current epoch (after a mid-epoch stop)
    partial: Optional[dict] = None
    history: List[EpochRecord] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"accuracy": -1.0, "loss": float("inf"),
                                                "epoch": 0, "state": None})
    stop: bool = False       # set by a hook: end training after this epoch
    resolution: str = "full"  # "1/s" during a kernel-rescaling low-resolution phase
    name: str = "model"      # for messages: "subdomain 3", "global CNN", ...

    def consider(self, record, force=False):
        """Keep the model's state if ``record`` beats the best so far (or ``force``)."""
        if force or (record.val_accuracy, -record.val_loss) > (self.best["accuracy"],
                                                               -self.best["loss"]):
            self.best = {"accuracy": record.val_accuracy, "loss": record.val_loss,
                         "epoch": record.epoch, "state": copy.deepcopy(self.model.state_dict())}

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "history": [asdict(r) for r in self.history], "best": self.best,
                "epoch": self.epoch, "batch": self.batch, "partial": self.partial,
                "finished": self.stop or self.epoch >= self.epochs,
                "resolution": self.resolution,
                "rng": torch.get_rng_state()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = [EpochRecord(**r) for r in state["history"]]
        self.best, self.epoch = state["best"], state["epoch"]
        self.batch, self.partial = state["batch"], state["partial"]
        self.stop = state["finished"] and self.epoch < self.epochs
        self.resolution = state["resolution"]
        torch.set_rng_state(state["rng"])


class Hook:
    """Called by :func:`fit`; override what you need."""

    def prepare(self, x):
        """Transform a batch's inputs on the device (e.g. down-sample)."""
        return x

    def epoch_end(self, trainer, record):
        """After each epoch's validation; may set ``trainer.stop`` or replace the model."""

    def interrupted(self, trainer):
        """Training stops mid-epoch (preemption): ``trainer.batch`` batches are done."""


def autocast(device, enabled):
    """bf16 autocast on CUDA when enabled; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(x, device, channels_last=False):
    if isinstance(x, dict):
        return {k: to_device(v, device, channels_last) for k, v in x.items()}
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class Step:
    """How one batch is run: device, precision, batch preparation, data parallelism."""

    device: torch.device
    amp: bool = False
    channels_last: bool = False
    augment: Optional[Callable] = None  # (x, idx on the host, epoch) -> x, training batches
    parallel: Optional[object] = None   # ddmpi.parallel.data_parallel.DataParallel
    hooks: tuple = ()
    compile: bool = False               # torch.compile the network of the training steps

    def inputs(self, x, idx=None, epoch=None):
        x = to_device(x, self.device, self.channels_last)
        if self.augment is not None and epoch is not None:
            x = self.augment(x, idx, epoch)
        for hook in self.hooks:
            x = hook.prepare(x)
        return x


def train_one_epoch(trainer, net, source, order, batch_size, step, poll_stop):
    """Train over ``order`` from ``trainer.batch`` on; return (loss sum, correct, seen)."""
    trainer.model.train()
    sums = trainer.partial or {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    # continue the interrupted epoch's float32 sum itself: a resumed epoch adds its losses in
    # the same order and precision as an uninterrupted one (bit-identical train_loss)
    loss_sum = torch.tensor(sums["loss"], dtype=torch.float32, device=step.device)
    correct = torch.tensor(sums["correct"], device=step.device, dtype=torch.int64)
    seen, start = sums["seen"], trainer.batch
    for b, (x, y, idx) in enumerate(source.batches(order[start * batch_size:], batch_size),
                                    start=start):
        x = step.inputs(x, idx, trainer.epoch)
        y = y.to(step.device, non_blocking=True)
        with autocast(step.device, step.amp):
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step.parallel is not None:
            step.parallel.after_backward(trainer.model)
        trainer.optimizer.step()
        loss_sum.add_(loss.detach(), alpha=len(y))
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if poll_stop():
            trainer.batch = b + 1
            trainer.partial = _add(sums, loss_sum, correct, seen)
            return None
    trainer.batch = 0
    return _add(sums, loss_sum, correct, seen)


def _add(sums, loss_sum, correct, seen):
    """The epoch's running totals (``loss_sum``, ``correct`` and ``seen`` include ``sums``)."""
    return {"loss": float(loss_sum), "correct": int(correct), "seen": seen,
            "seconds": sums["seconds"]}


@torch.no_grad()
def predict_proba(model, source, step, batch_size=512, indices=None):
    """Softmax probabilities (n, K) float32 on the host of ``model`` on ``indices``."""
    model.eval()
    indices = torch.arange(len(source)) if indices is None else indices
    out = []
    for x, _, _ in source.batches(indices, batch_size):
        with autocast(step.device, step.amp):
            logits = model(step.inputs(x))
        out.append(torch.softmax(logits.float(), dim=1))
    return torch.cat(out).cpu() if out else torch.zeros(0, 0)  # one copy to the host


def evaluate(model, source, step, batch_size=512):
    """(mean cross-entropy, accuracy) on all of ``source``; sharded over data-parallel replicas."""
    indices = torch.arange(len(source))
    if step.parallel is not None:
        indices = indices[step.parallel.rank::step.parallel.size]
    probs = predict_proba(model, source, step, batch_size, indices)
    labels = source.labels[indices]
    nll = float(-torch.log(probs[torch.arange(len(labels)), labels].clamp_min(1e-12)).sum()) \
        if len(labels) else 0.0
    right = int((probs.argmax(1) == labels).sum()) if len(labels) else 0
    n = len(labels)
    if step.parallel is not None:
        nll, right, n = step.parallel.sum([nll, right, n])
    return nll / max(n, 1), right / max(n, 1)


def fit(trainer, train, val, step, *, batch_size, seed, should_stop=lambda: False, vote=None):
    """Train ``trainer`` to ``trainer.epochs`` (or a hook's stop); leave the best state loaded.

    Raises :class:`Preempted` when ``should_stop()`` turns true (on any rank of ``vote``, a
    :class:`~ddmpi.parallel.group.StopVote`; by default the data-parallel replicas'), after
    the hooks' ``interrupted`` (which checkpoints).
    """
    parallel, hooks = step.parallel, step.hooks
    if vote is None and parallel is not None:
        vote = parallel.stop_vote()
    poll = (lambda: vote.poll(should_stop())) if vote else should_stop
    net = _network(trainer.model, step)
    while trainer.epoch < trainer.epochs and not trainer.stop:
        t0 = time.perf_counter()
        order = train.epoch_order(seed, trainer.epoch)
        if parallel is not None:
            order = parallel.shard(order)
        local_bs = parallel.local_batch_size(batch_size) if parallel else batch_size
        model_before = trainer.model
        sums = train_one_epoch(trainer, net, train, order, local_bs, step, poll)
        if sums is None:
            trainer.partial["seconds"] += time.perf_counter() - t0
            for hook in hooks:
                hook.interrupted(trainer)
            raise Preempted(f"{trainer.name}: stopped at epoch {trainer.epoch + 1}, "
                            f"batch {trainer.batch}")
        record = _finish_epoch(trainer, val, step, sums, t0)
        _check_finite(trainer.name, record)
        for hook in hooks:
            hook.epoch_end(trainer, record)  # the checkpoint hook saves the finished epoch
        if trainer.model is not model_before:
            net = _network(trainer.model, step)
        if (vote.finish(should_stop()) if vote else should_stop()) and not trainer.stop \
                and trainer.epoch < trainer.epochs:
            raise Preempted(f"{trainer.name}: stopped after epoch {trainer.epoch}")
    if trainer.best["state"] is not None:
        trainer.model.load_state_dict(trainer.best["state"])
    return trainer


def _network(model, step):
    """What the training steps call: the model, wrapped for data parallelism, compiled."""
    if step.channels_last:
        model.to(memory_format=torch.channels_last)
    net = step.parallel.wrap(model) if step.parallel is not None else model
    return torch.compile(net) if step.compile else net


def _check_finite(name, record):
    """Stop before a diverged epoch is checkpointed or chosen."""
    for kind, loss in (("training", record.train_loss), ("validation", record.val_loss)):
        if not math.isfinite(loss):
            raise Diverged(f"{name}: {kind} loss is {loss} in epoch {record.epoch} (learning "
                           f"rate too high, or NaN/inf in the data?)")


def _finish_epoch(trainer, val, step, sums, t0):
    if step.parallel is not None:
        step.parallel.epoch_end(trainer.model)
        sums["loss"], sums["correct"], sums["seen"] = step.parallel.sum(
            [sums["loss"], sums["correct"], sums["seen"]])
    lr = trainer.optimizer.param_groups[0]["lr"]
    trainer.scheduler.step()
    val_loss, val_acc = evaluate(trainer.model, val, step)
    trainer.epoch += 1
    trainer.partial = None
    record = EpochRecord(trainer.epoch, sums["loss"] / max(sums["seen"], 1),
                         sums["correct"] / max(sums["seen"], 1), val_loss, val_acc, lr,
                         sums["seconds"] + time.perf_counter() - t0)
    trainer.history.append(record)
    record.resolution = trainer.resolution
    if trainer.resolution == "full":
        trainer.consider(record)
    return record
