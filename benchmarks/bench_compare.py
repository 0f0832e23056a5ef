"""Parallel strategies side by side: ``ddmpi compare`` on one config, then the acceptance checks.

    python benchmarks/bench_compare.py --config benchmarks/configs/compare_mnist10k.yaml --ranks 2

Measures first, in this process with one thread, what one training step costs per sample for
the global CNN and for one local CNN (the fairness argument of the global width), then runs
``mpirun -n RANKS python -m ddmpi compare --config CONFIG --run-dir OUT --set
run.threads_per_rank=1`` (the launcher line the tests use), prints the comparison table it
wrote, and checks:

* the table (comparison.json/.md) and the plot (comparison.png) exist;
* the coherent CNN-DNN with transfer learning reaches at least the CNN-DNN's test accuracy;
* the CNN-DNN's wall time is at most 0.7x the global data-parallel CNN's, at a test accuracy at
  most 1 point below it.

Exit status 0 when all checks hold, 1 otherwise.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def step_cost(build_kwargs, batch=32, reps=20):
    """Median seconds per sample of one training step (forward, backward, Adam), one thread."""
    import torch
    import torch.nn.functional as F

    from ddmpi.models.cnn import build_cnn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_cnn(**build_kwargs)
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(batch, build_kwargs["in_channels"], *build_kwargs["input_shape"])
    y = torch.randint(0, build_kwargs["num_classes"], (batch,))
    times = []
    for i in range(reps + 3):
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] / batch


def cost_report(config_path, overrides):
    """Per-sample step cost of the global CNN and of the local CNNs of the configuration."""
    from ddmpi.strategies.global_ddp import global_build_kwargs
    from ddmpi.strategies.coherent import local_build_kwargs
    from ddmpi.config import load_config
    from ddmpi.data.decomposition import Decomposition
    from ddmpi.models.cnn import build_cnn, count_parameters
    from ddmpi.data.schema import read_info

    config = load_config(config_path, overrides)
    info = read_info(config.data.path)
    dec = Decomposition(info.spatial_shape, config.decomposition.grid,
                        config.decomposition.overlap)
    glob = global_build_kwargs(config, info)
    local = [local_build_kwargs(config, info, dec, s) for s in range(dec.num_subdomains)]
    g = step_cost(glob)
    ls = [step_cost(k) for k in local]
    return {"global_width": glob["width"], "global_input": list(glob["input_shape"]),
            "global_parameters": count_parameters(build_cnn(**glob)),
            "local_width": local[0]["width"], "local_inputs": [list(k["input_shape"])
                                                               for k in local],
            "local_parameters_total": sum(count_parameters(build_cnn(**k)) for k in local),
            "global_ms_per_sample": 1e3 * g, "locals_ms_per_sample": 1e3 * sum(ls),
            "ratio": g / sum(ls)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_compare")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--strategies", help="comma-separated subset (default: all)")
    args = parser.parse_args()
    from helpers import mpirun  # the launcher line the tests use (oversubscribe, root)

    overrides = ["run.threads_per_rank=1", *args.set]
    cost = cost_report(args.config, overrides)
    print(f"cost of one training step per sample, 1 thread: global CNN (width "
          f"{cost['global_width']}, {'x'.join(map(str, cost['global_input']))}, "
          f"{cost['global_parameters']} parameters) {cost['global_ms_per_sample']:.3f} ms; "
          f"all {len(cost['local_inputs'])} local CNNs (width {cost['local_width']}, "
          f"{cost['local_parameters_total']} parameters together) "
          f"{cost['locals_ms_per_sample']:.3f} ms; ratio {cost['ratio']:.2f}", flush=True)

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    extra = [a for kv in overrides for a in ("--set", kv)]
    if args.strategies:
        extra += ["--strategies", args.strategies]
    cmd, env = mpirun(args.ranks, "python", "-m", "ddmpi", "compare", "--config",
                      str(args.config), "--run-dir", str(out), *extra)
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"ddmpi compare took {time.perf_counter() - start:.0f} s", flush=True)

    from ddmpi.commands.compare import format_table

    comparison = json.loads((out / "comparison.json").read_text())
    comparison["cost_per_sample"] = cost
    (out / "bench_cost.json").write_text(json.dumps(cost, indent=2) + "\n")
    print("\n" + format_table(comparison) + "\n")
    rows = {r["strategy"]: r for r in comparison["rows"]}
    checks = {"table and plot exist": all((out / f).exists() for f in (
        "comparison.json", "comparison.md", "comparison.png"))}
    if {"cnn_dnn", "coherent_transfer"} <= set(rows):
        t, c = rows["coherent_transfer"]["test_accuracy"], rows["cnn_dnn"]["test_accuracy"]
        checks[f"coherent+transfer {100 * t:.2f} % >= CNN-DNN {100 * c:.2f} %"] = t >= c
    if {"cnn_dnn", "global_ddp"} <= set(rows):
        c, g = rows["cnn_dnn"], rows["global_ddp"]
        ratio = c["wall_seconds"] / g["wall_seconds"]
        checks[f"CNN-DNN wall {c['wall_seconds']:.0f} s = {ratio:.2f} x global "
               f"{g['wall_seconds']:.0f} s <= 0.7 x"] = ratio <= 0.7
        checks[f"CNN-DNN test {100 * c['test_accuracy']:.2f} % >= global "
               f"{100 * g['test_accuracy']:.2f} % - 1 point"] = (
            c["test_accuracy"] >= g["test_accuracy"] - 0.01)
    for name, ok in checks.items():
        print(f"[{'ok' if ok else 'FAILED'}] {name}")
    print(f"outputs: {out / 'comparison.md'}, {out / 'comparison.png'}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
