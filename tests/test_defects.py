"""One regression test per defect fixed by the redesign; each fails on the old behaviour."""

import json
import signal
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_digits_h5
from helpers import OperatorCounter, assert_all
from mpi4py import MPI

from ddmpi.config import ConfigError, dump, load_config
from ddmpi.parallel.group import Group
from ddmpi.training import preemption
from ddmpi.training.checkpoint import load_checkpoint
from ddmpi.training.loop import Preempted

# ------------------------------------------------ 1. --resume refuses a changed decomposition


def _stored_run(tmp_path):
    """A run directory with its configuration and a checkpoint (a run to continue)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = load_config("quickstart", [f"data.path={tmp_path / 'digits.h5'}",
                                        f"run.dir={run}"])
    (run / "config.yaml").write_text(dump(config))
    (run / "checkpoints" / "local_000.pt").write_text("trained")
    return run


def test_resume_without_config_refuses_a_changed_grid(tmp_path):
    from ddmpi.commands.train import resolve_config

    run = _stored_run(tmp_path)
    with pytest.raises(ConfigError, match=r"decomposition\.grid"):
        resolve_config(None, ["decomposition.grid=[4, 4]"], run)
    allowed = resolve_config(None, ["run.device=cpu"], run)
    assert allowed.run.device == "cpu" and allowed.decomposition.grid == [2, 2]


def test_cli_resume_with_a_changed_grid_names_the_field(tmp_path):
    run = _stored_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ddmpi", "train", "--resume", str(run),
                           "--set", "decomposition.grid=[4,4]"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "decomposition.grid" in proc.stderr


def test_cli_bare_resume_with_run_dir_continues_that_directory(tmp_path):
    """``--run-dir RUN --resume`` (no --config) means ``--resume RUN``: the stored grid binds."""
    run = _stored_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ddmpi", "train", "--run-dir", str(run),
                           "--resume", "--set", "decomposition.grid=[4,4]"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "decomposition.grid" in proc.stderr and "required" not in proc.stderr


# ---------------------------------------------------- 2. pickled code in a checkpoint refused


class _Payload:
    """Unpickling this creates (opens for writing) ``marker``: stands for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "epoch": 1, "payload": _Payload(marker)}, path)
    return path


def _garbage(path, marker=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    return path


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path / "evil.pt", marker)
    with pytest.raises(ValueError, match=r"evil.pt: unsafe checkpoint, refused: it holds "
                                         r"(builtins|io)\.open, not only tensors"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"hello", np.random.default_rng(0).bytes(4000)])
def test_a_garbage_checkpoint_is_one_line_naming_the_file(tmp_path, content):
    path = tmp_path / "local_000.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"{path}: not a ddmpi checkpoint, or corrupt (not a PyTorch "
                              f"checkpoint archive)")
    torch.save(torch.zeros(2), path)
    with pytest.raises(ValueError, match="local_000.pt: not a ddmpi checkpoint .holds a Tensor"):
        load_checkpoint(path)


def _error_lines(stderr):
    """stderr less Open MPI's abort banner: what ddmpi printed."""
    return [line for line in stderr.splitlines()
            if line.startswith("[ddmpi") or "Traceback" in line or "weights_only" in line]


@pytest.mark.parametrize("write, message", [
    (_malicious, "local_000.pt: unsafe checkpoint, refused: it holds "),
    (_garbage, "local_000.pt: not a ddmpi checkpoint, or corrupt"),
])
def test_predict_and_resume_refuse_a_bad_run_checkpoint(tmp_path, write, message):
    data = write_digits_h5(tmp_path / "digits.h5")
    run = _stored_run(tmp_path)
    from ddmpi.data.schema import read_info
    from ddmpi.strategies.base import dataset_record

    (run / "dataset.json").write_text(json.dumps(dataset_record(read_info(data))))
    marker = tmp_path / "pwned"
    for sub in range(4):
        write(run / "checkpoints" / f"local_{sub:03d}.pt", marker)
    for args in (["predict", str(run), str(data)], ["train", "--resume", str(run)]):
        proc = subprocess.run([sys.executable, "-m", "ddmpi", *args],
                              capture_output=True, text=True, timeout=300)
        lines = _error_lines(proc.stderr)
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"[ddmpi rank 0/1] error: {run}/checkpoints/{message}")
    assert not marker.exists()


# --------------------------------------------------------- 3. progress reaches 100 % on resume


def test_progress_after_resume_reaches_100_percent():
    from ddmpi.parallel.progress import Progress

    lines = []
    progress = Progress(Group.single(), 5, printer=lines.append)
    progress.epochs_resumed(2)
    for epoch in (3, 4, 5):
        progress.epoch_done("subdomain 0", SimpleNamespace(epoch=epoch, val_accuracy=0.5,
                                                           seconds=0.1))
    progress.rank_done()
    progress.wait_all()
    assert len(lines) == 3
    assert lines[-1].startswith("[5/5 epochs 100.0%]"), lines


# ------------------------------------------------------ 4. coarse history names holdout figures


def test_coarse_history_reports_holdout_not_training_accuracy():
    from ddmpi.coarse.dnn import predict_coarse, train_coarse
    from ddmpi.config import CoarseConfig

    rng = np.random.default_rng(0)
    n, s, k = 300, 4, 3
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(s, n, k)) + 1.5 * np.eye(k)[labels][None]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    cfg = CoarseConfig(epochs=15, patience=15)
    fit = train_coarse(probs, labels, cfg, seed=0)
    assert all("val_accuracy" not in r and "holdout_accuracy" in r for r in fit.history)
    hold = np.asarray(fit.holdout["indices"])
    assert 0 < len(hold) < n
    # the best epoch's figure is the accuracy on the holdout part, not on the training part
    on_holdout = float((predict_coarse(fit.model, probs[:, hold]).argmax(1)
                        == labels[hold]).mean())
    assert fit.history[fit.best_epoch]["holdout_accuracy"] == pytest.approx(on_holdout)


# ------------------------------------------------- 5. preemption between training and gather


def _context(world):
    from ddmpi.strategies.base import RunContext

    return RunContext(None, world, None, None, None, None, False)


def test_preemption_point_raises_on_a_requested_signal(monkeypatch):
    ctx = _context(Group.single())
    ctx.preemption_point()  # nothing requested: goes on
    monkeypatch.setitem(preemption._requested, "signal", signal.SIGUSR1)
    with pytest.raises(Preempted):
        ctx.preemption_point()


def test_cnn_dnn_evaluate_stops_before_the_gather(monkeypatch):
    from ddmpi.strategies.cnn_dnn import CNNDNN

    monkeypatch.setitem(preemption._requested, "signal", signal.SIGTERM)
    strategy = CNNDNN(_context(Group.single()))
    strategy.layout = None  # the gather would fail on it: the preemption point comes first
    with pytest.raises(Preempted):
        strategy.evaluate()


@pytest.mark.mpi(min_size=2)
def test_preemption_point_is_collective(monkeypatch):
    comm = MPI.COMM_WORLD
    ctx = _context(Group.world())
    if comm.rank == comm.size - 1:  # only the last rank got the signal
        monkeypatch.setitem(preemption._requested, "signal", signal.SIGUSR1)
    try:
        ctx.preemption_point()
        raised = False
    except Preempted:
        raised = True
    assert_all(comm, raised, "a rank went on to the gather after another was signalled")


# --------------------------------------------------- 6. loss and accuracy accumulate on device


def _augmented_epoch(train, device):
    """One epoch of the digits CNN over ``train`` with shift, flip and colour jitter, as the
    strategies run it; returns the epoch's sums and its number of batches."""
    from conftest import DIGITS_CNN

    from ddmpi.data.augment import Augmenter
    from ddmpi.models.cnn import build_cnn
    from ddmpi.training.loop import Step, Trainer, train_one_epoch

    torch.manual_seed(0)
    model = build_cnn(**DIGITS_CNN).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = Trainer(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1), 1)
    shape = tuple(train.x.shape[2:])
    aug = Augmenter(SimpleNamespace(shift=1, flip_axes=[-1], brightness=0.1, contrast=0.1),
                    shape, seed=0)
    box = tuple(slice(0, n) for n in shape)
    step = Step(device, augment=lambda x, idx, epoch: aug(x, box, box, idx, epoch))
    order = train.epoch_order(0, 0)
    sums = train_one_epoch(trainer, model, train, order, 16, step, lambda: False)
    return sums, -(-len(order) // 16)


def test_train_one_epoch_reads_no_scalar_per_step(digits_sources):
    """Source, augmentation and loop together: only the epoch's two totals are read."""
    with OperatorCounter() as reads:
        sums, batches = _augmented_epoch(digits_sources[0], torch.device("cpu"))
    assert sums["seen"] == len(digits_sources[0]) and batches == 75
    assert reads.scalar_reads <= 2, f"{reads.scalar_reads} scalar reads in {batches} steps"


def test_resident_source_copies_the_order_to_its_device_once(digits_sources, monkeypatch):
    train = digits_sources[0].to(torch.device("cpu"))
    copies = []
    original = torch.Tensor.to

    def counted(self, *args, **kwargs):
        if any(isinstance(a, torch.device) for a in args) or "device" in kwargs:
            copies.append(self.dtype)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counted)
    batches = list(train.batches(train.epoch_order(0, 0), 16))
    monkeypatch.undo()
    assert len(batches) == 75
    assert copies.count(torch.int64) == 1, f"{copies.count(torch.int64)} index copies"
    assert all(idx.device.type == "cpu" for _, _, idx in batches)


def _plain_epoch(train, model, optimizer, order, batch_size):
    """The usual PyTorch loop over a resident source: ``loss.item()`` every step."""
    import torch.nn.functional as F

    order = order.to(train.device)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        loss = F.cross_entropy(model(train.x[idx]).float(), train._y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()


def test_step_launches_at_most_four_operators_more_than_a_plain_loop(digits_sources):
    """The device-side loss and accuracy sums (add, argmax, eq, sum, add) less the plain
    loop's ``loss.item()`` are the only extras: on a GPU, where a small model's step is bound by
    kernel launches, they bound the loop's overhead (about 2 % of this VGG's step;
    benchmarks/RESULTS-step.md). Per step: the count of an epoch of 75 batches less that of an
    epoch of 25, over 50, so that the set-up (the epoch's order and totals, the optimizer's
    state) cancels."""
    from conftest import DIGITS_CNN

    from ddmpi.models.cnn import build_cnn
    from ddmpi.training.loop import Step, Trainer, train_one_epoch

    train = digits_sources[0].to(torch.device("cpu"))
    order = train.epoch_order(0, 0)
    assert len(order) == 75 * 16
    counts = {}
    for loop in ("plain", "ddmpi"):
        launches = []
        for batches in (25, 75):
            torch.manual_seed(0)
            model = build_cnn(**DIGITS_CNN)
            optimizer = torch.optim.Adam(model.parameters())
            with OperatorCounter() as ops:
                if loop == "plain":
                    _plain_epoch(train, model, optimizer, order[:batches * 16], 16)
                else:
                    trainer = Trainer(model, optimizer, None, 1)
                    train_one_epoch(trainer, model, train, order[:batches * 16], 16,
                                    Step(torch.device("cpu")), lambda: False)
            launches.append(ops.launches)
        counts[loop] = (launches[1] - launches[0]) / 50
    assert counts["ddmpi"] - counts["plain"] <= 4, counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA "
                    "notion; the two CPU tests above check the same step")
def test_cuda_epoch_synchronises_a_bounded_number_of_times(digits_sources):
    device = torch.device("cuda")
    train = digits_sources[0].to(device)
    _augmented_epoch(train, device)  # warm-up: allocator, normalisation constants, kernels
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, batches = _augmented_epoch(train, device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert batches == 75 and len(syncs) <= 6, [str(w.message) for w in syncs]
