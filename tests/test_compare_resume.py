"""``ddmpi compare --resume``: runs finished in an earlier job are read back, not trained again;
the interrupted run continues from its checkpoints; the others run; a held run of another
configuration, data set or rank count is refused, naming its directory. Serial comparisons of
the CNN-DNN and the coherent CNN-DNN on real digits, and one on 2 ranks stopped by a signal and
resumed."""

import json
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import yaml
from conftest import write_digits_h5
from helpers import mpirun

from ddmpi.cli import RESUME_IF_POSSIBLE, build_parser
from ddmpi.commands import compare
from ddmpi.commands.compare import holds_a_compare, run_compare
from ddmpi.config import ConfigError, load_config
from ddmpi.parallel import cluster
from ddmpi.parallel.cluster import BindingError
from ddmpi.parallel.group import Group
from ddmpi.strategies.base import read_result
from ddmpi.strategies.rundir import RunDirError, RunDirLock

SELF = Group.single()
TINY = ["local.epochs=2", "local.model.width=4", "coarse.epochs=10", "run.device=cpu",
        "run.threads_per_rank=1", "compare.strategies=[cnn_dnn, coherent]", "compare.seeds=2"]
RUNS = [f"seed{k}/{name}" for k in (0, 1) for name in ("cnn_dnn", "coherent")]


def _config(data, run_dir, *overrides):
    return load_config("quickstart", [f"data.path={data}", f"run.dir={run_dir}", *TINY,
                                      *overrides])


def _args(**kwargs):
    """``ddmpi compare`` arguments as the parser gives them."""
    return SimpleNamespace(**{"config": None, "set": [], "run_dir": None, "strategies": None,
                              "seeds": None, "resume": None, "overwrite": False, **kwargs})


def _files(root):
    """{path: (mtime_ns, bytes)} of every file under ``root`` but the lock files (each job
    writes its own pid and host there)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


class _Trained(Exception):
    pass


def _no_training(monkeypatch):
    def refuse(cls, config, world, resume):
        raise _Trained(config.run.dir)

    monkeypatch.setattr(compare, "run", refuse)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished serial comparison (2 strategies x 2 seeds): its directory and comparison."""
    base = tmp_path_factory.mktemp("finished")
    data = write_digits_h5(base / "digits.h5")
    comparison = run_compare(_config(data, base / "cmp"), SELF)
    return base / "cmp", comparison


@pytest.fixture
def held(finished, tmp_path):
    """A copy of the finished comparison to resume, and its data set."""
    root = tmp_path / "cmp"
    shutil.copytree(finished[0], root)
    return root, finished[0].parent / "digits.h5"


def test_resume_reads_finished_runs_back_without_training_them(finished, held, monkeypatch):
    root, data = held
    before = _files(root / "seed0") | _files(root / "seed1")
    _no_training(monkeypatch)
    again = run_compare(_config(data, root), SELF, resume=True)
    assert _files(root / "seed0") | _files(root / "seed1") == before
    original = finished[1]
    for key in ("rows", "paired", "curves", "coarse", "matched", "target_accuracy"):
        assert again[key] == original[key], key
    assert original["runs"] == {name: [{"seed": k, "segments": 1, "status": "ran"}
                                       for k in (0, 1)] for name in ("cnn_dnn", "coherent")}
    assert again["runs"] == {name: [{"seed": k, "segments": 1, "status": "reused"}
                                    for k in (0, 1)] for name in ("cnn_dnn", "coherent")}
    assert json.loads((root / "comparison.json").read_text())["runs"] == again["runs"]
    assert ("runs started in an earlier job (a run's wall time is the sum of its segments, one "
            "per job it ran in): CNN-DNN seed 0 reused, 1 segment;") in (
        root / "comparison.md").read_text()


def test_read_result_gives_back_what_the_run_returned(finished):
    root, comparison = finished
    result = read_result(root / "seed1" / "cnn_dnn")
    assert result.combiners["chosen"]["accuracy"] == comparison["rows"]["chosen"][
        "accuracy"]["values"][1]
    assert result.test_correct["chosen"].dtype == bool
    assert result.wall_seconds == comparison["rows"]["cnn_dnn"]["wall_seconds"]["values"][1]
    assert [s["end"] for s in result.segments] == ["finished"]


def test_more_seeds_on_resume_run_only_the_new_runs(held, monkeypatch):
    root, data = held
    ran = []
    real = compare.run

    def recording(cls, config, world, resume):
        ran.append((config.run.dir, resume))
        return real(cls, config, world, resume=resume)

    monkeypatch.setattr(compare, "run", recording)
    args = _args(resume=str(root), seeds=3)
    compare.main(args, SELF)
    assert ran == [(str(root / "seed2" / name), True) for name in ("cnn_dnn", "coherent")]
    runs = json.loads((root / "comparison.json").read_text())["runs"]
    assert [r["status"] for r in runs["coherent"]] == ["reused", "reused", "ran"]
    assert yaml.safe_load((root / "config.yaml").read_text())["compare"]["seeds"] == 3


def test_resume_refuses_a_changed_field_of_the_comparison(held, monkeypatch):
    root, _ = held
    _no_training(monkeypatch)
    with pytest.raises(ConfigError, match=rf"config field 'local.epochs': 3 differs from 2 "
                                          rf"stored in {root / 'config.yaml'}"):
        compare.main(_args(resume=str(root), set=["local.epochs=3"]), SELF)


def test_resume_refuses_a_held_run_of_another_configuration(held, monkeypatch):
    """A run directory the comparison's config.yaml does not describe (left by another
    comparison, say) is never mixed in."""
    root, data = held
    stored = root / "seed1" / "coherent" / "config.yaml"
    config = yaml.safe_load(stored.read_text())
    config["local"]["optimizer"]["lr"] = 0.1
    stored.write_text(yaml.safe_dump(config))
    before = (root / "config.yaml").read_text()
    _no_training(monkeypatch)
    with pytest.raises(ConfigError, match=rf"config field 'local.optimizer.lr': 0.003 differs "
                                          rf"from 0.1 stored in {stored}"):
        run_compare(_config(data, root), SELF, resume=True)
    assert (root / "config.yaml").read_text() == before


def test_resume_refuses_another_data_set(held, monkeypatch, tmp_path):
    root, _ = held
    other = write_digits_h5(tmp_path / "other.h5", seed=1)
    _no_training(monkeypatch)
    with pytest.raises(ConfigError, match=rf"config field 'data.path': {other} is not the data "
                                          rf"set this run trained on .*recorded in "
                                          rf"{root / 'seed0' / 'cnn_dnn' / 'dataset.json'}"):
        compare.main(_args(resume=str(root), set=[f"data.path={other}"]), SELF)


def test_resume_refuses_another_rank_count(held, monkeypatch):
    root, data = held
    path = root / "seed0" / "coherent" / "segments.json"
    segments = json.loads(path.read_text())
    segments[0]["ranks"] = 4
    path.write_text(json.dumps(segments))
    _no_training(monkeypatch)
    with pytest.raises(RunDirError, match=rf"{root / 'seed0' / 'coherent'}: ran on 4 ranks, "
                                          rf"this job has 1"):
        run_compare(_config(data, root), SELF, resume=True)


def test_overwrite_removes_an_earlier_comparisons_outputs(held, monkeypatch, capsys):
    """So that a later ``--resume`` cannot take a run of the earlier one for its own."""
    root, data = held
    _no_training(monkeypatch)
    with pytest.raises(_Trained):
        compare.main(_args(config="quickstart", set=[f"data.path={data}", *TINY],
                           run_dir=str(root), overwrite=True), SELF)
    assert not any((root / name).exists() for name in ("comparison.json", "comparison.md"))
    assert not any((root / run / "metrics.json").exists() for run in RUNS)
    assert not holds_a_compare(root)
    assert "held an earlier comparison: the outputs of its 4 runs were removed" in \
        capsys.readouterr().out


def test_resume_refuses_a_held_run_of_another_strategy(held, monkeypatch):
    root, data = held
    path = root / "seed1" / "coherent" / "segments.json"
    segments = json.loads(path.read_text())
    assert segments[0]["strategy"] == "coherent"
    segments[0]["strategy"] = "cnn_dnn"
    path.write_text(json.dumps(segments))
    _no_training(monkeypatch)
    with pytest.raises(RunDirError, match=rf"{root / 'seed1' / 'coherent'} holds a cnn_dnn run, "
                                          rf"not a coherent run"):
        run_compare(_config(data, root), SELF, resume=True)


def _error_line(*args):
    """The one line of ``ddmpi ARGS`` (serial) on stderr, which must fail with exit 1."""
    proc = subprocess.run([sys.executable, "-m", "ddmpi", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_train_resumes_no_run_of_a_comparison_but_a_cnn_dnn(held):
    """``ddmpi train --resume`` of a coherent run (its checkpoints are another model's) or of
    the comparison's directory is refused, naming the command that continues it."""
    root, _ = held
    before = _files(root)
    coherent = root / "seed0" / "coherent"
    assert _error_line("train", "--resume", str(coherent)) == (
        f"[ddmpi rank 0/1] error: {coherent} holds a coherent run, not a cnn_dnn run: resume "
        f"it with the command that started it (ddmpi train runs cnn_dnn; ddmpi compare "
        f"--resume continues a comparison's runs)")
    assert _error_line("train", "--resume", str(root)).startswith(
        f"[ddmpi rank 0/1] error: {root} holds a comparison (seed*/ runs of ddmpi compare), "
        f"not a run: ddmpi compare --resume {root} continues it")
    assert _files(root) == before


def test_compare_refuses_a_run_of_ddmpi_train(held, monkeypatch):
    root, data = held
    run_dir = root / "seed0" / "cnn_dnn"
    before = _files(run_dir)
    _no_training(monkeypatch)
    for resume in (False, True):
        with pytest.raises(RunDirError, match=rf"^{run_dir} holds a run of ddmpi train, not a "
                                              rf"comparison"):
            run_compare(_config(data, run_dir), SELF, resume=resume, overwrite=not resume)
    assert _files(run_dir) == before


def test_a_comparison_in_use_by_another_job_is_refused(held, monkeypatch):
    root, data = held
    before = _files(root)
    _no_training(monkeypatch)
    with RunDirLock(root):  # another job's, in this process: another open file
        for resume, overwrite in ((True, False), (False, True)):
            with pytest.raises(RunDirError, match=rf"^{root} is in use by another job \(pid "):
                run_compare(_config(data, root), SELF, resume=resume, overwrite=overwrite)
    assert _files(root) == before


def test_a_new_comparison_refuses_a_held_one_without_overwrite(held, monkeypatch):
    root, data = held
    before = _files(root)
    _no_training(monkeypatch)
    with pytest.raises(RunDirError, match=rf"^{root} holds a comparison \(4 trained runs\): "
                                          r"give --resume to continue it or --overwrite to "
                                          r"replace it$"):
        run_compare(_config(data, root), SELF)
    assert _files(root) == before


def _refuse_binding(*args, **kwargs):
    raise BindingError("run.device: cuda, but no GPU is visible")


@pytest.mark.parametrize("overrides, error", [
    (["decomposition.grid=[3, 3]", "decomposition.overlap=7"], ConfigError),
    (["data.augment.flip_axes=[2]"], ConfigError),
    ([], BindingError)])
def test_overwrite_removes_nothing_before_every_check_passed(held, monkeypatch, overrides,
                                                             error):
    """What every run checks when it opens, and the device binding, come before RUN_DIR is
    touched (a comparison that cannot run must not cost the one held there)."""
    root, data = held
    before = _files(root)
    _no_training(monkeypatch)
    monkeypatch.setattr(cluster, "bind_process", _refuse_binding)
    with pytest.raises(error):
        run_compare(_config(data, root, *overrides), SELF, overwrite=True)
    assert _files(root) == before


def test_bare_resume_starts_a_comparison_where_none_is_held(held, monkeypatch, tmp_path):
    """``--resume`` alone: the configured run.dir, continued if it holds a comparison."""
    root, data = held
    _no_training(monkeypatch)
    args = _args(config="quickstart", resume=RESUME_IF_POSSIBLE,
                 set=[f"data.path={data}", *TINY], run_dir=str(root))
    compare.main(args, SELF)   # all finished: nothing trained
    with pytest.raises(_Trained, match="seed0/cnn_dnn"):
        compare.main(_args(**{**vars(args), "run_dir": str(tmp_path / "new")}), SELF)


def test_resume_and_another_run_dir_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--resume .*A and run.dir .*B \(--run-dir or --set\) "
                                          r"name different run directories"):
        compare.main(_args(config="quickstart", resume=str(tmp_path / "A"),
                           run_dir=str(tmp_path / "B")), SELF)


def test_cli_compare_resume():
    parse = build_parser().parse_args
    assert parse(["compare", "--resume", "runs/cmp"]).resume == "runs/cmp"
    args = parse(["compare", "--config", "c.yaml", "--resume"])
    assert (args.config, args.resume) == ("c.yaml", RESUME_IF_POSSIBLE)
    with pytest.raises(ConfigError, match="ddmpi compare: give --config FILE"):
        compare.main(_args(), SELF)


# every rank signals itself as it starts its first local CNN of the second seed's CNN-DNN
SIGNAL_IN_SECOND_SEED = textwrap.dedent("""
    import os, signal, sys
    import ddmpi.strategies.local as local

    original = local.train_subdomain
    def signalled(ctx, *args, **kwargs):
        if ctx.config.run.seed == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(ctx, *args, **kwargs)
    local.train_subdomain = signalled
    from ddmpi.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.timeout(400)
def test_compare_stopped_by_a_signal_resumes_where_it_stopped(tmp_path):
    """2 ranks: seed 0's runs finish, seed 1's CNN-DNN stops in its first batch (exit 75); the
    resumed job reads seed 0's runs back, continues seed 1's CNN-DNN from its checkpoints and
    runs seed 1's coherent CNN-DNN."""
    data = write_digits_h5(tmp_path / "digits.h5")
    root = tmp_path / "cmp"
    script = tmp_path / "second_seed.py"
    script.write_text(SIGNAL_IN_SECOND_SEED)
    sets = [arg for item in TINY for arg in ("--set", item)]
    cmd, env = mpirun(2, "python", str(script), "compare", "--config", "quickstart", "--set",
                      f"data.path={data}", *sets, "--run-dir", str(root), "--resume")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 75, proc.stdout + proc.stderr
    message = ("ddmpi compare stopped by SIGUSR1 in cnn_dnn, seed 1 (subdomain 0: stopped at "
               f"epoch 1, batch 1); to resume (2 ranks): ddmpi compare --resume {root} "
               "(exit 75)")
    assert f"[ddmpi rank 0] {message}" in proc.stdout
    assert not (root / "seed1" / "cnn_dnn" / "metrics.json").exists()
    seed0 = _files(root / "seed0")

    cmd, env = mpirun(2, "python", "-m", "ddmpi", "compare", "--resume", str(root))
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _files(root / "seed0") == seed0    # not trained, evaluated or written again
    log = (root / "seed1" / "cnn_dnn" / "logs" / "rank_00000.log").read_text()
    assert "subdomain 0: resumed from" in log and "continuing epoch 1 after batch 1" in log
    metrics = json.loads((root / "seed1" / "cnn_dnn" / "metrics.json").read_text())
    assert [(s["resumed"], s["end"]) for s in metrics["segments"]] == [
        (False, "signal"), (True, "finished")]
    assert metrics["wall_seconds"] == pytest.approx(
        sum(s["wall_seconds"] for s in metrics["segments"]))
    comparison = json.loads((root / "comparison.json").read_text())
    assert list(comparison["rows"]) == ["chosen", "cnn_dnn", "average_log_probabilities",
                                        "average_probabilities", "majority_vote", "coherent"]
    assert all(r["accuracy"]["n"] == 2 for r in comparison["rows"].values())
    assert comparison["rows"]["cnn_dnn"]["wall_seconds"]["values"][1] == metrics["wall_seconds"]
    assert comparison["runs"] == {
        "cnn_dnn": [{"seed": 0, "segments": 1, "status": "reused"},
                    {"seed": 1, "segments": 2, "status": "resumed"}],
        "coherent": [{"seed": 0, "segments": 1, "status": "reused"},
                     {"seed": 1, "segments": 1, "status": "ran"}]}
