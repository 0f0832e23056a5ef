"""The comparison of strategies for people: fixed-width table, Markdown, one PNG."""

from ddmpi.report.output import _pyplot, _save

LABELS = {
    "global_ddp[compute]": "global CNN, compute-matched (DDP)",
    "global_ddp[parameters]": "global CNN, parameter-matched (DDP)",
    "chosen": "CNN-DNN (combiner chosen on holdout)",
    "cnn_dnn": "CNN-DNN, coarse model",
    "average_probabilities": "averaged probabilities",
    "majority_vote": "majority vote",
    "coherent": "coherent CNN-DNN",
    "coherent_transfer": "coherent CNN-DNN, transfer",
}
COLUMNS = ("strategy", "test acc", "balanced acc", "ROC AUC", "wall (s)",
           "time / compute-matched", "time to target (s)", "parameters", "train MFLOP/sample",
           "peak RSS (MiB)")
LEGEND = (
    "Compute-matched: the global CNN's width gives the same training FLOPs per sample (forward "
    "+ backward, torch.utils.flop_counter) as all local CNNs together; parameter-matched: the "
    "same parameter count. Wall time: barrier to barrier, data reading, training, evaluation "
    "and outputs included, after an untimed warm-up on every rank (training split read once, "
    "one forward and backward pass), so the first run does not carry the process's start-up "
    "costs. The coherent CNN-DNN by transfer starts from a finished CNN-DNN run (the same "
    "seed's, or compare.transfer_from): its wall time and time to target include that run's "
    "wall time. Time to target is '-' for the CNN-DNN rows: the CNN-DNN's accuracy exists only "
    "after the coarse stage, so it has no validation curve over training time. The CNN-DNN row "
    "uses the combiner chosen on a holdout part of the coarse model's training decisions, "
    "never on the test split. Paired tests take the test image as the unit: per image, the "
    "CNN-DNN's correctness minus the baseline's, averaged over the seeds; the bootstrap "
    "resamples images (all seeds of an image together) and the p-value is the exact two-sided "
    "sign-flip permutation test of these per-image differences (with one seed, the exact "
    "McNemar test).")


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
    seeds = "1 seed" if c["seeds"] == 1 else f"{c['seeds']} seeds, mean +- std over the seeds"
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
    return "\n".join(lines + [""] + paired_lines(c))


def paired_lines(c):
    out = []
    for other, t in c["paired"].items():
        b, seeds = t["bootstrap"], "1 seed" if t["seeds"] == 1 else f"{t['seeds']} seeds"
        out.append(f"CNN-DNN vs {LABELS.get(other, other)}: accuracy difference "
                   f"{100 * b['diff']:+.2f} points (95 % bootstrap interval over images "
                   f"{100 * b['low']:+.2f} .. {100 * b['high']:+.2f}), sign-flip test p = "
                   f"{t['sign_flip_p']:.3g} ({t['images']} test images x {seeds})")
    return out


def format_markdown(c):
    lines = ["# ddmpi compare", "", title(c), "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join([" --- "] + [" ---: "] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in c["rows"].values()]
    lines += [""] + [f"- {line}" for line in paired_lines(c)]
    lines += ["", LEGEND, ""]
    return "\n".join(lines)


def plot_comparison(path, c):
    """Test accuracy (mean, spread over seeds), wall time, validation accuracy over time."""
    plt = _pyplot()
    rows = list(c["rows"].values())
    fig, (ax_acc, ax_time, ax_curve) = plt.subplots(1, 3, figsize=(18, 5))
    labels = [r["label"] for r in rows]
    for ax, key, scale, name in ((ax_acc, "accuracy", 100, "test accuracy (%)"),
                                 (ax_time, "wall_seconds", 1, "wall time (s)")):
        means = [scale * r[key]["mean"] for r in rows]
        ax.bar(labels, means, yerr=[scale * r[key]["std"] for r in rows], capsize=3,
               color=[f"C{i}" for i in range(len(rows))])
        for i, r in enumerate(rows):
            ax.scatter([i] * len(r[key]["values"]), [scale * v for v in r[key]["values"]],
                       color="k", s=8, zorder=3)
        ax.set(ylabel=name, title=f"{name}, {c['seeds']} seed(s)")
        ax.tick_params(axis="x", rotation=35)
        for tick in ax.get_xticklabels():
            tick.set_ha("right")
    accs = [100 * v for r in rows for v in r["accuracy"]["values"]]
    ax_acc.set_ylim(max(0, min(accs) - 3), min(100.5, max(accs) + 1))
    for name, points in c["curves"].items():
        ax_curve.plot([p["elapsed"] for p in points], [100 * p["val_accuracy"] for p in points],
                      marker=".", label=name)
    ax_curve.set(xlabel="seconds of training (first seed)", ylabel="validation accuracy (%)",
                 title="validation accuracy over time")
    if 0 < len(c["curves"]) <= 12:
        ax_curve.legend(fontsize="x-small")
    _save(fig, path)
    plt.close(fig)
