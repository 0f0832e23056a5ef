"""Training-step overhead: ddmpi's loop against a plain PyTorch loop, same model, same tensors.

    python benchmarks/bench_step.py [--device cpu|cuda] [--samples N] [--epochs E] [--repeat R]

Prints images/s of both loops (median and spread over R repeats, interleaved) and their ratio,
and the operators each dispatches per step (set-up excluded: the difference of the counts of
epochs of 40 and 20 batches): those that launch device work, which bound a small model's step
on a GPU. The plain loop is the usual one (index, forward, backward, step,
``loss.item()`` per step).
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddmpi.data.schema import Normalization
from ddmpi.data.sources import TensorSource
from ddmpi.models.cnn import build_cnn
from ddmpi.training.loop import Step, Trainer, train_one_epoch
from ddmpi.training.optim import make_optimizer, make_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import OperatorCounter  # noqa: E402 (the tests' counter; after the path set-up)


def model_and_data(args, device):
    torch.manual_seed(0)
    model = build_cnn("vgg", 2, 3, 10, (32, 32), depth=3, width=args.width).to(device)
    x = torch.randint(0, 256, (args.samples, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (args.samples,))
    return model, x, y


def plain(args, device):
    model, x, y = model_and_data(args, device)
    x = ((x.float() / 255 - 0.5) / 0.25).to(device)
    y = y.to(device)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(y), device=device)
        for i in range(0, len(y), args.batch):
            idx = order[i:i + args.batch]
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                xb = x[idx].contiguous(memory_format=layout)
                loss = F.cross_entropy(model(xb).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
    _sync(device)
    return args.epochs * len(y) / (time.perf_counter() - start)


def ddmpi_loop(args, device):
    model, x, y = model_and_data(args, device)
    x = (x.float() / 255 - 0.5) / 0.25  # the plain loop's tensors; identity normalisation
    source = TensorSource(x, y, Normalization(mean=[0.0] * 3, std=[1.0] * 3)).to(device)
    cfg_opt = type("O", (), {"name": "adam", "lr": 1e-3, "weight_decay": 0.0})
    opt = make_optimizer(model.parameters(), cfg_opt)
    sched = make_scheduler(opt, type("S", (), {"name": "none"}), args.epochs)
    trainer = Trainer(model, opt, sched, args.epochs)
    step = Step(device, amp=device.type == "cuda", channels_last=args.channels_last)
    if step.channels_last:
        model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        trainer.epoch = epoch
        train_one_epoch(trainer, model, source, source.epoch_order(0, epoch), args.batch, step,
                        lambda: False)
    _sync(device)
    return args.epochs * len(y) / (time.perf_counter() - start)


def launches_per_step(loop, args, device):
    """Operators per step of ``loop``: the count of one epoch of 40 batches less that of one
    epoch of 20, over 20. The set-up (model, data, normalisation, optimizer, the epoch's order
    and totals) is the same in both and cancels: only the steps' operators remain."""
    counts = []
    for batches in (20, 40):
        short = copy.copy(args)
        short.samples, short.epochs = batches * args.batch, 1
        with OperatorCounter() as ops:
            loop(short, device)
        counts.append(ops.launches)
    return (counts[1] - counts[0]) / 20


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true",
                        help="both loops with channels_last (ddmpi: run.channels_last)")
    args = parser.parse_args()
    device = torch.device(args.device)
    plain(args, device), ddmpi_loop(args, device)  # warm-up (kernels, allocator)
    rates = {"plain PyTorch": [], "ddmpi": []}
    for _ in range(args.repeat):
        rates["plain PyTorch"].append(plain(args, device))
        rates["ddmpi"].append(ddmpi_loop(args, device))
    print(f"device {device}, {args.samples} images 3x32x32, batch {args.batch}, VGG depth 3 "
          f"width {args.width}, {args.epochs} epochs, {args.repeat} interleaved repeats, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name, values in rates.items():
        print(f"{name:14s} median {statistics.median(values):9.1f} images/s "
              f"(min {min(values):.1f}, max {max(values):.1f})")
    ratio = statistics.median(rates["ddmpi"]) / statistics.median(rates["plain PyTorch"])
    print(f"ddmpi / plain PyTorch throughput: {ratio:.3f}")
    ops = [launches_per_step(loop, args, device) for loop in (plain, ddmpi_loop)]
    print(f"operators launched per step: plain PyTorch {ops[0]:.1f}, ddmpi {ops[1]:.1f} "
          f"(ratio {ops[0] / ops[1]:.3f})")


if __name__ == "__main__":
    main()
