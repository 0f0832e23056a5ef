"""Strategies side by side: ``ddmpi compare`` on one config, then the acceptance checks.

    python benchmarks/bench_compare.py --config benchmarks/configs/compare_mnist10k.yaml \
        --ranks 2 [--seeds 3] [--out runs/bench_compare] [--set KEY=VALUE ...]

Runs ``mpirun -n RANKS python -m ddmpi compare ...``, prints the table it wrote and checks:
the compute-matched and parameter-matched global rows are there with FLOPs, parameters and
peak memory; every row has one value per seed; the paired tests are there; the CNN-DNN (the
combiner chosen on the holdout) is at least averaged probabilities - 0.5 points (mean over
seeds). Exit status 0 when all checks hold, 1 otherwise.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(args):
    mpirun = shutil.which("mpirun") or "mpirun"
    cmd = [mpirun, "-n", str(args.ranks), "--oversubscribe", sys.executable, "-m", "ddmpi",
           "compare", "--config", args.config, "--run-dir", args.out, "--overwrite", "--seeds",
           str(args.seeds), "--set", "run.threads_per_rank=1"]
    for item in args.set or []:
        cmd += ["--set", item]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def checks(comparison, seeds):
    rows = comparison["rows"]
    out = []
    for name in ("global_ddp[compute]", "global_ddp[parameters]"):
        row = rows.get(name)
        out.append((f"{name} row with FLOPs, parameters, peak memory",
                    row is not None and row["flops_per_sample"] and row["parameters"]
                    and row["peak_rss_mb"] > 0))
    out.append(("one value per seed in every row",
                all(len(r["accuracy"]["values"]) == seeds for r in rows.values())))
    out.append(("paired tests of the CNN-DNN", bool(comparison["paired"])))
    if "chosen" in rows:
        chosen = rows["chosen"]["accuracy"]["mean"]
        average = rows["average_probabilities"]["accuracy"]["mean"]
        out.append((f"CNN-DNN {100 * chosen:.2f} % >= averaged {100 * average:.2f} % - 0.5",
                    chosen >= average - 0.005))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="runs/bench_compare")
    parser.add_argument("--set", action="append")
    args = parser.parse_args()
    wall = launch(args)
    comparison = json.loads((ROOT / args.out / "comparison.json").read_text())
    print(f"\nddmpi compare: {wall:.0f} s wall for {args.seeds} seed(s)")
    ok = True
    for text, passed in checks(comparison, args.seeds):
        print(f"[{'ok' if passed else 'FAILED'}] {text}")
        ok = ok and passed
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
