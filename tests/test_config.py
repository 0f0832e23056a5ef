"""Configuration validation: every error names the field; overrides and packaged configs."""

import pytest

from ddmpi.config import ConfigError, dump, from_dict, load_config


def test_defaults_and_overrides():
    config = load_config(None, ["data.path=x.h5", "local.epochs=3",
                                "decomposition.grid=[2, 2, 2]", "coarse.hidden=[32, 16]"])
    assert config.local.epochs == 3
    assert config.decomposition.grid == [2, 2, 2]
    assert config.coarse.hidden == [32, 16]
    assert config.local.optimizer.name == "adam"


@pytest.mark.parametrize("override, field", [
    ("local.epoch=3", "local.epoch"),
    ("local.epochs=three", "local.epochs"),
    ("local.epochs=0", "local.epochs"),
    ("run.device=gpu", "run.device"),
    ("local.model.family=alexnet", "local.model.family"),
    ("local.model.dropout=1.5", "local.model.dropout"),
    ("local.optimizer.lr=-1", "local.optimizer.lr"),
    ("decomposition.grid=[2]", "decomposition.grid"),
    ("decomposition.grid=[2, x]", "decomposition.grid[1]"),
    ("decomposition.overlap=-1", "decomposition.overlap"),
    ("run.threads_per_rank=many", "run.threads_per_rank"),
    ("coarse.train_on=test", "coarse.train_on"),
    ("local.rescaling.factor=2", "local.rescaling"),
    ("local=3", "local"),
    ("local.model.dropout=1.0", "local.model.dropout"),
    ("data.in_memory=maybe", "data.in_memory"),
    ("data.memory_budget_gb=0", "data.memory_budget_gb"),
    ("data.augment.brightness=2", "data.augment.brightness"),
    ("compare.global_widths=[compute, 0]", "compare.global_widths"),
    ("compare.strategies=[global_ddp, cnn]", "compare.strategies[1]"),
    ("run.threads_per_rank=0", "run.threads_per_rank"),
    ("coarse.folds=1", "coarse.folds"),
    ("coarse.holdout_fraction=1", "coarse.holdout_fraction"),
    ("local.model.blocks=[2, 2, 2]", "local.model.blocks"),
    ("run.seed=-5", "run.seed"),
    ("run.seed=18446744073709551615", "run.seed"),
    ("local.optimizer.lr=.nan", "local.optimizer.lr"),
    ("local.optimizer.lr=5e-4x", "local.optimizer.lr"),
    ("local.model.stem=imagenet", "local.model.stem"),
    ("local.model.max_width_factor=0", "local.model.max_width_factor"),
])
def test_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=f"'{field.replace('[', '.').replace(']', '.')}"):
        load_config(None, ["data.path=x.h5", override])


def test_exponent_notation_is_a_float(tmp_path):
    """PyYAML reads 5e-4 as a string (YAML 1.1); a float field takes it as the number."""
    (tmp_path / "c.yaml").write_text("data: {path: x.h5}\nlocal:\n  optimizer: {lr: 5e-4}\n")
    config = load_config(tmp_path / "c.yaml", ["coarse.lr=1E-2", "coarse.weight_decay=0"])
    assert config.local.optimizer.lr == 5e-4 and config.coarse.lr == 0.01
    with pytest.raises(ConfigError, match="'local.epochs': expected int, got '1e3'"):
        load_config(tmp_path / "c.yaml", ["local.epochs=1e3"])


def test_vgg16_and_the_imagenet_resnet_stem_from_a_config():
    from types import SimpleNamespace

    from ddmpi.models.cnn import build_cnn
    from ddmpi.strategies.local import build_kwargs

    info = SimpleNamespace(spatial_dims=2, channels=3, num_classes=1000)
    vgg = load_config(None, ["data.path=x.h5", "local.model.depth=5", "local.model.width=64",
                             "local.model.blocks=[2, 2, 3, 3, 3]", "local.model.batchnorm=false",
                             "local.model.max_width_factor=8"])
    body = build_cnn(**build_kwargs(vgg, info, (224, 224)))
    assert sum(p.numel() for m in (body.stem, body.stages) for p in m.parameters()) == 14_714_688
    resnet = load_config(None, ["data.path=x.h5", "local.model.family=resnet",
                                "local.model.depth=4", "local.model.width=64",
                                "local.model.blocks=[2, 2, 2, 2]", "local.model.stem=imagenet"])
    net = build_cnn(**build_kwargs(resnet, info, (224, 224)))
    assert sum(p.numel() for p in net.parameters()) == 11_689_512  # torchvision resnet18


def test_missing_data_path():
    with pytest.raises(ConfigError, match="data.path"):
        from_dict({})


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["local.epochs"])


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("local: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)


def test_packaged_quickstart_round_trips(tmp_path):
    config = load_config("quickstart")
    assert config.decomposition.grid == [2, 2]
    saved = tmp_path / "resolved.yaml"
    saved.write_text(dump(config))
    assert load_config(saved) == config


def test_yaml_syntax_error_is_one_line_with_its_position(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value) == (f"{bad}: not valid YAML (line 2, column 1: expected ',' or ']', "
                              f"but got '<stream end>')")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["local.epochs=["])
    assert "\n" not in str(err.value) and "line 1, column 2" in str(err.value)


def test_an_error_in_the_file_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: {path: x.h5}\nfoo: 1\n")
    for overrides in ([], ["run.dir=elsewhere"], ["local.epochs=0"]):
        with pytest.raises(ConfigError, match=f"^{path}: config field 'foo': unknown key"):
            load_config(path, overrides)
    path.write_text("data: {path: x.h5}\n")
    with pytest.raises(ConfigError, match="^config field 'local.epochs'"):  # the --set's fault
        load_config(path, ["local.epochs=0"])
    path.write_text("local: {epochs: 2}\n")  # no data.path: the file's, unless --set gives it
    with pytest.raises(ConfigError, match=f"^{path}: config field 'data.path': required"):
        load_config(path)
    assert load_config(path, ["data.path=x.h5"]).local.epochs == 2


@pytest.mark.parametrize("text, key, line", [
    ("local:\n  epochs: 2\nrun:\n  seed: 1\nlocal:\n  epochs: 3\n", "local", 5),
    ("local:\n  epochs: 2\n  batch_size: 8\n  epochs: 3\n", "epochs", 4),
])
def test_a_key_given_twice_is_an_error_naming_file_key_and_line(tmp_path, text, key, line):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML \(line {line}, column "
                                          rf"\d+: duplicate key '{key}'\)$"):
        load_config(path)


def test_set_values_are_read_as_yaml_and_refuse_a_key_twice():
    config = load_config(None, ["data.path=x.h5", "local.model.blocks=[1, 2]",
                                "coarse.hidden=[8]"])
    assert (config.local.model.blocks, config.coarse.hidden) == ([1, 2], [8])
    with pytest.raises(ConfigError, match=r"--set .*duplicate key 'a'"):
        load_config(None, ["local.model={a: 1, a: 2}"])


def test_a_config_that_is_not_text_is_one_line_naming_it(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=rf"^{path}: not a UTF-8 text file$"):
        load_config(path)
