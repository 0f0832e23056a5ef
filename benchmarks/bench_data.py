"""Streaming sources and 8-bit storage, measured on real MNIST: accuracy, memory, bytes read.

    python benchmarks/bench_data.py                      # full MNIST 60k, 2 ranks, 2 epochs
    python benchmarks/bench_data.py --epochs 3 --json runs/bench_data.json
    python benchmarks/bench_data.py --limit 5000 --epochs 1     # smoke run (minutes)

Acceptance of the issue "train from HDF5 without holding the data set in memory; 8-bit storage":

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
    uint8 streamed        the same on the uint8 file

and, fourth, the float32 streamed run again with StreamingSource blocks of a quarter of the
budget (``ddmpi train`` run through a ``--worker`` wrapper that sets
``ddmpi.data.sources.BLOCK_TARGET_BYTES``; ``open_source`` itself sizes blocks at about 16 MiB
whatever the budget, so at most ``prefetch + 2`` = 4 blocks = about 64 MiB per streamed source),
and prints, side by side: the test accuracy of every combiner, the local CNNs' test accuracy,
each rank's peak RSS (``metrics.json`` ``peak_memory_mb``), the bytes each rank's train sources
read per epoch (``extra.local[s].train_bytes_read``, which counts ``epochs`` training passes
plus one inference pass, divided by ``epochs + 1``) against the rank's share of the stored
train split (the bytes of its boxes, and 1/P of the split), and the wall time. It also reads
one epoch of subdomain 0's train box through a :class:`ddmpi.data.sources.StreamingSource` in
this process (bytes read, blocks alive at most, time) for both files.

Equal accuracy means within noise: the streamed source visits the samples in a block-shuffled
order (blocks in random order, rows shuffled within windows of ``prefetch`` blocks), the
in-memory source in a full random permutation, so the two runs see different mini-batches.
The uint8 and float32 files hold bit-identical normalised inputs (MNIST is 8-bit), but their
streamed blocks differ: a block is about 16 MiB of the box, i.e. 4x the rows in uint8, so the
block-shuffled orders of the two streamed runs differ too (on MNIST 60k with 2x2 subdomains the
uint8 train box is a single block, whose order is then the in-memory run's full permutation).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "benchmarks" / "configs" / "mnist10k_2x2.yaml"
DEFAULT_SRC = ROOT.parent / "shared" / "data" / "mnist"
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


def worker(argv):
    """``ddmpi train`` (``argv[1:]``) with StreamingSource blocks of about ``argv[0]`` bytes
    (the module default that ``open_source`` uses; nothing else changed)."""
    from ddmpi.cli import main
    from ddmpi.data import sources

    sources.BLOCK_TARGET_BYTES = int(argv[0])
    return main(["train", *argv[1:]])


def train(config, data, ranks, run_dir, epochs, sets, reuse=False, block_bytes=None):
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
    launch = (["python", "-m", "ddmpi", "train"] if block_bytes is None else
              ["python", str(Path(__file__).resolve()), "--worker", str(int(block_bytes))])
    cmd, env = mpirun(ranks, *launch, "--config", str(config), "--run-dir", str(run_dir), *extra)
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
    """Per rank: peak RSS, train bytes read per epoch, own stored bytes of its boxes."""
    from ddmpi.data.sources import box_nbytes

    ranks = {}
    for s, summary in metrics["extra"]["local"].items():
        r = str(summary["rank"])
        entry = ranks.setdefault(r, {"subdomains": [], "bytes_read_per_epoch": 0,
                                     "own_bytes": 0, "streamed": True})
        entry["subdomains"].append(int(s))
        read = summary.get("train_bytes_read")
        if read is None:
            entry["streamed"] = False
        else:
            entry["bytes_read_per_epoch"] += read / (epochs + 1)
        entry["own_bytes"] += box_nbytes(info, "train", decomposition.slices(int(s)))
    for r, entry in ranks.items():
        entry["peak_rss_mb"] = metrics["peak_memory_mb"][r]["rss"]
        if not entry["streamed"]:
            entry["bytes_read_per_epoch"] = None
    return ranks


def direct_epoch(path, decomposition, seed=0, block_rows=None):
    """One epoch of subdomain 0's train box through a StreamingSource, in this process."""
    from ddmpi.data.sources import StreamingSource

    src = StreamingSource(path, "train", decomposition.slices(0), block_rows=block_rows)
    t0 = time.perf_counter()
    n = sum(len(idx) for _, _, idx in src.batches(src.epoch_order(seed, 0), 128))
    seconds = time.perf_counter() - t0
    src.close()
    assert n == len(src)
    return {"bytes_read": src.bytes_read, "peak_blocks": src.peak_blocks,
            "block_bytes": src.block_nbytes, "block_rows": src.block_rows,
            "blocks": src.num_blocks, "seconds": seconds,
            "bound_bytes": (src.prefetch + 2) * src.block_nbytes,
            "box_bytes": len(src) * src.block_nbytes // src.block_rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="MNIST IDX folder")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--limit", type=int, default=None,
                        help="data_prep --limit (default: all 60,000 + 10,000 images); the "
                             "files are then named mnist<limit>*.h5")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--budget-gb", type=float, default=0.01,
                        help="data.memory_budget_gb of the streamed runs (default 0.01)")
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                        help=f"config overrides of all runs (default: {' '.join(DEFAULT_SETS)})")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_data")
    parser.add_argument("--no-small-blocks", action="store_true",
                        help="leave out the fourth run (float32 streamed with blocks of a "
                             "quarter of the budget, set through a worker wrapper)")
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
    small = args.budget_gb * 1024 ** 3 / 4  # prefetch + 2 = 4 blocks alive at most
    runs = {
        "float32 in memory": (f32, ["data.in_memory=true"], None),
        "float32 streamed": (f32, stream, None),
        "uint8 streamed": (u8, stream, None),
        "float32 streamed, small blocks": (f32, stream, small),
    }
    if args.no_small_blocks:
        del runs["float32 streamed, small blocks"]
    metrics = {}
    for i, (name, (path, extra, block)) in enumerate(runs.items()):
        metrics[name] = train(args.config, path, args.ranks, args.out / f"run{i}", args.epochs,
                              [*sets, *extra], args.reuse, block)
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
          f"{'1/P MiB':>8} {'read/own':>8} {'read/(1/P)':>10} {'budget MiB':>10} "
          f"{'peak RSS':>9}")
    for n in names[1:]:
        key = "uint8" if "uint8" in n else "float32"
        share = split_bytes[key] / args.ranks
        for r, e in sorted(figures[n].items(), key=lambda kv: int(kv[0])):
            read = e["bytes_read_per_epoch"]
            print(f"{n:<30} {r:>4} {str(e['subdomains']):>10} {read / MiB:9.2f} "
                  f"{e['own_bytes'] / MiB:8.2f} {share / MiB:8.2f} {read / e['own_bytes']:8.3f} "
                  f"{read / share:10.3f} {args.budget_gb * 1024:10.1f} "
                  f"{e['peak_rss_mb']:8.1f}M")
    print("\npeak RSS: ru_maxrss of each rank's process (Python, torch, MPI and the model "
          "included)")

    # the default block (about 16 MiB of the box, what ddmpi train uses) and a block sized so
    # that prefetch + 2 = 4 blocks fit the budget (not something open_source does)
    direct = {}
    for k, p in (("float32", f32), ("uint8", u8)):
        direct[k] = direct_epoch(p, dec)
        per_row = direct[k]["block_bytes"] // direct[k]["block_rows"]
        direct[k + ", budget-sized blocks"] = direct_epoch(
            p, dec, block_rows=max(1, int(args.budget_gb * 1024 ** 3 / 4 / per_row)))
    print("\none epoch of subdomain 0's train box through a StreamingSource in this process "
          "(bound = (prefetch + 2) blocks alive at most):")
    for k, d in direct.items():
        print(f"  {k:>29}: {d['bytes_read'] / MiB:7.2f} MiB read (box {d['box_bytes'] / MiB:.2f}"
              f" MiB) in {d['seconds']:.2f} s; {d['blocks']} blocks of {d['block_rows']} rows = "
              f"{d['block_bytes'] / MiB:.2f} MiB, at most {d['peak_blocks']} alive, bound "
              f"{d['bound_bytes'] / MiB:.1f} MiB")

    sizes = {"float32": f32.stat().st_size, "uint8": u8.stat().st_size}
    read_f = sum(e["bytes_read_per_epoch"] for e in figures["float32 streamed"].values())
    read_u = sum(e["bytes_read_per_epoch"] for e in figures["uint8 streamed"].values())
    acc = {n: metrics[n]["combiners"]["chosen"]["accuracy"] for n in names}
    print("\n(b) float32 / uint8 side by side")
    print(f"{'':<34}{'float32':>12}{'uint8':>12}{'ratio':>8}")
    print(f"{'file bytes (MiB)':<34}{sizes['float32'] / MiB:12.1f}{sizes['uint8'] / MiB:12.1f}"
          f"{sizes['float32'] / sizes['uint8']:8.2f}")
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
            "split_bytes": split_bytes, "file_bytes": sizes, "direct_epoch": direct,
            "runs": {n: {"combiners": {c: m["combiners"][c]["accuracy"] for c in combiners},
                         "local_test_accuracy": m["extra"]["local_test_accuracy"],
                         "wall_seconds": m["wall_seconds"], "bench": m["bench"],
                         "ranks": figures[n]} for n, m in metrics.items()}}, indent=1))
    return metrics


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2:]))
    main()
