"""One regression test per defect fixed by the redesign; each fails on the old behaviour."""

import json
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_digits_h5
from helpers import assert_all
from mpi4py import MPI

from ddmpi.config import ConfigError, dump, load_config
from ddmpi.parallel.group import Group
from ddmpi.training import preemption
from ddmpi.training.checkpoint import load_checkpoint
from ddmpi.training.loop import Preempted

# ------------------------------------------------ 1. --resume refuses a changed decomposition


def _stored_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = load_config("quickstart", [f"data.path={tmp_path / 'digits.h5'}",
                                        f"run.dir={run}"])
    (run / "config.yaml").write_text(dump(config))
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


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path / "evil.pt", marker)
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(path)
    assert not marker.exists()


def test_predict_refuses_a_malicious_run_checkpoint(tmp_path):
    data = write_digits_h5(tmp_path / "digits.h5")
    run = _stored_run(tmp_path)
    from ddmpi.data.schema import read_info
    from ddmpi.strategies.base import dataset_record

    (run / "dataset.json").write_text(json.dumps(dataset_record(read_info(data))))
    marker = tmp_path / "pwned"
    for sub in range(4):
        _malicious(run / "checkpoints" / f"local_{sub:03d}.pt", marker)
    proc = subprocess.run([sys.executable, "-m", "ddmpi", "predict", str(run), str(data)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "local_000.pt: unreadable or unsafe checkpoint, refused" in proc.stderr, proc.stderr
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


def test_train_one_epoch_does_not_synchronise_per_step(digits_sources, monkeypatch):
    from conftest import DIGITS_CNN

    from ddmpi.models.cnn import build_cnn
    from ddmpi.training import loop
    from ddmpi.training.loop import Step, Trainer, train_one_epoch

    train = digits_sources[0]
    torch.manual_seed(0)
    model = build_cnn(**DIGITS_CNN)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = Trainer(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1), 1)
    calls = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename == loop.__file__:
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    order = train.epoch_order(0, 0)
    batches = -(-len(order) // 16)
    sums = train_one_epoch(trainer, model, train, order, 16, Step(torch.device("cpu")),
                           lambda: False)
    monkeypatch.undo()
    assert sums["seen"] == len(train) and batches == 75
    assert "item" not in calls and "__bool__" not in calls, calls
    assert len(calls) <= 2, f"{len(calls)} host synchronisations in {batches} steps: {calls}"
