"""``ddmpi compare``: every strategy on one data set, over several seeds, with fair baselines.

Runs go to ``RUN_DIR/seed<k>/<strategy>/``; the comparison (table, JSON, plot) to ``RUN_DIR``.
A stop signal (:mod:`ddmpi.training.preemption`) ends it with exit 75 naming the run it
stopped (or, when the run it arrived in could finish, that run and the runs left undone,
before the next run starts) and the command that resumes it.

``--resume`` continues a comparison as ``ddmpi train --resume`` continues a run: the runs that
finished in an earlier job are read back from their run directories, not trained again; the
interrupted one continues from its checkpoints (its wall time is the sum of its segments); the
others run. Every run it holds must match the comparison: its configuration (outside
:data:`RESUMABLE`), its data set and its rank count, else an error naming the run directory
and what differs. ``compare.seeds``, ``compare.strategies``, ``compare.global_widths`` and
``compare.target_accuracy`` may change: the comparison is of the runs now configured (a new
one runs; one no longer configured stays on disk, unused). ``comparison.json`` records per
run whether this job ran, resumed or reused it, and its segments.
"""

import copy
import json
import shlex
import time
from pathlib import Path

import numpy as np

from ddmpi.commands import RESUMABLE as RUN_RESUMABLE
from ddmpi.commands import check_resumable, exit_preempted, resolve_config, resume_dir_of
from ddmpi.config import ConfigError, dump
from ddmpi.data.atomic import write_text
from ddmpi.data.reader import check_contents
from ddmpi.data.schema import open_h5, read_info, reading
from ddmpi.models.cnn import build_cnn
from ddmpi.models.flops import training_flops
from ddmpi.parallel import cluster
from ddmpi.report import comparison as table
from ddmpi.report.summary import summarise
from ddmpi.strategies.base import (
    check_run,
    dataset_record,
    decomposition_of,
    lock_run_dir,
    on_root,
    read_result,
    run,
)
from ddmpi.strategies.cnn_dnn import CNNDNN
from ddmpi.strategies.coherent import Coherent, CoherentTransfer
from ddmpi.strategies.global_ddp import cnn_dnn_budget, global_strategy, global_width
from ddmpi.strategies.local import build_kwargs
from ddmpi.strategies.rundir import (
    RunDirError,
    check_kind,
    check_same_dataset,
    check_strategy,
    clear_outputs,
    holds_a_run,
    read_json,
    trained_state,
    update_config,
)
from ddmpi.training import preemption
from ddmpi.training.loop import Preempted
from ddmpi.training.preemption import EXIT_PREEMPTED

# Fields a resumed comparison may change: a run's (ddmpi train's), and which runs it holds and
# how they are summarised
RESUMABLE = RUN_RESUMABLE | {"compare.seeds", "compare.strategies", "compare.global_widths",
                             "compare.target_accuracy"}
COMPARISON = ("comparison.json", "comparison.md", "comparison.png")  # the outputs in RUN_DIR


def strategies(config, widths=None):
    """``(run name, strategy class)`` in the order they run; ``widths``: the global widths'
    rules resolved beforehand (:func:`resolve_widths`), else each run resolves its own."""
    out = []
    for name in config.compare.strategies:
        if name == "global_ddp":
            out += [(f"global_ddp[{w}]", global_strategy(w, (widths or {}).get(w)))
                    for w in config.compare.global_widths]
        else:
            out.append((name, {"cnn_dnn": CNNDNN, "coherent": Coherent,
                               "coherent_transfer": CoherentTransfer}[name]))
    return out


def check(config):
    """Refuse what the comparison cannot report fairly (errors name the config field)."""
    if config.local.rescaling.factor > 1:
        raise ConfigError("config field 'local.rescaling': ddmpi compare runs the strategies at "
                          "full resolution; compare rescaling with benchmarks/bench_rescaling.py")
    source = config.compare.transfer_from
    if ("coherent_transfer" in config.compare.strategies and source
            and not (Path(source) / "metrics.json").is_file()):
        raise ConfigError(f"config field 'compare.transfer_from': {source} has no metrics.json "
                          f"(the coherent transfer's wall time includes that run's)")


def check_runs(config, world):
    """Collective, before RUN_DIR is touched: what every run checks before its run directory
    is (:func:`~ddmpi.strategies.base.check_run` for each strategy), and binding device and
    threads; the device."""
    for _, cls in strategies(config):
        check_run(config, cls, world.size)
    return cluster.bind_process(world, config.run.device, config.run.threads_per_rank).device


def warm_up(config, world, device):
    """Untimed, on every rank: pay the process's one-time costs before the first timed run.

    Reads the training split once (page cache) and runs one forward and backward pass of the
    configured CNN on ``device`` under the FLOP counter every strategy uses (thread pools,
    first convolution kernels, the counter's own start-up).
    """
    start = time.perf_counter()
    info = read_info(config.data.path)
    read_through(info.path, "train", config.data.memory_budget_gb * 2**30)
    model = build_cnn(**build_kwargs(config, info, info.spatial_shape)).to(device)
    training_flops(model, info.spatial_shape, info.channels)
    world.barrier()
    return time.perf_counter() - start


def resolve_widths(config):
    """``(budget, {rule: width})``: what the matched global CNNs match
    (:func:`~ddmpi.strategies.global_ddp.cnn_dnn_budget`) and their widths, found once and
    untimed (the "compute" rule FLOP-counts a dozen candidate networks, which is no part of
    training the baseline)."""
    if "global_ddp" not in config.compare.strategies:
        return None, {}
    info = read_info(config.data.path)
    decomposition = decomposition_of(config, info)
    budget = cnn_dnn_budget(config, info, decomposition)
    return budget, {w: global_width(config, info, decomposition, w, budget)
                    for w in config.compare.global_widths}


def read_through(path, split, budget_bytes, block_bytes=64 << 20):
    """Read a split's images once, block by block, keeping nothing (the page cache keeps them);
    not at all when they exceed ``budget_bytes`` (streamed data is read from disk by every run)."""
    with open_h5(path) as f, reading(path, f"/{split}/images"):
        images = f[split]["images"]
        if images.size * images.dtype.itemsize > budget_bytes:
            return
        rows = max(1, block_bytes // (images.dtype.itemsize * int(np.prod(images.shape[1:]))))
        for i in range(0, len(images), rows):
            images[i:i + rows]


def run_compare(config, world, resume=False, overwrite=False):
    """Run every strategy for every seed (``resume``: continue the comparison in RUN_DIR, see
    the module's docstring; ``overwrite``: replace the one held there), holding RUN_DIR's lock
    (each run holds its own directory's too); the comparison dict on rank 0, None elsewhere."""
    check(config)
    device = check_runs(config, world)
    with lock_run_dir(config.run.dir, world) as lock:
        for note in lock.notes:
            print(f"=== ddmpi compare: {note}", flush=True)
        finished = on_root(world, prepare_compare_dir, config, world.size, resume, overwrite)
        runs, budget = run_all(config, world, device, finished, resume)
        if world.rank == 0:
            return write_comparison(config, world.size, runs, budget, finished)
    return None


def run_all(config, world, device, finished, resume):
    """After the untimed warm-up and finding the global widths: every run (:func:`run_plan`);
    ``(runs, budget)`` (the budget of the matched global CNNs)."""
    seconds = warm_up(config, world, device)
    budget, widths = resolve_widths(config)
    if world.rank == 0:
        print(f"=== ddmpi compare: untimed warm-up, {seconds:.1f} s", flush=True)
    return run_plan(config, world, schedule(config, widths), finished, resume), budget


def write_comparison(config, ranks, runs, budget, finished):
    """Rank 0: the comparison of ``runs`` on ``ranks`` ranks, printed and written to RUN_DIR."""
    root = Path(config.run.dir)
    comparison = summarise(config, ranks, runs, budget)
    comparison["runs"] = provenance(config, runs, finished)
    print("\n" + table.format_table(comparison), flush=True)
    write_text(root / "comparison.json", json.dumps(comparison, indent=2, default=float) + "\n")
    write_text(root / "comparison.md", table.format_markdown(comparison))
    table.plot_comparison(root / "comparison.png", comparison)
    print(f"comparison: {root / 'comparison.md'}, {root / 'comparison.json'}, "
          f"{root / 'comparison.png'}", flush=True)
    return comparison


def schedule(config, widths=None):
    """``(seed index, run name, strategy class)`` of every run, in the order they run."""
    return [(k, name, cls) for k in range(config.compare.seeds)
            for name, cls in strategies(config, widths)]


def run_config(config, k, name):
    """The configuration of run ``name`` of seed index ``k``: ``run.seed + k``, in
    ``RUN_DIR/seed<k>/<name>``."""
    sub = copy.deepcopy(config)
    sub.run.seed = config.run.seed + k
    sub.run.dir = str(Path(config.run.dir) / f"seed{k}" / name)
    return sub


def run_plan(config, world, plan, finished, resume):
    """Every run of ``plan``, those ``finished`` in an earlier job read back: ``{name: [result
    per seed]}`` (the results on rank 0, None elsewhere)."""
    runs, done = {}, None
    for i, (k, name, cls) in enumerate(plan):
        result = finished.get((k, name))
        if result is None:
            if done:
                left = [p for p in plan[i:] if p[:2] not in finished]
                stop_between_runs(world, config, done, left)
            result = run_one(cls, run_config(config, k, name), world, name, resume)
            done = (k, name)
        elif world.rank == 0:
            print(f"=== ddmpi compare: {name}, seed {config.run.seed + k}: finished in an "
                  f"earlier job ({len(result.segments)} segment(s), "
                  f"{result.wall_seconds:.1f} s), read back", flush=True)
        runs.setdefault(name, []).append(result)
    return runs


def run_one(cls, config, world, name, resume):
    """:func:`~ddmpi.strategies.base.run` one strategy between barriers (its wall time is its
    own); after a stop signal, exit 75 saying which run stopped and how to resume (the run
    continues from its checkpoints)."""
    if world.rank == 0:
        print(f"=== ddmpi compare: {name}, seed {config.run.seed}, {world.size} ranks",
              flush=True)
    world.barrier()
    try:
        result = run(cls, config, world, resume=resume)
    except Preempted as stop:
        root = Path(config.run.dir).parents[1]  # RUN_DIR of RUN_DIR/seed<k>/<name>
        exit_preempted(world.rank, f"ddmpi compare stopped by {preemption.describe()} in "
                       f"{name}, seed {config.run.seed} ({stop}); to resume ({world.size} "
                       f"ranks): {resume_command(root)} (exit {EXIT_PREEMPTED})")
    world.barrier()
    return result


def prepare_compare_dir(config, ranks, resume, overwrite=False):
    """Rank 0, holding RUN_DIR's lock: store the configuration in RUN_DIR; the runs finished
    in an earlier job, ``{(seed index, name): RunResult}``. Resuming a comparison held there
    checks its runs (:func:`held_runs`) and returns those finished; a new one replaces an
    earlier comparison (:func:`clear_comparison`)."""
    root = Path(config.run.dir)
    check_kind(root, comparison=True)
    if resume and holds_a_compare(root):
        finished = held_runs(config, ranks)
        changed = update_config(root, config)
        if changed:
            print("=== ddmpi compare: resumed with changed fields (config.yaml updated): "
                  + ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changed),
                  flush=True)
        return finished
    clear_comparison(root, config.data.path, overwrite)
    write_text(root / "config.yaml", dump(config))
    return {}


def clear_comparison(root, data_path, overwrite):
    """Rank 0, before a new comparison: remove an earlier one's outputs from ``root``, so that
    a later ``--resume`` cannot take them for its own. One with a trained run is replaced only
    with ``overwrite``, after the data set's contents passed the readers' checks."""
    trained = [d for d in sorted(root.glob("seed*/*")) if d.is_dir() and trained_state(d)]
    if trained and not overwrite:
        raise RunDirError(f"{root} holds a comparison ({len(trained)} trained runs): give "
                          f"--resume to continue it or --overwrite to replace it")
    if trained:
        check_contents(data_path)
    cleared = [d for d in sorted(root.glob("seed*/*")) if d.is_dir() and clear_outputs(d)]
    for name in COMPARISON:
        (root / name).unlink(missing_ok=True)
    if cleared:
        print(f"=== ddmpi compare: {root} held an earlier comparison: the outputs of its "
              f"{len(cleared)} runs were removed", flush=True)


def holds_a_compare(root):
    """Whether ``root`` holds a comparison to continue: its configuration and a run with a
    checkpoint."""
    return (Path(root) / "config.yaml").is_file() and any(
        holds_a_run(d) for d in Path(root).glob("seed*/*"))


def held_runs(config, ranks):
    """Rank 0, on resume: check every configured run held in RUN_DIR (:func:`check_held`);
    return those finished, read back: ``{(seed index, name): RunResult}``."""
    record, finished = None, {}
    for k, name, cls in schedule(config):
        sub = run_config(config, k, name)
        run_dir = Path(sub.run.dir)
        if not holds_a_run(run_dir):
            continue
        record = record or dataset_record(read_info(config.data.path))
        check_held(run_dir, sub, record, ranks, cls.name)
        if (run_dir / "metrics.json").is_file():
            finished[k, name] = read_result(run_dir)
    return finished


def check_held(run_dir, config, record, ranks, strategy):
    """A run held in ``run_dir`` belongs to this comparison: the same ``strategy``,
    configuration (outside :data:`RESUMABLE`), data set (``record``) and rank count (its wall
    time compares with the others'); an error naming ``run_dir`` and what differs otherwise."""
    check_strategy(run_dir, strategy)
    check_resumable(run_dir / "config.yaml", config, RESUMABLE,
                    "a resumed comparison keeps the configuration of its runs")
    check_same_dataset(run_dir, record)
    path = run_dir / "segments.json"
    started = {s["ranks"] for s in read_json(path)} if path.is_file() else {ranks}
    if started != {ranks}:
        raise RunDirError(f"{run_dir}: ran on {', '.join(map(str, sorted(started)))} ranks, "
                          f"this job has {ranks}; a resumed comparison keeps its rank count "
                          f"(its wall times compare runs on as many ranks)")


def resume_command(root):
    """The command line that resumes the comparison in ``root``."""
    return f"ddmpi compare --resume {shlex.quote(str(root))}"


def stop_between_runs(world, config, done, left):
    """Collective: exit 75 before the next run if any rank received a stop signal (one that
    arrived while the run ``done`` was finishing, which lets it finish), naming that run, the
    runs ``left`` undone and how to resume."""
    if not world.any(preemption.requested()):
        return
    seed = config.run.seed
    undone = ", ".join(f"{name} seed {seed + k}" for k, name, _ in left)
    exit_preempted(world.rank, f"ddmpi compare stopped by {preemption.describe()} after "
                   f"{done[1]}, seed "
                   f"{seed + done[0]} finished; not run: {undone}; to resume ({world.size} "
                   f"ranks): {resume_command(config.run.dir)} (exit {EXIT_PREEMPTED})")


def provenance(config, runs, finished):
    """Per run name, per seed: how this job got the run ("ran", "resumed" from its
    checkpoints, or "reused": finished in an earlier job, read back) and its segments (one
    per job it ran in)."""
    out = {}
    for name, results in runs.items():
        out[name] = [{"seed": config.run.seed + k, "segments": len(r.segments),
                      "status": "reused" if (k, name) in finished else
                      "resumed" if r.segments[-1]["resumed"] else "ran"}
                     for k, r in enumerate(results)]
    return out


def main(args, world):
    """Entry of ``ddmpi compare``."""
    overrides = list(args.set or [])
    if args.run_dir:
        overrides.append(f"run.dir={args.run_dir}")
    if args.strategies:
        names = [s.strip() for s in args.strategies.split(",") if s.strip()]
        overrides.append(f"compare.strategies=[{', '.join(names)}]")
    if args.seeds is not None:
        overrides.append(f"compare.seeds={args.seeds}")
    resume_dir = resume_dir_of(args, overrides)
    config = resolve_config(args.config, overrides, resume_dir, holds_a_compare, RESUMABLE,
                            "compare")
    run_compare(config, world, resume=resume_dir is not None, overwrite=args.overwrite)
