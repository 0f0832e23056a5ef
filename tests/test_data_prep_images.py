"""The image-folder converter: ORL-like PGM faces, PNG objects, regex/manifest labels, errors."""

import json

import h5py
import numpy as np
import pytest
from PIL import Image
from test_data_prep_cli import assert_failed, run_prep

from data_prep import images
from data_prep.cli import main
from data_prep.errors import PrepError
from data_prep.splits import SplitOptions
from ddmpi.data.inputs import load_image, load_sample
from ddmpi.data.schema import read_info


def make_faces(root, subjects=40, per_subject=10, size=(112, 92)):
    """The AT&T/ORL layout: s1..sN folders of 1.pgm..10.pgm, grey, H x W = 112 x 92."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size[0], :size[1]]
    for s in range(1, subjects + 1):
        folder = root / f"s{s}"
        folder.mkdir(parents=True)
        face = ((xx - size[1] / 2) / (0.3 * size[1] + s)) ** 2 + \
            ((yy - size[0] / 2) / (0.4 * size[0])) ** 2 < 1
        for i in range(1, per_subject + 1):
            pixels = np.clip(face * (120 + 3 * s) + rng.normal(40, 10, size), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.pgm")
    (root / "README").write_text("ORL-like synthetic faces\n")


def make_objects(root, classes=("cup", "duck", "car"), per_class=6, size=(24, 32)):
    """Colour PNG objects, one folder per class, with a stray text file and a hidden file."""
    rng = np.random.default_rng(1)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            pixels[..., c] = 255
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
        (root / name / "notes.txt").write_text("not an image")
        (root / name / ".hidden.png").write_bytes(b"junk")


def test_orl_faces_full_size(tmp_path):
    make_faces(tmp_path / "orl_faces")
    out = tmp_path / "orl.h5"
    assert main(["images", "--src", str(tmp_path / "orl_faces"), "--out", str(out)]) == 0
    info = read_info(out)
    assert info.classes == [f"s{i}" for i in range(1, 41)]
    assert info.channels == 1 and info.spatial_shape == (112, 92)
    assert info.splits == {"train": 280, "val": 40, "test": 80}
    with h5py.File(out, "r") as f:
        for split in ("train", "test"):
            rel = f[f"{split}/ids"].asstr()[0]
            label = f[f"{split}/labels"][0]
            assert rel.split("/")[0] == info.classes[label]
            expected = np.asarray(Image.open(tmp_path / "orl_faces" / rel), np.float32) / 255
            np.testing.assert_allclose(f[f"{split}/images"][0, 0], expected, atol=1e-6)
        np.testing.assert_array_equal(
            load_sample(tmp_path / "orl_faces" / rel, info), f[f"{split}/images"][0])
    prov = json.loads(info.attrs["provenance"])
    assert len(prov["sources"]) == 400 and prov["sources"][0]["path"] == "s1/1.pgm"
    assert prov["options"]["mode"] == "grey" and prov["options"]["size"] == [112, 92]


def test_orl_faces_resized_small(tmp_path):
    make_faces(tmp_path / "faces", subjects=4, per_subject=5, size=(28, 23))
    out = tmp_path / "faces.h5"
    images.convert(out, src=tmp_path / "faces", size=(14, 12), mode="rgb",
                   split_options=SplitOptions(val_fraction=0.2, test_fraction=0.2))
    info = read_info(out)
    assert info.channels == 3 and info.spatial_shape == (14, 12)
    assert info.splits == {"train": 12, "val": 4, "test": 4}


def test_png_objects_auto_rgb_resized(tmp_path):
    make_objects(tmp_path / "objects")
    out = tmp_path / "objects.h5"
    assert main(["images", "--src", str(tmp_path / "objects"), "--size", "16x20",
                 "--val-fraction", "0.17", "--test-fraction", "0.17", "--out", str(out)]) == 0
    info = read_info(out)
    assert info.classes == ["car", "cup", "duck"] and info.channels == 3
    assert info.spatial_shape == (16, 20) and sum(info.splits.values()) == 18
    with h5py.File(out, "r") as f:
        for split in ("train", "val", "test"):
            x, y = f[f"{split}/images"][()], f[f"{split}/labels"][()]
            assert x.min() >= 0 and x.max() <= 1
            colour = {"car": 2, "cup": 0, "duck": 1}
            for image, label in zip(x, y):  # the class's channel is saturated
                np.testing.assert_allclose(image[colour[info.classes[label]]], 1.0, atol=1e-6)


def test_flat_folder_with_label_regex(tmp_path):
    flat = tmp_path / "coil"
    flat.mkdir()
    for obj in (1, 2, 10):
        for angle in range(0, 40, 5):
            pixels = np.full((8, 8), obj * 20, np.uint8)
            Image.fromarray(pixels).save(flat / f"obj{obj}__{angle}.png")
    out = tmp_path / "coil.h5"
    images.convert(out, src=flat, label_regex=r"obj(\d+)__",
                   split_options=SplitOptions(val_fraction=0.25, test_fraction=0.25))
    info = read_info(out)
    assert info.classes == ["1", "2", "10"] and sum(info.splits.values()) == 24
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(flat / "stray.png")
    with pytest.raises(PrepError, match="stray.png: its name does not match"):
        images.convert(tmp_path / "o.h5", src=flat, label_regex=r"obj(\d+)__")


def test_manifest_groups_and_unknown_label(tmp_path):
    root = tmp_path / "m"
    (root / "img").mkdir(parents=True)
    rows = ["file,kind,subject"]
    for i in range(40):
        Image.fromarray(np.full((6, 6), i, np.uint8)).save(root / "img" / f"{i}.bmp")
        rows.append(f"img/{i}.bmp,{'ab'[i % 2]},subj{i // 4}")
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "m.h5"
    images.convert(out, manifest=root / "list.csv", image_column="file", label_column="kind",
                   group_column="subject", classes=["a", "b"],
                   split_options=SplitOptions(val_fraction=0.2, test_fraction=0.2))
    with h5py.File(out, "r") as f:
        groups = {s: set(f[f"{s}/groups"].asstr()[()]) for s in ("train", "val", "test")}
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"]
                or groups["val"] & groups["test"])
    assert sum(map(len, groups.values())) == 10
    with pytest.raises(PrepError, match=r"list.csv line 2: unknown label 'a' \(classes: b, c\)"):
        images.convert(tmp_path / "o.h5", manifest=root / "list.csv", image_column="file",
                       label_column="kind", classes=["b", "c"])
    assert not (tmp_path / "o.h5").exists()


def test_different_sizes_need_size(tmp_path):
    for name, shape in (("a", (10, 12)), ("b", (11, 12))):
        (tmp_path / "src" / name).mkdir(parents=True)
        Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / "src" / name / "x.png")
    with pytest.raises(PrepError, match=r"b/x.png: 11x12 \(HxW\), but .*a/x.png is 10x12"):
        images.convert(tmp_path / "o.h5", src=tmp_path / "src")


def test_cli_bad_png_fails_cleanly(tmp_path, capsys):
    make_objects(tmp_path / "objects", per_class=3)
    bad = tmp_path / "objects" / "duck" / "duck_1.png"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated PNG
    out = tmp_path / "objects.h5"
    result = run_prep("images", "--src", tmp_path / "objects", "--out", out)
    assert_failed(result.returncode, result.stderr, bad, out)
    assert "cannot decode the image" in result.stderr
    bad.write_bytes(b"this is no image at all")
    status = main(["images", "--src", str(tmp_path / "objects"), "--size", "8x8", "--mode",
                   "rgb", "--out", str(out)])  # no header probe: fails when loading pixels
    assert_failed(status, capsys.readouterr().err, bad, out)


def test_load_image_modes_and_16_bit(tmp_path):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(grey).save(tmp_path / "g.png")
    x = load_image(tmp_path / "g.png")
    assert x.shape == (1, 12, 10) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], grey / 255, atol=1e-6)
    rgb = load_image(tmp_path / "g.png", size=(6, 5), mode="rgb")
    assert rgb.shape == (3, 6, 5) and np.allclose(rgb[0], rgb[2])
    deep = np.full((4, 4), 65535, np.uint16)
    deep[0, 0] = 0
    Image.fromarray(deep).save(tmp_path / "d.png")
    y = load_image(tmp_path / "d.png")
    assert y[0, 0, 0] == 0 and y[0, 1, 1] == 1.0
    with pytest.raises(PrepError, match="image mode 'cmyk'"):
        load_image(tmp_path / "g.png", mode="cmyk")


def _split_manifest(root, rows):
    """PNG files and a manifest ``image,label,patient,split`` of ``rows``."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["image,label,patient,split"]
    for i, (label, patient, split) in enumerate(rows):
        Image.fromarray(np.full((6, 5), 20 * i, np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png,{label},{patient},{split}")
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    return root / "list.csv"


def test_manifest_split_column_keeps_the_official_splits(tmp_path):
    rows = [("a", "p1", "train"), ("b", "p1", "train"), ("a", "p2", "train"),
            ("b", "p3", "val"), ("a", "p4", "test"), ("b", "p4", "test")]
    csv_path = _split_manifest(tmp_path / "m", rows)
    out = tmp_path / "o.h5"
    assert main(["images", "--manifest", str(csv_path), "--split-column", "split",
                 "--group-column", "patient", "--dtype", "uint8", "--out", str(out),
                 "--quiet"]) == 0
    info = read_info(out)
    assert info.splits == {"train": 3, "val": 1, "test": 2} and info.storage_dtype == "uint8"
    with h5py.File(out, "r") as f:
        assert list(f["test/ids"].asstr()[()]) == ["4.png", "5.png"]
        np.testing.assert_array_equal(f["val/images"][0, 0], np.full((6, 5), 60, np.uint8))
    options = json.loads(info.attrs["provenance"])["options"]
    assert options["split_column"] == "split" and options["val_fraction"] is None
    proc = run_prep("images", "--manifest", csv_path, "--split-column", "split",
                    "--val-fraction", "0.5", "--out", tmp_path / "v.h5")
    assert_failed(proc.returncode, proc.stderr,
                  "--val-fraction does not apply with a split column", tmp_path / "v.h5")


@pytest.mark.parametrize("rows, message", [
    ([("a", "p1", "train"), ("a", "p2", "valid"), ("a", "p3", "test")],
     r"list.csv line 3: column 'split': unknown split 'valid'"),
    ([("a", "p1", "train"), ("a", "p2", "train"), ("a", "p3", "test")],
     r"list.csv: column 'split': split 'val' has no rows"),
    ([("a", "p1", "train"), ("a", "p2", "val"), ("a", "p1", "test")],
     r"list.csv line 4: column 'split': group 'p1' \(column 'patient'\) is in split 'test' "
     r"here but in 'train' at .*list.csv line 2"),
    ([("a", "p1", "train"), ("a", "p2", "val"), ("b", "p3", "test")],
     r"list.csv: the split column gives class 'b' no training samples"),
])
def test_manifest_split_column_errors(tmp_path, rows, message):
    csv_path = _split_manifest(tmp_path / "m", rows)
    with pytest.raises(PrepError, match=message):
        images.convert(tmp_path / "o.h5", manifest=csv_path, split_column="split",
                       group_column="patient")
    assert not (tmp_path / "o.h5").exists()


def test_formats_pillow_only_identifies_are_not_images(tmp_path):
    from ddmpi.data.inputs import is_image

    assert all(is_image(f"x.{ext}") for ext in ("png", "JPG", "tif", "pgm", "bmp", "webp"))
    assert not any(is_image(f"x.{ext}") for ext in ("h5", "hdf", "grib", "bufr", "wmf", "emf",
                                                     "eps", "mpg", "txt"))


def test_a_grey_palette_image_is_grey(tmp_path):
    from ddmpi.data.inputs import probe

    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("RGB")
    grey.quantize(16).save(tmp_path / "grey.png")
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    red.quantize(4).save(tmp_path / "red.png")
    assert Image.open(tmp_path / "grey.png").mode == "P"
    assert probe(tmp_path / "grey.png") == ("grey", (8, 8))
    assert probe(tmp_path / "red.png") == ("rgb", (8, 8))
