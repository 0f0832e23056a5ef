"""``open_run``: what it does to the run directory (fresh or resumed), and the checks of config
against data."""

import json
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import write_digits_h5

from ddmpi.cli import build_parser
from ddmpi.commands.train import resolve_config
from ddmpi.config import ConfigError, dump, load_config
from ddmpi.data.schema import DatasetError
from ddmpi.parallel import cluster
from ddmpi.parallel.cluster import BindingError
from ddmpi.parallel.group import Group
from ddmpi.parallel.layout import MappingError
from ddmpi.strategies.base import open_run, run
from ddmpi.strategies.cnn_dnn import CNNDNN
from ddmpi.strategies.global_ddp import GlobalDDP
from ddmpi.strategies.rundir import RunDirError, RunDirLock

SELF = Group.single()


def _config(data, run_dir, *overrides):
    return load_config("quickstart", [f"data.path={data}", f"run.dir={run_dir}",
                                      "run.device=cpu", *overrides])


def _earlier_run(run_dir, config=None):
    for name in ("checkpoints/local_008.pt", "decisions/local_008.npz", "scalars/s.csv",
                 "tensorboard/subdomain_8/events.out", "metrics.json", "logs/rank_00000.log",
                 "notes.txt"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("{}" if name.endswith(".json") else "earlier run")
    (run_dir / "config.yaml").write_text(dump(config) if config else "earlier: config\n")


def _log(run_dir):
    return (run_dir / "logs" / "rank_00000.log").read_text()


def test_overwrite_replaces_an_earlier_runs_outputs(digits_h5, tmp_path):
    run_dir = tmp_path / "run"
    _earlier_run(run_dir)
    open_run(_config(digits_h5, run_dir), SELF, overwrite=True)
    left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert left == [".lock", "config.yaml", "dataset.json", "logs/rank_00000.log", "notes.txt",
                    "segments.json"]
    assert "held an earlier run: its checkpoints, decisions, scalars, tensorboard, metrics.json " \
           "were removed" in _log(run_dir)


@pytest.mark.parametrize("trained, state", [("metrics.json", "finished"),
                                            ("checkpoints/local_000.pt", "unfinished")])
def test_a_new_run_refuses_a_trained_run_without_overwrite(digits_h5, tmp_path, trained,
                                                           state):
    run_dir = tmp_path / "run"
    open_run(_config(digits_h5, run_dir), SELF)
    (run_dir / trained).parent.mkdir(exist_ok=True)
    (run_dir / trained).write_text("trained")
    before = _files(run_dir)
    with pytest.raises(RunDirError, match=rf"^{run_dir} holds a trained run \({state}\): give "
                                          r"--resume to continue it or --overwrite to replace "
                                          r"it$"):
        open_run(_config(digits_h5, run_dir), SELF)
    assert _files(run_dir) == before


def test_a_run_dir_that_failed_before_training_is_started_again(digits_h5, tmp_path):
    """Nothing trained, nothing lost: no --overwrite needed."""
    run_dir = tmp_path / "run"
    open_run(_config(digits_h5, run_dir, "local.epochs=1"), SELF)
    assert open_run(_config(digits_h5, run_dir), SELF).config.local.epochs != 1


@pytest.mark.parametrize("command", ["train", "compare"])
def test_cli_overwrite_and_resume_exclude_each_other(command):
    parse = build_parser().parse_args
    assert parse([command, "--config", "c.yaml", "--overwrite"]).overwrite
    assert not parse([command, "--config", "c.yaml"]).overwrite
    with pytest.raises(SystemExit):
        parse([command, "--config", "c.yaml", "--overwrite", "--resume"])


def _nan_copy(digits_h5, path):
    """``digits_h5`` with one NaN pixel in a training image its header does not show."""
    import h5py

    shutil.copy(digits_h5, path)
    with h5py.File(path, "r+") as f:
        images = f["train"]["images"]
        images[5, 0, 3, 3] = float("nan")
    return path


def _refuse_binding(*args, **kwargs):
    raise BindingError("run.device: cuda, but no GPU is visible")


@pytest.mark.parametrize("failure", ["nan", "binding"])
def test_overwrite_removes_nothing_before_every_check_passed(digits_h5, tmp_path, monkeypatch,
                                                             failure):
    """Checks that a run would fail on later (the data's contents, read in mid-training; the
    device binding) are made before the earlier run's outputs go."""
    run_dir, data = tmp_path / "run", digits_h5
    _trained_run(run_dir, digits_h5)
    (run_dir / "metrics.json").write_text("{}")
    before = _files(run_dir)
    if failure == "nan":
        data = _nan_copy(digits_h5, tmp_path / "nan.h5")
    else:
        monkeypatch.setattr(cluster, "bind_process", _refuse_binding)
    with pytest.raises((DatasetError, BindingError), match="NaN or infinite|no GPU"):
        open_run(_config(data, run_dir), SELF, overwrite=True)
    assert _files(run_dir) == before


def test_resume_keeps_the_earlier_runs_outputs_and_updates_its_config(digits_h5, tmp_path):
    run_dir = tmp_path / "run"
    _earlier_run(run_dir, _config(digits_h5, run_dir, "data.in_memory=false"))
    (run_dir / "metrics.json").unlink()  # unfinished
    config = _config(digits_h5, run_dir)
    assert open_run(config, SELF, resume=True).resume
    assert (run_dir / "checkpoints" / "local_008.pt").exists()
    assert (run_dir / "config.yaml").read_text() == dump(config)
    assert "resumed with changed fields (config.yaml updated): data.in_memory False -> " \
           "'auto'" in _log(run_dir)


def _must_not_train(self):
    raise AssertionError("a finished run was trained again")


def test_resume_of_a_finished_run_does_nothing_but_say_so(digits_h5, tmp_path, monkeypatch,
                                                          capsys):
    """No second training, segment or wall time: the result it wrote, read back."""
    run_dir = tmp_path / "run"
    config = _config(digits_h5, run_dir, "local.epochs=1", "local.model.width=4",
                     "coarse.epochs=5", "run.threads_per_rank=1")
    first = run(CNNDNN, config, SELF)
    before = _files(run_dir)
    monkeypatch.setattr(CNNDNN, "train", _must_not_train)
    again = run(CNNDNN, _config(digits_h5, run_dir, "local.epochs=1", "local.model.width=4",
                                "coarse.epochs=5", "run.threads_per_rank=1",
                                "data.in_memory=false"), SELF, resume=True)
    assert _files(run_dir) == before  # config.yaml too: nothing resumed, nothing to update
    assert (again.wall_seconds, again.segments) == (first.wall_seconds, first.segments)
    assert again.combiners["chosen"]["accuracy"] == first.combiners["chosen"]["accuracy"]
    assert (f"{run_dir}: the run finished in an earlier job, nothing to resume; its metrics: "
            f"{run_dir / 'metrics.json'}") in capsys.readouterr().out


def test_a_configuration_error_leaves_no_config_behind(digits_h5, tmp_path):
    with pytest.raises(ValueError, match="not-a-file.h5"):
        open_run(_config(tmp_path / "not-a-file.h5", tmp_path / "run"), SELF)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_resume_where_nothing_was_trained_starts_afresh(digits_h5, tmp_path):
    """A run that failed before training (wrong rank count, say) binds nothing."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump(_config(digits_h5, run_dir, "local.epochs=1")))
    config = resolve_config("quickstart", [f"data.path={digits_h5}", "run.device=cpu"], run_dir)
    assert config.local.epochs != 1
    assert not open_run(config, SELF, resume=True).resume
    assert (run_dir / "config.yaml").read_text() == dump(config)
    assert "holds no checkpoint: nothing to resume, starting the run afresh" in _log(run_dir)


def test_resume_into_an_empty_directory_starts_quietly(digits_h5, tmp_path):
    """The first Slurm submission passes --resume too: nothing to warn about."""
    run_dir = tmp_path / "run"
    assert not open_run(_config(digits_h5, run_dir), SELF, resume=True).resume
    assert "WARNING" not in _log(run_dir)


def test_resume_refuses_checkpoints_without_their_config(digits_h5, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "local_000.pt").write_text("trained")
    with pytest.raises(RunDirError, match=r"a trained run \(unfinished\) without config.yaml"):
        open_run(_config(digits_h5, run_dir), SELF, resume=True)
    open_run(_config(digits_h5, run_dir), SELF, overwrite=True)
    assert not (run_dir / "checkpoints" / "local_000.pt").exists()


def test_resume_and_a_different_run_dir_are_refused(digits_h5, tmp_path):
    with pytest.raises(ConfigError, match=r"--resume .*p1 and run.dir .*B \(--run-dir or "
                                          r"--set\) name different run directories"):
        resolve_config("quickstart", [f"data.path={digits_h5}", f"run.dir={tmp_path / 'B'}"],
                       tmp_path / "p1")


def _other_split(path):
    """The digits of ``digits_h5`` split differently: another data set, same classes and shapes."""
    return write_digits_h5(path, seed=1)


def _trained_run(run_dir, data):
    """A run directory of ``data`` holding a checkpoint."""
    open_run(_config(data, run_dir), SELF)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "local_000.pt").write_text("trained")


def test_resume_refuses_another_data_set_under_the_same_path(digits_h5, tmp_path):
    data = tmp_path / "data.h5"
    shutil.copy(digits_h5, data)
    _trained_run(tmp_path / "run", data)
    _other_split(data)
    with pytest.raises(ConfigError, match=rf"'data.path': {data} is not the data set this run "
                                          rf"trained on \({data}, recorded in .*dataset.json\): "
                                          r"its .*fingerprint differ"):
        open_run(_config(data, tmp_path / "run"), SELF, resume=True)


def test_resume_takes_the_same_data_set_under_a_new_path(digits_h5, tmp_path):
    run_dir, moved = tmp_path / "run", tmp_path / "scratch" / "digits.h5"
    _trained_run(run_dir, digits_h5)
    moved.parent.mkdir()
    shutil.copy(digits_h5, moved)
    config = resolve_config(None, [f"data.path={moved}"], run_dir)
    assert open_run(config, SELF, resume=True).resume
    assert json.loads((run_dir / "dataset.json").read_text())["path"] == str(moved)
    assert load_config(run_dir / "config.yaml").data.path == str(moved)
    assert f"data.path '{digits_h5}' -> '{moved}'" in _log(run_dir)


def test_resume_refuses_the_same_labels_with_other_images(digits_h5, tmp_path):
    """Flipped images keep labels, ids, statistics and provenance: the fingerprint's image rows
    tell them apart."""
    import h5py

    data = tmp_path / "data.h5"
    shutil.copy(digits_h5, data)
    _trained_run(tmp_path / "run", data)
    with h5py.File(data, "r+") as f:
        for split in ("train", "val", "test"):
            f[split]["images"][...] = f[split]["images"][()][..., ::-1]
    with pytest.raises(ConfigError, match="its fingerprint differ"):
        open_run(_config(data, tmp_path / "run"), SELF, resume=True)


def _eight_bit_digits(path, dtype):
    """The digits as 8-bit images, stored as ``dtype`` (both hold the same values)."""
    import numpy as np
    from helpers import digits_arrays

    from ddmpi.data.schema import DatasetWriter

    images, labels = digits_arrays()
    images = np.rint(images * 255).astype(np.uint8)
    with DatasetWriter(path, name="digits", classes=[str(d) for d in range(10)],
                       converter="tests", dtype=dtype) as writer:
        for split, rows in (("train", slice(0, 1200)), ("val", slice(1200, 1500)),
                            ("test", slice(1500, None))):
            writer.write_split(split, images[rows], labels[rows])
    return path


def test_resume_takes_the_same_images_in_the_other_storage_dtype(tmp_path):
    """uint8 and float32 files of the same 8-bit images give the network the same values:
    the same data set; other images are not."""
    import h5py

    run_dir = tmp_path / "run"
    as_float = _eight_bit_digits(tmp_path / "f32.h5", "float32")
    as_uint8 = _eight_bit_digits(tmp_path / "u8.h5", "uint8")
    _trained_run(run_dir, as_float)
    assert open_run(_config(as_uint8, run_dir), SELF, resume=True).resume
    assert open_run(_config(as_float, run_dir), SELF, resume=True).resume
    with h5py.File(as_uint8, "r+") as f:
        f["test/images"][0, 0, 3, 3] = 255 - f["test/images"][0, 0, 3, 3]  # a fingerprinted row
    with pytest.raises(ConfigError, match="its fingerprint differ"):
        open_run(_config(as_uint8, run_dir), SELF, resume=True)


def test_a_run_recorded_with_the_stored_bytes_fingerprint_still_resumes(tmp_path):
    """dataset.json of an earlier ddmpi (no fingerprint_version) holds the hash of the stored
    bytes: compared as such, then recorded anew."""
    from ddmpi.data.schema import FINGERPRINT_VERSION, dataset_fingerprint

    run_dir, data = tmp_path / "run", _eight_bit_digits(tmp_path / "u8.h5", "uint8")
    _trained_run(run_dir, data)
    path = run_dir / "dataset.json"
    record = json.loads(path.read_text())
    del record["fingerprint_version"]
    path.write_text(json.dumps(dict(record, fingerprint="0" * 64)))
    with pytest.raises(ConfigError, match="its fingerprint differ"):
        open_run(_config(data, run_dir), SELF, resume=True)
    path.write_text(json.dumps(dict(record, fingerprint=dataset_fingerprint(data, stored=True))))
    assert open_run(_config(data, run_dir), SELF, resume=True).resume
    assert json.loads(path.read_text())["fingerprint"] == dataset_fingerprint(data)
    assert json.loads(path.read_text())["fingerprint_version"] == FINGERPRINT_VERSION


def test_resume_takes_a_copy_whose_provenance_names_other_paths(digits_h5, tmp_path):
    """The same samples prepared from a copy of the sources elsewhere: other source paths in
    the provenance, same data set."""
    import h5py

    run_dir, copy = tmp_path / "run", tmp_path / "copy.h5"
    _trained_run(run_dir, digits_h5)
    shutil.copy(digits_h5, copy)
    with h5py.File(copy, "r+") as f:
        provenance = json.loads(f.attrs.get("provenance", "{}") or "{}")
        provenance.setdefault("options", {})["src"] = "/elsewhere/sources"
        f.attrs["provenance"] = json.dumps(provenance)
    config = resolve_config(None, [f"data.path={copy}"], run_dir)
    assert open_run(config, SELF, resume=True).resume


def test_segments_record_every_start_of_a_run(digits_h5, tmp_path):
    from ddmpi.strategies.rundir import end_segment

    run_dir = tmp_path / "run"
    _trained_run(run_dir, digits_h5)
    end_segment(run_dir, 5.0, "signal", "SIGUSR1")
    open_run(_config(digits_h5, run_dir), SELF, resume=True)
    segments = end_segment(run_dir, 2.0, "finished")
    assert [(s["resumed"], s["ranks"], s["wall_seconds"], s["end"]) for s in segments] == [
        (False, 1, 5.0, "signal"), (True, 1, 2.0, "finished")]
    assert segments[0]["signal"] == "SIGUSR1" and "signal" not in segments[1]


@pytest.mark.parametrize("recorded_in", ["segments.json", "metrics.json"])
def test_resume_refuses_a_run_of_another_strategy(digits_h5, tmp_path, recorded_in):
    """A global CNN's run (of ddmpi compare, say) is not continued as a CNN-DNN; a run started
    before segments.json recorded the strategy is known by its metrics.json."""
    run_dir = tmp_path / "run"
    open_run(_config(digits_h5, run_dir), SELF, strategy_cls=GlobalDDP)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "global.pt").write_text("trained")
    assert json.loads((run_dir / "segments.json").read_text())[0]["strategy"] == "global_ddp"
    if recorded_in == "metrics.json":
        (run_dir / "segments.json").unlink()
        (run_dir / "metrics.json").write_text(json.dumps({"strategy": "global_ddp"}))
    before = _files(run_dir)
    with pytest.raises(RunDirError, match=rf"^{re.escape(str(run_dir))} holds a global_ddp run, "
                                          r"not a cnn_dnn run: resume it with the command that "
                                          r"started it"):
        open_run(_config(digits_h5, run_dir), SELF, resume=True, strategy_cls=CNNDNN)
    assert _files(run_dir) == before


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_refuses_a_comparisons_directory(digits_h5, tmp_path, resume):
    root = tmp_path / "cmp"
    (root / "seed0" / "cnn_dnn").mkdir(parents=True)
    (root / "seed0" / "cnn_dnn" / "segments.json").write_text("[]")
    (root / "config.yaml").write_text(dump(_config(digits_h5, root)))
    before = _files(root)
    with pytest.raises(RunDirError, match=rf"^{re.escape(str(root))} holds a comparison "
                                          rf"\(seed\*/ runs of ddmpi compare\), not a run"):
        open_run(_config(digits_h5, root), SELF, resume=resume, overwrite=True)
    assert _files(root) == before


# another job: takes the run directory's lock, says so and sleeps until it is killed
HOLDER = textwrap.dedent("""
    import sys, time
    from ddmpi.strategies.rundir import RunDirLock
    lock = RunDirLock(sys.argv[1])
    print("held", flush=True)
    time.sleep(300)
""")


def test_a_run_dir_in_use_by_another_job_is_refused_until_it_ends(digits_h5, tmp_path):
    """One line naming the holder; the lock goes with the holder's process, however it ends
    (here SIGKILL, as a crash or a node failure): no stale lock."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunDirError, match=rf"^{re.escape(str(run_dir))} is in use by another "
                                              rf"job \(pid {holder.pid} on "
                                              rf"{re.escape(socket.gethostname())}\)$"):
            open_run(_config(digits_h5, run_dir), SELF)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert not open_run(_config(digits_h5, run_dir), SELF).resume


def _fails(self):
    raise RuntimeError("failed in training")


def test_a_run_holds_its_directory_until_it_ends(digits_h5, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    ctx = open_run(_config(digits_h5, run_dir), SELF)
    with pytest.raises(RunDirError, match="is in use by another job"):
        open_run(_config(digits_h5, run_dir), SELF, overwrite=True)
    ctx.lock.close()
    monkeypatch.setattr(CNNDNN, "train", _fails)
    with pytest.raises(RuntimeError, match="failed in training"):
        run(CNNDNN, _config(digits_h5, run_dir), SELF)
    RunDirLock(run_dir).close()  # released by the failed run


def test_flip_axes_must_be_axes_of_the_data(digits_h5, tmp_path):
    with pytest.raises(ConfigError, match=r"'data.augment.flip_axes': 2 is not a spatial axis "
                                          r"of a 2D image \(0..1 or negative\) \(.*digits.h5\)"):
        open_run(_config(digits_h5, tmp_path / "run", "data.augment.flip_axes=[-1, 2]"), SELF)


def test_shift_must_fit_the_images_of_the_data(digits_h5, tmp_path):
    with pytest.raises(ConfigError, match=r"^config field 'data.augment.shift': 4 is not less "
                                          r"than half the smallest side of the 8x8 images "
                                          r"\(8\); .* \(.*digits.h5\)$"):
        open_run(_config(digits_h5, tmp_path / "run", "data.augment.shift=4"), SELF)
    assert not (tmp_path / "run").exists()


def test_amp_on_a_cpu_says_it_trains_in_float32(digits_h5, tmp_path):
    open_run(_config(digits_h5, tmp_path / "run", "run.amp=true"), SELF)
    assert "run.amp: bf16 autocast is for CUDA; cpu trains in float32" in (
        tmp_path / "run" / "logs" / "rank_00000.log").read_text()


def _files(run_dir):
    """Every file of ``run_dir`` but the logs and the lock (the job that takes it writes its
    pid and host there), with its content."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and "logs" not in p.parts and p.name != ".lock"}


class _World:
    """Rank 0 of ``size`` ranks: enough for the checks made before any communication."""

    rank = 0

    def __init__(self, size):
        self.size = size


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("overrides, ranks, error", [
    (["decomposition.grid=[3, 3]", "decomposition.overlap=7"], 1, ConfigError),
    (["decomposition.grid=[1, 2]"], 3, MappingError),
])
def test_a_run_that_does_not_fit_leaves_the_earlier_run_untouched(digits_h5, tmp_path, resume,
                                                                   overrides, ranks, error):
    run_dir = tmp_path / "run"
    _trained_run(run_dir, digits_h5)
    before = _files(run_dir)
    with pytest.raises(error):
        open_run(_config(digits_h5, run_dir, *overrides), _World(ranks), resume, CNNDNN)
    assert _files(run_dir) == before


@pytest.mark.parametrize("name", ["segments.json", "dataset.json"])
@pytest.mark.parametrize("content", [b"{garbage", b"", b"\xff\xfe\x00"])
def test_a_corrupt_run_file_is_one_line_naming_it(digits_h5, tmp_path, name, content):
    run_dir = tmp_path / "run"
    _trained_run(run_dir, digits_h5)
    (run_dir / name).write_bytes(content)
    with pytest.raises(RunDirError, match=rf"^{run_dir / name}: not (valid JSON \(|a UTF-8 text "
                                          rf"file$)"):
        open_run(_config(digits_h5, run_dir), SELF, resume=True)
