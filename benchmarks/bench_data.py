"""Streaming sources and 8-bit storage, measured on real MNIST: accuracy, memory, bytes read.

    python benchmarks/bench_data.py                      # full MNIST 60k, 2 ranks, 2 epochs
    python benchmarks/bench_data.py --runs float32 --epochs 1 --budget-gb 0.1   # (a) only
    python benchmarks/bench_data.py --epochs 3 --json runs/bench_data.json

Acceptance of the issues "train from HDF5 without holding the data set in memory; 8-bit
storage" and "data larger than memory":

(a) a run with ``data.in_memory: false`` on a data set larger than ``data.memory_budget_gb``
    trains to the same accuracy as the in-memory run (same seeds), with each rank's peak RSS
    bounded and the bytes read per epoch about the rank's share of the split;
(b) the same data set stored with ``--dtype uint8``: file and bytes read about 4x smaller, the
    same accuracy as float32 within noise.

It prepares ``data/mnist60k.h5`` (float32) and ``data/mnist60k_u8.h5`` (uint8) from the MNIST
IDX files in ``--src`` with ``python -m data_prep mnist`` (54,000 / 6,000 / 10,000 split) when
they are missing, then runs ``mpirun -n P ddmpi train`` (``benchmarks/configs/mnist10k_2x2.yaml``
with ``--set`` overrides: the data set, ``local.epochs``, a smaller CNN for a 2-core machine)
with the same seeds:

    float32 in memory     data.in_memory=true
    float32 streamed      data.in_memory=false, data.memory_budget_gb=--budget-gb
    uint8 streamed        the same on the uint8 file (left out by --runs float32)

Streamed blocks are sized from the budget (``ddmpi.data.sources.block_rows_for_budget``: the
``prefetch + 2`` blocks alive of each of a box's 3 streamed splits fit ``STREAM_FRACTION`` of the
rank's budget). It prints, side by side: the test accuracy of every combiner, the local CNNs'
test accuracy, each rank's peak RSS (``metrics.json`` ``peak_memory_mb``) next to the budget,
the rank's stored data (its boxes of all splits) and the file size, the bytes each rank's train
sources read per epoch (``extra.local[s].train_bytes_read``, which counts ``epochs`` training
passes plus one inference pass, divided by ``epochs + 1``) against the rank's share of the
stored train split (the bytes of its boxes, and 1/P of the split), and the wall time.

Peak RSS includes Python, torch, MPI and the model (hundreds of MiB), so it also measures the
data's own memory in a fresh process (``--data-rss``): the growth of ru_maxrss, after imports
and opening, over one pass of rank 0's boxes as ``ddmpi train`` opens them (all 3 splits of a
subdomain at once, subdomains one after another; a train epoch in block-shuffled order, val and
test in order), streamed with the budget and held in memory; with the blocks' bound.

Equal accuracy means within noise: the streamed source visits the samples in a block-shuffled
order (blocks in random order, rows shuffled within windows of ``prefetch`` blocks), the
in-memory source in a full random permutation, so the two runs see different mini-batches.
The uint8 and float32 files hold bit-identical normalised inputs (MNIST is 8-bit), but their
streamed blocks differ in rows (the same bytes hold 4x the rows in uint8), so the
block-shuffled orders of the two streamed runs differ too.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _paths import ROOT, SHARED_DATA

DEFAULT_CONFIG = ROOT / "benchmarks" / "configs" / "mnist10k_2x2.yaml"
DEFAULT_SRC = SHARED_DATA / "mnist"
# a smaller local CNN than the config's (width 16, batch 64) so that three runs on the full
# 54,000 training images fit a shared 2-core machine
DEFAULT_SETS = ["local.model.width=8", "local.batch_size=128"]
MiB = 2 ** 20


def prepare(src, out, dtype, limit):
    if out.exists():
        return out
    if not src.is_dir():
        sys.exit(f"{out} is missing and {src} (MNIST IDX files) is not there to prepare it from")
    cmd = [sys.executable, "-m", "data_prep", "mnist", "--src", str(src), "--out", str(out),
           "--dtype", dtype, "--quiet"] + (["--limit", str(limit)] if limit else [])
    print("$", " ".join(cmd), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def data_rss(path, boxes, in_memory, budget_gb, batch_size=128):
    """In this (fresh) process: ru_maxrss growth over one pass of ``boxes`` as ``ddmpi train``
    opens them (3 splits of a box at once, boxes one after another), and the blocks' bound."""
    import resource

    from ddmpi.data.sources import StreamingSource, open_splits

    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    base, bound, blocks = rss(), 0, {}
    for box in boxes:
        sources = open_splits(path, box, in_memory=in_memory, memory_budget_gb=budget_gb)
        streamed = [s for s in sources.values() if isinstance(s, StreamingSource)]
        bound = max(bound, sum((s.prefetch + 2) * s.block_nbytes for s in streamed))
        for split, src in sources.items():
            order = src.epoch_order(0, 0) if split == "train" else range(len(src))
            for _ in src.batches(order, batch_size):
                pass
            if isinstance(src, StreamingSource):
                blocks[split] = [src.num_blocks, src.block_rows, src.block_nbytes,
                                 src.peak_blocks]
        del sources, streamed
    return {"base": base, "peak": rss(), "growth": rss() - base, "bound": bound,
            "blocks": blocks}


def measure_data_rss(path, boxes, in_memory, budget_gb):
    """:func:`data_rss` in a fresh Python process (ru_maxrss only grows)."""
    arg = json.dumps({"path": str(path), "boxes": [[[s.start, s.stop] for s in b] for b in boxes],
                      "in_memory": in_memory, "budget_gb": budget_gb})
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--data-rss", arg],
                         check=True, cwd=ROOT, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def train(config, data, ranks, run_dir, epochs, sets, reuse=False):
    """One ``ddmpi train``; its metrics.json plus the launcher's wall time. ``reuse``: read the
    finished run in ``run_dir`` instead (the launcher's figures from its bench.json if there)."""
    if reuse and (run_dir / "metrics.json").exists():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        bench = run_dir / "bench.json"
        metrics["bench"] = (json.loads(bench.read_text()) if bench.exists() else
                            {"job_wall": float("nan"), "load_before": float("nan"),
                             "load_after": float("nan")})
        print(f"reusing {run_dir}", flush=True)
        return metrics
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import mpirun  # the launcher line the tests use (oversubscribe, root)

    shutil.rmtree(run_dir, ignore_errors=True)
    extra = [a for kv in [f"data.path={data}", f"local.epochs={epochs}",
                          "run.threads_per_rank=1", *sets] for a in ("--set", kv)]
    cmd, env = mpirun(ranks, "python", "-m", "ddmpi", "train", "--config", str(config),
                      "--run-dir", str(run_dir), *extra)
    print("$", " ".join(cmd), flush=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["bench"] = {"job_wall": time.perf_counter() - t0, "load_before": load,
                        "load_after": os.getloadavg()[0]}
    (run_dir / "bench.json").write_text(json.dumps(metrics["bench"]))
    print(f"  {metrics['bench']['job_wall']:.0f} s, load {load:.1f} -> "
          f"{metrics['bench']['load_after']:.1f}", flush=True)
    return metrics


def rank_figures(metrics, info, decomposition, epochs):
    """Per rank: peak RSS, train bytes read per epoch, own stored bytes of its boxes (train,
    and all splits)."""
    from ddmpi.data.sources import box_nbytes

    ranks = {}
    for s, summary in metrics["extra"]["local"].items():
        r = str(summary["rank"])
        entry = ranks.setdefault(r, {"subdomains": [], "bytes_read_per_epoch": 0,
                                     "own_bytes": 0, "data_bytes": 0, "streamed": True})
        entry["subdomains"].append(int(s))
        read = summary.get("train_bytes_read")
        if read is None:
            entry["streamed"] = False
        else:
            entry["bytes_read_per_epoch"] += read / (epochs + 1)
        entry["own_bytes"] += box_nbytes(info, "train", decomposition.slices(int(s)))
        entry["data_bytes"] += sum(box_nbytes(info, split, decomposition.slices(int(s)))
                                   for split in info.splits)
    for r, entry in ranks.items():
        entry["peak_rss_mb"] = metrics["peak_memory_mb"][r]["rss"]
        if not entry["streamed"]:
            entry["bytes_read_per_epoch"] = None
    return ranks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC,
                        help="MNIST IDX folder (default: %(default)s; $DDMPI_SHARED_DATA "
                        "overrides ../shared/data)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--limit", type=int, default=None,
                        help="data_prep --limit (default: all 60,000 + 10,000 images); the "
                             "files are then named mnist<limit>*.h5")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--budget-gb", type=float, default=0.1,
                        help="data.memory_budget_gb of the streamed runs (default 0.1)")
    parser.add_argument("--runs", choices=["all", "float32"], default="all",
                        help="float32: the in-memory and streamed float32 runs only (no (b))")
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                        help=f"config overrides of all runs (default: {' '.join(DEFAULT_SETS)})")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_data")
    parser.add_argument("--reuse", action="store_true",
                        help="report on the finished runs in --out instead of training again")
    parser.add_argument("--json", type=Path, help="write all figures as JSON")
    args = parser.parse_args(argv)

    from ddmpi.config import load_config
    from ddmpi.data.decomposition import Decomposition
    from ddmpi.data.schema import read_info

    sets = DEFAULT_SETS if args.set is None else args.set
    stem = f"mnist{args.limit}" if args.limit else "mnist60k"
    f32 = prepare(args.src, args.data_dir / f"{stem}.h5", "float32", args.limit).resolve()
    u8 = prepare(args.src, args.data_dir / f"{stem}_u8.h5", "uint8", args.limit).resolve()
    config = load_config(args.config, [f"data.path={f32}", *sets])
    infos = {"float32": read_info(f32), "uint8": read_info(u8)}
    info = infos["float32"]
    dec = Decomposition(info.spatial_shape, config.decomposition.grid,
                        config.decomposition.overlap)
    split_bytes = {k: i.splits["train"] * i.channels * i.spatial_shape[0] * i.spatial_shape[1]
                   * i.itemsize for k, i in infos.items()}
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()}; {dec}; splits "
          f"{info.splits}; {args.ranks} ranks, {args.epochs} epochs, overrides {sets}")
    print(f"stored train split images: float32 {split_bytes['float32'] / MiB:.1f} MiB, uint8 "
          f"{split_bytes['uint8'] / MiB:.1f} MiB; streamed runs: data.memory_budget_gb="
          f"{args.budget_gb} ({args.budget_gb * 1024:.1f} MiB per rank)")

    stream = ["data.in_memory=false", f"data.memory_budget_gb={args.budget_gb}"]
    runs = {
        "float32 in memory": (f32, ["data.in_memory=true"]),
        "float32 streamed": (f32, stream),
        "uint8 streamed": (u8, stream),
    }
    if args.runs == "float32":
        del runs["uint8 streamed"]
    metrics = {}
    for i, (name, (path, extra)) in enumerate(runs.items()):
        metrics[name] = train(args.config, path, args.ranks, args.out / f"run{i}", args.epochs,
                              [*sets, *extra], args.reuse)
    figures = {name: rank_figures(m, infos["uint8" if "uint8" in name else "float32"], dec,
                                  args.epochs) for name, m in metrics.items()}

    names = list(runs)
    width = max(len(n) for n in names) + 2
    combiners = list(metrics[names[0]]["combiners"])
    print(f"\n(a) + (b): test accuracy (same seeds; {args.epochs} epochs; "
          f"{info.splits['test']} test images)")
    print(f"{'combiner':<24}" + "".join(f"{n:>{width}}" for n in names))
    for c in combiners:
        print(f"{c:<24}" + "".join(
            f"{100 * metrics[n]['combiners'][c]['accuracy']:{width - 2}.2f} %" for n in names))
    for s in sorted(metrics[names[0]]["extra"]["local_test_accuracy"], key=int):
        print(f"{'local CNN ' + str(s):<24}" + "".join(
            f"{100 * metrics[n]['extra']['local_test_accuracy'][s]:{width - 2}.2f} %"
            for n in names))
    print(f"{'chosen combiner':<24}" + "".join(f"{metrics[n]['extra']['chosen']:>{width}}"
                                               for n in names))
    print(f"{'ddmpi wall s':<24}" + "".join(f"{metrics[n]['wall_seconds']:{width}.1f}"
                                            for n in names))
    print(f"{'job wall s (mpirun)':<24}" + "".join(
        f"{metrics[n]['bench']['job_wall']:{width}.1f}" for n in names))
    print(f"{'load avg before/after':<24}" + "".join(
        f"{metrics[n]['bench']['load_before']:>{width - 6}.1f}/"
        f"{metrics[n]['bench']['load_after']:<5.1f}" for n in names))
    for r in sorted(figures[names[0]], key=int):
        print(f"{'rank ' + r + ' peak RSS MiB':<24}" + "".join(
            f"{figures[n][r]['peak_rss_mb']:{width}.1f}" for n in names))
    for r in sorted(figures[names[0]], key=int):
        print(f"{'rank ' + r + ' MiB read/epoch':<24}" + "".join(
            (f"{figures[n][r]['bytes_read_per_epoch'] / MiB:{width}.2f}"
             if figures[n][r]["bytes_read_per_epoch"] is not None else f"{'(in memory)':>{width}}")
            for n in names))
    for r in sorted(figures[names[0]], key=int):
        print(f"{'rank ' + r + ' own MiB (boxes)':<24}" + "".join(
            f"{figures[n][r]['own_bytes'] / MiB:{width}.2f}" for n in names))
    print("\nbytes read per epoch by each rank's train sources against its share of the stored "
          "train split (own = the bytes of its subdomains' boxes, overlap included; 1/P = the "
          "split's bytes divided by the ranks)")
    print(f"{'run':<30} {'rank':>4} {'subdomains':>10} {'read MiB':>9} {'own MiB':>8} "
          f"{'1/P MiB':>8} {'read/own':>8} {'read/(1/P)':>10}")
    for n in names[1:]:
        key = "uint8" if "uint8" in n else "float32"
        share = split_bytes[key] / args.ranks
        for r, e in sorted(figures[n].items(), key=lambda kv: int(kv[0])):
            read = e["bytes_read_per_epoch"]
            print(f"{n:<30} {r:>4} {str(e['subdomains']):>10} {read / MiB:9.2f} "
                  f"{e['own_bytes'] / MiB:8.2f} {share / MiB:8.2f} {read / e['own_bytes']:8.3f} "
                  f"{read / share:10.3f}")

    sizes = {k: p.stat().st_size for k, p in (("float32", f32), ("uint8", u8))}
    budget = args.budget_gb * 1024 ** 3
    print(f"\npeak RSS of each rank (ru_maxrss: Python, torch, MPI and the model included) next "
          f"to the budget (data.memory_budget_gb={args.budget_gb} = {budget / MiB:.1f} MiB per "
          f"rank in the streamed runs), the rank's stored data (its boxes of all splits) and the "
          f"file")
    print(f"{'run':<30} {'rank':>4} {'peak RSS MiB':>12} {'vs in memory':>12} "
          f"{'budget MiB':>10} {'rank data MiB':>13} {'file MiB':>9}")
    for n in names:
        key = "uint8" if "uint8" in n else "float32"
        for r, e in sorted(figures[n].items(), key=lambda kv: int(kv[0])):
            diff = e["peak_rss_mb"] - figures[names[0]][r]["peak_rss_mb"]
            print(f"{n:<30} {r:>4} {e['peak_rss_mb']:12.1f} {diff:+12.1f} "
                  + (f"{budget / MiB:10.1f} " if "streamed" in n else f"{'-':>10} ")
                  + f"{e['data_bytes'] / MiB:13.1f} {sizes[key] / MiB:9.1f}")

    boxes = [dec.slices(s) for s in figures[names[0]]["0"]["subdomains"]]
    rss = {"float32 in memory": measure_data_rss(f32, boxes, True, args.budget_gb),
           "float32 streamed": measure_data_rss(f32, boxes, False, args.budget_gb)}
    print(f"\ndata memory of rank 0's boxes (subdomains {figures[names[0]]['0']['subdomains']}) "
          f"in a fresh process: ru_maxrss growth over one pass, after imports and opening "
          f"(bound = (prefetch + 2) blocks of each streamed split of one box)")
    for k, d in rss.items():
        blocks = "; ".join(f"{sp} {nb} blocks of {rows} rows = {nbytes / MiB:.2f} MiB, at most "
                           f"{peak} alive" for sp, (nb, rows, nbytes, peak) in d["blocks"].items())
        print(f"  {k:<18} growth {d['growth'] / MiB:7.1f} MiB (process peak "
              f"{d['peak'] / MiB:.1f} MiB)" + (f"; bound {d['bound'] / MiB:.1f} MiB, budget "
                                                f"{budget / MiB:.1f} MiB; {blocks}"
                                                if d["blocks"] else ""))

    acc = {n: metrics[n]["combiners"]["chosen"]["accuracy"] for n in names}
    if "uint8 streamed" in metrics:
        read_f = sum(e["bytes_read_per_epoch"] for e in figures["float32 streamed"].values())
        read_u = sum(e["bytes_read_per_epoch"] for e in figures["uint8 streamed"].values())
        print("\n(b) float32 / uint8 side by side")
        print(f"{'':<34}{'float32':>12}{'uint8':>12}{'ratio':>8}")
        print(f"{'file bytes (MiB)':<34}{sizes['float32'] / MiB:12.1f}"
              f"{sizes['uint8'] / MiB:12.1f}{sizes['float32'] / sizes['uint8']:8.2f}")
        print(f"{'stored train images (MiB)':<34}{split_bytes['float32'] / MiB:12.1f}"
              f"{split_bytes['uint8'] / MiB:12.1f}"
              f"{split_bytes['float32'] / split_bytes['uint8']:8.2f}")
        print(f"{'read per epoch, all ranks (MiB)':<34}{read_f / MiB:12.2f}{read_u / MiB:12.2f}"
              f"{read_f / read_u:8.2f}")
        r0f = figures["float32 streamed"]["0"]["bytes_read_per_epoch"]
        r0u = figures["uint8 streamed"]["0"]["bytes_read_per_epoch"]
        print(f"{'read per epoch, rank 0 (MiB)':<34}{r0f / MiB:12.2f}{r0u / MiB:12.2f}"
              f"{r0f / r0u:8.2f}")
        print(f"{'chosen test accuracy (streamed)':<34}{100 * acc['float32 streamed']:11.2f}%"
              f"{100 * acc['uint8 streamed']:11.2f}%"
              f"{acc['uint8 streamed'] - acc['float32 streamed']:+8.4f}")
        print(f"{'rank 0 peak RSS (MiB, streamed)':<34}"
              f"{figures['float32 streamed']['0']['peak_rss_mb']:12.1f}"
              f"{figures['uint8 streamed']['0']['peak_rss_mb']:12.1f}")
    n_test = info.splits["test"]
    se = (acc["float32 in memory"] * (1 - acc["float32 in memory"]) / n_test) ** 0.5
    print(f"\n(a) chosen test accuracy: in memory {100 * acc['float32 in memory']:.2f} %, "
          f"streamed {100 * acc['float32 streamed']:.2f} % (difference "
          f"{100 * (acc['float32 streamed'] - acc['float32 in memory']):+.2f} points; binomial "
          f"standard error of one accuracy on {n_test} test images {100 * se:.2f} points)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "sets": sets,
            "split_bytes": split_bytes, "file_bytes": sizes, "data_rss": rss,
            "runs": {n: {"combiners": {c: m["combiners"][c]["accuracy"] for c in combiners},
                         "local_test_accuracy": m["extra"]["local_test_accuracy"],
                         "wall_seconds": m["wall_seconds"], "bench": m["bench"],
                         "ranks": figures[n]} for n, m in metrics.items()}}, indent=1))
    return metrics


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--data-rss":
        a = json.loads(sys.argv[2])
        print(json.dumps(data_rss(a["path"], [tuple(slice(*b) for b in box) for box in a["boxes"]],
                                  a["in_memory"], a["budget_gb"])))
        sys.exit(0)
    main()
