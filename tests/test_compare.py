"""``ddmpi compare`` pieces without MPI: the compare config section, the global width rules
(compute- and parameter-matched), the strategy list, summarise (mean +- std over seeds, paired
tests over test images, the transfer's prior CNN-DNN run), the comparison table, Markdown and
plot, the warm-up, the refused configurations, the command line."""

import json
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ddmpi.cli import build_parser
from ddmpi.coarse.dnn import CoarseNet
from ddmpi.commands import compare
from ddmpi.commands.compare import run_compare, strategies, warm_up
from ddmpi.report.summary import paired_tests, summarise
from ddmpi.config import ConfigError, load_config
from ddmpi.data.decomposition import Decomposition
from ddmpi.data.schema import read_info
from ddmpi.models.cnn import build_cnn, count_parameters
from ddmpi.models.flops import training_flops
from ddmpi.parallel.group import Group
from ddmpi.report.comparison import format_markdown, format_table, plot_comparison
from ddmpi.report.stats import classification_metrics, sign_flip_test
from ddmpi.strategies.base import RunResult, decomposition_of
from ddmpi.strategies.cnn_dnn import CNNDNN
from ddmpi.strategies.coherent import Coherent, CoherentTransfer
from ddmpi.strategies.global_ddp import GlobalDDP, cnn_dnn_budget, global_width, local_budget
from ddmpi.strategies.local import build_kwargs
from ddmpi.training import preemption


def _config(*overrides):
    return load_config(None, ["data.path=x.h5", *overrides])


def test_compare_section_defaults_and_validation():
    cmp = _config().compare
    assert cmp.strategies == ["global_ddp", "cnn_dnn", "coherent", "coherent_transfer"]
    assert cmp.global_widths == ["compute", "parameters"]
    assert cmp.seeds == 1 and cmp.coherent_epochs is None
    for bad, field in [("compare.strategies=[global, cnn_dnn]", "compare.strategies"),
                       ("compare.strategies=[]", "compare.strategies"),
                       ("compare.strategies=[coherent, coherent]", "compare.strategies"),
                       ("compare.strategies=[coherent_transfer]", "compare.strategies"),
                       ("compare.global_widths=[wide]", "compare.global_widths"),
                       ("compare.global_widths=[0]", "compare.global_widths"),
                       ("compare.seeds=0", "compare.seeds"),
                       ("compare.coherent_epochs=-1", "compare.coherent_epochs"),
                       ("compare.coherent_lr=0", "compare.coherent_lr"),
                       ("compare.transfer_lr_factor=-1", "compare.transfer_lr_factor"),
                       ("compare.target_accuracy=1.5", "compare.target_accuracy"),
                       ("compare.width=3", "compare.width")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            _config(bad)
    ok = _config("compare.strategies=[coherent_transfer]", "compare.transfer_from=runs/x",
                 "compare.global_widths=[compute, 12]", "compare.seeds=3")
    assert ok.compare.strategies == ["coherent_transfer"]
    assert ok.compare.global_widths == ["compute", 12] and ok.compare.seeds == 3


def test_strategies_expand_the_global_widths_in_order():
    config = _config("compare.global_widths=[compute, parameters, 6]")
    runs = strategies(config)
    assert [name for name, _ in runs] == [
        "global_ddp[compute]", "global_ddp[parameters]", "global_ddp[6]", "cnn_dnn",
        "coherent", "coherent_transfer"]
    classes = dict(runs)
    assert [classes[f"global_ddp[{w}]"].width_rule for w in ("compute", "parameters", 6)] == [
        "compute", "parameters", 6]
    assert all(issubclass(classes[f"global_ddp[{w}]"], GlobalDDP)
               for w in ("compute", "parameters", 6))
    assert classes["cnn_dnn"] is CNNDNN and classes["coherent"] is Coherent
    assert classes["coherent_transfer"] is CoherentTransfer
    resolved = dict(strategies(config, {"compute": 7, "parameters": 9, 6: 6}))
    assert [resolved[f"global_ddp[{w}]"].width for w in ("compute", "parameters", 6)] == [
        7, 9, 6]
    assert classes["global_ddp[compute]"].width is None  # resolved by the run itself
    only = strategies(_config("compare.strategies=[coherent, global_ddp]",
                              "compare.global_widths=[parameters]"))
    assert [name for name, _ in only] == ["coherent", "global_ddp[parameters]"]


MNIST = SimpleNamespace(spatial_dims=2, channels=1, num_classes=10, spatial_shape=(28, 28))


def _global(config, width):
    return build_cnn(**build_kwargs(config, MNIST, MNIST.spatial_shape, width))


def _flops(model):
    return training_flops(model, model.config["input_shape"], model.config["in_channels"])


def test_global_width_rules_match_the_cnn_dnn():
    """2x2 MNIST-sized images (28x28, overlap 2 -> 16x16 subimages), local width 8: compute
    matches the local CNNs' training FLOPs, parameters the local CNNs' and the coarse DNN's."""
    config = _config("local.model.width=8", "local.model.depth=2", "decomposition.grid=[2, 2]",
                     "decomposition.overlap=2")
    decomposition = Decomposition((28, 28), [2, 2], 2)
    flops, params = local_budget(config, MNIST, decomposition)
    local = build_cnn("vgg", 2, 1, 10, decomposition.subdomain_shape(0), depth=2, width=8,
                      dropout=config.local.model.dropout)
    assert params == 4 * count_parameters(local)
    assert flops == 4 * _flops(local)
    assert global_width(config, MNIST, decomposition, 20) == 20

    budget = cnn_dnn_budget(config, MNIST, decomposition)
    coarse = CoarseNet(4, 10, config.coarse.hidden)   # the CNN-DNN's coarse DNN
    assert count_parameters(coarse) == 40 * 64 + 64 + 64 * 10 + 10 + 4 == 3278
    assert budget["parameters"] == {"target": params + 3278, "local_cnns": params,
                                    "coarse_dnn": 3278, "coarse_included": True}
    assert budget["compute"] == {"target": flops, "local_cnns": flops, "coarse_included": False,
                                 "coarse_dnn": training_flops(coarse, (), 40)}
    assert 0 < budget["compute"]["coarse_dnn"] < flops / 100

    # parameter-matched: the closest parameter count to the whole CNN-DNN's among the
    # neighbouring widths (18 here; 16 when matched to the local CNNs alone)
    target = budget["parameters"]["target"]
    w = global_width(config, MNIST, decomposition, "parameters")
    assert global_width(config, MNIST, decomposition, "parameters", budget) == w
    counts = {v: count_parameters(_global(config, v)) for v in (w - 1, w, w + 1)}
    assert abs(counts[w] - target) <= min(abs(counts[w - 1] - target),
                                          abs(counts[w + 1] - target))
    assert abs(counts[w] - params) > abs(count_parameters(_global(config, 16)) - params)

    # compute-matched: the global CNN's training FLOPs lie within the neighbour gap of the
    # local CNNs' total (and are the closest of the neighbours)
    w = global_width(config, MNIST, decomposition, "compute")
    cost = {v: _flops(_global(config, v)) for v in (w - 1, w, w + 1)}
    assert abs(cost[w] - flops) <= max(cost[w + 1] - cost[w], cost[w] - cost[w - 1])
    assert abs(cost[w] - flops) <= min(abs(cost[w - 1] - flops), abs(cost[w + 1] - flops))


LABELS = np.arange(40) % 4
CLASSES = ["a", "b", "c", "d"]


def _probs(accuracy, seed):
    """(40, 4) probabilities whose arg-max is right on about ``accuracy`` of LABELS."""
    rng = np.random.default_rng(seed)
    right = rng.random(len(LABELS)) < accuracy
    pred = np.where(right, LABELS, (LABELS + 1) % 4)
    probs = rng.dirichlet(np.ones(4), len(LABELS)) * 0.2
    probs[np.arange(len(LABELS)), pred] += 0.8
    return probs / probs.sum(1, keepdims=True)


def _result(name, accs, seed, *, parameters, flops, wall, rss, extra=None):
    """A RunResult whose combiners ``accs`` ({combiner: accuracy}) are real metrics."""
    probs = {c: _probs(a, seed + i) for i, (c, a) in enumerate(accs.items())}
    history = {"main": [{"epoch": e, "seconds": 2.0, "val_accuracy": 0.5 + 0.1 * e}
                        for e in (1, 2)]}
    return RunResult(strategy=name,
                     combiners={c: classification_metrics(p, LABELS, CLASSES)
                                for c, p in probs.items()},
                     test_correct={c: p.argmax(1) == LABELS for c, p in probs.items()},
                     parameters=parameters, flops_per_sample=flops, history=history,
                     extra=extra or {}, wall_seconds=wall,
                     peak_memory_mb={"0": {"rss": rss}, "1": {"rss": rss + 10}})


# what the matched global CNNs of _fake_runs match (resolve_widths' budget)
BUDGET = {"compute": {"target": 1_900_000, "local_cnns": 1_900_000, "coarse_dnn": 14_250,
                      "coarse_included": False},
          "parameters": {"target": 820, "local_cnns": 700, "coarse_dnn": 120,
                         "coarse_included": True}}


def _fake_runs(seeds=2, honest=True):
    runs = {}
    for k in range(seeds):
        runs.setdefault("global_ddp[compute]", []).append(_result(
            "global_ddp", {"global_ddp": 0.9}, 10 * k, parameters=1000, flops=2e6,
            wall=100.0 + k, rss=300 + 20 * k, extra={"width": 12}))
        runs.setdefault("global_ddp[parameters]", []).append(_result(
            "global_ddp", {"global_ddp": 0.85}, 10 * k + 1, parameters=800, flops=1.5e6,
            wall=80.0, rss=290, extra={"width": 10}))
        cnn = {"chosen": 0.8, "cnn_dnn": 0.8, "average_probabilities": 0.7,
               "majority_vote": 0.6}
        runs.setdefault("cnn_dnn", []).append(_result(
            "cnn_dnn", cnn, 10 * k + 2, parameters=850, flops=1.8e6, wall=40.0 + 2 * k,
            rss=200, extra={"chosen": "cnn_dnn", "coarse": {"holdout": {"size": 36,
                                                                         "honest": honest}}}))
        runs.setdefault("coherent", []).append(_result(
            "coherent", {"coherent": 0.75}, 10 * k + 7, parameters=850, flops=1.8e6,
            wall=50.0, rss=210))
        runs.setdefault("coherent_transfer", []).append(_result(
            "coherent_transfer", {"coherent_transfer": 0.82}, 10 * k + 8, parameters=850,
            flops=1.8e6, wall=10.0, rss=210))
    return runs


def test_summarise_mean_std_costs_and_paired_tests():
    runs = _fake_runs()
    c = summarise(_config("local.epochs=2", "compare.seeds=2"), 2, runs, BUDGET)
    rows = c["rows"]
    assert list(rows) == ["global_ddp[compute]", "global_ddp[parameters]", "chosen", "cnn_dnn",
                          "average_probabilities", "majority_vote", "coherent",
                          "coherent_transfer"]
    for name, row in rows.items():
        accs = [r.combiners[c_name]["accuracy"] for r in runs[row["run"]]
                for c_name in [name if row["run"] == "cnn_dnn" else
                               next(iter(r.combiners))]]
        assert row["accuracy"]["values"] == accs and row["accuracy"]["n"] == 2
        assert row["accuracy"]["mean"] == pytest.approx(np.mean(accs))
        assert row["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    g = rows["global_ddp[compute]"]
    assert g["wall_seconds"]["mean"] == 100.5 and g["time_vs_compute_matched"] == 1.0
    assert rows["cnn_dnn"]["time_vs_compute_matched"] == pytest.approx(41.0 / 100.5)
    assert g["flops_per_sample"] == 2e6 and g["parameters"] == 1000 and g["width"] == 12
    assert g["peak_rss_mb"] == 330                   # the larger rank in the larger seed
    assert rows["chosen"]["chosen"] == ["cnn_dnn", "cnn_dnn"]
    assert rows["majority_vote"]["parameters"] == 850

    assert set(c["paired"]) == {"global_ddp[compute]", "global_ddp[parameters]",
                                "average_probabilities"}
    mine = np.stack([r.test_correct["chosen"] for r in runs["cnn_dnn"]])
    base = np.stack([r.test_correct["global_ddp"] for r in runs["global_ddp[compute]"]])
    t = c["paired"]["global_ddp[compute]"]
    assert (t["images"], t["seeds"]) == (len(LABELS), 2)
    assert t["sign_flip_p"] == sign_flip_test(mine, base)
    assert t["bootstrap"]["diff"] == pytest.approx(mine.mean() - base.mean())
    assert t["bootstrap"]["low"] <= t["bootstrap"]["diff"] <= t["bootstrap"]["high"]
    assert list(c["curves"]) == ["global_ddp[compute]", "global_ddp[parameters]", "coherent",
                                 "coherent_transfer"]
    assert [p["elapsed"] for p in c["curves"]["coherent"]] == [2.0, 4.0]
    # time to target: the lowest best validation accuracy of the curves with held-out
    # validation, reached by every one; the transfer's validation decisions trained its
    # coarse DNN (train_on: train+val), so it has none
    assert c["validation_not_held_out"] == ["coherent_transfer"]
    fair = {n: line for n, line in c["curves"].items() if n != "coherent_transfer"}
    target = min(max(p["val_accuracy"] for p in line) for line in fair.values())
    assert c["target_accuracy"] == target
    for name, line in fair.items():
        first = next(p["elapsed"] for p in line if p["val_accuracy"] >= target)
        assert rows[name]["time_to_target"] == first
    assert rows["cnn_dnn"]["time_to_target"] is None
    assert rows["coherent_transfer"]["time_to_target"] is None
    assert "Coherent CNN-DNN, transfer: no time to target" in format_markdown(c)
    per_seed = c["paired"]["global_ddp[compute]"]["per_seed"]
    assert per_seed == pytest.approx((mine.mean(1) - base.mean(1)).tolist())
    assert "per seed " + ", ".join(f"{100 * d:+.2f}" for d in per_seed) in format_table(c)
    json.dumps(c, default=float)


def test_time_to_target_needs_two_curves_and_a_held_out_validation():
    """One curve gives no default target (it would be that curve's own best); with
    coarse.train_on: train the transfer's validation decisions are held out and count."""
    runs = {k: v for k, v in _fake_runs().items() if k in ("global_ddp[compute]", "cnn_dnn")}
    c = summarise(_config("compare.seeds=2"), 2, runs, BUDGET)
    assert c["target_accuracy"] is None
    assert rows_none(c)
    c = summarise(_config("compare.seeds=2", "compare.target_accuracy=0.5"), 2, runs, BUDGET)
    assert c["rows"]["global_ddp[compute]"]["time_to_target"] is not None
    c = summarise(_config("compare.seeds=2", "coarse.train_on=train"), 2, _fake_runs(), BUDGET)
    assert c["validation_not_held_out"] == []
    assert c["rows"]["coherent_transfer"]["time_to_target"] is not None


def rows_none(c):
    return all(row["time_to_target"] is None for row in c["rows"].values())


def test_summarise_states_the_matched_targets_per_seed_walls_and_peak_memory():
    """Each matched global CNN: the CNN-DNN's cost it matches, what it has, the deviation;
    wall times and their ratios to the compute-matched global CNN per seed; peak RSS the
    largest of every rank and seed."""
    c = summarise(_config("compare.seeds=2"), 2, _fake_runs(), BUDGET)
    assert c["matched"] == {
        "global_ddp[compute]": {"rule": "compute", **BUDGET["compute"], "width": 12,
                                "achieved": 2e6, "deviation": pytest.approx(2 / 1.9 - 1)},
        "global_ddp[parameters]": {"rule": "parameters", **BUDGET["parameters"], "width": 10,
                                   "achieved": 800, "deviation": pytest.approx(800 / 820 - 1)}}
    rows = c["rows"]
    assert rows["cnn_dnn"]["time_vs_compute_matched"] == pytest.approx(41.0 / 100.5)
    assert rows["cnn_dnn"]["time_vs_compute_matched_per_seed"] == pytest.approx(
        [40.0 / 100.0, 42.0 / 101.0])
    assert rows["global_ddp[compute]"]["time_vs_compute_matched_per_seed"] == [1.0, 1.0]
    assert rows["global_ddp[compute]"]["peak_rss_mb"] == 330 and rows["chosen"][
        "peak_rss_mb"] == 210
    assert summarise(_config(), 2, _fake_runs(), None)["matched"] == {}
    table, markdown = format_table(c), format_markdown(c)
    for text in ("parameter-matched: target 820 parameters (local CNNs 700 + coarse DNN 120), "
                 "width 10 gives 800 (-2.44 %)",
                 "compute-matched: target 1.900 train MFLOP/sample (local CNNs; the coarse "
                 "DNN's 0.014 left out), width 12 gives 2.000 (+5.26 %)",
                 "wall per seed (s), global CNN, compute-matched (DDP): 100.00, 101.00\n",
                 "wall per seed (s), CNN-DNN: 40.00, 42.00; ratio to compute-matched 0.40, 0.42",
                 "wall per seed (s), coherent CNN-DNN, transfer: 50.00, 52.00; ratio to "
                 "compute-matched 0.50, 0.51"):
        assert text in table and text in markdown, text
    assert table.count("wall per seed") == 5
    for text in ("Time / compute-matched: the ratio of the mean wall times over the seeds",
                 "Peak RSS: the largest resident set of any rank in any seed",
                 "the coarse DNN's (0.014 MFLOP per sample and step, 0.75 % of the local "
                 "CNNs') left out", "closest to the whole CNN-DNN's, local CNNs and coarse DNN"):
        assert text in markdown, text
    json.dumps(c, default=float)


def _with_rss_scope(runs, scope):
    for results in runs.values():
        for r in results:
            for m in r.peak_memory_mb.values():
                m["rss_scope"] = scope
    return runs


@pytest.mark.parametrize("scopes, text", [
    (["run"], "each run's own (the process's peak is reset at the start of every run)"),
    (["process"], "as the process's high-water mark since start-up"),
    (["run", "process"], "so a row also carries the peaks of the runs before it")])
def test_legend_says_whose_peak_the_rss_is(scopes, text):
    """Per-run peaks only when every rank of every run could reset its peak."""
    runs = _with_rss_scope(_fake_runs(), scopes[0])
    runs["coherent"][1].peak_memory_mb["1"]["rss_scope"] = scopes[-1]
    c = summarise(_config("compare.seeds=2"), 2, runs, BUDGET)
    assert c["rss_scope"] == ("run" if scopes == ["run"] else "process")
    assert text in format_markdown(c)


@pytest.mark.parametrize("overrides, honest, text", [
    ([], True, "a seeded, stratified 20 % (36 decisions) of the validation decisions only "
               "(coarse.train_on: train+val; the local CNNs did not train on them"),
    (["coarse.train_on=val", "coarse.holdout_fraction=0.25"], True,
     "25 % (36 decisions) of the validation decisions (coarse.train_on: val"),
    (["coarse.train_on=crossfit"], True,
     "of the out-of-fold training decisions and the validation decisions"),
    (["coarse.train_on=train"], False, "of the training decisions (coarse.train_on: train; "),
    ([], False, "of all the decisions it trains on (coarse.train_on: train+val; fewer than"),
    (["coarse.fallback=false"], True, "The CNN-DNN row is the coarse DNN (coarse.fallback: "
                                      "false); its early stopping uses a holdout")])
def test_legend_says_where_the_holdout_was_drawn_from(overrides, honest, text):
    c = summarise(_config(*overrides), 2, _fake_runs(honest=honest), BUDGET)
    assert c["coarse"]["train_on"] == _config(*overrides).coarse.train_on
    markdown = format_markdown(c)
    assert text in markdown
    assert "coarse model's training decisions" not in markdown
    assert ("significantly more often" in markdown) == ("coarse.fallback=false" not in overrides)


def test_transfer_is_charged_the_cnn_dnn_run_it_starts_from(tmp_path):
    """The coherent transfer's wall time, curve and time to target start after the CNN-DNN
    run whose local CNNs and coarse model it loads: the same seed's, or transfer_from's."""
    runs = _fake_runs()
    c = summarise(_config("compare.seeds=2"), 2, runs, BUDGET)
    rows, lines = c["rows"], c["curves"]
    assert rows["coherent_transfer"]["wall_seconds"]["values"] == [10.0 + 40.0, 10.0 + 42.0]
    assert rows["coherent"]["wall_seconds"]["values"] == [50.0, 50.0]
    assert [p["elapsed"] for p in lines["coherent_transfer"]] == [42.0, 44.0]
    held_out = summarise(_config("compare.seeds=2", "coarse.train_on=train"), 2, runs, BUDGET)
    assert held_out["rows"]["coherent_transfer"]["time_to_target"] >= 42.0

    (tmp_path / "metrics.json").write_text(json.dumps({"wall_seconds": 500.0}))
    elsewhere = summarise(_config("compare.seeds=2", f"compare.transfer_from={tmp_path}"), 2,
                          runs, BUDGET)
    assert elsewhere["rows"]["coherent_transfer"]["wall_seconds"]["values"] == [510.0, 510.0]
    assert [p["elapsed"] for p in elsewhere["curves"]["coherent_transfer"]] == [502.0, 504.0]


def test_paired_tests_take_the_image_as_the_unit():
    """Repeating one seed's predictions S times adds no evidence: same p-value, same interval
    (pooling the seeds as independent pairs would shrink both)."""
    rng = np.random.default_rng(3)
    mine, theirs = rng.random(200) < 0.8, rng.random(200) < 0.7
    one = paired_tests({"chosen": [mine], "average_probabilities": [theirs]})
    three = paired_tests({"chosen": [mine] * 3, "average_probabilities": [theirs] * 3})
    a, b = one["average_probabilities"], three["average_probabilities"]
    assert (a["images"], a["seeds"], b["images"], b["seeds"]) == (200, 1, 200, 3)
    assert b["sign_flip_p"] == pytest.approx(a["sign_flip_p"])
    assert b["bootstrap"] == pytest.approx(a["bootstrap"])
    assert 0.0 < a["sign_flip_p"] < 0.05


def test_paired_tests_need_the_cnn_dnn_and_skip_absent_baselines():
    assert paired_tests({"global_ddp[compute]": [np.ones(3, bool)]}) == {}
    out = paired_tests({"chosen": [np.array([True, False, True])],
                        "average_probabilities": [np.array([True, True, False])]})
    assert list(out) == ["average_probabilities"] and out["average_probabilities"]["images"] == 3


def test_comparison_table_markdown_and_plot(tmp_path):
    c = summarise(_config("local.epochs=2", "compare.seeds=2"), 2, _fake_runs(), BUDGET)
    table = format_table(c)
    for text in ("global CNN, compute-matched (DDP)", "global CNN, parameter-matched (DDP)",
                 "CNN-DNN (combiner chosen on holdout)", "coherent CNN-DNN", "+-",
                 "train MFLOP/sample", "peak RSS (MiB)", "parameters", "sign-flip test p",
                 f"({len(LABELS)} test images x 2 seeds)", "2 seeds, mean +- std",
                 "2.0", "1,000", "330"):
        assert text in table, text
    acc = c["rows"]["global_ddp[compute]"]["accuracy"]
    assert f"{100 * acc['mean']:.2f} +- {100 * acc['std']:.2f} %" in table
    assert table.count("CNN-DNN vs ") == 3
    markdown = format_markdown(c)
    assert "| global CNN, compute-matched (DDP) |" in markdown
    assert "| coherent CNN-DNN |" in markdown and "Compute-matched" in markdown
    for text in ("untimed warm-up", "include that run's wall time",
                 "'-' for the CNN-DNN rows", "sign-flip permutation test"):
        assert text in markdown, text
    plot_comparison(tmp_path / "comparison.png", c)
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_one_seed_prints_means_only():
    one = summarise(_config(), 2, _fake_runs(1), BUDGET)
    assert all(r["accuracy"]["std"] == 0.0 for r in one["rows"].values())
    table = format_table(one)
    assert "+-" not in table and "1 seed;" in table and "test images x 1 seed)" in table
    acc = one["rows"]["global_ddp[compute]"]["accuracy"]["mean"]
    assert f"{100 * acc:.2f} %" in table


class _Stop(Exception):
    pass


CPU = ("run.device=cpu", "run.threads_per_rank=1")


def test_run_compare_warms_up_before_the_first_timed_run(monkeypatch, tmp_path, digits_h5):
    calls = []
    monkeypatch.setattr(compare, "warm_up",
                        lambda config, world, device: calls.append("warm-up") or 0.0)
    monkeypatch.setattr(compare, "resolve_widths",
                        lambda config: calls.append("widths") or (None, {}))

    def first_run(cls, config, world, resume):
        calls.append("run")
        raise _Stop

    monkeypatch.setattr(compare, "run", first_run)
    with pytest.raises(_Stop):
        run_compare(_config(f"run.dir={tmp_path}", f"data.path={digits_h5}", *CPU),
                    Group.single())
    assert calls == ["warm-up", "widths", "run"]


def test_a_signal_while_a_run_finishes_stops_compare_before_the_next_run(monkeypatch, tmp_path,
                                                                         digits_h5):
    """The run the signal arrived in finishes (as the CNN-DNN's coarse phase does); compare
    then exits 75 before opening the next run, naming the finished run and those left."""
    calls, exits = [], []
    monkeypatch.setattr(compare, "warm_up", lambda config, world, device: 0.0)
    monkeypatch.setattr(compare, "resolve_widths", lambda config: (None, {}))

    def finishing(cls, config, world, resume):
        calls.append((cls.__name__, config.run.seed))
        monkeypatch.setitem(preemption._requested, "signal", signal.SIGUSR1)

    def leave(rank, message):
        exits.append(message)
        raise _Stop

    monkeypatch.setattr(compare, "run", finishing)
    monkeypatch.setattr(compare, "exit_preempted", leave)
    with pytest.raises(_Stop):
        run_compare(_config(f"run.dir={tmp_path}", f"data.path={digits_h5}", *CPU,
                            "compare.strategies=[cnn_dnn, coherent]", "compare.seeds=2",
                            "run.seed=5"), Group.single())
    assert calls == [("CNNDNN", 5)]
    assert exits == ["ddmpi compare stopped by SIGUSR1 after cnn_dnn, seed 5 finished; not "
                     "run: coherent seed 5, cnn_dnn seed 6, coherent seed 6; to resume (1 ranks): "
                     f"ddmpi compare --resume {tmp_path} (exit 75)"]


def test_warm_up_binds_and_runs_on_the_data(digits_h5):
    config = _config(f"data.path={digits_h5}", "run.device=cpu", "run.threads_per_rank=1",
                     "local.model.width=4")
    assert warm_up(config, Group.single(), torch.device("cpu")) > 0.0
    budget, widths = compare.resolve_widths(config)
    info = read_info(digits_h5)
    decomposition = decomposition_of(config, info)
    assert budget == cnn_dnn_budget(config, info, decomposition)
    assert widths == {w: global_width(config, info, decomposition, w)
                      for w in ("compute", "parameters")}


@pytest.mark.parametrize("overrides, field", [
    (["local.rescaling.factor=2", "local.rescaling.switch_epoch=1"], "local.rescaling"),
    (["compare.transfer_from=/nowhere"], "compare.transfer_from")])
def test_run_compare_refuses_what_it_cannot_compare_fairly(overrides, field):
    """Raised before any run (and before the world is touched: None here)."""
    with pytest.raises(ConfigError, match=f"config field '{field}'"):
        run_compare(_config(*overrides), None)


def test_compare_main_passes_every_seed_count_on():
    args = SimpleNamespace(config="quickstart", set=["data.path=x.h5"], run_dir=None,
                           strategies=None, seeds=0, resume=None)
    with pytest.raises(ConfigError, match=r"compare\.seeds"):
        compare.main(args, None)


def test_cli_compare_subcommand():
    args = build_parser().parse_args(["compare", "--config", "c.yaml", "--strategies",
                                      "cnn_dnn,coherent", "--seeds", "3", "--set",
                                      "local.epochs=1"])
    assert (args.command, args.config, args.strategies, args.seeds, args.set) == (
        "compare", "c.yaml", "cnn_dnn,coherent", 3, ["local.epochs=1"])
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["compare", "--config", "c.yaml", "--seeds", bad])
