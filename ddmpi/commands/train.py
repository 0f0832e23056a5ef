"""``ddmpi train``: resolve the configuration (fresh or resumed) and run the CNN-DNN strategy."""

from ddmpi.commands import exit_preempted, resolve_config, resume_dir_of
from ddmpi.strategies.base import run
from ddmpi.strategies.cnn_dnn import CNNDNN
from ddmpi.training import preemption
from ddmpi.training.loop import Preempted


def main(args, world):
    """Entry of ``ddmpi train``; exits 75 after a preemption (checkpoints written)."""
    overrides = list(args.set or []) + ([f"run.dir={args.run_dir}"] if args.run_dir else [])
    resume_dir = resume_dir_of(args, overrides)
    config = resolve_config(args.config, overrides, resume_dir)
    try:
        run(CNNDNN, config, world, resume=resume_dir is not None, overwrite=args.overwrite)
    except Preempted as stop:
        exit_preempted(world.rank, f"stopped by {preemption.describe()} ({stop}); exiting "
                       f"with {preemption.EXIT_PREEMPTED} for requeue")
