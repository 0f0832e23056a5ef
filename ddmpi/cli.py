"""Command line: ``ddmpi train | predict | compare`` (also ``python -m ddmpi ...``), MPI-safe.

Every subcommand runs under :func:`ddmpi.parallel.abort.run_or_abort`: an exception on any rank
prints that rank's message (also to its log file, once the run directory is open) and aborts the
whole job with a non-zero exit instead of leaving the other ranks waiting. ``train`` and
``compare`` take SIGUSR1/SIGTERM as a request to stop (:mod:`ddmpi.training.preemption`) from
before their heavy imports until the rank leaves.
"""

import argparse
import logging
import sys

from ddmpi import __version__
from ddmpi.training import preemption

RESUME_IF_POSSIBLE = "<run.dir>"  # --resume without RUN_DIR: the configured run.dir, if any
PREEMPTIBLE = ("train", "compare")  # commands that stop on a signal and exit 75


def _user_errors():
    from ddmpi.config import ConfigError
    from ddmpi.data.schema import DatasetError
    from ddmpi.parallel.cluster import BindingError
    from ddmpi.parallel.layout import MappingError
    from ddmpi.strategies.coherent import TransferError
    from ddmpi.strategies.rundir import RunDirError
    from ddmpi.training.checkpoint import CheckpointError
    from ddmpi.training.loop import Diverged

    return (BindingError, CheckpointError, ConfigError, DatasetError, Diverged, MappingError,
            RunDirError, TransferError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            PermissionError)


def _positive_int(text):
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ddmpi", description="Domain-decomposition training of CNN image classifiers "
        "under MPI: local CNNs per subdomain, coarse DNN on rank 0.")
    parser.add_argument("--version", action="version", version=f"ddmpi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train a decomposed CNN-DNN (mpirun -n P ddmpi train --config run.yaml)",
        description="Train one local CNN per subdomain (ranks own subdomains), gather the local "
        "decisions on rank 0, train the coarse DNN, compare with majority vote and averaged "
        "probabilities, and write metrics, plots and checkpoints to the run directory.")
    train.add_argument("--config", help="YAML run configuration (see ddmpi/configs/)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config field, e.g. --set local.epochs=5 (repeatable)")
    train.add_argument("--run-dir", help="run directory (overrides run.dir)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", nargs="?", const=RESUME_IF_POSSIBLE, metavar="RUN_DIR",
                       help="continue RUN_DIR where it stopped; without RUN_DIR, continue the "
                       "configured run directory if it holds a run, else start it")
    start.add_argument("--overwrite", action="store_true",
                       help="replace the run the run directory holds (without it, a run "
                       "directory holding a trained run is refused)")

    predict = sub.add_parser(
        "predict", help="classify new images with a trained run",
        description="Predict classes and probabilities of new images (a ddmpi HDF5 file, "
        "image files, NIfTI volumes or CIFAR python batch files such as test_batch) with a "
        "trained run directory; serial, or under MPI on any number of ranks with the subdomains "
        "(of a global CNN run: the images) spread over them (ranks beyond the subdomains idle).")
    predict.add_argument("run_dir", help="run directory written by 'ddmpi train', or one "
                         "strategy's run directory of 'ddmpi compare' (CNN-DNN, coherent or "
                         "global CNN)")
    predict.add_argument("inputs", nargs="+",
                         help="HDF5 data set, image files, NIfTI volumes or CIFAR batch files")
    predict.add_argument("--split", default="test", help="split to classify in an HDF5 input")
    predict.add_argument("--combiner", default="chosen",
                         choices=("chosen", "cnn_dnn", "average_log_probabilities",
                                  "average_probabilities", "majority_vote"),
                         help="how local decisions are combined (default: the one the run "
                         "chose on its holdout; a global CNN run has only 'chosen')")
    predict.add_argument("--out", help="write predictions as CSV (default: print)")

    compare = sub.add_parser(
        "compare", help="run parallel strategies side by side (mpirun -n P ddmpi compare "
        "--config run.yaml)",
        description="Train, in one MPI job on one data set, the global CNN data-parallel "
        "(torch DDP), the decomposed CNN-DNN (with majority vote and averaged probabilities), "
        "the coherent CNN-DNN from scratch and by transfer learning from that CNN-DNN; write "
        "comparison.json, comparison.md and comparison.png to the run directory.")
    compare.add_argument("--config", help="YAML run configuration (its 'compare' section "
                         "sets the strategies, see ddmpi/config.py)")
    compare.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="override a config field, e.g. --set compare.coherent_epochs=4")
    compare.add_argument("--run-dir", help="run directory (overrides run.dir)")
    compare.add_argument("--strategies", metavar="LIST",
                         help="comma-separated subset of global_ddp,cnn_dnn,coherent,"
                         "coherent_transfer (overrides compare.strategies)")
    compare.add_argument("--seeds", type=_positive_int, metavar="N",
                         help="run every strategy with N >= 1 seeds (overrides compare.seeds)")
    start = compare.add_mutually_exclusive_group()
    start.add_argument("--resume", nargs="?", const=RESUME_IF_POSSIBLE, metavar="RUN_DIR",
                       help="continue the comparison in RUN_DIR: runs finished in an earlier "
                       "job are read back, the interrupted one continues from its "
                       "checkpoints; without RUN_DIR, continue the configured run directory "
                       "if it holds a comparison, else start it")
    start.add_argument("--overwrite", action="store_true",
                       help="replace the comparison the run directory holds (without it, one "
                       "holding a trained run is refused)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command in PREEMPTIBLE:
        preemption.install()  # before MPI and torch: a signal at start-up stops the run
    from ddmpi.parallel.abort import prepare_exit_meeting, run_or_abort
    from ddmpi.parallel.group import Group
    from ddmpi.strategies.rundir import log_to_file

    def command(args, world):
        from importlib import import_module

        import_module(f"ddmpi.commands.{args.command}").main(args, world)

    world = Group.world()
    if args.command in PREEMPTIBLE:
        prepare_exit_meeting()
    run_or_abort(command, args, world, user_error_types=_user_errors(),
                 log=lambda text: log_to_file(world.rank, logging.ERROR, text))
    preemption.ignore()  # done: a signal must not kill this rank while MPI finalises
    return 0


if __name__ == "__main__":
    sys.exit(main())
