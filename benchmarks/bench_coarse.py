"""Regime study of the combiners: where does the coarse DNN help, and what should it train on?

    nice -n 5 env OMP_NUM_THREADS=1 python benchmarks/bench_coarse.py            # all phases
    python benchmarks/bench_coarse.py --phase evaluate                           # tables only

For each data set (real MNIST, real CIFAR-10), labelled images per class (10, 50, 500), grid
(2x2, 4x4) and seed (0, 1, 2) the local CNNs are trained ONCE, in this process (1 rank, 1
thread), with ``coarse.train_on: crossfit``: the run writes decisions/local_XXX.npz with the
local CNNs' train, val and test decisions and the out-of-fold (oof) training decisions of
``coarse.folds`` fold CNNs per subdomain. Every combiner is then evaluated offline from those
saved decisions, with the shipped coarse defaults (skip path, holdout early stopping,
fallback):

    averaged         averaged probabilities of the local CNNs
    vote             majority vote
    coarse[T]        the coarse DNN trained on T (val | train+val | crossfit = oof + val)
    chosen[T]        the combiner that run would use (coarse DNN, or its holdout fallback)

Data: n labelled images per class are drawn per seed (stratified) from the real training
images, 80 % train / 20 % val per class (10/class: 8 + 2). The evaluation images are a FIXED
*selection set* per data set (1,000 images, 100 per class, never in any pool), stored as the
study files' ``test`` split. The study chooses ddmpi's coarse defaults on it, so it is drawn
from images that no headline data set holds: MNIST's from the official training file (the
headline MNIST sets come from t10k), CIFAR-10's from the 37,500 images outside the headline
CIFAR-10 10k set (``data_prep cifar --limit 12500 --seed 0``). Same local CNNs for every coarse
variant, so the columns of a row differ only in the combiner.

Phases: ``prepare`` (HDF5 subsets into data/coarse_select/), ``train`` (runs into
runs/bench_coarse_select/, a finished run is skipped, an unfinished one trained afresh),
``evaluate`` (tables, benchmarks/RESULTS-coarse.md).
"""

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddmpi.data.atomic import write_text  # noqa: E402 (after the path set-up)

SHARED = Path(os.environ.get("DDMPI_SHARED_DATA", ROOT.parent / "shared" / "data"))
# "_select": files and runs of the selection-set study; those of the first study (whose test
# set overlapped the headline data sets) live elsewhere and are never picked up.
DATA = ROOT / "data" / "coarse_select"
RUNS = ROOT / "runs" / "bench_coarse_select"
RESULTS = ROOT / "benchmarks" / "RESULTS-coarse.md"

SEEDS = (0, 1, 2)
PER_CLASS = (10, 50, 500)
SELECT_PER_CLASS = 100
VAL_FRACTION = 0.2
SELECT_SEED = 12345
HEADLINE_CIFAR = {"limit": 12500, "seed": 0}  # data_prep cifar options of data/cifar10k.h5

# local CNNs: small, few epochs; batch size shrinks with the data so that 10/class still
# takes some steps. Folds (crossfit) train for the same number of epochs.
MODELS = {"mnist": {"depth": 2, "width": 16}, "cifar10": {"depth": 3, "width": 16}}
EPOCHS = {10: 20, 50: 10, 500: 4}
BATCH = {10: 16, 50: 32, 500: 64}
FOLDS = 4
COARSE_VARIANTS = ("val", "train+val", "crossfit")
COLUMNS = ("averaged", "vote", *[f"{k}[{t}]" for t in COARSE_VARIANTS
                                 for k in ("coarse", "chosen")])
MARGIN = 0.5  # points: chosen CNN-DNN >= averaged probabilities - MARGIN (the criterion)


# ----------------------------------------------------------------------------- data sets

def load_mnist():
    """Pool and selection set from the official training images (headline sets use t10k)."""
    from data_prep.idx import read_idx
    src = SHARED / "mnist"
    x = read_idx(src / "train-images-idx3-ubyte.gz")[:, None]
    y = read_idx(src / "train-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y, [str(i) for i in range(10)], stratified(y, SELECT_PER_CLASS, SELECT_SEED)


def load_cifar():
    """The 50,000 training images; the selection set outside the headline CIFAR-10 10k set."""
    from data_prep.splits import subsample
    src = SHARED / "cifar10" / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        with open(src / f"data_batch_{i}", "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch["labels"], np.int64))
    with open(src / "batches.meta", "rb") as f:
        classes = pickle.load(f, encoding="latin1")["label_names"]
    x, y = np.concatenate(xs), np.concatenate(ys)
    outside = np.setdiff1d(np.arange(len(y)), subsample(y, **HEADLINE_CIFAR))
    return x, y, classes, outside[stratified(y[outside], SELECT_PER_CLASS, SELECT_SEED)]


def stratified(labels, per_class, seed):
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                   for c in np.unique(labels)]))


def data_path(ds, n, seed):
    return DATA / f"{ds}_{n}pc_s{seed}.h5"


def prepare(datasets, per_class):
    """One HDF5 file per (data set, images per class, seed): train/val from the pool, the
    selection set as the ``test`` split."""
    from ddmpi.data.schema import DatasetWriter
    DATA.mkdir(parents=True, exist_ok=True)
    for ds in datasets:
        if all(data_path(ds, n, s).exists() for n in per_class for s in SEEDS):
            continue
        x, y, classes, select_idx = load_mnist() if ds == "mnist" else load_cifar()
        pool = np.setdiff1d(np.arange(len(y)), select_idx)
        source = ("MNIST training file: selection set 100/class, pool the other 59,000"
                  if ds == "mnist" else "CIFAR-10 data_batch_1..5: selection set 100/class "
                  "outside the headline 12,500, pool the other 49,000")
        for n in per_class:
            n_val = max(1, round(VAL_FRACTION * n))
            for seed in SEEDS:
                rng = np.random.default_rng([seed, n])
                train_idx, val_idx = [], []
                for c in range(len(classes)):
                    pick = rng.permutation(pool[y[pool] == c])[:n]
                    val_idx.append(pick[:n_val])
                    train_idx.append(pick[n_val:])
                train_idx, val_idx = np.sort(np.concatenate(train_idx)), np.sort(
                    np.concatenate(val_idx))
                prov = {"source": source, "per_class": n, "val_per_class": n_val,
                        "seed": seed, "select_seed": SELECT_SEED,
                        "select_per_class": SELECT_PER_CLASS, "test_split": "selection set"}
                with DatasetWriter(data_path(ds, n, seed), name=f"{ds}-{n}pc-s{seed}",
                                   classes=classes, converter="benchmarks/bench_coarse.py",
                                   provenance=prov, dtype="uint8") as w:
                    w.write_split("train", x[train_idx], y[train_idx])
                    w.write_split("val", x[val_idx], y[val_idx])
                    w.write_split("test", x[select_idx], y[select_idx])
        names = [data_path(ds, n, s).name for n in per_class for s in SEEDS]
        print(f"prepared {ds}: {', '.join(names)}", flush=True)


# ----------------------------------------------------------------------------- training

def cells(datasets, per_class, grids):
    return [(ds, n, g, s) for ds in datasets for n in per_class for g in grids for s in SEEDS]


def run_dir(ds, n, grid, seed):
    return RUNS / f"{ds}_{n}pc_{grid[0]}x{grid[1]}_s{seed}"


def make_config(ds, n, grid, seed):
    from ddmpi.config import from_dict
    return from_dict({
        "data": {"path": str(data_path(ds, n, seed)), "in_memory": True},
        "decomposition": {"grid": list(grid), "overlap": 0},
        "local": {"model": {"family": "vgg", **MODELS[ds]}, "epochs": EPOCHS[n],
                  "batch_size": BATCH[n]},
        "coarse": {"train_on": "crossfit", "folds": FOLDS, "fold_epochs": EPOCHS[n]},
        "run": {"dir": str(run_dir(ds, n, grid, seed)), "seed": seed, "device": "cpu",
                "threads_per_rank": 1},
    })


# training order: cheap, informative rows first (a stopped study still has whole rows)
PRIORITY = [((2, 2), 10), ((2, 2), 50), ((4, 4), 10), ((2, 2), 500), ((4, 4), 50),
            ((4, 4), 500)]


def order(cell):
    ds, n, grid, seed = cell
    rank = PRIORITY.index((grid, n)) if (grid, n) in PRIORITY else len(PRIORITY)
    return rank, ds != "mnist", seed


def train(todo):
    import logging

    from ddmpi.parallel.group import Group
    from ddmpi.strategies.base import run
    from ddmpi.strategies.cnn_dnn import CNNDNN
    logging.getLogger().setLevel(logging.WARNING)
    world = Group.world()
    for ds, n, grid, seed in sorted(todo, key=order):
        rd = run_dir(ds, n, grid, seed)
        if (rd / "metrics.json").exists():
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        result = run(CNNDNN, make_config(ds, n, grid, seed), world, overwrite=True)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        if world.rank != 0:
            continue
        (rd / "bench_seconds.txt").write_text(f"{cpu:.1f} {secs:.1f}\n")
        acc = result.combiners["chosen"]["accuracy"]
        print(f"trained {rd.name}: {cpu:.0f} s CPU ({secs:.0f} s wall), chosen[crossfit] "
              f"{100 * acc:.2f} %", flush=True)


# ----------------------------------------------------------------------------- evaluation

def evaluate_cell(ds, n, grid, seed):
    """Selection-set accuracy (%) of every column, from the saved decisions of one run."""
    from ddmpi.coarse.dnn import combine, train_coarse
    from ddmpi.config import CoarseConfig
    from ddmpi.data.schema import read_labels
    from ddmpi.strategies.cnn_dnn import coarse_training_data

    rd = run_dir(ds, n, grid, seed)
    files = sorted((rd / "decisions").glob("local_*.npz"))
    gathered = {}
    for split in ("train", "val", "test", "oof"):
        gathered[split] = np.stack([np.load(f)[split] for f in files])
    path = data_path(ds, n, seed)
    labels = {split: read_labels(path, split) for split in ("train", "val", "test")}
    yt = labels["test"]

    def acc(p):
        return 100.0 * float((p.argmax(1) == yt).mean())

    out = {"averaged": acc(combine("average_probabilities", None, gathered["test"])),
           "vote": acc(combine("majority_vote", None, gathered["test"])), "picked": {}}
    for train_on in COARSE_VARIANTS:
        x, y, honest = coarse_training_data(train_on, gathered, labels)
        fit = train_coarse(x, y, CoarseConfig(), seed=seed, honest=honest)  # shipped defaults
        out[f"coarse[{train_on}]"] = acc(combine("cnn_dnn", fit.model, gathered["test"]))
        out[f"chosen[{train_on}]"] = acc(combine(fit.chosen, fit.model, gathered["test"]))
        out["picked"][train_on] = fit.chosen
    metrics = json.loads((rd / "metrics.json").read_text())
    out["run_chosen_crossfit"] = 100.0 * metrics["combiners"]["chosen"]["accuracy"]
    out["local_test_mean"] = 100.0 * float(np.mean(
        [(g.argmax(1) == yt).mean() for g in gathered["test"]]))
    secs = rd / "bench_seconds.txt"
    out["seconds"] = float(secs.read_text().split()[0]) if secs.exists() else float("nan")
    return out


def evaluate(datasets, per_class, grids):
    rows = {}
    for ds, n, grid, seed in cells(datasets, per_class, grids):
        if (run_dir(ds, n, grid, seed) / "metrics.json").exists():
            rows.setdefault((ds, n, grid), []).append(evaluate_cell(ds, n, grid, seed))
    return rows


def fmt(values):
    v = np.asarray(values, float)
    return f"{v.mean():6.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:4.2f}"


def tables(rows, datasets):
    lines = []
    for ds in datasets:
        keys = [k for k in rows if k[0] == ds]
        if not keys:
            continue
        lines += [f"### {ds}: selection-set accuracy (%), mean ± std over seeds "
                  f"(fixed selection set of {10 * SELECT_PER_CLASS} images)", ""]
        head = ["per class x grid", "seeds", "local CNN", *COLUMNS]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
        for key in sorted(keys, key=lambda k: (k[1], k[2])):
            r = rows[key]
            label = f"{key[1]} x {key[2][0]}x{key[2][1]}"
            cells_ = [label, str(len(r)), fmt([c["local_test_mean"] for c in r])]
            cells_ += [fmt([c[col] for c in r]) for col in COLUMNS]
            lines.append("| " + " | ".join(cells_) + " |")
        lines.append("")
    return "\n".join(lines)


def summary(rows, datasets):
    """Per-dataset criterion check and the pick counts; returns markdown lines."""
    lines = ["### Criterion: mean over seeds of chosen[T] - averaged (points), per row", ""]
    head = ["data set", "per class x grid", *[f"chosen[{t}] - avg" for t in COARSE_VARIANTS],
            *[f"coarse[{t}] - avg" for t in COARSE_VARIANTS]]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    worst = {t: {} for t in COARSE_VARIANTS}
    for key in sorted(rows, key=lambda k: (k[0], k[1], k[2])):
        ds, n, grid = key
        r = rows[key]
        avg = np.mean([c["averaged"] for c in r])
        d_ch = [np.mean([c[f"chosen[{t}]"] for c in r]) - avg for t in COARSE_VARIANTS]
        d_co = [np.mean([c[f"coarse[{t}]"] for c in r]) - avg for t in COARSE_VARIANTS]
        for t, d in zip(COARSE_VARIANTS, d_ch):
            worst[t][ds] = min(worst[t].get(ds, np.inf), d)
        lines.append("| " + " | ".join([ds, f"{n} x {grid[0]}x{grid[1]}",
                                        *[f"{d:+.2f}" for d in d_ch + d_co]]) + " |")
    lines += ["", "### Criterion per data set: worst row of chosen[T] - averaged "
              f"(pass: >= -{MARGIN})", ""]
    lines.append("| train_on | " + " | ".join(datasets) + " | passes everywhere |")
    lines.append("|---|" + "---:|" * len(datasets) + "---|")
    for t in COARSE_VARIANTS:
        ok = all(worst[t].get(ds, -np.inf) >= -MARGIN for ds in datasets)
        values = " | ".join(f"{worst[t].get(ds, float('nan')):+.2f}" for ds in datasets)
        lines.append(f"| {t} | {values} | {'yes' if ok else 'no'} |")
    lines += ["", "### Combiner the fallback picked (counts over seeds: cnn_dnn / averaged / vote)",
              ""]
    lines.append("| data set | per class x grid | " + " | ".join(COARSE_VARIANTS) + " |")
    lines.append("|---|---|" + "---|" * len(COARSE_VARIANTS))
    short = {"cnn_dnn": 0, "average_probabilities": 1, "majority_vote": 2}
    for key in sorted(rows, key=lambda k: (k[0], k[1], k[2])):
        counts = []
        for t in COARSE_VARIANTS:
            c = [0, 0, 0]
            for cell in rows[key]:
                c[short[cell["picked"][t]]] += 1
            counts.append("/".join(map(str, c)))
        lines.append(f"| {key[0]} | {key[1]} x {key[2][0]}x{key[2][1]} | "
                     + " | ".join(counts) + " |")
    return "\n".join(lines), worst


def consistency(rows):
    """The offline chosen[crossfit] must reproduce the runs' own chosen combiner."""
    bad = [(k, c["chosen[crossfit]"], c["run_chosen_crossfit"]) for k, r in rows.items()
           for c in r if abs(c["chosen[crossfit]"] - c["run_chosen_crossfit"]) > 1e-9]
    return bad


def verdict(rows, datasets):
    """The generated paragraph: which train_on passes the criterion, where the coarse DNN helps."""
    _, worst = summary(rows, datasets)
    passing = [t for t in COARSE_VARIANTS
               if all(worst[t].get(ds, -np.inf) >= -MARGIN for ds in datasets)]
    best = {t: np.mean([np.mean([c[f"chosen[{t}]"] for c in r]) for r in rows.values()])
            for t in COARSE_VARIANTS}
    helps, hurts = [], []
    for key in sorted(rows, key=lambda k: (k[0], k[1], k[2])):
        r = rows[key]
        avg = np.mean([c["averaged"] for c in r])
        for t in COARSE_VARIANTS:
            d = np.mean([c[f"chosen[{t}]"] for c in r]) - avg
            label = f"{key[0]} {key[1]}/class {key[2][0]}x{key[2][1]} [{t}] {d:+.1f}"
            if d >= 1.0:
                helps.append(label)
            elif d <= -MARGIN:
                hurts.append(label)
    lines = [f"Criterion (filed issue): chosen CNN-DNN >= averaged probabilities - {MARGIN} "
             "points, mean over the seeds, on every row of every data set. Variants that pass: "
             + (", ".join(passing) if passing else "none") + ". Mean of chosen[T] over all rows: "
             + ", ".join(f"{t} {v:.2f} %" for t, v in best.items()) + ".", "",
             "Rows where the chosen combiner beats averaging by >= 1 point: "
             + ("; ".join(helps) if helps else "none") + ".", "",
             f"Rows where it falls short of averaging by more than {MARGIN} points: "
             + ("; ".join(hurts) if hurts else "none") + "."]
    return "\n".join(lines)


def consistency_line(rows):
    import subprocess
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        head = ""
    bad = consistency(rows)
    total = sum(len(r) for r in rows.values())
    return (f"Coarse models evaluated with the ddmpi of commit {head or '?'} (working tree). "
            f"The offline chosen[crossfit] equals the runs' own `chosen` on "
            f"{total - len(bad)} of {total} cells"
            + (" (the rest: those runs used an older fallback rule, see Discussion)."
               if bad else "."))


def write_results(rows, args, text, summ):
    cmd = "nice -n 5 mpirun -n 2 --oversubscribe python benchmarks/bench_coarse.py --phase train"
    if args.skip:
        cmd += " --skip " + " ".join(args.skip)
    setup = f"""# Coarse-model regime study: combiners vs. images per class and subdomains

Generated by `benchmarks/bench_coarse.py` (issue: where does the coarse DNN help, and which
`coarse.train_on` should be the default).

```bash
. .venv/bin/activate && export OMP_NUM_THREADS=1
python benchmarks/bench_coarse.py --phase prepare          # HDF5 subsets into data/coarse_select/
{cmd}
python benchmarks/bench_coarse.py --phase evaluate --write # tables, this file
```

## Set-up

- Data: real MNIST and real CIFAR-10 (`../shared/data`). For n in
  {{{", ".join(map(str, PER_CLASS))}}} labelled images per class, n per class are drawn
  per seed (stratified) from the training images, {100 - int(100 * VAL_FRACTION)} % train /
  {int(100 * VAL_FRACTION)} % val per class (10/class: 8 + 2; 50: 40 + 10; 500: 400 + 100).
  Evaluation: a FIXED *selection set* of {10 * SELECT_PER_CLASS} images per data set
  ({SELECT_PER_CLASS} per class, disjoint from every pool), the study files' `test` split.
  ddmpi's coarse defaults are chosen on it, so it holds no image of a headline data set:
  MNIST's comes from the official training file (the headline MNIST sets are cut from t10k),
  CIFAR-10's from the 37,500 training images outside the headline CIFAR-10 10k set
  (`data_prep cifar --limit 12500 --seed 0`). The headline comparisons
  (RESULTS-compare.md, RESULTS-cifar.md) report on their own test splits, which played no
  part in these choices.
- Local CNNs: VGG, MNIST depth {MODELS["mnist"]["depth"]} width {MODELS["mnist"]["width"]},
  CIFAR-10 depth {MODELS["cifar10"]["depth"]} width {MODELS["cifar10"]["width"]}; Adam 1e-3,
  cosine schedule, best epoch on val; epochs {EPOCHS} and batch sizes {BATCH} by images per
  class; grids 2x2 and 4x4, no overlap, no augmentation. Each (data set, n, grid, seed 0/1/2) is
  trained ONCE with `coarse.train_on: crossfit`, folds {FOLDS}, fold_epochs = epochs (1 process
  per rank, 2 ranks, 1 thread each, CPU), writing train/val/test/oof decisions.
- Combiners, offline from those decisions (`ddmpi.coarse.dnn.train_coarse` with the shipped
  `CoarseConfig()` defaults: hidden [64], skip path, holdout 0.2, patience 20, fallback):
  averaged probabilities, majority vote, and the coarse DNN trained on val, train+val
  (the final local CNNs' own training decisions + val) and crossfit (out-of-fold training
  decisions + val). `coarse[T]` is the coarse model itself, `chosen[T]` what a run with
  `train_on: T` uses (the coarse model, or averaging / voting when they beat it on the
  holdout, by ddmpi's fallback rule). All columns of a row share the same local CNNs and
  selection-set decisions.
- {consistency_line(rows)}
- "local CNN": mean selection-set accuracy of a single subdomain's CNN.
"""
    skipped = ""
    if args.skip:
        skipped = ("\nLeft out to keep the study affordable (the rest takes about 25 min on "
                   "the 2-core machine, 2 ranks): " + ", ".join(args.skip) + ".\n")
    body = [setup, skipped, "## Results", "", text, summ, "", "## Verdict (generated)", "",
            verdict(rows, args.datasets), ""]
    write_text(RESULTS, "\n".join(body) + discussion())


def discussion():
    """The hand-written sections of the existing RESULTS-coarse.md ("## Discussion" on)."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    start = text.find("\n## Discussion")
    return text[start:] if start >= 0 else ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("all", "prepare", "train", "evaluate"), default="all")
    p.add_argument("--datasets", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--per-class", nargs="+", type=int, default=list(PER_CLASS))
    p.add_argument("--grids", nargs="+", default=["2x2", "4x4"])
    p.add_argument("--skip", nargs="*", default=[],
                   help="cells left out, as DATASET:PERCLASS:GRID (e.g. cifar10:500:4x4)")
    p.add_argument("--write", action="store_true", help="write benchmarks/RESULTS-coarse.md")
    args = p.parse_args(argv)
    grids = [tuple(int(v) for v in g.split("x")) for g in args.grids]
    skip = {tuple(s.split(":")) for s in args.skip}
    todo = [c for c in cells(args.datasets, args.per_class, grids)
            if (c[0], str(c[1]), f"{c[2][0]}x{c[2][1]}") not in skip]
    if args.phase in ("all", "prepare"):
        prepare(args.datasets, args.per_class)
    if args.phase in ("all", "train"):
        t0 = time.perf_counter()
        train(todo)
        if os.environ.get("OMPI_COMM_WORLD_RANK", "0") != "0":
            return
        print(f"training phase: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.phase in ("all", "evaluate"):
        t0 = time.perf_counter()
        rows = evaluate(args.datasets, args.per_class, grids)
        if not rows:
            sys.exit(f"bench_coarse: no finished run under {RUNS} for these data sets, "
                     f"images per class and grids; run --phase train first")
        text = tables(rows, args.datasets)
        summ, _ = summary(rows, args.datasets)
        print(text)
        print(summ)
        bad = consistency(rows)
        print(f"offline chosen[crossfit] reproduces the runs' chosen combiner: "
              f"{'yes' if not bad else f'NO ({bad})'}")
        times = {k: sum(c["seconds"] for c in r) for k, r in rows.items()}
        print("training seconds per row (sum over seeds): " + ", ".join(
            f"{k[0]} {k[1]}x{k[2][0]}x{k[2][1]} {v:.0f}" for k, v in sorted(times.items())))
        print(f"evaluation phase: {time.perf_counter() - t0:.0f} s")
        if args.write:
            write_results(rows, args, text, summ)
            print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
