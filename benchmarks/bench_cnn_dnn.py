"""CNN-DNN accuracy and local-phase speed-up, 1 rank against P ranks, measured side by side.

    python benchmarks/bench_cnn_dnn.py --config benchmarks/configs/mnist10k_2x2.yaml --ranks 1 2

Runs ``ddmpi train`` once per rank count (same config, same seeds, one thread per rank), then
prints the test accuracy of every combiner for each run (``metrics.json``
``combiners[name]["accuracy"]``), whether the runs agree, and the local phase's wall time
(local_training + local_inference of the slowest rank, ``timings``) with its ratio to the first
rank count, and each rank's peak RSS (``peak_memory_mb``). Each rank count runs once (single
measurements, no best-of selection). It then retrains only the coarse DNN of the last run on
each choice of ``coarse.train_on`` (train / val / train+val decisions, the configured coarse
model and seed; :func:`ddmpi.coarse.dnn.train_coarse`) and prints their test accuracies and
the combiner each one chooses on its holdout, for information only: nothing is chosen on them
(the default comes from the regime study's selection set, benchmarks/RESULTS-coarse.md).
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def run(config, ranks, run_dir, extra):
    from helpers import mpirun  # the launcher line the tests use (oversubscribe, root)

    shutil.rmtree(run_dir, ignore_errors=True)
    cmd, env = mpirun(ranks, "python", "-m", "ddmpi", "train", "--config", str(config),
                      "--run-dir", str(run_dir), "--set", "run.threads_per_rank=1", *extra)
    print("$", " ".join(cmd[:1] + cmd[1:]), flush=True)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "metrics.json").read_text())


def local_phase_seconds(metrics):
    """Wall time of the local phase: data loading, training and inference, slowest rank."""
    return max(sum(t.get(p, 0.0) for p in ("local_training", "local_inference"))
               for t in metrics["timings"].values())


def coarse_variants(run_dir, config_path):
    """Test accuracy of the coarse DNN trained on each choice of local decisions."""
    from ddmpi.coarse.dnn import predict_coarse, train_coarse
    from ddmpi.config import load_config
    from ddmpi.data.schema import read_labels
    from ddmpi.strategies.cnn_dnn import coarse_training_data

    config = load_config(run_dir / "config.yaml")
    subs = sorted(run_dir.glob("decisions/local_*.npz"))
    probs = {split: np.stack([np.load(p)[split] for p in subs]) for split in
             ("train", "val", "test")}
    labels = {split: read_labels(config.data.path, split) for split in probs}
    results = {}
    for train_on in ("train", "val", "train+val"):
        x, y, honest = coarse_training_data(train_on, probs, labels)
        fit = train_coarse(x, y, config.coarse, seed=config.run.seed, honest=honest)
        pred = predict_coarse(fit.model, probs["test"]).argmax(1)
        results[train_on] = (float(np.mean(pred == labels["test"])), fit.chosen)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="runs/bench_cnn_dnn")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    extra = [a for kv in args.set for a in ("--set", kv)]
    out = Path(args.out)
    metrics = {p: run(args.config, p, out / f"ranks{p}", extra) for p in args.ranks}

    names = list(next(iter(metrics.values()))["combiners"])
    dec = metrics[args.ranks[0]]["config"]["decomposition"]
    print(f"\nconfig {args.config}: grid {dec['grid']}, overlap {dec['overlap']}")
    print(f"{'ranks':>5}  " + "  ".join(f"{n:>22}" for n in names)
          + "  local phase (s)  ratio  efficiency  peak RSS MiB per rank")
    base = local_phase_seconds(metrics[args.ranks[0]])
    for p, m in metrics.items():
        t = local_phase_seconds(m)
        eff = base / t / (p / args.ranks[0])
        rss = " ".join(f"{v['rss']:.0f}" for _, v in sorted(m["peak_memory_mb"].items(),
                                                            key=lambda kv: int(kv[0])))
        print(f"{p:>5}  " + "  ".join(f"{100 * m['combiners'][n]['accuracy']:21.2f}%"
                                      for n in names)
              + f"  {t:15.1f}  {t / base:5.3f}  {eff:10.3f}  {rss}")
    accs = {p: {n: m["combiners"][n]["accuracy"] for n in names} for p, m in metrics.items()}
    same = all(a == accs[args.ranks[0]] for a in accs.values())
    print(f"identical global results across rank counts: {same}")
    local = metrics[args.ranks[-1]]["extra"]["local"]
    print("local CNN test accuracy: " + ", ".join(
        f"sub {s}: {100 * v['accuracy']['test']:.2f}%" for s, v in local.items()))
    print("coarse DNN trained on (test accuracy; combiner chosen on the holdout): " + ", ".join(
        f"{k}: {100 * v:.2f}% ({chosen})" for k, (v, chosen) in coarse_variants(
            out / f"ranks{args.ranks[-1]}", args.config).items()))


if __name__ == "__main__":
    main()
