"""Strong scaling of the local phase (1, 2, 4 ranks, same decomposed run) and bytes read per rank.

    python benchmarks/bench_scaling.py                         # 2 epochs, 1, 2 and 4 ranks
    python benchmarks/bench_scaling.py --epochs 8 --repeat 3   # closer to the paper's setting
    python benchmarks/bench_scaling.py --ranks 1 2 --json runs/bench_scaling.json

Runs ``ddmpi train`` on the same configuration (default: the real MNIST 10k set,
``benchmarks/configs/mnist10k_2x2.yaml``: 2x2 subdomains, overlap 2, ``run.threads_per_rank=1``)
with each rank count P, so that every rank owns S/P of the S subdomains, and prints

- the local phase (local_training + local_inference of the slowest rank, from
  ``metrics.json``'s ``timings``; opening the data sources is not timed as a phase of its
  own), the speed-up T(1)/T(P) and the parallel efficiency E(P) = T(1) / (P * T(P)) at the
  medians over the repeats; the whole job's wall time (mpirun to exit) and ddmpi's own wall time;
- E_cpu(P): the same ratio computed from the CPU seconds of the local phase (``process_time``,
  recorded by a wrapper around ``ddmpi.strategies.base.PhaseTimer``, no change to ddmpi): the
  efficiency the run would have with one idle core per rank. On a shared machine the wall-time figure
  depends on what else runs; E_cpu much less so. Also the load average around each run;
- bytes read per rank: every rank reads its subdomains of the train, val and test splits
  (:func:`ddmpi.data.reader.load_subdomain`); the benchmark reads them here through the counting file
  object of ``bench_io.py`` and sums them per rank of each layout, against the data set's image
  bytes (all splits);
- whether the global test accuracies agree across rank counts (seeds follow subdomains).

P larger than the machine's cores is oversubscribed (marked); its efficiency measures the
machine, not ddmpi. The acceptance figure is E(2) >= 0.9 (on a 2-core machine). With
``--repeat R`` the rank counts run interleaved R times; the tables give the median of each rank
count with the range (min..max) of the R runs, and E(2) is reported for every pair (repeat i of
1 rank with repeat i of 2 ranks, run next to each other) with the mean +- std of the per-pair
efficiencies (no best-of selection).

If the data set is missing it is prepared from ``--src`` (``python -m data_prep mnist --src
../shared/data/mnist-test10k --out data/mnist10k.h5 --val-fraction 0.1 --test-fraction 0.1``).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from _paths import ROOT, SHARED_DATA

DEFAULT_CONFIG = ROOT / "benchmarks" / "configs" / "mnist10k_2x2.yaml"
DEFAULT_SRC = SHARED_DATA / "mnist-test10k"
LOCAL_PHASES = ("local_training", "local_inference")


# ---------------------------------------------------------------------------------------------
# worker: ddmpi train with CPU seconds recorded next to the wall seconds of every phase
# ---------------------------------------------------------------------------------------------

def worker(argv):
    """``ddmpi train`` (``argv``) with ``cpu:<phase>`` entries added to ``timings``."""
    from ddmpi.cli import main
    from ddmpi.strategies import base

    wall_timer = base.PhaseTimer.__call__  # RunContext's default_factory holds the class itself

    @contextmanager
    def cpu_and_wall(self, phase):
        cpu = time.process_time()
        try:
            with wall_timer(self, phase):
                yield
        finally:
            key = f"cpu:{phase}"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.process_time() - cpu

    base.PhaseTimer.__call__ = cpu_and_wall
    return main(["train", *argv])


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(config, data, ranks, run_dir, epochs, extra):
    """One ``ddmpi train`` on ``ranks`` ranks; returns its metrics plus the launcher's view."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import mpirun  # the launcher line the tests use (oversubscribe, root)

    shutil.rmtree(run_dir, ignore_errors=True)
    cmd, env = mpirun(ranks, "python", str(Path(__file__).resolve()), "--worker",
                      "--config", str(config), "--run-dir", str(run_dir),
                      "--set", f"data.path={data}", "--set", f"local.epochs={epochs}",
                      "--set", "run.threads_per_rank=1", *extra)
    print("$", " ".join(cmd), flush=True)
    load_before = os.getloadavg()[0]
    cpu0, t0 = children_cpu(), time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    job_wall, job_cpu = time.perf_counter() - t0, children_cpu() - cpu0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["bench"] = {"ranks": ranks, "job_wall": job_wall, "job_cpu": job_cpu,
                        "load_before": load_before, "load_after": os.getloadavg()[0]}
    return metrics


def local_phase(timings, prefix=""):
    return sum(timings.get(prefix + p, 0.0) for p in LOCAL_PHASES)


def slowest_local(metrics, prefix=""):
    """Local phase of the slowest rank (wall seconds, or CPU seconds with prefix 'cpu:')."""
    return max(local_phase(t, prefix) for t in metrics["timings"].values())


def accuracies(metrics):
    """Test accuracy of every combiner."""
    return {name: m["accuracy"] for name, m in metrics["combiners"].items()}


def spread(values):
    """``median (min..max)`` of a list of numbers."""
    return f"{np.median(values):.1f} ({min(values):.1f}..{max(values):.1f})"


def bytes_per_rank(data, decomposition, rank_counts):
    """{P: [bytes rank r reads for its subdomains of all splits]}, counted, and the totals."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_io import counting_reader

    from ddmpi.data.reader import load_subdomain
    from ddmpi.data.schema import read_info
    from ddmpi.parallel.layout import assign_subdomains

    info = read_info(data)
    splits = ("train", "val", "test")
    per_sub, own_per_sub = {}, {}
    for sub in decomposition:
        with counting_reader() as counters:
            for split in splits:
                load_subdomain(data, split, decomposition, sub)
        per_sub[sub] = sum(c.bytes_read for c in counters)
        own_per_sub[sub] = sum(info.splits[s] for s in splits) * info.channels * int(
            np.prod(decomposition.subdomain_shape(sub))) * info.itemsize
    image_bytes = sum(info.splits[s] for s in splits) * info.channels * int(
        np.prod(info.spatial_shape)) * info.itemsize
    layout = {}
    for p in rank_counts:
        owned = assign_subdomains(decomposition.num_subdomains, p)
        layout[p] = [{"subdomains": subs, "bytes_read": sum(per_sub[s] for s in subs),
                      "own_bytes": sum(own_per_sub[s] for s in subs)} for subs in owned]
    return layout, image_bytes


def ensure_data(data, src):
    if data.exists():
        return
    if not src.is_dir():
        sys.exit(f"{data} is missing and {src} (MNIST IDX files) is not there to prepare it "
                 f"from; give --data FILE.h5 or --src DIR")
    cmd = [sys.executable, "-m", "data_prep", "mnist", "--src", str(src), "--out", str(data),
           "--val-fraction", "0.1", "--test-fraction", "0.1"]
    print("$", " ".join(cmd), flush=True)
    data.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--data", type=Path,
                        help="prepared data set (default: the config's data.path)")
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC,
                        help="MNIST IDX folder to prepare --data from when it is missing "
                        "(default: %(default)s; $DDMPI_SHARED_DATA overrides ../shared/data)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--epochs", type=int, default=2, help="local.epochs (default 2)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every rank count this many times (interleaved); medians "
                             "with their range, E(2) per pair of runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="further config overrides, e.g. --set coarse.epochs=50")
    parser.add_argument("--cores", type=int, default=os.cpu_count(),
                        help="cores of the machine (rank counts above it are oversubscribed)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_scaling")
    parser.add_argument("--json", type=Path, help="write all figures as JSON")
    args = parser.parse_args(argv)

    from ddmpi.config import load_config
    from ddmpi.data.decomposition import Decomposition
    from ddmpi.data.schema import read_info

    for name in ("config", "data", "src", "out", "json"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    os.chdir(ROOT)  # the configs' relative data paths are relative to the checkout
    config = load_config(args.config, list(args.set))
    data = (args.data or Path(config.data.path)).resolve()
    ensure_data(data, args.src)
    info = read_info(data)
    dec = Decomposition(info.spatial_shape, config.decomposition.grid,
                        config.decomposition.overlap)
    ranks = sorted(set(args.ranks))
    bad = [p for p in ranks if dec.num_subdomains % p]
    if bad:
        print(f"note: {bad} ranks do not divide the {dec.num_subdomains} subdomains evenly")
    extra = [a for kv in args.set for a in ("--set", kv)]

    print(f"machine: {args.cores} cores, load average {os.getloadavg()}; "
          f"config {args.config.name}, {dec}, {info.splits} samples, {args.epochs} epochs")
    runs = {p: [] for p in ranks}
    for rep in range(args.repeat):
        for p in ranks:
            m = run_once(args.config, data, p, args.out / f"ranks{p}", args.epochs, extra)
            runs[p].append(m)
            print(f"  ranks {p} (repeat {rep + 1}): local phase {slowest_local(m):.1f} s, "
                  f"job {m['bench']['job_wall']:.1f} s, load {m['bench']['load_before']:.1f}"
                  f" -> {m['bench']['load_after']:.1f}", flush=True)
    med = {p: float(np.median([slowest_local(m) for m in ms])) for p, ms in runs.items()}
    med_cpu = {p: float(np.median([slowest_local(m, "cpu:") for m in ms]))
               for p, ms in runs.items()}

    base_p = ranks[0]
    t_base, c_base = med[base_p] * base_p, med_cpu[base_p] * base_p
    rows = []
    print(f"\nstrong scaling of the local phase (slowest rank's local_training + "
          f"local_inference), {dec.num_subdomains} subdomains, 1 thread per rank, "
          f"{args.epochs} epochs; median (min..max) of {args.repeat} run(s); speed-up and E(P) "
          f"at the medians")
    print(f"{'ranks':>5} {'subs/rank':>9} {'over-sub':>8} {'local s':>20} {'speed-up':>8} "
          f"{'E(P)':>6} {'cpu s':>20} {'E_cpu':>6} {'job s':>20} {'ddmpi s':>20} "
          f"{'cnn_dnn %':>9}")
    for p in ranks:
        ms = runs[p]
        t, c = med[p], med_cpu[p]
        local_all = [slowest_local(x) for x in ms]
        cpu_all = [slowest_local(x, "cpu:") for x in ms]
        job_all = [x["bench"]["job_wall"] for x in ms]
        ddmpi_all = [x["wall_seconds"] for x in ms]
        acc_all = [x["combiners"]["cnn_dnn"]["accuracy"] for x in ms]
        row = dict(ranks=p, subdomains_per_rank=dec.num_subdomains / p,
                   oversubscribed=p > args.cores, local_seconds=t, speedup=t_base / t,
                   efficiency=t_base / (p * t), local_cpu_seconds=c,
                   efficiency_cpu=c_base / (p * c), all_local_seconds=local_all,
                   all_local_cpu_seconds=cpu_all, all_job_wall=job_all,
                   all_ddmpi_wall=ddmpi_all, cnn_dnn=acc_all,
                   load=[(x["bench"]["load_before"], x["bench"]["load_after"]) for x in ms],
                   per_rank=[x["timings"] for x in ms])
        rows.append(row)
        print(f"{p:>5} {row['subdomains_per_rank']:>9g} "
              f"{'yes' if row['oversubscribed'] else 'no':>8} {spread(local_all):>20} "
              f"{row['speedup']:8.2f} {row['efficiency']:6.3f} {spread(cpu_all):>20} "
              f"{row['efficiency_cpu']:6.3f} {spread(job_all):>20} {spread(ddmpi_all):>20} "
              f"{100 * np.median(acc_all):9.2f}")
    print("\nper rank, every run: wall seconds of local_training / local_inference (cpu "
          "seconds of the local phase); load average before -> after")
    for p in ranks:
        for i, m in enumerate(runs[p]):
            parts = [f"r{r}: " + "/".join(f"{tm.get(ph, 0.0):.1f}" for ph in LOCAL_PHASES)
                     + f" ({local_phase(tm, 'cpu:'):.1f})" for r, tm in m["timings"].items()]
            print(f"  P={p} run {i + 1}: " + ", ".join(parts)
                  + f"; load {m['bench']['load_before']:.1f} -> {m['bench']['load_after']:.1f}")
    same = all(accuracies(m) == accuracies(runs[base_p][0])
               for ms in runs.values() for m in ms)
    print(f"identical test accuracies of every combiner across rank counts and repeats: {same}")

    layout, image_bytes = bytes_per_rank(data, dec, ranks)
    print(f"\nbytes read per rank (load_subdomain of its subdomains, train+val+test, counting "
          f"file object) against the data set's {image_bytes / 2**20:.2f} MiB of images")
    print(f"{'ranks':>5} {'rank':>4} {'subdomains':>12} {'own MiB':>8} {'read MiB':>9} "
          f"{'read/all':>9} {'own/all':>8}")
    for p in ranks:
        for r, entry in enumerate(layout[p]):
            print(f"{p:>5} {r:>4} {str(entry['subdomains']):>12} "
                  f"{entry['own_bytes'] / 2**20:8.2f} {entry['bytes_read'] / 2**20:9.2f} "
                  f"{entry['bytes_read'] / image_bytes:9.4f} "
                  f"{entry['own_bytes'] / image_bytes:8.4f}")
        total = sum(e["bytes_read"] for e in layout[p])
        print(f"{p:>5} {'all':>4} {'':>12} {'':>8} {total / 2**20:9.2f} "
              f"{total / image_bytes:9.4f}")

    pairs = []
    if 2 in ranks and base_p == 1:
        print("\nE(2) of every pair of runs (repeat i of 1 rank with repeat i of 2 ranks): "
              "T1 / (2 T2), wall and cpu")
        for i, (m1, m2) in enumerate(zip(runs[1], runs[2])):
            t1, t2 = slowest_local(m1), slowest_local(m2)
            c1, c2 = slowest_local(m1, "cpu:"), slowest_local(m2, "cpu:")
            pairs.append(dict(repeat=i + 1, t1=t1, t2=t2, efficiency=t1 / (2 * t2),
                              efficiency_cpu=c1 / (2 * c2)))
            print(f"  pair {i + 1}: T1 {t1:.1f} s, T2 {t2:.1f} s, E(2) {t1 / (2 * t2):.3f}, "
                  f"E_cpu(2) {c1 / (2 * c2):.3f}")
        eff = np.array([x["efficiency"] for x in pairs])
        std = eff.std(ddof=1) if len(eff) > 1 else float("nan")
        print(f"acceptance: parallel efficiency of the local phase at 2 ranks E(2) = "
              f"{eff.mean():.3f} +- {std:.3f} (mean +- std over {len(eff)} pair(s); "
              f"{'meets' if eff.mean() >= 0.9 else 'misses'} >= 0.9); load average now "
              f"{os.getloadavg()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "pairs": pairs, "bytes": {str(p): v for p, v in
                                         layout.items()}, "image_bytes": image_bytes,
                                         "epochs": args.epochs, "cores": args.cores},
                                        indent=1, default=str))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2:]))
    main()
