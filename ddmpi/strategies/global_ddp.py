"""The global baseline: one CNN on the full images, data-parallel with torch DDP over all ranks.

Its width is explicit, or matched to the CNN-DNN (:func:`cnn_dnn_budget`): "compute" (same
training FLOPs per sample as all local CNNs together) or "parameters" (same parameter count as
the whole CNN-DNN, local CNNs and coarse DNN).
"""

import contextlib

import torch

from ddmpi.coarse.dnn import coarse_model
from ddmpi.models.cnn import build_cnn, count_parameters
from ddmpi.models.flops import matched_width, matched_width_by_parameters, training_flops
from ddmpi.parallel.data_parallel import ddp_over
from ddmpi.report.stats import classification_metrics
from ddmpi.strategies.base import RunResult, Strategy
from ddmpi.strategies.local import build_kwargs, open_sources, train_cnn
from ddmpi.strategies.rundir import global_path
from ddmpi.training.loop import predict_proba


def local_budget(config, info, decomposition):
    """(training FLOPs per sample, parameters) of all local CNNs of the decomposition."""
    flops = params = 0
    for sub in range(decomposition.num_subdomains):
        kwargs = build_kwargs(config, info, decomposition.subdomain_shape(sub))
        model = build_cnn(**kwargs)
        params += count_parameters(model)
        flops += training_flops(model, kwargs["input_shape"], kwargs["in_channels"])
    return flops, params


def cnn_dnn_budget(config, info, decomposition):
    """What each width rule matches, from the config before any training: ``{rule: {"target",
    "local_cnns", "coarse_dnn", "coarse_included"}}``. "parameters": the local CNNs' and the
    coarse DNN's (built as the CNN-DNN builds it). "compute": training FLOPs per sample of the
    local CNNs; the coarse DNN's are left out (it trains on decisions, not images, for its own
    number of epochs), reported as ``coarse_dnn``."""
    flops, params = local_budget(config, info, decomposition)
    s, k = decomposition.num_subdomains, info.num_classes
    with torch.random.fork_rng(devices=[]):
        coarse = coarse_model(s, k, config.coarse)
    coarse_params = count_parameters(coarse)
    return {"compute": {"target": flops, "local_cnns": flops, "coarse_included": False,
                        "coarse_dnn": training_flops(coarse, (), s * k)},
            "parameters": {"target": params + coarse_params, "local_cnns": params,
                           "coarse_dnn": coarse_params, "coarse_included": True}}


def global_width(config, info, decomposition, rule, budget=None):
    """Width of the global CNN for ``rule``: an int, "compute" or "parameters"; ``budget``:
    :func:`cnn_dnn_budget`, if already computed."""
    if isinstance(rule, int):
        return rule
    target = (budget or cnn_dnn_budget(config, info, decomposition))[rule]["target"]

    def build(width):
        return build_cnn(**build_kwargs(config, info, info.spatial_shape, width))
    if rule == "compute":
        return matched_width(build, target)
    return matched_width_by_parameters(build, target)


class GlobalDDP(Strategy):
    """``width_rule``: the class attribute set by :func:`global_strategy`."""

    name = "global_ddp"
    width_rule = "parameters"
    width = None  # the rule's width when the caller resolved it beforehand

    def train(self):
        ctx, info = self.ctx, self.ctx.info
        width = self.width or global_width(ctx.config, info, ctx.decomposition(),
                                           self.width_rule)
        self.kwargs = build_kwargs(ctx.config, info, info.spatial_shape, width)
        box = tuple(slice(0, n) for n in info.spatial_shape)
        self.sources, augment = open_sources(ctx, box)
        ctx.log.info(f"global CNN width {width} ({self.width_rule}) on "
                     f"{'x'.join(map(str, info.spatial_shape))}, DDP over {ctx.world.size} ranks")
        with contextlib.ExitStack() as stack:
            with ctx.timer("ddp_setup"):  # the process group; torch wraps the model in fit
                parallel = stack.enter_context(ddp_over(ctx.world, ctx.device))
            with ctx.timer("global_training"):
                self.trainer, self.step = train_cnn(
                    ctx, self.kwargs, self.sources["train"], self.sources["val"], augment,
                    seed=ctx.config.run.seed, path=global_path(ctx.run_dir),
                    epochs=ctx.config.local.epochs, parallel=parallel,
                    writes=ctx.world.rank == 0)

    def evaluate(self):
        ctx, test = self.ctx, self.sources["test"]
        share = ctx.world.row_share(len(test))
        mine = predict_proba(self.trainer.model, test, self.step,
                             indices=torch.arange(share.start, share.stop)).numpy()
        probs = ctx.world.gatherv_rows(mine)
        if ctx.world.rank != 0:
            return None
        labels = test.labels.cpu().numpy()
        model = self.trainer.model
        return RunResult(
            strategy=self.name,
            combiners={self.name: classification_metrics(probs, labels, ctx.info.classes)},
            test_correct={self.name: probs.argmax(1) == labels},
            parameters=count_parameters(model),
            flops_per_sample=training_flops(model, self.kwargs["input_shape"],
                                            self.kwargs["in_channels"]),
            history={"global": [vars(rec) for rec in self.trainer.history]},
            extra={"width": self.kwargs["width"], "width_rule": self.width_rule,
                   "best_epoch": self.trainer.best["epoch"], "model": model.config})


def global_strategy(rule, width=None):
    """The :class:`GlobalDDP` strategy with width ``rule`` ("compute", "parameters" or int);
    ``width``: that rule's width, if already resolved."""
    return type(f"GlobalDDP_{rule}", (GlobalDDP,), {"width_rule": rule, "width": width})

