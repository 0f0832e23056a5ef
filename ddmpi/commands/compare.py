"""``ddmpi compare``: parallel training strategies side by side, one data set, one MPI job.

    mpirun -n P ddmpi compare --config run.yaml [--set KEY=VALUE ...] [--run-dir DIR]
                              [--strategies global_ddp,cnn_dnn,coherent,coherent_transfer]

Strategies (``compare.strategies``, run in this order, each on all P ranks):

* ``global_ddp``: the global CNN on full images, data-parallel with torch DDP
  (:mod:`ddmpi.strategies.global_ddp`; width rule there);
* ``cnn_dnn``: the decomposed CNN-DNN of ``ddmpi train`` (:func:`ddmpi.strategies.cnn_dnn.run_train`;
  hybrid data-parallel groups when P is a multiple of S > P); its majority vote and averaged
  probabilities come with it and are listed with its wall time;
* ``coherent``: the coherent CNN-DNN trained end to end from scratch
  (:mod:`ddmpi.strategies.coherent`);
* ``coherent_transfer``: the coherent CNN-DNN initialised from the CNN-DNN just trained (or
  ``compare.transfer_from``), then trained end to end. Its "incl. pretraining" time adds the
  CNN-DNN's wall time when it starts from this job's CNN-DNN.

All strategies use the same data, ``local.epochs`` (the coherent ones ``compare.coherent_epochs``
if set), ``local.batch_size``, optimizer and seed, keep the state with the best validation
accuracy and are evaluated on the test split. Wall time of a strategy: from a barrier before it
to a barrier after it (the whole job waits for its slowest rank), including reading the data,
evaluation and writing its outputs.

Time to target: the validation accuracy after every epoch is recorded with its time since the
strategy started (global CNN and coherent runs; the CNN-DNN has a global model only at its
end). The target is ``compare.target_accuracy``, by default the lowest best validation accuracy
of those strategies, so that each reaches it; the time is that of the first epoch reaching it.
A transfer run whose source CNN-DNN trained its coarse DNN on the validation split (the default
``coarse.train_on: val``) has no held-out validation curve: it is plotted dotted and gets no
time to target.

Run directory::

    RUN_DIR/config.yaml
    RUN_DIR/<strategy>/...     each strategy's own run directory (metrics.json, checkpoints, ...)
    RUN_DIR/comparison.json    the table's rows, per-epoch curves, target, configuration
    RUN_DIR/comparison.md      the table (Markdown) and how it was made
    RUN_DIR/comparison.png     test accuracy, wall time, validation accuracy over time
"""

import copy
import json
import time
from pathlib import Path

from ddmpi.data.atomic import write_text
from ddmpi.config import COMPARE_STRATEGIES, dump, load_config, to_dict
from ddmpi.strategies.context import collective_check
from ddmpi.strategies.rundir import check_writable

LABELS = {
    "global_ddp": "global CNN (DDP)",
    "cnn_dnn": "CNN-DNN",
    "majority_vote": "majority vote",
    "average_probabilities": "averaged probabilities",
    "coherent": "coherent CNN-DNN",
    "coherent_transfer": "coherent CNN-DNN, transfer",
}
CURVES = ("global_ddp", "coherent", "coherent_transfer")


def _sub_config(config, run_dir):
    sub = copy.deepcopy(config)
    sub.run.dir = str(run_dir)
    return sub


def run_strategy(name, config, comm, run_dir):
    """Run one strategy in ``run_dir``; return ``(metrics on rank 0 / None, wall seconds)``."""
    from ddmpi.strategies.global_ddp import run_baseline
    from ddmpi.strategies.coherent import run_coherent
    from ddmpi.strategies.cnn_dnn import run_train

    sub = _sub_config(config, run_dir / name)
    comm.Barrier()
    start = time.perf_counter()
    if name == "global_ddp":
        metrics = run_baseline(sub, comm)
    elif name == "cnn_dnn":
        metrics = run_train(sub, comm)
    elif name == "coherent":
        metrics = run_coherent(sub, comm)
    elif name == "coherent_transfer":
        source = config.compare.transfer_from or str(run_dir / "cnn_dnn")
        metrics = run_coherent(sub, comm, transfer_from=source)
    else:
        raise ValueError(f"unknown strategy {name!r}")
    comm.Barrier()
    return metrics, time.perf_counter() - start


def run_compare(config, comm):
    """Run ``config.compare.strategies`` one after the other on the ranks of ``comm`` and write
    the comparison. Returns the comparison dict on rank 0, None elsewhere."""
    run_dir = Path(config.run.dir)
    collective_check(comm, check_writable, run_dir)
    if comm.rank == 0:
        write_text(run_dir / "config.yaml", dump(config))
    order = [s for s in COMPARE_STRATEGIES if s in config.compare.strategies]
    done = {}
    for name in order:
        if comm.rank == 0:
            print(f"=== ddmpi compare: {name} ({LABELS[name]}) on {comm.size} ranks", flush=True)
        metrics, wall = run_strategy(name, config, comm, run_dir)
        done[name] = (metrics, wall)
        if comm.rank == 0:
            print(f"=== ddmpi compare: {name}: test accuracy "
                  f"{100 * _test_accuracy(name, metrics):.2f} %, wall {wall:.1f} s", flush=True)
    if comm.rank != 0:
        return None
    comparison = build_comparison(config, comm.size, done)
    table = format_table(comparison)
    print("\n" + table, flush=True)
    report_json = json.dumps(comparison, indent=2, default=_jsonable) + "\n"
    write_text(run_dir / "comparison.json", report_json)
    write_text(run_dir / "comparison.md", format_markdown(comparison))
    plot_comparison(run_dir / "comparison.png", comparison)
    print(f"comparison: {run_dir / 'comparison.md'}, {run_dir / 'comparison.json'}, "
          f"{run_dir / 'comparison.png'}", flush=True)
    return comparison


def _jsonable(value):
    from ddmpi.report.output import _jsonable as convert

    return convert(value)


def _test_accuracy(name, metrics):
    if name == "cnn_dnn":
        return metrics["global"]["cnn_dnn"]["test_accuracy"]
    return metrics["test_accuracy"]


def _parameters(name, metrics):
    p = metrics["parameters"]
    if name == "global_ddp":
        return p
    if name == "cnn_dnn":
        return p["local_total"] + p["coarse"]
    return p["total"]


def time_to_target(curve, target, offset=0.0):
    """Seconds until the first epoch whose validation accuracy reaches ``target`` (None: never)."""
    for entry in curve:
        if entry["val_accuracy"] >= target:
            return offset + entry["elapsed"]
    return None


def slowest_phases(metrics):
    """Wall time of every phase on the slowest rank, from a run's ``timings_seconds``."""
    phases = {}
    for timings in metrics.get("timings_seconds", {}).values():
        for phase, seconds in timings.items():
            phases[phase] = max(phases.get(phase, 0.0), seconds)
    return phases


def build_comparison(config, ranks, done):
    """Rows of the table, curves and target from ``{strategy: (metrics, wall seconds)}``."""
    cnn_wall = done["cnn_dnn"][1] if "cnn_dnn" in done else None
    pretrain = (cnn_wall if "coherent_transfer" in done and not config.compare.transfer_from
                else None)
    curves = {}
    for name in CURVES:
        if name in done:
            offset = (pretrain or 0.0) if name == "coherent_transfer" else 0.0
            held_out = not done[name][0].get("selection", "").startswith("last epoch")
            curves[name] = {"offset_seconds": offset, "held_out": held_out, "points": [
                {"epoch": e["epoch"], "elapsed": e["elapsed"] + offset,
                 "val_accuracy": e["val_accuracy"]} for e in done[name][0]["history"]]}
    target = config.compare.target_accuracy
    target_rule = "compare.target_accuracy"
    if target is None and curves:
        bests = [max((p["val_accuracy"] for p in c["points"]), default=0.0)
                 for c in curves.values() if c["points"] and c["held_out"]]
        target = min(bests) if bests else None
        target_rule = "lowest best validation accuracy of the strategies with curves"

    rows = []
    for name, (metrics, wall) in done.items():
        names = [name]
        if name == "cnn_dnn":
            names += ["average_probabilities", "majority_vote"]
        for shown in names:
            acc = (metrics["global"][shown]["test_accuracy"] if name == "cnn_dnn"
                   else metrics["test_accuracy"])
            extra = pretrain if name == "coherent_transfer" else None
            total = wall + (extra or 0.0)
            if name == "cnn_dnn":
                epochs = config.local.epochs
                best = sorted({v.get("best_epoch") for v in metrics["local"].values()})
                best = best[0] if len(best) == 1 else best
            else:
                epochs, best = metrics["epochs"], metrics["best_epoch"]
            params = _parameters(name, metrics)
            if shown != "cnn_dnn" and name == "cnn_dnn":
                params = metrics["parameters"]["local_total"]
            ttt = None
            if name in curves and curves[name]["held_out"] and target is not None:
                ttt = time_to_target(done[name][0]["history"], target,
                                     curves[name]["offset_seconds"])
            rows.append({"strategy": shown, "label": LABELS[shown], "run": name,
                         "test_accuracy": acc, "wall_seconds": wall,
                         "pretraining_seconds": extra, "total_seconds": total,
                         "parameters": params, "epochs": epochs, "best_epoch": best,
                         "time_to_target_seconds": ttt,
                         "ranks_used": metrics.get("ranks_used", ranks),
                         "phases_seconds": slowest_phases(metrics),
                         "per_class_accuracy": metrics["global"][shown]["per_class_accuracy"]})
    base = next((r["total_seconds"] for r in rows if r["strategy"] == "global_ddp"), None)
    for row in rows:
        row["time_vs_global"] = row["total_seconds"] / base if base else None
    extra = {}
    if "global_ddp" in done:
        m = done["global_ddp"][0]["model"]
        extra["global_model"] = {k: m[k] for k in ("family", "depth", "width", "input_shape")}
    return {
        "ranks": ranks,
        "dataset": config.data.path,
        "decomposition": {"grid": list(config.decomposition.grid),
                          "overlap": config.decomposition.overlap},
        "local_model": to_dict(config)["local"]["model"],
        **extra,
        "epochs": config.local.epochs,
        "coherent_epochs": (config.compare.coherent_epochs
                            if config.compare.coherent_epochs is not None
                            else config.local.epochs),
        "target_accuracy": target,
        "target_rule": target_rule,
        "rows": rows,
        "curves": curves,
        "cnn_dnn_wall_seconds": cnn_wall,
        "config": to_dict(config),
    }


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


COLUMNS = ("strategy", "test acc", "wall (s)", "incl. pretrain (s)", "time / global",
           "parameters", "best epoch / epochs", "time to target (s)")


def _cells(row):
    best = row["best_epoch"]
    best = ",".join(map(str, best)) if isinstance(best, list) else str(best)
    return [row["label"], f"{100 * row['test_accuracy']:.2f} %", f"{row['wall_seconds']:.1f}",
            _fmt(row["total_seconds"] if row["pretraining_seconds"] is not None else None,
                 ".1f"),
            _fmt(row["time_vs_global"], ".2f"), str(row["parameters"]), f"{best} / {row['epochs']}",
            _fmt(row["time_to_target_seconds"], ".1f")]


def _title(c):
    target = (f"{100 * c['target_accuracy']:.2f} % validation accuracy"
              if c["target_accuracy"] is not None else "none")
    glob = c.get("global_model")
    glob = (f"; global CNN {glob['family']} depth {glob['depth']} width {glob['width']} on "
            f"{'x'.join(map(str, glob['input_shape']))}" if glob else "")
    local = c["local_model"]
    return (f"{c['dataset']}, {c['ranks']} ranks, grid {c['decomposition']['grid']} overlap "
            f"{c['decomposition']['overlap']}; local CNNs {local['family']} depth "
            f"{local['depth']} width {local['width']}{glob}; {c['epochs']} epochs "
            f"(coherent {c['coherent_epochs']}); target {target} ({c['target_rule']})")


def format_table(comparison):
    """The fixed-width table printed by ``ddmpi compare``."""
    rows = [_cells(r) for r in comparison["rows"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(COLUMNS)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(COLUMNS, widths)))
    out = [_title(comparison), line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def format_markdown(comparison):
    """``comparison.md``: the table as Markdown with the set-up above it."""
    lines = ["# ddmpi compare", "", _title(comparison), "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join([" --- "] + [" ---: "] * (len(COLUMNS) - 1)) + "|"]
    for row in comparison["rows"]:
        lines.append("| " + " | ".join(_cells(row)) + " |")
    lines += ["", "Slowest rank per phase (s):", ""]
    seen = set()
    for row in comparison["rows"]:
        if row["run"] in seen:
            continue
        seen.add(row["run"])
        phases = ", ".join(f"{k} {v:.1f}" for k, v in row["phases_seconds"].items())
        lines.append(f"- {LABELS[row['run']]}: {phases}")
    lines += ["", "Wall time: barrier to barrier over all ranks, data reading, training, "
              "evaluation and outputs included. Majority vote and averaged probabilities come "
              "with the CNN-DNN run (its wall time). 'incl. pretrain' adds the CNN-DNN run the "
              "transfer started from; 'time / global' divides that total by the global CNN's. "
              "Time to target: first epoch whose validation accuracy reaches the target, from "
              "the start of the strategy (plus pretraining).", ""]
    return "\n".join(lines)


def plot_comparison(path, comparison):
    """Test accuracy and wall time per strategy, validation accuracy over time."""
    from ddmpi.report.output import _pyplot, _save

    plt = _pyplot()
    rows = comparison["rows"]
    fig, (ax_acc, ax_time, ax_curve) = plt.subplots(1, 3, figsize=(17, 4.8))
    labels = [r["label"] for r in rows]
    colors = [f"C{i}" for i in range(len(rows))]
    accs = [100 * r["test_accuracy"] for r in rows]
    bars = ax_acc.bar(labels, accs, color=colors)
    ax_acc.bar_label(bars, fmt="%.2f", fontsize="small")
    ax_acc.set(ylabel="test accuracy (%)", ylim=(max(0, min(accs) - 3), 100.5),
               title="test accuracy")
    own = [r["wall_seconds"] for r in rows]
    pre = [r["pretraining_seconds"] or 0.0 for r in rows]
    ax_time.bar(labels, pre, color="lightgray", hatch="//", label="CNN-DNN pretraining")
    bars = ax_time.bar(labels, own, bottom=pre, color=colors)
    ax_time.bar_label(bars, labels=[f"{o + p:.0f}" for o, p in zip(own, pre)], fontsize="small")
    ax_time.set(ylabel="wall time (s)", title=f"wall time, {comparison['ranks']} ranks")
    if any(pre):
        ax_time.legend(fontsize="small")
    for ax in (ax_acc, ax_time):
        ax.tick_params(axis="x", rotation=35)
        for tick in ax.get_xticklabels():
            tick.set_ha("right")
        ax.grid(axis="y", alpha=0.3)
    color_of = {r["strategy"]: c for r, c in zip(rows, colors)}
    for name, curve in comparison["curves"].items():
        pts = curve["points"]
        held_out = curve.get("held_out", True)
        ax_curve.plot([p["elapsed"] for p in pts], [100 * p["val_accuracy"] for p in pts],
                      marker=".", color=color_of.get(name), linestyle="-" if held_out else ":",
                      label=LABELS[name] + ("" if held_out else " (validation not held out)"))
    if comparison.get("cnn_dnn_wall_seconds"):
        ax_curve.axvline(comparison["cnn_dnn_wall_seconds"], color=color_of.get("cnn_dnn"),
                         linestyle=":", label="CNN-DNN finished")
    if comparison["target_accuracy"] is not None:
        ax_curve.axhline(100 * comparison["target_accuracy"], color="gray", linestyle="--",
                         label=f"target {100 * comparison['target_accuracy']:.2f} %")
    lows = [100 * p["val_accuracy"] for c in comparison["curves"].values() for p in c["points"]]
    if lows:
        ax_curve.set_ylim(max(0, min(lows) - 2), min(100.5, max(lows) + 2))
    ax_curve.set(xlabel="seconds since the strategy started (transfer: + CNN-DNN run)",
                 ylabel="validation accuracy (%)",
                 title="validation accuracy over time")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize="small")
    _save(fig, path)
    plt.close(fig)


def main(args, comm):
    """Entry of ``ddmpi compare`` (arguments parsed by :mod:`ddmpi.cli`)."""
    overrides = list(args.set or [])
    if args.run_dir:
        overrides.append(f"run.dir={args.run_dir}")
    if args.strategies:
        names = [s.strip() for s in args.strategies.split(",") if s.strip()]
        overrides.append(f"compare.strategies=[{', '.join(names)}]")
    run_compare(load_config(args.config, overrides), comm)


__all__ = ["run_compare", "build_comparison", "format_table", "plot_comparison", "main"]
