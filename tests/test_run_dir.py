"""``open_run``: what it does to the run directory, and the checks of config against data."""

import pytest

from ddmpi.config import ConfigError, load_config
from ddmpi.parallel.group import Group
from ddmpi.strategies.base import open_run

SELF = Group.single()


def _config(data, run_dir, *overrides):
    return load_config("quickstart", [f"data.path={data}", f"run.dir={run_dir}",
                                      "run.device=cpu", *overrides])


def _earlier_run(run_dir):
    for name in ("checkpoints/local_008.pt", "decisions/local_008.npz", "scalars/s.csv",
                 "tensorboard/subdomain_8/events.out", "metrics.json", "logs/rank_00000.log",
                 "notes.txt"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("earlier run")
    (run_dir / "config.yaml").write_text("earlier: config\n")


def test_a_new_run_replaces_an_earlier_runs_outputs(digits_h5, tmp_path):
    run_dir = tmp_path / "run"
    _earlier_run(run_dir)
    open_run(_config(digits_h5, run_dir), SELF)
    left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert left == ["config.yaml", "dataset.json", "logs/rank_00000.log", "notes.txt"]
    log = (run_dir / "logs" / "rank_00000.log").read_text()
    assert "held an earlier run: its checkpoints, decisions, scalars, tensorboard, metrics.json " \
           "were removed (--resume continues a run instead)" in log


def test_resume_keeps_the_earlier_runs_outputs(digits_h5, tmp_path):
    run_dir = tmp_path / "run"
    _earlier_run(run_dir)
    open_run(_config(digits_h5, run_dir), SELF, resume=True)
    assert (run_dir / "checkpoints" / "local_008.pt").exists()
    assert (run_dir / "config.yaml").read_text() == "earlier: config\n"


def test_flip_axes_must_be_axes_of_the_data(digits_h5, tmp_path):
    with pytest.raises(ConfigError, match=r"'data.augment': augment.flip_axes entry 2 is not a "
                                          r"spatial axis of a 2D image \(0..1 or negative\); "
                                          r"data: .*digits.h5"):
        open_run(_config(digits_h5, tmp_path / "run", "data.augment.flip_axes=[-1, 2]"), SELF)


def test_amp_on_a_cpu_says_it_trains_in_float32(digits_h5, tmp_path):
    open_run(_config(digits_h5, tmp_path / "run", "run.amp=true"), SELF)
    assert "run.amp: bf16 autocast is for CUDA; cpu trains in float32" in (
        tmp_path / "run" / "logs" / "rank_00000.log").read_text()
