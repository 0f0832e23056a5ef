"""The comparison of strategies for people: fixed-width table, Markdown, one PNG."""

from ddmpi.report.output import _pyplot, _save

LABELS = {
    "global_ddp[compute]": "global CNN, compute-matched (DDP)",
    "global_ddp[parameters]": "global CNN, parameter-matched (DDP)",
    "chosen": "CNN-DNN (combiner chosen on holdout)",
    "cnn_dnn": "CNN-DNN, coarse model",
    "average_log_probabilities": "averaged log-probabilities (coarse model untrained)",
    "average_probabilities": "averaged probabilities",
    "majority_vote": "majority vote",
    "coherent": "coherent CNN-DNN",
    "coherent_transfer": "coherent CNN-DNN, transfer",
}
COLUMNS = ("strategy", "test acc", "balanced acc", "ROC AUC", "wall (s)",
           "time / compute-matched", "time to target (s)", "parameters", "train MFLOP/sample",
           "peak RSS (MiB)")
# the run names of the per-seed wall lines (a CNN-DNN run gives several rows)
RUN_LABELS = {**LABELS, "cnn_dnn": "CNN-DNN"}
MATCHED = {"compute": "compute-matched", "parameters": "parameter-matched"}
# where the CNN-DNN's holdout is drawn from, per coarse.train_on (ddmpi/coarse/dnn.py)
HOLDOUT = {
    "train+val": "of the validation decisions only (coarse.train_on: train+val; the local CNNs "
                 "did not train on them, the coarse DNN trains on the training decisions and "
                 "the other validation decisions)",
    "val": "of the validation decisions (coarse.train_on: val; the coarse DNN trains on the "
           "others)",
    "crossfit": "of the out-of-fold training decisions and the validation decisions "
                "(coarse.train_on: crossfit; no decision comes from a CNN that trained on its "
                "image)",
    "train": "of the training decisions (coarse.train_on: train; the local CNNs trained on "
             "these images, so their decisions are over-confident)",
}
TIMES = (
    "Wall time: barrier to barrier, data reading, training and evaluation included, the run's "
    "report (metrics.json, history, plots) not, after an untimed warm-up on every rank "
    "(training split read once, one forward and backward pass), so the first run does not "
    "carry the process's start-up costs. Time / compute-matched: the ratio of the mean wall "
    "times over the seeds; the wall time of every seed and its ratio to the compute-matched "
    "global CNN's of the same seed are listed above the legend. The coherent CNN-DNN by "
    "transfer starts from a finished CNN-DNN run (the same seed's, or compare.transfer_from): "
    "its wall time and time to target include that run's wall time.")
TARGET = (
    "Time to target: the first seed's training seconds until its validation accuracy first "
    "reaches the target (compare.target_accuracy; by default the lowest of the curves' best "
    "validation accuracies, so that every curve reaches it; no default with fewer than two "
    "curves, where the target would be a curve's own best). '-' for the CNN-DNN rows: the "
    "CNN-DNN's accuracy exists only after the coarse stage, so it has no validation curve over "
    "training time.")
NOT_HELD_OUT = (
    " {names}: no time to target and no say in the default target, since the coarse DNN it "
    "starts from trained on validation decisions (coarse.train_on other than train), so its "
    "validation accuracy is not held out (its test accuracy is).")
PAIRED_TESTS = (
    "Paired tests take the test image as the unit: per image, the CNN-DNN's correctness minus "
    "the baseline's, averaged over the seeds; the bootstrap resamples images (all seeds of an "
    "image together) and the p-value is the exact two-sided sign-flip permutation test of these "
    "per-image differences (with one seed, the exact McNemar test). Both hold the trained "
    "networks fixed and take only the test images as random: they say whether the difference "
    "holds on this test set for these networks, not whether it survives retraining; the "
    "per-seed differences show how much it moves between seeds.")
PEAK_RSS = {
    "run": "Peak RSS: the largest resident set of any rank in any seed, each run's own (the "
           "process's peak is reset at the start of every run).",
    "process": "Peak RSS: the largest resident set of any rank in any seed, as the process's "
               "high-water mark since start-up (its peak could not be reset per run here), so "
               "a row also carries the peaks of the runs before it.",
}


def _pm(stat, scale=100, unit=" %"):
    """'mean +- std', or the one value of a single seed."""
    if stat["n"] == 1:
        return f"{scale * stat['mean']:.2f}{unit}"
    return f"{scale * stat['mean']:.2f} +- {scale * stat['std']:.2f}{unit}"


def _cells(row):
    ratio = row["time_vs_compute_matched"]
    flops = row["flops_per_sample"]
    return [row["label"], _pm(row["accuracy"]), _pm(row["balanced_accuracy"]),
            f"{row['roc_auc']['mean']:.4f}", _pm(row["wall_seconds"], 1, ""),
            "-" if ratio is None else f"{ratio:.2f}",
            "-" if row.get("time_to_target") is None else f"{row['time_to_target']:.1f}",
            f"{row['parameters']:,}",
            "-" if flops is None else f"{flops / 1e6:.1f}", f"{row['peak_rss_mb']:.0f}"]


def title(c):
    target = c.get("target_accuracy")
    target = "-" if target is None else f"{100 * target:.2f} % validation accuracy"
    seeds = ("1 seed" if c["seeds"] == 1 else
             f"{c['seeds']} seeds, mean +- std over the seeds (sample std, ddof 1)")
    return (f"{c['dataset']}: {c['ranks']} ranks, grid {c['decomposition']['grid']} overlap "
            f"{c['decomposition']['overlap']}, {c['epochs']} epochs; accuracy on the test "
            f"split, {seeds}; target {target} (time to target: first seed's training seconds)")


def format_table(c):
    """The table printed by ``ddmpi compare``, with the paired tests below it."""
    rows = [_cells(r) for r in c["rows"].values()]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(COLUMNS)]
    lines = [title(c), "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                                 for i, (h, w) in enumerate(zip(COLUMNS, widths))),
             "  ".join("-" * w for w in widths)]
    for r in rows:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(lines + [""] + notes(c))


def notes(c):
    """The lines under the table: matched targets, per-seed wall times, runs started in an
    earlier job, paired tests."""
    return matched_lines(c) + wall_lines(c) + jobs_lines(c) + paired_lines(c)


def matched_lines(c):
    """Per matched global CNN: the CNN-DNN's cost it matches, its width, its cost, deviation."""
    out = []
    for m in c["matched"].values():
        if m["rule"] == "parameters":
            target = (f"{m['target']:,} parameters (local CNNs {m['local_cnns']:,} + coarse DNN "
                      f"{m['coarse_dnn']:,})")
            achieved = f"{m['achieved']:,}"
        else:
            target = (f"{m['target'] / 1e6:.3f} train MFLOP/sample (local CNNs; the coarse "
                      f"DNN's {m['coarse_dnn'] / 1e6:.3f} left out)")
            achieved = f"{m['achieved'] / 1e6:.3f}"
        out.append(f"{MATCHED[m['rule']]}: target {target}, width {m['width']} gives "
                   f"{achieved} ({100 * m['deviation']:+.2f} %)")
    return out


def wall_lines(c):
    """Per run: the wall time of every seed, and its ratio to the compute-matched global
    CNN's of the same seed."""
    firsts = {}
    for row in c["rows"].values():
        firsts.setdefault(row["run"], row)
    out = []
    for run, row in firsts.items():
        line = (f"wall per seed (s), {RUN_LABELS.get(run, run)}: "
                + ", ".join(f"{w:.2f}" for w in row["wall_seconds"]["values"]))
        ratios = row["time_vs_compute_matched_per_seed"]
        if ratios and run != "global_ddp[compute]":
            line += "; ratio to compute-matched " + ", ".join(f"{r:.2f}" for r in ratios)
        out.append(line)
    return out


def jobs_lines(c):
    """The runs this job did not run from the start (``ddmpi compare --resume``)."""
    earlier = [f"{RUN_LABELS.get(name, name)} seed {r['seed']} {r['status']}, "
               f"{r['segments']} segment{'s' if r['segments'] > 1 else ''}"
               for name, runs in c.get("runs", {}).items() for r in runs if r["status"] != "ran"]
    if not earlier:
        return []
    return ["runs started in an earlier job (a run's wall time is the sum of its segments, "
            "one per job it ran in): " + "; ".join(earlier)]


def paired_lines(c):
    out = []
    for other, t in c["paired"].items():
        b, seeds = t["bootstrap"], "1 seed" if t["seeds"] == 1 else f"{t['seeds']} seeds"
        per_seed = t.get("per_seed")
        by_seed = "" if not per_seed or len(per_seed) < 2 else (
            "; per seed " + ", ".join(f"{100 * d:+.2f}" for d in per_seed))
        out.append(f"CNN-DNN vs {LABELS.get(other, other)}: accuracy difference "
                   f"{100 * b['diff']:+.2f} points (95 % bootstrap interval over images "
                   f"{100 * b['low']:+.2f} .. {100 * b['high']:+.2f}), sign-flip test p = "
                   f"{t['sign_flip_p']:.3g} ({t['images']} test images x {seeds}){by_seed}")
    return out


def format_markdown(c):
    lines = ["# ddmpi compare", "", title(c), "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join([" --- "] + [" ---: "] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in c["rows"].values()]
    lines += [""] + [f"- {line}" for line in notes(c)]
    lines += ["", legend(c), ""]
    return "\n".join(lines)


def legend(c):
    """What the table's columns and rows are, for this comparison."""
    return " ".join(filter(None, (costs_sentence(c), TIMES, target_sentence(c),
                                  PEAK_RSS[c.get("rss_scope", "process")],
                                  holdout_sentence(c["coarse"]), PAIRED_TESTS)))


def target_sentence(c):
    """How time to target is measured, and which curves it leaves out."""
    names = c.get("validation_not_held_out")
    if not names:
        return TARGET
    listed = ", ".join(LABELS.get(n, n) for n in names)
    return TARGET + NOT_HELD_OUT.format(names=listed[0].upper() + listed[1:])


def costs_sentence(c):
    """What the cost columns count and what the matched global CNNs match."""
    compute = c["matched"].get("global_ddp[compute]")
    coarse = "" if compute is None else (
        f" ({compute['coarse_dnn'] / 1e6:.3f} MFLOP per sample and step, "
        f"{100 * compute['coarse_dnn'] / compute['local_cnns']:.2f} % of the local CNNs')")
    listed = " (targets, widths and deviations above the legend)" if c["matched"] else ""
    return (
        "Train MFLOP/sample: the training FLOPs of one step per sample (forward + backward, "
        "torch.utils.flop_counter); for the CNN-DNN rows those of all local CNNs together, the "
        f"coarse DNN's{coarse} left out (it trains on the local decisions, not on images, for "
        "its own number of epochs). It is the cost of one step: a run's total also scales with "
        "its epochs, so the coherent transfer's total adds the CNN-DNN run it starts from, and "
        "coarse.train_on: crossfit adds coarse.folds fold CNNs per subdomain, trained "
        "coarse.fold_epochs epochs each on part of the training split. Compute-matched: the "
        "global CNN's width whose training FLOPs per sample are closest to the local CNNs' "
        "together; parameter-matched: the width "
        "whose parameter count is closest to the whole CNN-DNN's, local CNNs and coarse DNN"
        f"{listed}.")


def holdout_sentence(h):
    """How the CNN-DNN row's combiner was chosen: on what holdout, by what rule."""
    if h is None:
        return ""
    pool = HOLDOUT[h["train_on"]] if h["honest"] or h["train_on"] == "train" else (
        f"of all the decisions it trains on (coarse.train_on: {h['train_on']}; fewer than "
        f"two of them held out from the local CNNs)")
    sizes = (f"{h['sizes'][0]} decisions" if len(set(h["sizes"])) == 1 else
             ", ".join(map(str, h["sizes"])) + " decisions per seed")
    share = f"a seeded, stratified {100 * h['fraction']:g} % ({sizes}) {pool}"
    if not h["fallback"]:
        return ("The CNN-DNN row is the coarse DNN (coarse.fallback: false); its early "
                f"stopping uses a holdout: {share}; never the test split.")
    return (f"The CNN-DNN row uses the combiner chosen on a holdout: {share}. The coarse DNN "
            "is used unless the better of averaged probabilities and majority vote is right "
            "significantly more often there (one-sided sign test, p < 0.05); the same holdout "
            "stops the coarse DNN's training early. The test split is never used for either.")


def plot_comparison(path, c):
    """Test accuracy (mean, spread over seeds), wall time, validation accuracy over time."""
    plt = _pyplot()
    rows = list(c["rows"].values())
    fig, (ax_acc, ax_time, ax_curve) = plt.subplots(1, 3, figsize=(18, 5))
    labels = [r["label"] for r in rows]
    for ax, key, scale, name in ((ax_acc, "accuracy", 100, "test accuracy (%)"),
                                 (ax_time, "wall_seconds", 1, "wall time (s)")):
        means = [scale * r[key]["mean"] for r in rows]
        spread = [scale * r[key]["std"] for r in rows]
        top = [s if key != "accuracy" else min(s, 100.0 - m) for m, s in zip(means, spread)]
        ax.bar(labels, means, yerr=[spread, top], capsize=3,
               color=[f"C{i}" for i in range(len(rows))])
        for i, r in enumerate(rows):
            ax.scatter([i] * len(r[key]["values"]), [scale * v for v in r[key]["values"]],
                       color="k", s=8, zorder=3)
        ax.set(ylabel=name, title=f"{name}: mean +- sample std, dots: {c['seeds']} seed(s)")
        ax.tick_params(axis="x", rotation=35)
        for tick in ax.get_xticklabels():
            tick.set_ha("right")
    accs = [100 * v for r in rows for v in r["accuracy"]["values"]]
    low = max(0, min(accs) - 3)
    ax_acc.set_ylim(low, min(100.5, max(accs) + 1))
    if low > 0:
        ax_acc.set_ylabel(f"test accuracy (%), axis from {low:.0f} %")
    for name, points in c["curves"].items():
        ax_curve.plot([p["elapsed"] for p in points], [100 * p["val_accuracy"] for p in points],
                      marker=".", label=name)
    ax_curve.set(xlabel="seconds of training (first seed)", ylabel="validation accuracy (%)",
                 title="validation accuracy over time")
    if 0 < len(c["curves"]) <= 12:
        ax_curve.legend(fontsize="x-small")
    _save(fig, path)
    plt.close(fig)
