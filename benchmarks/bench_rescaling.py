"""Kernel rescaling (docs/kernel-rescaling.md): does the low-resolution phase save training time?

    python benchmarks/bench_rescaling.py --results benchmarks/RESULTS-rescaling.md \
        --json /tmp/bench_rescaling.json

Headline: the saving of kernel rescaling against **the same final network trained at full
resolution from the start**, over several seeds, in CPU time to a target validation accuracy,
with the final test accuracy. Variants of one setting, same seeds, same data order, same epochs,
same optimizer and schedule, trained with the project's loop (``ddmpi.training.loop.fit`` with
``Trainer``/``Step`` and ``ddmpi.training.hooks.Rescaling``, wired as
``ddmpi.strategies.local.train_cnn`` wires a ``local.rescaling`` run):

* ``rescaled``     (a) kernel rescaling, factor ``s``: ``--switch`` epochs of the low-resolution
                   network (``KernelRescaling.build_low_resolution_model``, ``Trainer(resolution=
                   "1/s")``) on ``s``x average-pooled inputs, then the hook's exact switch to the
                   full-resolution network (stem ``s*k`` at stride ``s``) for the remaining
                   epochs;
* ``same-final``   (b) HEADLINE BASELINE: the network the rescaled run ends as
                   (``KernelRescaling.build_full_resolution_model``: the strided ``s*k`` stem)
                   trained at full resolution from epoch 1; (a) against (b) isolates what the
                   low-resolution schedule itself buys;
* ``ordinary``     (c) secondary: the ordinary network (3x3 stem, stride 1) at full resolution,
                   i.e. ddmpi without rescaling. It is a *different* final network (body at full
                   resolution, several times the cost per epoch); (a) against (c) mostly measures
                   that architecture difference, not the schedule.

Settings: ``global`` (one CNN on the whole 28x28 image, a 1x1 grid) and ``local`` (the four CNNs
of a 2x2 decomposition, overlap 2 px at 28x28 / 4 px at 56x56, each with seed ``seed +
subdomain`` as ``ddmpi train`` does), on ``28`` (the 10,000 real MNIST test10k digits, 8,000 /
1,000 / 1,000, ``data/mnist10k.h5``, written with ``python -m data_prep mnist --src
../shared/data/mnist-test10k --out data/mnist10k.h5 --val-fraction 0.1 --test-fraction 0.1``
when absent) and optionally ``56`` (the same digits and splits up-sampled 2x bilinear, written
with ``DatasetWriter`` to ``data/mnist10k_56.h5`` when absent).

Figures per (setting, seed); a local setting sums its four CNNs (the cost on one core):

* time to target: CPU seconds of training (each epoch incl. its validation and, for (a), the
  switch) until the validation accuracy first reaches the target; per CNN, target = lowest best
  validation accuracy of the variants run in that setting, minus ``--target-drop`` (0.005), so
  every variant reaches it. Validation split only, never test. In the low-resolution phase the
  validation accuracy is the low-resolution network's on down-sampled inputs, which equals the
  switched network's on full inputs (the switch is exact). Quantised to epochs.
* total: CPU seconds of all epochs.
* test accuracy of the best-by-validation state (what ``fit`` leaves loaded); a local setting
  combines its four CNNs by averaged probabilities (the coarse DNN is left out: it is the same
  for every variant), the mean single-CNN accuracy is reported beside it.

Then mean +- sample std over the seeds; savings are per seed ``1 - t(a) / t(b)``, then averaged.
Time is ``time.process_time()`` of this single-threaded process (robust to other jobs' load on a
shared machine, not immune to it: shared caches, SMT siblings); wall seconds are recorded too.
``--train-subset N`` trains on the first N training images only (validation and test whole).
"""

import argparse
import contextlib
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
from _paths import ROOT, SHARED_DATA  # noqa: E402

sys.path.insert(0, str(ROOT))

from ddmpi.config import LocalConfig, ModelConfig, OptimizerConfig, RescalingConfig, SchedulerConfig  # noqa: E402
from ddmpi.data.decomposition import Decomposition  # noqa: E402
from ddmpi.data.reader import read_box  # noqa: E402
from ddmpi.data.schema import DatasetWriter, read_info  # noqa: E402
from ddmpi.data.sources import TensorSource  # noqa: E402
from ddmpi.models.cnn import build_cnn  # noqa: E402
from ddmpi.models.rescaling import KernelRescaling  # noqa: E402
from ddmpi.training import hooks  # noqa: E402
from ddmpi.training.loop import Step, Trainer, fit, predict_proba  # noqa: E402
from ddmpi.training.optim import make_optimizer, make_scheduler  # noqa: E402

VARIANTS = ("rescaled", "same-final", "ordinary")
LABELS = {"rescaled": "(a) rescaled: low res, then switch",
          "same-final": "(b) same final network from scratch [HEADLINE baseline]",
          "ordinary": "(c) ordinary network, full res [secondary: different network]"}
SPLITS = ("train", "val", "test")
DEFAULT_SRC = SHARED_DATA / "mnist-test10k"
CPU = torch.device("cpu")


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
    """``source`` with every image up-sampled ``factor``x (bilinear, clipped to [0, 1]), same
    splits and labels, written with :class:`DatasetWriter`, when absent."""
    if path.exists():
        return path
    info = read_info(source)
    print(f"preparing: {path} = {source} up-sampled {factor}x (bilinear)", flush=True)
    full = tuple(slice(0, n) for n in info.spatial_shape)
    with DatasetWriter(path, name=f"{info.name}-x{factor}", classes=info.classes,
                       converter="benchmarks/bench_rescaling.py",
                       provenance={"source": str(source), "upsampling": f"bilinear x{factor}, "
                                   "torch.nn.functional.interpolate(align_corners=False), "
                                   "clip [0, 1]"}) as writer:
        for split in SPLITS:
            x, y = read_box(source, split, full)
            x = torch.from_numpy(info.normalization.unit(x))
            big = torch.nn.functional.interpolate(x, scale_factor=factor, mode="bilinear",
                                                  align_corners=False).clamp_(0, 1)
            writer.write_split(split, big.numpy(), y)
    return path


def load_sources(path, grid, overlap, train_subset=None):
    """The data set's info, decomposition and ``{subdomain: {split: TensorSource}}``."""
    info = read_info(path)
    dec = Decomposition(info.spatial_shape, grid, overlap)
    out = {}
    for sub in range(dec.num_subdomains):
        box = dec.slices(sub)
        out[sub] = {}
        for split in SPLITS:
            x, y = read_box(path, split, box)
            if split == "train" and train_subset:
                x, y = x[:train_subset], y[:train_subset]
            out[sub][split] = TensorSource(torch.from_numpy(np.ascontiguousarray(x)),
                                           torch.from_numpy(y), info.normalization, box)
    return info, dec, out


# ------------------------------------------------------------------------------- training

def local_config(args):
    return LocalConfig(model=ModelConfig(family="vgg", depth=args.depth, width=args.width,
                                         dropout=args.dropout),
                       epochs=args.epochs, batch_size=args.batch_size,
                       optimizer=OptimizerConfig(name="adam", lr=args.lr),
                       scheduler=SchedulerConfig(name="cosine"),
                       rescaling=RescalingConfig(factor=args.factor, switch_epoch=args.switch))


def train_one(args, info, shape, sources, variant, seed):
    """Train one CNN as ``ddmpi.strategies.local.train_cnn`` does; its per-epoch curve
    (val accuracy, resolution, cumulative CPU / wall seconds), totals and test figures."""
    cfg = local_config(args)
    kwargs = dict(family="vgg", spatial_dims=info.spatial_dims, in_channels=info.channels,
                  num_classes=info.num_classes, input_shape=tuple(shape), depth=args.depth,
                  width=args.width, dropout=args.dropout, batchnorm=True)
    rescaler = KernelRescaling(cfg.rescaling.factor, switch_epoch=cfg.rescaling.switch_epoch)
    curve = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    torch.manual_seed(seed)
    if variant == "rescaled":
        model = rescaler.build_low_resolution_model(**kwargs)
    elif variant == "same-final":
        model = rescaler.build_full_resolution_model(**kwargs)
    else:
        model = build_cnn(**kwargs)
    optimizer = make_optimizer(model.parameters(), cfg.optimizer)
    trainer = Trainer(model, optimizer, make_scheduler(optimizer, cfg.scheduler, cfg.epochs),
                      cfg.epochs,
                      resolution=f"1/{rescaler.factor}" if variant == "rescaled" else "full")

    def on_epoch(record):
        curve.append({"epoch": record.epoch, "val_accuracy": record.val_accuracy,
                      "resolution": record.resolution, "lr": record.lr,
                      "cpu_s": time.process_time() - cpu0,
                      "wall_s": time.perf_counter() - wall0})

    epoch_hooks = []
    if variant == "rescaled":
        epoch_hooks.append(hooks.Rescaling(rescaler, cfg, trainer))
    epoch_hooks.append(hooks.Report(on_epoch))  # after the switch: its cost is counted
    step = Step(device=CPU, hooks=tuple(epoch_hooks))
    fit(trainer, sources["train"], sources["val"], step, batch_size=cfg.batch_size, seed=seed)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    probs = predict_proba(trainer.model, sources["test"], step)
    labels = sources["test"].labels
    stem = trainer.model.stem.conv
    return {"variant": variant, "seed": seed, "input_shape": list(shape),
            "stem": f"{'x'.join(map(str, stem.kernel_size))}/{'x'.join(map(str, stem.stride))}",
            "final_resolution": trainer.resolution, "curve": curve,
            "best_epoch": trainer.best["epoch"], "cpu_s": cpu, "wall_s": wall,
            "test_accuracy": float((probs.argmax(1) == labels).float().mean()),
            "test_probs": probs}


def warm_up(args, info, dec, sources, variants):
    """Untimed: one short run per variant (first-call costs of torch kernels, allocator)."""
    small = argparse.Namespace(**{**vars(args), "epochs": 2, "switch": 1})
    shape = dec.subdomain_shape(0)
    tiny = {k: TensorSource(v.x[:128], v.labels[:128], v.normalization, v.box)
            for k, v in sources[0].items()}
    for variant in variants:
        train_one(small, info, shape, tiny, variant, 12345)


def time_to(curve, target):
    """(CPU seconds, epoch) at the end of the first epoch whose val accuracy reaches target."""
    for point in curve:
        if point["val_accuracy"] >= target - 1e-12:
            return point["cpu_s"], point["epoch"]
    return float("nan"), None


def run_setting_seed(args, size, setting, info, dec, sources, seed, variants):
    """Every variant of one (data set, setting, seed): one result per variant."""
    subs = list(range(dec.num_subdomains))
    runs = {v: [] for v in variants}
    for sub in subs:
        for variant in variants:  # interleaved, so that load drift hits every variant alike
            r = train_one(args, info, dec.subdomain_shape(sub), sources[sub], variant,
                          seed + sub)
            runs[variant].append(r)
            curve = " ".join(f"{p['val_accuracy']:.4f}{'*' if p['resolution'] != 'full' else ''}"
                             for p in r["curve"])
            print(f"  {size} {setting} seed {seed} sub {sub} {variant:10s} stem {r['stem']:7s} "
                  f"cpu {r['cpu_s']:6.1f}s wall {r['wall_s']:6.1f}s test "
                  f"{r['test_accuracy']:.4f}  val/epoch {curve}", flush=True)
    best = {v: [max(p["val_accuracy"] for p in r["curve"]) for r in runs[v]] for v in variants}
    targets = [min(best[v][i] for v in variants) - args.target_drop for i in subs]
    # sensitivity: the target from the two headline variants only
    ab = [v for v in ("rescaled", "same-final") if v in variants]
    targets_ab = [min(best[v][i] for v in ab) - args.target_drop for i in subs]
    labels = sources[0]["test"].labels
    out = {}
    for v in variants:
        reached = [time_to(r["curve"], t) for r, t in zip(runs[v], targets)]
        reached_ab = [time_to(r["curve"], t) for r, t in zip(runs[v], targets_ab)]
        probs = sum(r["test_probs"] for r in runs[v]) / len(subs)
        out[v] = {"seed": seed, "stem": runs[v][0]["stem"],
                  "targets": targets, "targets_ab": targets_ab,
                  "time_to_target_cpu_s": float(sum(t for t, _ in reached)),
                  "time_to_target_ab_cpu_s": float(sum(t for t, _ in reached_ab)),
                  "target_epochs": [e for _, e in reached],
                  "total_cpu_s": float(sum(r["cpu_s"] for r in runs[v])),
                  "total_wall_s": float(sum(r["wall_s"] for r in runs[v])),
                  "test_accuracy": float((probs.argmax(1) == labels).float().mean()),
                  "single_test_accuracies": [r["test_accuracy"] for r in runs[v]],
                  "best_val": best[v], "best_epochs": [r["best_epoch"] for r in runs[v]],
                  "curves": [[(p["val_accuracy"], p["resolution"], p["cpu_s"], p["lr"])
                              for p in r["curve"]] for r in runs[v]]}
    return out


# ------------------------------------------------------------------------------- report

def ms(values, scale=1.0, fmt="{:.1f}"):
    """'mean +- std' (sample std over the seeds)."""
    a = np.asarray(values, dtype=float) * scale
    std = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{fmt.format(a.mean())} ± {fmt.replace('+', '').format(std)}"


def saving(a, b):
    return [1.0 - x / y for x, y in zip(a, b)]


def summarise(setting_runs):
    """Per variant, lists over seeds, and the headline numbers of one setting."""
    variants = list(setting_runs[0].keys())
    per = {v: {k: [r[v][k] for r in setting_runs] for k in (
        "time_to_target_cpu_s", "time_to_target_ab_cpu_s", "total_cpu_s", "total_wall_s",
        "test_accuracy")} for v in variants}
    for v in variants:
        per[v]["single_mean"] = [float(np.mean(r[v]["single_test_accuracies"]))
                                 for r in setting_runs]
        per[v]["stem"] = setting_runs[0][v]["stem"]
    head = {}
    if "rescaled" in per and "same-final" in per:
        a, b = per["rescaled"], per["same-final"]
        head = {"ttt_saving": saving(a["time_to_target_cpu_s"], b["time_to_target_cpu_s"]),
                "ttt_ab_saving": saving(a["time_to_target_ab_cpu_s"],
                                        b["time_to_target_ab_cpu_s"]),
                "total_saving": saving(a["total_cpu_s"], b["total_cpu_s"]),
                "test_diff": [x - y for x, y in zip(a["test_accuracy"], b["test_accuracy"])]}
    if "rescaled" in per and "ordinary" in per:
        a, c = per["rescaled"], per["ordinary"]
        head["vs_ordinary"] = {
            "ttt_saving": saving(a["time_to_target_cpu_s"], c["time_to_target_cpu_s"]),
            "total_saving": saving(a["total_cpu_s"], c["total_cpu_s"]),
            "test_diff": [x - y for x, y in zip(a["test_accuracy"], c["test_accuracy"])]}
    return per, head


def headline_line(name, head, n):
    return (f"{name}: rescaled vs same final network: time-to-target saving "
            f"{ms(head['ttt_saving'], 100, '{:+.0f}')} % (mean ± std over {n} seeds), "
            f"test accuracy difference {ms(head['test_diff'], 100, '{:+.2f}')} points "
            f"[total-time saving {ms(head['total_saving'], 100, '{:+.0f}')} %; "
            f"time-to-target saving with the target from (a) and (b) only "
            f"{ms(head['ttt_ab_saving'], 100, '{:+.0f}')} %]")


def table(results):
    lines = ["| setting | variant | stem k/stride | time to target (CPU s) | total (CPU s) | "
             "total (wall s) | test acc. (%) | mean single-CNN test acc. (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        per = res["per"]
        for v in per:
            p = per[v]
            local = res["cnns"] > 1
            lines.append(
                f"| {name} | {LABELS[v]} | {p['stem']} | {ms(p['time_to_target_cpu_s'])} | "
                f"{ms(p['total_cpu_s'])} | {ms(p['total_wall_s'])} | "
                f"{ms(p['test_accuracy'], 100, '{:.2f}')} | "
                f"{ms(p['single_mean'], 100, '{:.2f}') if local else ''} |")
    return "\n".join(lines)


def per_seed_table(results):
    lines = ["| setting | seed | (a) to target / total (CPU s) | (b) to target / total (CPU s) "
             "| (c) to target / total (CPU s) | test acc. (a) / (b) / (c) (%) | saving (a) vs (b) "
             "to target / total |", "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for r in res["runs"]:
            cells = []
            for v in VARIANTS:
                cells.append(f"{r[v]['time_to_target_cpu_s']:.1f} / {r[v]['total_cpu_s']:.1f}"
                             if v in r else "—")
            acc = " / ".join(f"{100 * r[v]['test_accuracy']:.1f}" if v in r else "—"
                             for v in VARIANTS)
            a, b = r["rescaled"], r["same-final"]
            lines.append(f"| {name} | {a['seed']} | {' | '.join(cells)} | {acc} | "
                         f"{100 * (1 - a['time_to_target_cpu_s'] / b['time_to_target_cpu_s']):+.0f}"
                         f" % / {100 * (1 - a['total_cpu_s'] / b['total_cpu_s']):+.0f} % |")
    return "\n".join(lines)


def curves_text(results):
    out = []
    for name, res in results.items():
        for r in res["runs"]:
            for v in r:
                for i, c in enumerate(r[v]["curves"]):
                    who = "global" if res["cnns"] == 1 else f"sub {i}"
                    vals = " ".join(f"{a:.4f}{'*' if resn != 'full' else ''}"
                                    for a, resn, _, _ in c)
                    cpu = " ".join(f"{t:.1f}" for _, _, t, _ in c)
                    out.append(f"{name:10s} seed {r[v]['seed']} {who:6s} {v:10s} {vals}   "
                               f"(target {r[v]['targets'][i]:.4f}, cum. CPU s {cpu})")
    return "\n".join(out)


READING = """\
How to read it:

- (b) is the honest baseline: the rescaled run *ends* as exactly this network (stem `s·k` at
  stride `s`, the body at `1/s` of the input resolution; docs/kernel-rescaling.md), so (a)
  against (b) is what the low-resolution phase itself buys. Per epoch the low-resolution
  network (3x3 stem on 2x average-pooled inputs) and (b) (6x6 stem at stride 2 on full inputs)
  do nearly the same work: the body, which dominates, sees feature maps of the same size in
  both; only the stem differs (`s^d` = 4x its FLOPs, small for 1-channel inputs) plus the
  pooling of the inputs. So the schedule can only save a little per epoch, plus whatever
  epochs it gains or loses towards the target.
- (c) is ddmpi without rescaling: the ordinary 3x3/stride-1 network, whose body runs at full
  resolution (several times the cost per epoch). "(a) vs (c)" is mostly the saving of the
  cheaper *architecture*, which (b) has too; it is not a property of the schedule.
- Time to target is quantised to epochs (the target is checked after each epoch's
  validation); with few epochs, a one-epoch difference is a large percentage.
- Test sets of 1,000 images: one image is 0.1 point.
"""


def report_markdown(meta, results):
    a, env, n = meta["args"], meta["machine"], len(meta["args"]["seeds"])
    load = lambda v: ", ".join(f"{x:.1f}" for x in v)  # noqa: E731
    heads = [headline_line(name, res["head"], n) for name, res in results.items()
             if res["head"]]
    sec = []
    for name, res in results.items():
        h = res["head"].get("vs_ordinary")
        if h:
            sec.append(f"{name}: rescaled vs ordinary full-resolution network (a different "
                       f"network): time-to-target saving {ms(h['ttt_saving'], 100, '{:+.0f}')}"
                       f" %, total {ms(h['total_saving'], 100, '{:+.0f}')} %, test accuracy "
                       f"{ms(h['test_diff'], 100, '{:+.2f}')} points")
    subset = (f"the first {a['train_subset']} training images" if a.get("train_subset")
              else "all 8,000 training images")
    return "\n".join([
        "# Kernel rescaling: time to target and accuracy against the same final network",
        "",
        "Written by `benchmarks/bench_rescaling.py` (its docstring has the method). Command:",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"Machine: {env['cpu']}, {env['cores']} cores shared with other jobs, torch "
        f"{env['torch']}, {env['threads']} thread, python {env['python']}; commit "
        f"{env['commit']}; {env['date']}. Load average (1/5/15 min) at start "
        f"{load(meta['load_start'])}, at end {load(meta['load_end'])}; CPU time of the whole "
        f"benchmark {meta['cpu_s']:.0f} s, wall {meta['elapsed_s']:.0f} s.",
        "",
        f"Set-up: MNIST test10k digits (8,000 / 1,000 / 1,000, `data/mnist10k.h5`), "
        f"{subset}; VGG depth {a['depth']}, width {a['width']}, dropout {a['dropout']}, "
        f"Adam {a['lr']}, cosine, batch {a['batch_size']}, {a['epochs']} epochs for every "
        f"variant; rescaled: factor {a['factor']}, switch after {a['switch']} low-resolution "
        f"epochs (the `hooks.Rescaling` switch: Adam's moments and the one cosine schedule "
        f"carry on, the stem kernel's moments start afresh); seeds "
        f"{', '.join(map(str, a['seeds']))} (+ subdomain for local CNNs). Local: 2x2 grid, "
        f"overlap {a['overlap']} px at 28x28 (scaled with the image size). Times are CPU "
        f"seconds (`time.process_time`) of the single-threaded process, summed over the CNNs "
        f"of a setting; target = lowest best *validation* accuracy of the variants run in "
        f"the setting − {a['target_drop']}, per CNN and seed. Test accuracy: the "
        f"best-by-validation state; local settings combine the four CNNs by averaged "
        f"probabilities. Figures are mean ± sample std over the seeds."
        + (f" Variants run: {meta['variants_note']}." if meta.get("variants_note") else ""),
        "",
        "## Headline",
        "",
        *[f"- {h}" for h in heads],
        "",
        "Secondary (not the headline):",
        "",
        *[f"- {s}" for s in sec],
        "",
        "## Per variant (mean ± std over seeds)",
        "",
        table(results),
        "",
        "## Per seed",
        "",
        per_seed_table(results),
        "",
        READING,
        "Validation accuracy per epoch (`*`: low-resolution phase) and cumulative CPU seconds:",
        "",
        "```",
        curves_text(results),
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


def strip(results):
    """JSON-able copy (no tensors)."""
    return json.loads(json.dumps(results, default=lambda o: None))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "mnist10k.h5")
    p.add_argument("--src", type=Path, default=DEFAULT_SRC,
                   help="MNIST IDX files (default: %(default)s; $DDMPI_SHARED_DATA overrides "
                   "../shared/data)")
    p.add_argument("--upsampled", type=Path, default=ROOT / "data" / "mnist10k_56.h5")
    p.add_argument("--sizes", nargs="+", default=["28"], choices=["28", "56"],
                   help="data sets (default 28; 56 = the 2x up-sampled digits)")
    p.add_argument("--settings", nargs="+", default=["global", "local"],
                   choices=["global", "local"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--no-ordinary-at", nargs="*", default=[], choices=["28", "56"],
                   help="sizes at which the secondary (c) ordinary variant is skipped (cost)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--switch", type=int, default=2, help="low-resolution epochs of (a)")
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--overlap", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--target-drop", type=float, default=0.005)
    p.add_argument("--results", type=Path, help="write the markdown report here")
    p.add_argument("--json", type=Path, help="write every figure as JSON here")
    p.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                   help="train nothing: rebuild the report (--results) from --json files "
                        "(several: their settings merged, e.g. one run per image size)")
    args = p.parse_args(argv)
    if args.render:
        saved = [json.loads(path.read_text()) for path in args.render]
        meta, results = dict(saved[0]["meta"]), {}
        for part in saved:
            results.update(part["results"])
        if len(saved) > 1:
            metas = [part["meta"] for part in saved]
            meta.update(command="\n".join(m["command"] for m in metas),
                        load_end=metas[-1]["load_end"],
                        cpu_s=sum(m["cpu_s"] for m in metas),
                        elapsed_s=sum(m["elapsed_s"] for m in metas),
                        variants_note="; ".join(f"{', '.join(part['results'])}: "
                                                f"{', '.join(part['meta']['args']['variants'])}"
                                                for part in saved))
        text = report_markdown(meta, results)
        if args.results:
            args.results.write_text(text)
        print(text)
        return 0
    if not 1 <= args.switch < args.epochs:
        p.error("--switch must be at least 1 and below --epochs")
    if not {"rescaled", "same-final"} <= set(args.variants):
        p.error("--variants must include rescaled and same-final (the headline)")

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    env = machine()
    load_start = os.getloadavg()
    command = "python benchmarks/bench_rescaling.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(f"command: {command}\nmachine: {env}\nload average at start: {load_start}",
          flush=True)
    data = {"28": prepare_mnist(args.data, args.src)}
    if "56" in args.sizes:
        data["56"] = prepare_upsampled(data["28"], args.upsampled)

    results, cpu_start, start = {}, time.process_time(), time.perf_counter()  # incl. warm-ups
    for size in args.sizes:
        scale = 1 if size == "28" else 2
        variants = [v for v in args.variants
                    if not (v == "ordinary" and size in args.no_ordinary_at)]
        for setting in args.settings:
            grid, overlap = ((1, 1), 0) if setting == "global" else ((2, 2), args.overlap * scale)
            info, dec, sources = load_sources(data[size], grid, overlap, args.train_subset)
            name = f"{size}x{size} {setting}"
            print(f"{name}: {dec}; variants {variants}", flush=True)
            warm_up(args, info, dec, sources, variants)
            runs = [run_setting_seed(args, name, setting, info, dec, sources, seed, variants)
                    for seed in args.seeds]
            per, head = summarise(runs)
            results[name] = {"cnns": dec.num_subdomains, "per": per, "head": head,
                             "runs": runs}
            print(headline_line(name, head, len(args.seeds)), flush=True)
            if args.json:  # after every setting, so that an interrupted run keeps its figures
                write_json(args.json, make_meta(args, command, env, load_start, start,
                                                cpu_start), results)
    meta = make_meta(args, command, env, load_start, start, cpu_start)
    results = strip(results)
    text = report_markdown(meta, results)
    print("\n" + text, flush=True)
    if args.results:
        args.results.write_text(text)
        print(f"wrote {args.results}")
    if args.json:
        write_json(args.json, meta, results)
        print(f"wrote {args.json}")
    return 0


def write_json(path, meta, results):
    path.write_text(json.dumps({"meta": meta, "results": strip(results)}, indent=1))


def make_meta(args, command, env, load_start, start, cpu_start):
    return {"command": command, "machine": env,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "load_start": load_start, "load_end": os.getloadavg(),
            "elapsed_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start,
            "variants_note": ("ordinary (c) skipped at " + ", ".join(
                f"{s}x{s}" for s in args.no_ordinary_at) + " (cost)")
            if args.no_ordinary_at and "ordinary" in args.variants else ""}


if __name__ == "__main__":
    sys.exit(main())
