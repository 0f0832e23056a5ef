"""``ddmpi compare``: every strategy on one data set, over several seeds, with fair baselines.

Runs go to ``RUN_DIR/seed<k>/<strategy>/``; the comparison (table, JSON, plot) to ``RUN_DIR``.
A stop signal (:mod:`ddmpi.training.preemption`) ends it with exit 75 naming the run it
stopped (or, when the run it arrived in could finish, that run and the runs left undone,
before the next run starts); ``compare`` does not resume (its wall times would mix two jobs):
run it again.
"""

import copy
import json
import time
from pathlib import Path

import numpy as np

from ddmpi.coarse.dnn import COMBINERS
from ddmpi.commands import exit_preempted
from ddmpi.config import ConfigError, dump, load_config
from ddmpi.data.atomic import write_text
from ddmpi.data.schema import open_h5, read_info
from ddmpi.models.cnn import build_cnn
from ddmpi.models.flops import training_flops
from ddmpi.parallel import cluster
from ddmpi.report import comparison as table
from ddmpi.report.stats import mean_std, paired_bootstrap, sign_flip_test
from ddmpi.strategies.base import decomposition_of, run
from ddmpi.strategies.cnn_dnn import CNNDNN
from ddmpi.strategies.coherent import Coherent, CoherentTransfer
from ddmpi.strategies.global_ddp import cnn_dnn_budget, global_strategy, global_width
from ddmpi.strategies.local import build_kwargs
from ddmpi.training import preemption
from ddmpi.training.loop import Preempted
from ddmpi.training.preemption import EXIT_PREEMPTED

# The rows compared with the CNN-DNN in paired tests, when present.
PAIRED = ("global_ddp[compute]", "global_ddp[parameters]", "average_probabilities")


def strategies(config, widths=None):
    """``(run name, strategy class)`` in the order they run; ``widths``: the global widths'
    rules resolved beforehand (:func:`resolve_widths`), else each run resolves its own."""
    out = []
    for name in config.compare.strategies:
        if name == "global_ddp":
            out += [(f"global_ddp[{w}]", global_strategy(w, (widths or {}).get(w)))
                    for w in config.compare.global_widths]
        else:
            out.append((name, {"cnn_dnn": CNNDNN, "coherent": Coherent,
                               "coherent_transfer": CoherentTransfer}[name]))
    return out


def check(config):
    """Refuse what the comparison cannot report fairly (errors name the config field)."""
    if config.local.rescaling.factor > 1:
        raise ConfigError("config field 'local.rescaling': ddmpi compare runs the strategies at "
                          "full resolution; compare rescaling with benchmarks/bench_rescaling.py")
    source = config.compare.transfer_from
    if ("coherent_transfer" in config.compare.strategies and source
            and not (Path(source) / "metrics.json").is_file()):
        raise ConfigError(f"config field 'compare.transfer_from': {source} has no metrics.json "
                          f"(the coherent transfer's wall time includes that run's)")


def warm_up(config, world):
    """Untimed, on every rank: pay the process's one-time costs before the first timed run.

    Reads the training split once (page cache), binds threads and device, and runs one
    forward and backward pass of the configured CNN under the FLOP counter every strategy
    uses (thread pools, first convolution kernels, the counter's own start-up).
    """
    start = time.perf_counter()
    info = read_info(config.data.path)
    if "train" in info.splits:  # else the first run names the missing split
        read_through(info.path, "train", config.data.memory_budget_gb * 2**30)
    device = cluster.bind_process(world, config.run.device, config.run.threads_per_rank).device
    model = build_cnn(**build_kwargs(config, info, info.spatial_shape)).to(device)
    training_flops(model, info.spatial_shape, info.channels)
    world.barrier()
    return time.perf_counter() - start


def resolve_widths(config):
    """``(budget, {rule: width})``: what the matched global CNNs match
    (:func:`~ddmpi.strategies.global_ddp.cnn_dnn_budget`) and their widths, found once and
    untimed (the "compute" rule FLOP-counts a dozen candidate networks, which is no part of
    training the baseline)."""
    if "global_ddp" not in config.compare.strategies:
        return None, {}
    info = read_info(config.data.path)
    decomposition = decomposition_of(config, info)
    budget = cnn_dnn_budget(config, info, decomposition)
    return budget, {w: global_width(config, info, decomposition, w, budget)
                    for w in config.compare.global_widths}


def read_through(path, split, budget_bytes, block_bytes=64 << 20):
    """Read a split's images once, block by block, keeping nothing (the page cache keeps them);
    not at all when they exceed ``budget_bytes`` (streamed data is read from disk by every run)."""
    with open_h5(path) as f:
        images = f[split]["images"]
        if images.size * images.dtype.itemsize > budget_bytes:
            return
        rows = max(1, block_bytes // (images.dtype.itemsize * int(np.prod(images.shape[1:]))))
        for i in range(0, len(images), rows):
            images[i:i + rows]


def run_compare(config, world):
    """Run every strategy for every seed; the comparison dict on rank 0, None elsewhere."""
    check(config)
    root = Path(config.run.dir)
    if world.rank == 0:
        write_text(root / "config.yaml", dump(config))
    seconds = warm_up(config, world)
    budget, widths = resolve_widths(config)
    if world.rank == 0:
        print(f"=== ddmpi compare: untimed warm-up, {seconds:.1f} s", flush=True)
    runs, plan = {}, schedule(config, widths)
    for i, (k, name, cls) in enumerate(plan):
        if i:
            stop_between_runs(world, config, plan[i - 1], plan[i:])
        sub = copy.deepcopy(config)
        sub.run.seed = config.run.seed + k
        sub.run.dir = str(root / f"seed{k}" / name)
        if world.rank == 0:
            print(f"=== ddmpi compare: {name}, seed {sub.run.seed}, {world.size} ranks",
                  flush=True)
        world.barrier()
        result = run_or_exit(cls, sub, world, name)
        world.barrier()
        runs.setdefault(name, []).append(result)
    if world.rank != 0:
        return None
    comparison = summarise(config, world.size, runs, budget)
    print("\n" + table.format_table(comparison), flush=True)
    write_text(root / "comparison.json", json.dumps(comparison, indent=2, default=float) + "\n")
    write_text(root / "comparison.md", table.format_markdown(comparison))
    table.plot_comparison(root / "comparison.png", comparison)
    print(f"comparison: {root / 'comparison.md'}, {root / 'comparison.json'}, "
          f"{root / 'comparison.png'}", flush=True)
    return comparison


def schedule(config, widths):
    """``(seed index, run name, strategy class)`` of every run, in the order they run."""
    return [(k, name, cls) for k in range(config.compare.seeds)
            for name, cls in strategies(config, widths)]


def stop_between_runs(world, config, done, left):
    """Collective: exit 75 before the next run if any rank received a stop signal (one that
    arrived while the run ``done`` was finishing, which lets it finish), naming that run and
    the runs ``left`` undone."""
    if not world.any(preemption.requested()):
        return
    seed = config.run.seed
    undone = ", ".join(f"{name} seed {seed + k}" for k, name, _ in left)
    exit_preempted(world.rank, f"ddmpi compare stopped by a signal after {done[1]}, seed "
                   f"{seed + done[0]} finished; not run: {undone}; compare does not resume: "
                   f"run it again (exit {EXIT_PREEMPTED})")


def run_or_exit(cls, config, world, name):
    """:func:`~ddmpi.strategies.base.run` one strategy; after a stop signal, exit 75 saying
    which run stopped and that the comparison must be run again."""
    try:
        return run(cls, config, world)
    except Preempted as stop:
        exit_preempted(world.rank, f"ddmpi compare stopped by a signal in {name}, seed "
                       f"{config.run.seed} ({stop}); compare does not resume: run it again "
                       f"(exit {EXIT_PREEMPTED})")


def rows_of(name, result):
    """``{row: (metrics, per-sample correctness)}`` of one run: a CNN-DNN run gives several."""
    if name != "cnn_dnn":
        key = next(iter(result.combiners))
        return {name: (result.combiners[key], result.test_correct[key])}
    return {n: (result.combiners[n], result.test_correct[n])
            for n in ("chosen", *COMBINERS) if n in result.combiners}


def summarise(config, ranks, runs, budget):
    """Mean +- std of every row over the seeds, costs, the matched widths' targets
    (``budget``: :func:`resolve_widths`'), the CNN-DNN's holdout, and the paired tests."""
    rows, correct = {}, {}
    prior = prior_seconds(config, runs)
    for name, results in runs.items():
        for row in rows_of(name, results[0]):
            per_seed = [rows_of(name, r)[row] for r in results]
            correct[row] = [c for _, c in per_seed]
            rows[row] = row_summary(row, name, results, [m for m, _ in per_seed], prior[name])
    time_ratios(rows)
    lines = curves(runs, prior)
    target = config.compare.target_accuracy or lowest_best(lines)
    for row in rows.values():
        line = lines.get(row["run"])
        row["time_to_target"] = None if line is None else time_to(line, target)
    return {"ranks": ranks, "dataset": config.data.path, "seeds": config.compare.seeds,
            "decomposition": {"grid": list(config.decomposition.grid),
                              "overlap": config.decomposition.overlap},
            "epochs": config.local.epochs, "rows": rows, "target_accuracy": target,
            "rss_scope": rss_scope(runs), "matched": matched(runs, budget),
            "coarse": coarse_holdout(config, runs),
            "paired": paired_tests(correct), "curves": lines}


def rss_scope(runs):
    """"run" when every rank of every run measured its own peak resident set, else "process"
    (some peak is the process's since start-up: :mod:`ddmpi.training.memory`)."""
    scopes = {m.get("rss_scope", "process") for results in runs.values() for r in results
              for m in r.peak_memory_mb.values()}
    return "run" if scopes == {"run"} else "process"


def time_ratios(rows):
    """Each row's wall time over the compute-matched global CNN's: the ratio of the means
    over the seeds, and per seed."""
    base = rows.get("global_ddp[compute]")
    for row in rows.values():
        walls, mean, per_seed = row["wall_seconds"], None, None
        if base:
            mean = walls["mean"] / base["wall_seconds"]["mean"]
            per_seed = [w / b for w, b in zip(walls["values"], base["wall_seconds"]["values"])]
        row["time_vs_compute_matched"], row["time_vs_compute_matched_per_seed"] = mean, per_seed


def matched(runs, budget):
    """Per matched global CNN that ran: its rule's target and the target's parts
    (``budget``), its width, the cost it has (first seed; every seed builds the same
    network) and the relative deviation from the target."""
    out = {}
    for rule, cost in (budget or {}).items():
        results = runs.get(f"global_ddp[{rule}]")
        if results:
            r = results[0]
            achieved = r.flops_per_sample if rule == "compute" else r.parameters
            out[f"global_ddp[{rule}]"] = {"rule": rule, **cost, "width": r.extra.get("width"),
                                          "achieved": achieved,
                                          "deviation": achieved / cost["target"] - 1.0}
    return out


def coarse_holdout(config, runs):
    """On what the CNN-DNN runs chose their combiner: ``coarse.train_on``, the holdout
    fraction, whether every holdout decision was one the local CNNs did not train on, the
    holdout sizes per seed, and whether a cheap combiner could be chosen (``coarse.fallback``)."""
    if "cnn_dnn" not in runs:
        return None
    holdouts = [r.extra["coarse"]["holdout"] for r in runs["cnn_dnn"]]
    return {"train_on": config.coarse.train_on, "fraction": config.coarse.holdout_fraction,
            "honest": all(h["honest"] for h in holdouts), "sizes": [h["size"] for h in holdouts],
            "fallback": config.coarse.fallback}


def prior_seconds(config, runs):
    """Per run name, per seed: the seconds of the run it starts from, timed elsewhere. The
    coherent transfer loads the CNN-DNN run of its seed (or compare.transfer_from's)."""
    out = {name: [0.0] * len(results) for name, results in runs.items()}
    if "coherent_transfer" not in runs:
        return out
    source = config.compare.transfer_from
    if source:
        seconds = json.loads((Path(source) / "metrics.json").read_text())["wall_seconds"]
        out["coherent_transfer"] = [seconds] * len(runs["coherent_transfer"])
    else:
        out["coherent_transfer"] = [r.wall_seconds for r in runs["cnn_dnn"]]
    return out


def row_summary(row, name, results, metrics, prior):
    return {"label": table.LABELS.get(row, row), "run": name,
            "accuracy": mean_std([m["accuracy"] for m in metrics]),
            "balanced_accuracy": mean_std([m["balanced_accuracy"] for m in metrics]),
            "roc_auc": mean_std([m["roc_auc"] for m in metrics]),
            "majority_class_rate": metrics[0]["majority_class_rate"],
            "wall_seconds": mean_std([r.wall_seconds + p for r, p in zip(results, prior)]),
            "parameters": results[0].parameters,
            "flops_per_sample": results[0].flops_per_sample,
            "peak_rss_mb": max(m["rss"] for r in results for m in r.peak_memory_mb.values()),
            "width": results[0].extra.get("width"),
            "chosen": [r.extra.get("chosen") for r in results] if row == "chosen" else None}


def paired_tests(correct):
    """CNN-DNN (the combiner it chose) against each baseline, the test image as the unit: an
    image's seeds count once (sign-flip test and bootstrap over images)."""
    if "chosen" not in correct:
        return {}
    mine = np.stack(correct["chosen"])
    out = {}
    for other in PAIRED:
        if other in correct:
            theirs = np.stack(correct[other])
            out[other] = {"sign_flip_p": sign_flip_test(mine, theirs),
                          "bootstrap": paired_bootstrap(mine, theirs),
                          "images": mine.shape[1], "seeds": len(mine)}
    return out


def curves(runs, prior):
    """Validation accuracy over cumulative training time (first seed) of the strategies that
    train one global model (the CNN-DNN's local CNNs have no global validation curve), after
    the ``prior`` seconds of the run each starts from."""
    out = {}
    for name, results in runs.items():
        if name != "cnn_dnn":
            history = next(iter(results[0].history.values()))
            elapsed = (prior[name][0] + np.cumsum([r["seconds"] for r in history])).tolist()
            out[name] = [{"elapsed": t, "val_accuracy": r["val_accuracy"]}
                         for t, r in zip(elapsed, history)]
    return out


def lowest_best(lines):
    """The default target: the lowest best validation accuracy, so every curve reaches it."""
    bests = [max(p["val_accuracy"] for p in line) for line in lines.values() if line]
    return min(bests) if bests else None


def time_to(line, target):
    """Training seconds until the first epoch whose validation accuracy reaches ``target``."""
    return next((p["elapsed"] for p in line if target is not None
                 and p["val_accuracy"] >= target), None)


def main(args, world):
    """Entry of ``ddmpi compare``."""
    overrides = list(args.set or [])
    if args.run_dir:
        overrides.append(f"run.dir={args.run_dir}")
    if args.strategies:
        names = [s.strip() for s in args.strategies.split(",") if s.strip()]
        overrides.append(f"compare.strategies=[{', '.join(names)}]")
    if args.seeds is not None:
        overrides.append(f"compare.seeds={args.seeds}")
    run_compare(load_config(args.config, overrides), world)
