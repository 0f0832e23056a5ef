"""The coherent CNN-DNN trained end to end, from scratch or from a finished CNN-DNN (transfer).

Local CNNs stay on the ranks that own their subdomains; with more ranks than subdomains the
first S ranks train and the others wait.
"""

from pathlib import Path

import torch

from ddmpi.coarse.dnn import CoarseNet, build_coarse
from ddmpi.config import load_config
from ddmpi.data.schema import SPLITS
from ddmpi.models.cnn import build_cnn, count_parameters
from ddmpi.models.coherent import CoherentCNNDNN
from ddmpi.models.flops import training_flops
from ddmpi.parallel.layout import assign_subdomains
from ddmpi.report.stats import classification_metrics
from ddmpi.strategies.base import RunResult, Strategy
from ddmpi.strategies.local import build_kwargs, open_sources
from ddmpi.strategies.rundir import coarse_path, local_path
from ddmpi.training import hooks, preemption
from ddmpi.training.checkpoint import load_checkpoint, save_checkpoint
from ddmpi.training.loop import Trainer, fit, predict_proba
from ddmpi.training.optim import make_optimizer, make_scheduler


class TransferError(ValueError):
    """The run to transfer from is missing, unfinished or of another decomposition."""


class Joint:
    """The sources of this rank's subdomains as one: batches of ``{subdomain: x}``."""

    def __init__(self, sources):
        self.sources = sources
        self.first = next(iter(sources.values()))
        self.labels = self.first.labels

    def __len__(self):
        return len(self.first)

    def epoch_order(self, seed, epoch):
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return torch.randperm(len(self), generator=gen)

    def batches(self, order, batch_size):
        streams = {s: src.batches(order, batch_size) for s, src in self.sources.items()}
        for parts in zip(*streams.values()):
            yield dict(zip(streams, (x for x, _, _ in parts))), parts[0][1], parts[0][2]


def load_transfer(run_dir, owned, decomposition):
    """Trained local CNNs of ``owned`` and the coarse model of a finished ``ddmpi train`` run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise TransferError(f"{run_dir}: no config.yaml; not a finished 'ddmpi train' run")
    theirs = load_config(run_dir / "config.yaml").decomposition
    if (list(theirs.grid), theirs.overlap) != (list(decomposition.grid),
                                               decomposition.overlap[0]):
        raise TransferError(f"{run_dir}: trained on grid {theirs.grid} overlap "
                            f"{theirs.overlap}, not {list(decomposition.grid)} overlap "
                            f"{decomposition.overlap[0]}")
    local = {}
    for s in owned:
        state = load_checkpoint(local_path(run_dir, s))
        if state is None or "best_model" not in state:
            raise TransferError(f"{local_path(run_dir, s)}: missing or unfinished local "
                                f"checkpoint")
        local[s] = build_cnn(**state["model_config"])
        local[s].load_state_dict(state["best_model"])
    state = load_checkpoint(coarse_path(run_dir))
    if state is None:
        raise TransferError(f"{coarse_path(run_dir)}: missing coarse checkpoint")
    coarse = build_coarse(state["model_config"])
    coarse.load_state_dict(state["model"])
    return local, coarse


class Coherent(Strategy):
    name = "coherent"
    transfer = False

    def train(self):
        ctx, cfg = self.ctx, self.ctx.config
        decomposition = ctx.decomposition()
        s_total = decomposition.num_subdomains
        self.group = ctx.world.split(0 if ctx.world.rank < s_total else None)
        if not self.group.active:
            ctx.log.info(f"{self.name}: idle (more ranks than subdomains)")
            return
        owned = assign_subdomains(s_total, self.group.size)[self.group.rank]
        local, coarse = self._models(decomposition, owned)
        self.sources, self.augments = {}, {}
        for s in owned:
            self.sources[s], self.augments[s] = open_sources(ctx, decomposition.slices(s),
                                                             share=len(owned))
        self.joint = {split: Joint({s: self.sources[s][split] for s in owned})
                      for split in SPLITS}
        model = CoherentCNNDNN(local, coarse, self.group, s_total,
                               seed=cfg.run.seed).to(ctx.device)
        self.trainer = self._trainer(model)
        self.local_cost = [sum(count_parameters(m) for m in local.values()),
                           sum(training_flops(m, m.config["input_shape"], m.config["in_channels"])
                               for m in local.values())]
        step = ctx.step(augment=self._augment(), hooks=(
            hooks.Report(lambda r: ctx.log.info(f"{self.name} epoch {r.epoch}: val acc "
                                                f"{r.val_accuracy:.4f} ({r.seconds:.1f}s)")),))
        self.step = step
        fit(self.trainer, self.joint["train"], self.joint["val"], step,
            batch_size=cfg.local.batch_size, seed=cfg.run.seed,
            should_stop=preemption.requested, vote=self.group.stop_vote())

    def _models(self, decomposition, owned):
        ctx, cfg = self.ctx, self.ctx.config
        if self.transfer:
            source = cfg.compare.transfer_from or str(Path(ctx.run_dir).parent / "cnn_dnn")
            return load_transfer(source, owned, decomposition)
        local = {}
        for s in owned:
            torch.manual_seed(cfg.run.seed + s)
            local[s] = build_cnn(**build_kwargs(cfg, ctx.info, decomposition.subdomain_shape(s)))
        torch.manual_seed(cfg.run.seed + decomposition.num_subdomains)
        c = cfg.coarse
        coarse = CoarseNet(decomposition.num_subdomains, ctx.info.num_classes, c.hidden,
                           c.dropout, c.inputs, c.skip)
        return local, coarse

    def _trainer(self, model):
        cfg = self.ctx.config
        cmp = cfg.compare
        lr = cmp.coherent_lr or cfg.local.optimizer.lr
        local_lr = lr * cmp.transfer_lr_factor if self.transfer else lr
        coarse_lr = lr * (cmp.transfer_coarse_lr_factor or cmp.transfer_lr_factor) \
            if self.transfer else lr
        optimizer = make_optimizer([{"params": model.local.parameters(), "lr": local_lr},
                                    {"params": model.coarse.parameters(), "lr": coarse_lr}],
                                   cfg.local.optimizer)
        epochs = cfg.local.epochs if cmp.coherent_epochs is None else cmp.coherent_epochs
        return Trainer(model, optimizer, make_scheduler(optimizer, cfg.local.scheduler, epochs),
                       epochs, name="coherent CNN-DNN")

    def _augment(self):
        if all(a is None for a in self.augments.values()):
            return None
        return lambda x, idx, epoch: {s: self.augments[s](v, idx, epoch) for s, v in x.items()}

    def evaluate(self):
        ctx = self.ctx
        probs, cost = None, [0, 0]
        if self.group.active:
            probs = predict_proba(self.trainer.model, self.joint["test"], self.step).numpy()
            cost = self.group.sum(self.local_cost).tolist()
            self._save()
        cost = ctx.world.bcast(cost)
        if ctx.world.rank != 0:
            return None
        model = self.trainer.model
        coarse = sum(p.numel() for p in model.coarse.parameters())
        labels = self.joint["test"].labels.cpu().numpy()
        return RunResult(
            strategy=self.name,
            combiners={self.name: classification_metrics(probs, labels, ctx.info.classes)},
            test_correct={self.name: probs.argmax(1) == labels},
            parameters=int(cost[0]) + coarse, flops_per_sample=cost[1],
            history={self.name: [vars(r) for r in self.trainer.history]},
            extra={"best_epoch": self.trainer.best["epoch"], "ranks_used": self.group.size,
                   "transfer": self.transfer})


    def _save(self):
        """Checkpoints in the CNN-DNN's layout, so ``ddmpi predict`` reads them."""
        model, run_dir = self.trainer.model, self.ctx.run_dir
        for s, cnn in zip(model.owned, model.local.values()):
            save_checkpoint(local_path(run_dir, s), {"best_model": cnn.state_dict(),
                                                     "model_config": cnn.config})
        if self.group.rank == 0:
            save_checkpoint(coarse_path(run_dir), {
                "model": model.coarse.state_dict(), "model_config": model.coarse.config,
                "chosen": "cnn_dnn", "train_on": "coherent"})


class CoherentTransfer(Coherent):
    name = "coherent_transfer"
    transfer = True

