"""The decomposed CNN-DNN: local CNNs trained independently per subdomain, gather, coarse model.

Each rank trains the CNNs of its subdomains (data-parallel with its replicas under hybrid
parallelism), writes their checkpoints and decisions, and the decision holders gather them to
rank 0, which trains the coarse model and evaluates every combiner on the test split.
"""

import numpy as np

from ddmpi.coarse.dnn import COMBINERS, combine, train_coarse
from ddmpi.data.schema import read_labels
from ddmpi.parallel.data_parallel import DataParallel
from ddmpi.parallel.layout import check_layout, make_layout
from ddmpi.parallel.progress import Progress
from ddmpi.report.stats import classification_metrics
from ddmpi.strategies import local
from ddmpi.strategies.base import RunResult, Strategy
from ddmpi.strategies.rundir import coarse_path, decisions_path
from ddmpi.training import preemption
from ddmpi.training.checkpoint import save_checkpoint


class CNNDNN(Strategy):
    name = "cnn_dnn"

    @classmethod
    def check_fit(cls, config, info, ranks):
        """The decomposition fits the images and the ranks fit its subdomains."""
        decomposition = super().check_fit(config, info, ranks)
        check_layout(ranks, decomposition.num_subdomains)
        return decomposition

    def train(self):
        ctx = self.ctx
        self.decomposition = ctx.decomposition()
        self.layout = make_layout(ctx.world, self.decomposition.num_subdomains)
        replicas = self.layout.replicas
        parallel = DataParallel(replicas) if replicas.size > 1 else None
        ctx.log.info(f"{self.decomposition}; rank {ctx.world.rank} owns subdomains "
                     f"{self.layout.owned}")
        cfg = ctx.config
        epochs = self.decomposition.num_subdomains * cfg.local.epochs
        if cfg.coarse.train_on == "crossfit":
            epochs += self.decomposition.num_subdomains * cfg.coarse.folds * fold_epochs(cfg)
        progress = Progress(ctx.world, epochs, printer=ctx.log.info)
        self.summaries = {}
        for sub in self.layout.owned:
            self.summaries[sub] = local.train_subdomain(ctx, self.decomposition, sub, parallel,
                                                        progress, self.layout.writes)
        skipped = sum(s["epochs_skipped"] for s in self.summaries.values())
        progress.rank_done(skipped if self.layout.writes else 0)
        progress.wait_all()

    def evaluate(self):
        ctx, layout = self.ctx, self.layout
        ctx.preemption_point()
        with ctx.timer("gather"):
            gathered = {}
            if layout.owners.active:
                for split in coarse_splits(ctx.config):
                    local_part = {s: load_decisions(ctx.run_dir, s)[split] for s in layout.owned}
                    gathered[split] = layout.owners.gather_decisions(
                        local_part, layout.num_subdomains, ctx.config.run.gather_chunk_mb << 20)
            parts = ctx.world.gather(self.summaries if layout.writes else {})
        if ctx.world.rank != 0:
            return None
        with ctx.timer("coarse"):
            result = self._combine(gathered, {s: v for p in parts for s, v in p.items()})
        if preemption.requested():
            ctx.log.warning("stop signal received after the local CNNs were done: the run "
                            "finished (the coarse phase is short and not checkpointed)")
        return result

    def _combine(self, gathered, summaries):
        ctx, cfg = self.ctx, self.ctx.config
        # "oof" is not a split of the file: its decisions are of the train split's samples
        splits = dict.fromkeys("train" if split == "oof" else split for split in gathered)
        labels = {split: read_labels(ctx.info.path, split) for split in splits}
        x, y, honest = coarse_training_data(cfg.coarse.train_on, gathered, labels)
        fit = train_coarse(x, y, cfg.coarse, seed=cfg.run.seed, device=ctx.device,
                           honest=honest)
        save_checkpoint(coarse_path(ctx.run_dir), {
            "model": fit.model.state_dict(), "model_config": fit.model.config,
            "chosen": fit.chosen, "holdout": fit.holdout, "train_on": cfg.coarse.train_on})
        test = gathered["test"]
        probs = {n: combine(n, fit.model, test, ctx.device) for n in COMBINERS}
        probs["chosen"] = probs[fit.chosen]
        results = {n: classification_metrics(p, labels["test"], ctx.info.classes)
                   for n, p in probs.items()}
        kind = "held-out" if fit.holdout["honest"] else "training"
        ctx.log.info(f"coarse model: best epoch {fit.best_epoch}; holdout of "
                     f"{len(fit.holdout['indices'])} {kind} decisions, accuracy "
                     + ", ".join(f"{n} {fit.holdout[n]['accuracy']:.4f}" for n in COMBINERS)
                     + f"; combiner used: {fit.chosen}")
        params = sum(s["parameters"] for s in summaries.values())
        return RunResult(
            strategy=self.name, combiners=results,
            test_correct={n: p.argmax(1) == labels["test"] for n, p in probs.items()},
            parameters=params + sum(p.numel() for p in fit.model.parameters()),
            flops_per_sample=sum(s["flops_per_sample"] for s in summaries.values()),
            history={f"subdomain {s}": v["history"] for s, v in sorted(summaries.items())},
            extra={"chosen": fit.chosen, "coarse": {"train_on": cfg.coarse.train_on,
                                                    "best_epoch": fit.best_epoch,
                                                    "holdout": holdout_evidence(fit.holdout),
                                                    "history": fit.history},
                   "local": {str(s): {k: v for k, v in info.items() if k != "history"}
                             for s, info in sorted(summaries.items())},
                   "local_test_accuracy": {s: v["accuracy"]["test"]
                                           for s, v in summaries.items()},
                   "local_parameters": params})


def fold_epochs(cfg):
    return cfg.coarse.fold_epochs or cfg.local.epochs


def coarse_splits(config):
    """The splits whose decisions rank 0 needs: the coarse model's training data and test."""
    train_on = config.coarse.train_on
    needed = {"crossfit": ("oof", "val"), "train+val": ("train", "val")}.get(
        train_on, (train_on,))
    return [*dict.fromkeys([*needed, "test"])]


def coarse_training_data(train_on, gathered, labels):
    """Decisions (S, N, K), labels and the mask of decisions the local CNNs did not train on
    (validation and out-of-fold: honest estimates of test-time behaviour)."""
    parts = {"crossfit": (("oof", "train", True), ("val", "val", True)),
             "train+val": (("train", "train", False), ("val", "val", True)),
             "train": (("train", "train", False),), "val": (("val", "val", True),)}[train_on]
    return (np.concatenate([gathered[d] for d, _, _ in parts], axis=1),
            np.concatenate([labels[split] for _, split, _ in parts]),
            np.concatenate([np.full(len(labels[split]), ok) for _, split, ok in parts]))


def load_decisions(run_dir, sub):
    with np.load(decisions_path(run_dir, sub)) as data:
        return {split: data[split] for split in data.files}


def holdout_evidence(holdout):
    """The holdout's scores and size, without its indices."""
    return {"size": len(holdout["indices"]),
            **{k: v for k, v in holdout.items() if k != "indices"}}
