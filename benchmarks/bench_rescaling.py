"""Kernel rescaling (docs/kernel-rescaling.md): training time and accuracy, with and without.

    python benchmarks/bench_rescaling.py --results benchmarks/RESULTS-rescaling.md

Side by side, in one run, with one thread, the same seeds and the same number of epochs, three
ways of training the same CNN family (VGG depth 2, width 16, dropout 0.1, Adam 2e-3, cosine,
batch 64: the local networks of ``benchmarks/configs/mnist10k_2x2.yaml``):

* ``ordinary``   the ordinary network at full resolution (3x3 stem, stride 1): rescaling off;
* ``rescaled``   kernel rescaling, factor 2: ``--switch`` epochs on 2x average-pooled inputs,
                 then the rescaled (6x6, stride 2) stem at full resolution
                 (``local.rescaling.factor=2``, ``local.rescaling.switch_epoch=S``);
* ``strided``    the post-switch architecture (6x6 stem, stride 2) trained from scratch at
                 full resolution: what the schedule must beat to be worth more than its
                 architecture (the rescaled network *ends* as this network, see the docs).

each for

* ``global``  the global baseline: one CNN on the full images (``train_local`` on the only
              subdomain of a 1x1 grid);
* ``local``   the four local CNNs of a 2x2 decomposition (overlap 2 px at 28x28, 4 px at 56x56:
              16x16 / 32x32 sub-images, read with ``ddmpi.data.reader.load_subdomain``), each trained
              with ``train_local`` and seed ``seed + subdomain`` as ``ddmpi train`` does; their
              test decisions are also combined by averaged probabilities (the coarse DNN is
              left out: it costs the same for every variant);

on two data sets:

* ``28x28``  the 10,000 real MNIST test10k digits, 8,000 / 1,000 / 1,000 (``data/mnist10k.h5``,
             written with ``python -m data_prep mnist --src ../shared/data/mnist-test10k --out
             data/mnist10k.h5 --val-fraction 0.1 --test-fraction 0.1`` when absent);
* ``56x56``  the same digits and splits up-sampled 2x (bilinear, ``torch.nn.functional.
             interpolate``, clipped to [0, 1]) and written with ``ddmpi.data.schema.DatasetWriter`` to
             ``data/mnist10k_56.h5`` when absent (``--upsampled``).

Figures, per row (a local row sums its four CNNs: the cost on one core):

* time to target: CPU seconds of training (incl. each epoch's validation) until the validation
  accuracy first reaches the target: for every CNN, the lowest best validation accuracy of the
  three variants minus ``--target-drop`` (so every variant reaches it). In the low-resolution
  phase the validation accuracy is that of the low-resolution network on down-sampled
  inputs, which *equals* that of the switched network on full inputs (the switch is exact);
* total: CPU seconds of all epochs; wall seconds beside it (noisy on a shared machine);
* test accuracy of the best-by-validation state (what ``train_local`` returns), for local rows
  the mean over the four CNNs and the combined (averaged probabilities) accuracy.

Timing is ``time.process_time()`` of this single-threaded process (less sensitive to other
processes than wall time, though not immune: shared caches and SMT siblings). Every figure of
every run, the per-epoch validation curves, the machine and its load are also printed (and with
``--json`` written) so that a rerun on a quiet machine can be compared line by line.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddmpi.coarse import combiners  # noqa: E402
from ddmpi.config import (LocalConfig, ModelConfig, OptimizerConfig,  # noqa: E402
                          RescalingConfig, SchedulerConfig)
from ddmpi.data.decomposition import Decomposition  # noqa: E402
from ddmpi.training.loop import TensorSource, predict_proba, train_local  # noqa: E402
from ddmpi.data.reader import load_subdomain  # noqa: E402
from ddmpi.models.rescaling import KernelRescaling  # noqa: E402
from ddmpi.data.schema import DatasetWriter, read_info  # noqa: E402

VARIANTS = ("ordinary", "rescaled", "strided")
SPLITS = ("train", "val", "test")
DEFAULT_SRC = ROOT.parent / "shared" / "data" / "mnist-test10k"


# ------------------------------------------------------------------------------------ data

def prepare_mnist(path, src):
    """``data/mnist10k.h5`` via the project's converter, when absent."""
    if path.exists():
        return path
    cmd = [sys.executable, "-m", "data_prep", "mnist", "--src", str(src), "--out", str(path),
           "--val-fraction", "0.1", "--test-fraction", "0.1", "--quiet"]
    print("preparing:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return path


def prepare_upsampled(source, path, factor=2):
    """The data set ``source`` with every image up-sampled ``factor``x (bilinear), same splits,
    labels and ids, written with :class:`ddmpi.data.schema.DatasetWriter`, when absent."""
    if path.exists():
        return path
    import h5py

    info = read_info(source)
    print(f"preparing: {path} = {source} up-sampled {factor}x (bilinear)", flush=True)
    with h5py.File(source, "r") as f, DatasetWriter(
            path, name=f"{info.name}-x{factor}", classes=info.classes,
            converter="benchmarks/bench_rescaling.py",
            provenance={"source": str(source), "upsampling": f"bilinear x{factor}, "
                        "torch.nn.functional.interpolate(align_corners=False), clip [0, 1]",
                        "source_provenance": info.attrs.get("provenance", "")}) as writer:
        for split in SPLITS:
            if split not in f:
                continue
            x = torch.from_numpy(f[split]["images"][()])
            big = torch.nn.functional.interpolate(x, scale_factor=factor, mode="bilinear",
                                                  align_corners=False).clamp_(0, 1)
            ids = [i.decode() if isinstance(i, bytes) else str(i)
                   for i in f[split]["ids"][()]] if "ids" in f[split] else None
            writer.write_split(split, big.numpy(), f[split]["labels"][()], ids=ids)
    return path


def load_sources(path, grid, overlap):
    """{subdomain: {split: TensorSource}} and the decomposition of the data set at ``path``."""
    info = read_info(path)
    dec = Decomposition(info.spatial_shape, grid, overlap)
    out = {}
    for sub in range(dec.num_subdomains):
        out[sub] = {}
        for split in SPLITS:
            x, y = load_subdomain(path, split, dec, sub)
            out[sub][split] = TensorSource(torch.from_numpy(x), torch.from_numpy(y))
    return info, dec, out


# ------------------------------------------------------------------------------- training

def local_config(args, variant):
    rescaling = (RescalingConfig(factor=args.factor, switch_epoch=args.switch)
                 if variant == "rescaled" else RescalingConfig())
    return LocalConfig(model=ModelConfig(family="vgg", depth=args.depth, width=args.width,
                                         dropout=args.dropout),
                       epochs=args.epochs, batch_size=args.batch_size,
                       optimizer=OptimizerConfig(name="adam", lr=args.lr),
                       scheduler=SchedulerConfig(name="cosine"), rescaling=rescaling)


def build_kwargs(args, info, shape, variant):
    kwargs = dict(family="vgg", spatial_dims=info.spatial_dims, in_channels=info.channels,
                  num_classes=info.num_classes, input_shape=tuple(shape), depth=args.depth,
                  width=args.width, dropout=args.dropout, batchnorm=True)
    if variant == "strided":
        kwargs = KernelRescaling(args.factor, switch_epoch=1).full_resolution_kwargs(**kwargs)
    return kwargs


def train_one(args, info, shape, sources, variant, seed):
    """Train one CNN; its per-epoch (val accuracy, resolution, cumulative CPU s, wall s), the
    test probabilities of the returned (best) state and its test accuracy."""
    cfg = local_config(args, variant)
    kwargs = build_kwargs(args, info, shape, variant)
    curve = []
    cpu0, wall0 = time.process_time(), time.perf_counter()

    def on_epoch(record):
        curve.append({"epoch": record.epoch, "val_accuracy": record.val_accuracy,
                      "resolution": record.resolution,
                      "cpu_s": time.process_time() - cpu0,
                      "wall_s": time.perf_counter() - wall0})

    model, history, best_epoch = train_local(kwargs, sources["train"], sources["val"], cfg,
                                             device=torch.device("cpu"), seed=seed,
                                             on_epoch=on_epoch, log=lambda msg: None)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    probs = predict_proba(model, sources["test"], torch.device("cpu"))
    test_acc = float((probs.argmax(1) == sources["test"].y.numpy()).mean())
    return {"variant": variant, "seed": seed, "input_shape": list(shape),
            "stem": f"{'x'.join(map(str, model.stem.conv.kernel_size))}/"
                    f"{'x'.join(map(str, model.stem.stride))}",
            "curve": curve, "best_epoch": best_epoch, "cpu_s": cpu, "wall_s": wall,
            "test_accuracy": test_acc, "test_probs": probs}


def time_to(curve, target):
    """(CPU seconds, epoch) of the first epoch whose validation accuracy reaches ``target``."""
    for point in curve:
        if point["val_accuracy"] >= target - 1e-12:
            return point["cpu_s"], point["epoch"]
    return float("nan"), None


def run_setting(args, size, setting, info, dec, sources):
    """All variants of one (data set, setting); returns the rows of the table."""
    runs = {v: [] for v in VARIANTS}
    subs = list(range(dec.num_subdomains))
    for sub in subs:
        shape = dec.subdomain_shape(sub)
        for variant in VARIANTS:  # interleaved, so that load drift hits every variant alike
            r = train_one(args, info, shape, sources[sub], variant, args.seed + sub)
            runs[variant].append(r)
            curve = " ".join(f"{p['val_accuracy']:.4f}{'*' if p['resolution'] != 'full' else ''}"
                             for p in r["curve"])
            print(f"  {size} {setting:6s} sub {sub} {variant:8s} stem {r['stem']:7s} "
                  f"cpu {r['cpu_s']:7.1f}s wall {r['wall_s']:7.1f}s test {r['test_accuracy']:.4f}"
                  f"  val/epoch {curve}", flush=True)
    targets = [min(max(p["val_accuracy"] for p in runs[v][i]["curve"]) for v in VARIANTS)
               - args.target_drop for i in range(len(subs))]
    labels = sources[0]["test"].y.numpy()
    rows = []
    for variant in VARIANTS:
        reached = [time_to(r["curve"], t) for r, t in zip(runs[variant], targets)]
        row = {"size": size, "setting": setting, "variant": variant,
               "cnns": len(subs), "input": "x".join(map(str, dec.subdomain_shape(0))),
               "stem": runs[variant][0]["stem"],
               "targets": targets,
               "time_to_target_cpu_s": float(sum(t for t, _ in reached)),
               "target_epochs": [e for _, e in reached],
               "total_cpu_s": float(sum(r["cpu_s"] for r in runs[variant])),
               "total_wall_s": float(sum(r["wall_s"] for r in runs[variant])),
               "test_accuracy_mean": float(np.mean([r["test_accuracy"]
                                                    for r in runs[variant]])),
               "test_accuracies": [r["test_accuracy"] for r in runs[variant]],
               "curves": [[(p["val_accuracy"], p["resolution"]) for p in r["curve"]]
                          for r in runs[variant]],
               "best_epochs": [r["best_epoch"] for r in runs[variant]],
               "cpu_s_each": [r["cpu_s"] for r in runs[variant]]}
        if len(subs) > 1:
            probs = np.stack([r["test_probs"] for r in runs[variant]])
            combined = combiners.average_probabilities(probs).argmax(1)
            row["test_accuracy_combined"] = combiners.accuracy(combined, labels)
        row["test_accuracy"] = row.get("test_accuracy_combined", row["test_accuracy_mean"])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------- report

def _pct_saving(new, ref):
    return 100.0 * (ref - new) / ref if ref else float("nan")


def table(rows):
    """Markdown table of all rows, savings and accuracy differences against ``ordinary`` and
    ``strided`` of the same (size, setting)."""
    ref = {(r["size"], r["setting"], r["variant"]): r for r in rows}
    head = ("| images | CNNs | input | variant (stem k/stride) | time to target (CPU s) "
            "| total (CPU s) | total (wall s) | test acc. | local mean test acc. "
            "| saving vs ordinary: to target / total | saving vs strided: to target / total "
            "| test acc. − ordinary (points) |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        o = ref[(r["size"], r["setting"], "ordinary")]
        s = ref[(r["size"], r["setting"], "strided")]
        mean = (f"{100 * r['test_accuracy_mean']:.2f} %" if r["cnns"] > 1 else "")
        if r["variant"] == "ordinary":
            vs_o, d_acc = "—", "—"
        else:
            vs_o = (f"{_pct_saving(r['time_to_target_cpu_s'], o['time_to_target_cpu_s']):+.0f} %"
                    f" / {_pct_saving(r['total_cpu_s'], o['total_cpu_s']):+.0f} %")
            d_acc = f"{100 * (r['test_accuracy'] - o['test_accuracy']):+.2f}"
        vs_s = (f"{_pct_saving(r['time_to_target_cpu_s'], s['time_to_target_cpu_s']):+.0f} % / "
                f"{_pct_saving(r['total_cpu_s'], s['total_cpu_s']):+.0f} %"
                if r["variant"] == "rescaled" else "—")
        setting = "global (1x1)" if r["setting"] == "global" else "local (2x2), combined"
        lines.append(
            f"| {r['size']} | {setting} | {r['input']} | {r['variant']} ({r['stem']}) "
            f"| {r['time_to_target_cpu_s']:.1f} | {r['total_cpu_s']:.1f} "
            f"| {r['total_wall_s']:.1f} | {100 * r['test_accuracy']:.2f} % | {mean} "
            f"| {vs_o} | {vs_s} | {d_acc} |")
    return "\n".join(lines)


def acceptance(rows, tolerance):
    """Lines on the acceptance criterion: rescaled test accuracy within ``tolerance`` points
    of the ordinary full-resolution network, for every (size, setting)."""
    ref = {(r["size"], r["setting"], r["variant"]): r for r in rows}
    out, ok_all = [], True
    for r in rows:
        if r["variant"] != "rescaled":
            continue
        o = ref[(r["size"], r["setting"], "ordinary")]
        d = 100 * (r["test_accuracy"] - o["test_accuracy"])
        ok = d >= -tolerance
        ok_all &= ok
        out.append(f"- {r['size']} {r['setting']}: rescaled {100 * r['test_accuracy']:.2f} % vs "
                   f"ordinary {100 * o['test_accuracy']:.2f} % ({d:+.2f} points): "
                   f"{'within' if ok else 'NOT within'} {tolerance} points")
    return ok_all, out


def curves_text(rows):
    lines = []
    for r in rows:
        for i, curve in enumerate(r["curves"]):
            name = "global" if r["setting"] == "global" else f"sub {i}"
            lines.append(f"{r['size']} {name:6s} {r['variant']:8s} "
                         + " ".join(f"{a:.4f}{'*' if res != 'full' else ''}" for a, res in curve)
                         + f"   (target {r['targets'][i]:.4f}, reached at epoch "
                         f"{r['target_epochs'][i]}, best epoch {r['best_epochs'][i]}, "
                         f"{r['cpu_s_each'][i]:.1f} CPU s)")
    return "\n".join(lines)


def summary(rows):
    """Sentences with the ranges of savings and accuracy differences of the rescaled variant
    against the ordinary network and against the strided-stem network from scratch."""
    ref = {(r["size"], r["setting"], r["variant"]): r for r in rows}
    parts = {"ordinary": [], "strided": []}
    for r in rows:
        if r["variant"] != "rescaled":
            continue
        for other in parts:
            o = ref[(r["size"], r["setting"], other)]
            parts[other].append((
                f"{r['size']} {r['setting']}",
                _pct_saving(r["time_to_target_cpu_s"], o["time_to_target_cpu_s"]),
                _pct_saving(r["total_cpu_s"], o["total_cpu_s"]),
                100 * (r["test_accuracy"] - o["test_accuracy"])))
    lines = []
    for other, label in (("ordinary", "the ordinary stride-1 network at full resolution"),
                         ("strided", "the strided-stem network trained from scratch (the "
                                     "comparison that isolates the schedule)")):
        items = parts[other]
        if not items:
            continue
        each = "; ".join(f"{name} {tt:+.0f} % / {tot:+.0f} % / {acc:+.2f}"
                         for name, tt, tot, acc in items)
        lines.append(f"- Rescaled against {label}: time-to-target saving / total-time saving / "
                     f"test-accuracy difference (points): {each}.")
    return lines


READING = """\
How to read it:

- `ordinary` is the network ddmpi trains without rescaling; `rescaled` *ends* as a different
  network, the strided-stem one (6x6 stem at stride 2, body at half the input resolution; see
  docs/kernel-rescaling.md), which costs about as much per epoch as the low-resolution phase.
  So "saving vs ordinary" is mostly the saving of that architecture; `strided` (the same
  architecture trained from scratch at full resolution) separates it from the schedule, and
  "saving vs strided" is what the low-resolution phase itself buys: the per-epoch difference
  between the low-resolution network (3x3 stem on 2x pooled inputs) and the strided stem
  (6x6 on full inputs), plus any epochs it gains towards the target. For a 1-channel input
  both stems are a small part of the work, so expect a few per cent at most, which is below
  the timing noise of a shared machine: the four local CNNs of a row do exactly the same
  work, so the spread of their CPU seconds (listed with the curves below) is the noise of
  the run.
- Time to target is quantised to epochs (the target is checked after each epoch).
- The ordinary depth-2 VGG has a receptive field of 14 px before its global average pool
  (3x3, 3x3, pool, 3x3, 3x3); the strided-stem network's is 28 px. On the 56x56 images the
  ordinary network's features therefore see 14x14 windows, a quarter of the image width, and
  it learns more slowly in these few epochs; its lower accuracy there is a property of that
  architecture on larger images, not of rescaling.
- One seed; 1,000 test images: one image is 0.1 point, and run-to-run differences of +-0.5
  point are ordinary at this size.
"""


def report_markdown(meta, rows):
    """The markdown report of one benchmark run (``meta``: command, machine, args, loads,
    elapsed seconds)."""
    a, env = meta["args"], meta["machine"]
    fmt_load = (lambda v: ", ".join(f"{x:.1f}" for x in v))  # noqa: E731
    elapsed = meta.get("elapsed_s")
    ok, accept = acceptance(rows, float(a["tolerance"]))
    return "\n".join([
        "# Kernel rescaling: training time and accuracy, with and without",
        "",
        "Written by `benchmarks/bench_rescaling.py` (see its docstring for the method); "
        "rerun it on a quiet machine to replace these figures:",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores (shared with other jobs), torch "
        f"{env['torch']}, {env['threads']} thread, python {env['python']}; commit "
        f"{env['commit']}; {env['date']}. Load average (1/5/15 min) at start "
        f"{fmt_load(meta['load_start'])}, at end {fmt_load(meta['load_end'])}"
        + (f"; benchmark wall time {elapsed:.0f} s." if elapsed else "."),
        "",
        f"VGG depth {a['depth']}, width {a['width']}, dropout {a['dropout']}, Adam {a['lr']}, "
        f"cosine, batch {a['batch_size']}, {a['epochs']} epochs for every variant; rescaled: "
        f"factor {a['factor']}, switch after {a['switch']} epochs; seed {a['seed']} "
        f"(+ subdomain). Times are CPU seconds of the single-threaded process, summed over "
        f"the CNNs of a row (the cost on one core; with one rank per subdomain the wall time "
        f"is about a quarter of a local row); target = lowest best validation accuracy of the "
        f"three variants − {a['target_drop']}, per CNN. Test accuracy: global rows the CNN, "
        f"local rows the four CNNs combined by averaged probabilities (the mean of the single "
        f"CNNs beside it). The 56x56 images are the same digits and splits up-sampled 2x "
        f"(bilinear), written by the benchmark to `data/mnist10k_56.h5` with "
        f"`ddmpi.data.schema.DatasetWriter` when absent.",
        "",
        table(rows),
        "",
        "Summary:",
        "",
        *summary(rows),
        "",
        f"Acceptance (rescaled within {a['tolerance']} points of the ordinary full-resolution "
        f"network): {'met' if ok else 'NOT met'}.",
        "",
        *accept,
        "",
        READING,
        "Validation accuracy per epoch (`*`: low-resolution phase, the low-resolution "
        "network on down-sampled inputs, equal to the switched network on full inputs):",
        "",
        "```",
        curves_text(rows),
        "```",
        "",
    ])


def machine():
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        commit += " + uncommitted changes" if dirty else ""
    except OSError:
        commit = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "commit": commit, "date": datetime.datetime.now().isoformat(timespec="seconds")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "mnist10k.h5",
                   help="28x28 MNIST data set (written from --src when absent)")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="MNIST IDX files")
    p.add_argument("--upsampled", type=Path, default=ROOT / "data" / "mnist10k_56.h5",
                   help="the 2x up-sampled data set (written from --data when absent)")
    p.add_argument("--sizes", nargs="+", default=["28", "56"], choices=["28", "56"],
                   help="data sets to run (default both)")
    p.add_argument("--settings", nargs="+", default=["global", "local"],
                   choices=["global", "local"])
    p.add_argument("--epochs", type=int, default=4, help="epochs of every variant (default 4)")
    p.add_argument("--switch", type=int, default=2,
                   help="low-resolution epochs of the rescaled variant (default 2)")
    p.add_argument("--factor", type=int, default=2, help="rescaling factor (default 2)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--overlap", type=int, default=2,
                   help="overlap of the 2x2 grid at 28x28 in px, scaled with the image size "
                        "(default 2: 16x16 sub-images at 28x28, 32x32 at 56x56)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-drop", type=float, default=0.005,
                   help="target = lowest best validation accuracy of the variants minus this "
                        "(default 0.005)")
    p.add_argument("--tolerance", type=float, default=0.5,
                   help="acceptance: rescaled test accuracy at most this many points below "
                        "the ordinary network's (default 0.5)")
    p.add_argument("--results", type=Path, help="write the markdown report here")
    p.add_argument("--json", type=Path, help="write every figure as JSON here")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="train nothing: rebuild the report (--results) from a --json file")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        text = report_markdown(saved, saved["rows"])
        if args.results:
            args.results.write_text(text)
            print(f"wrote {args.results}")
        else:
            print(text)
        return 0
    if not 1 <= args.switch < args.epochs:
        p.error("--switch must be at least 1 and below --epochs")

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    env = machine()
    load_start = os.getloadavg()
    command = "python benchmarks/bench_rescaling.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(f"command: {command}\nmachine: {env}\nload average at start: {load_start}",
          flush=True)

    data = {"28": prepare_mnist(args.data, args.src)}
    if "56" in args.sizes:
        data["56"] = prepare_upsampled(data["28"], args.upsampled)
    rows, start = [], time.perf_counter()
    for size in args.sizes:
        scale = 1 if size == "28" else 2
        for setting in args.settings:
            grid, overlap = ((1, 1), 0) if setting == "global" else ((2, 2), args.overlap * scale)
            info, dec, sources = load_sources(data[size], grid, overlap)
            label = f"{'x'.join(map(str, info.spatial_shape))}"
            print(f"{label} {setting}: {dec}", flush=True)
            rows += run_setting(args, label, setting, info, dec, sources)
    elapsed = time.perf_counter() - start
    load_end = os.getloadavg()

    meta = {"command": command, "machine": env,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "load_start": load_start, "load_end": load_end, "elapsed_s": elapsed}
    ok, accept = acceptance(rows, args.tolerance)
    print("\n" + table(rows) + "\n\nsummary:\n" + "\n".join(summary(rows))
          + "\n\nacceptance (final test accuracy):\n" + "\n".join(accept)
          + f"\n\nvalidation accuracy per epoch (* = low-resolution phase):\n"
          f"{curves_text(rows)}\n\nbenchmark wall time {elapsed:.0f} s; load average at end "
          f"{load_end}", flush=True)
    if args.results:
        args.results.write_text(report_markdown(meta, rows))
        print(f"wrote {args.results}")
    if args.json:
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
