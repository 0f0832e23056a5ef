"""The comparison of ``ddmpi compare`` as data: every row's figures over the seeds, costs,
matched targets, the CNN-DNN's holdout, paired tests and validation curves (rank 0, from the
finished runs' :class:`~ddmpi.strategies.base.RunResult`)."""

import json
from pathlib import Path

import numpy as np

from ddmpi.coarse.dnn import COMBINERS
from ddmpi.report import comparison as table
from ddmpi.report.stats import mean_std, paired_bootstrap, sign_flip_test

# The rows compared with the CNN-DNN in paired tests, when present.
PAIRED = ("global_ddp[compute]", "global_ddp[parameters]", "average_probabilities")


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
    unfair = not_held_out(config, lines)
    fair = {name: line for name, line in lines.items() if name not in unfair}
    target = config.compare.target_accuracy or lowest_best(fair)
    for row in rows.values():
        line = fair.get(row["run"])
        row["time_to_target"] = None if line is None else time_to(line, target)
    return {"ranks": ranks, "dataset": config.data.path, "seeds": config.compare.seeds,
            "decomposition": {"grid": list(config.decomposition.grid),
                              "overlap": config.decomposition.overlap},
            "epochs": config.local.epochs, "rows": rows, "target_accuracy": target,
            "rss_scope": rss_scope(runs), "matched": matched(runs, budget),
            "coarse": coarse_holdout(config, runs),
            "paired": paired_tests(correct), "curves": lines,
            "validation_not_held_out": unfair}


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
                          "per_seed": (mine.mean(1) - theirs.mean(1)).tolist(),
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


def not_held_out(config, lines):
    """The curves whose validation accuracy is not held out: the coherent transfer's, when
    the coarse DNN it starts from trained on validation decisions (``coarse.train_on`` other
    than ``train``). They get no time to target and do not set the default target."""
    return [name for name in lines
            if name == "coherent_transfer" and config.coarse.train_on != "train"]


def lowest_best(lines):
    """The default target: the lowest best validation accuracy, so every curve reaches it;
    None for fewer than two curves (a curve's own best says nothing about the others)."""
    bests = [max(p["val_accuracy"] for p in line) for line in lines.values() if line]
    return min(bests) if len(bests) >= 2 else None


def time_to(line, target):
    """Training seconds until the first epoch whose validation accuracy reaches ``target``."""
    return next((p["elapsed"] for p in line if target is not None
                 and p["val_accuracy"] >= target), None)
