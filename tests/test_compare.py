"""``ddmpi compare`` pieces without MPI: the compare config section, the global width rule, the
coherent model's coarse input, the comparison table and plot."""

import json

import numpy as np
import pytest
import torch

from ddmpi.coarse import combiners
from ddmpi.strategies.global_ddp import global_build_kwargs, global_width
from ddmpi.cli import build_parser
from ddmpi.strategies.coherent import LogInputs, coarse_module
from ddmpi.commands.compare import build_comparison, format_markdown, format_table, plot_comparison, \
    time_to_target
from ddmpi.config import ConfigError, load_config
from ddmpi.models.cnn import CoarseDNN, build_cnn, count_parameters


def _config(*overrides):
    return load_config(None, ["data.path=x.h5", *overrides])


def test_compare_section_defaults_and_validation():
    cmp = _config().compare
    assert cmp.strategies == ["global_ddp", "cnn_dnn", "coherent", "coherent_transfer"]
    assert cmp.global_width_factor == "auto" and cmp.coherent_epochs is None
    for bad, field in [("compare.strategies=[global, cnn_dnn]", "compare.strategies"),
                       ("compare.strategies=[]", "compare.strategies"),
                       ("compare.strategies=[coherent, coherent]", "compare.strategies"),
                       ("compare.strategies=[coherent_transfer]", "compare.strategies"),
                       ("compare.global_width_factor=wide", "compare.global_width_factor"),
                       ("compare.global_width_factor=0", "compare.global_width_factor"),
                       ("compare.global_width=0", "compare.global_width"),
                       ("compare.coherent_epochs=-1", "compare.coherent_epochs"),
                       ("compare.coherent_lr=0", "compare.coherent_lr"),
                       ("compare.transfer_lr_factor=-1", "compare.transfer_lr_factor"),
                       ("compare.target_accuracy=1.5", "compare.target_accuracy"),
                       ("compare.width=3", "compare.width")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            _config(bad)
    ok = _config("compare.strategies=[coherent_transfer]", "compare.transfer_from=runs/x")
    assert ok.compare.strategies == ["coherent_transfer"]


def test_global_width_rule_gives_the_local_networks_together_about_the_global_parameters():
    assert global_width(_config("local.model.width=16", "decomposition.grid=[2, 2]"), 4) == 32
    assert global_width(_config("local.model.width=16", "compare.global_width=20"), 4) == 20
    assert global_width(_config("local.model.width=16",
                                "compare.global_width_factor=1.5"), 4) == 24
    # 2x2 MNIST (28x28, overlap 2 -> 16x16 subimages): local width 16, global width 32
    local = build_cnn("vgg", 2, 1, 10, (16, 16), depth=2, width=16)
    config = _config("local.model.width=16", "decomposition.grid=[2, 2]")

    class Info:
        spatial_dims, channels, num_classes, spatial_shape = 2, 1, 10, (28, 28)

    kwargs = global_build_kwargs(config, Info)
    assert kwargs["input_shape"] == (28, 28) and kwargs["width"] == 32
    ratio = count_parameters(build_cnn(**kwargs)) / (4 * count_parameters(local))
    assert 0.9 < ratio < 1.1


def test_coarse_module_sees_what_the_cnn_dnn_coarse_dnn_was_trained_on():
    torch.manual_seed(0)
    coarse = CoarseDNN(4 * 10, 10, hidden=(16,)).eval()
    probs = np.random.default_rng(0).dirichlet(np.ones(10), size=(4, 32)).astype(np.float32)
    flat = torch.from_numpy(probs.transpose(1, 0, 2).reshape(32, 40))
    for inputs in ("log", "prob"):
        ref = combiners.coarse_predict(coarse, probs, inputs)
        with torch.no_grad():
            got = torch.softmax(coarse_module(coarse, inputs)(flat), 1).numpy()
        assert np.abs(got - ref).max() < 1e-6
    assert isinstance(coarse_module(coarse, "log"), LogInputs)
    assert coarse_module(coarse, "prob") is coarse
    with pytest.raises(ValueError):
        coarse_module(coarse, "logits")


def test_time_to_target():
    curve = [{"elapsed": 10.0, "val_accuracy": 0.5}, {"elapsed": 20.0, "val_accuracy": 0.9}]
    assert time_to_target(curve, 0.9) == 20.0
    assert time_to_target(curve, 0.4, offset=5.0) == 15.0
    assert time_to_target(curve, 0.95) is None


def _fake_runs():
    def curve(accs, step):
        return [{"epoch": i + 1, "elapsed": step * (i + 1), "val_accuracy": a,
                 "val_loss": 1 - a} for i, a in enumerate(accs)]

    def result(acc):
        return {"test_accuracy": acc, "per_class_accuracy": {"0": acc, "1": acc},
                "confusion_matrix": [[1, 0], [0, 1]]}

    timings = {"0": {"training": 9.0}, "1": {"training": 10.0}}
    return {
        "global_ddp": ({"test_accuracy": 0.95, "global": {"global_ddp": result(0.95)},
                        "parameters": 1000, "epochs": 2, "best_epoch": 2,
                        "history": curve([0.9, 0.96], 50.0), "timings_seconds": timings,
                        "model": {"family": "vgg", "depth": 2, "width": 32,
                                  "input_shape": [28, 28]}}, 100.0),
        "cnn_dnn": ({"global": {n: result(a) for n, a in [("cnn_dnn", 0.94),
                                                         ("majority_vote", 0.9),
                                                         ("average_probabilities", 0.92)]},
                     "local": {"0": {"best_epoch": 2}, "1": {"best_epoch": 2}},
                     "parameters": {"local_total": 800, "coarse": 50},
                     "timings_seconds": timings}, 40.0),
        "coherent": ({"test_accuracy": 0.93, "global": {"coherent": result(0.93)},
                      "parameters": {"total": 850}, "epochs": 2, "best_epoch": 1,
                      "history": curve([0.93, 0.92], 20.0), "ranks_used": 2,
                      "timings_seconds": timings}, 45.0),
        "coherent_transfer": ({"test_accuracy": 0.955,
                               "global": {"coherent_transfer": result(0.955)},
                               "parameters": {"total": 850}, "epochs": 2, "best_epoch": 2,
                               "history": curve([0.95, 0.97], 20.0), "ranks_used": 2,
                               "timings_seconds": timings}, 44.0),
    }


def test_comparison_table_json_markdown_and_plot(tmp_path):
    config = _config("local.epochs=2")
    comparison = build_comparison(config, 2, _fake_runs())
    rows = {r["strategy"]: r for r in comparison["rows"]}
    assert list(rows) == ["global_ddp", "cnn_dnn", "average_probabilities", "majority_vote",
                          "coherent", "coherent_transfer"]
    assert comparison["target_accuracy"] == 0.93        # lowest best validation accuracy
    assert rows["global_ddp"]["time_to_target_seconds"] == 100.0
    assert rows["coherent"]["time_to_target_seconds"] == 20.0
    assert rows["coherent_transfer"]["time_to_target_seconds"] == 40.0 + 20.0
    assert rows["coherent_transfer"]["total_seconds"] == 84.0
    assert rows["cnn_dnn"]["time_vs_global"] == 0.4
    assert rows["majority_vote"]["parameters"] == 800 and rows["cnn_dnn"]["parameters"] == 850
    assert rows["cnn_dnn"]["phases_seconds"] == {"training": 10.0}
    assert comparison["curves"]["coherent_transfer"]["points"][0]["elapsed"] == 60.0
    table = format_table(comparison)
    assert "coherent CNN-DNN, transfer" in table and "95.50 %" in table and "84.0" in table
    assert "| CNN-DNN | 94.00 % |" in format_markdown(comparison)
    json.dumps(comparison)
    plot_comparison(tmp_path / "comparison.png", comparison)
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"

    runs = _fake_runs()   # a transfer from a CNN-DNN whose coarse DNN was trained on val
    runs["coherent_transfer"][0]["selection"] = "last epoch (validation used by the source)"
    contaminated = build_comparison(config, 2, runs)
    rows = {r["strategy"]: r for r in contaminated["rows"]}
    assert contaminated["curves"]["coherent_transfer"]["held_out"] is False
    assert rows["coherent_transfer"]["time_to_target_seconds"] is None
    assert contaminated["target_accuracy"] == 0.93
    plot_comparison(tmp_path / "contaminated.png", contaminated)

    explicit = build_comparison(_config("compare.target_accuracy=0.99"), 2, _fake_runs())
    assert all(r["time_to_target_seconds"] is None for r in explicit["rows"])


def test_cli_compare_subcommand():
    args = build_parser().parse_args(["compare", "--config", "c.yaml", "--strategies",
                                      "cnn_dnn,coherent", "--set", "local.epochs=1"])
    assert (args.command, args.config, args.strategies, args.set) == (
        "compare", "c.yaml", "cnn_dnn,coherent", ["local.epochs=1"])
