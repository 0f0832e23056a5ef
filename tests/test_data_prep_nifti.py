"""The NIfTI converter: orientation, windowing, resampling, manifests, corrupt files, LIDC."""

import csv
import gzip
import json

import h5py
import nibabel as nib
import numpy as np
import pytest
from helpers import shared_data
from test_data_prep_cli import assert_failed, run_prep

from data_prep import nifti
from data_prep.cli import main
from data_prep.errors import PrepError
from data_prep.splits import SplitOptions
from ddmpi.data.inputs import load_sample, load_volume
from ddmpi.data.schema import read_info

LPS = np.array([[-0.7, 0, 0, 40.0], [0, -0.7, 0, 60.0], [0, 0, 2.5, -120.0], [0, 0, 0, 1]])


def save(path, data, affine=LPS):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def hu_volume(shape, seed):
    """int16 Hounsfield-like values: air around a soft-tissue blob."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = (np.asarray(shape) / 2).reshape(3, 1, 1, 1)
    blob = (((grid - centre) / (np.asarray(shape).reshape(3, 1, 1, 1) / 3)) ** 2).sum(0) < 1
    return (np.where(blob, 40, -950) + rng.normal(0, 20, shape)).astype(np.int16)


def test_orientation_is_canonical_and_d_is_z(tmp_path):
    ras = np.random.default_rng(0).normal(size=(5, 6, 4)).astype(np.float32)
    ras[..., 2] += 10  # a marked slice z = 2
    ras_affine = np.diag([0.8, 0.9, 2.0, 1.0])
    a = load_volume(save(tmp_path / "ras.nii", ras, ras_affine))
    assert a.shape == (1, 4, 6, 5)  # (1, D=z, H=y, W=x)
    assert a[0, 2].min() > a[0, 1].max()  # the marked slice is D index 2
    lps_affine = ras_affine @ np.array([[-1, 0, 0, 4], [0, -1, 0, 5], [0, 0, 1, 0], [0, 0, 0, 1]])
    b = load_volume(save(tmp_path / "lps.nii.gz", ras[::-1, ::-1], lps_affine))
    perm_affine = ras_affine[:, [2, 0, 1, 3]]  # voxel axes stored as (z, x, y)
    c = load_volume(save(tmp_path / "zxy.nii.gz", ras.transpose(2, 0, 1), perm_affine))
    np.testing.assert_allclose(b, a, atol=1e-6)
    np.testing.assert_allclose(c, a, atol=1e-6)


def test_window_and_resampling(tmp_path):
    data = np.array([-2000, -1000, -300, 400, 3071, 0], np.int16).reshape(1, 1, 6)
    x = load_volume(save(tmp_path / "w.nii.gz", data, np.eye(4)), window=(-1000, 400))
    np.testing.assert_allclose(x.ravel(), [0, 0, 0.5, 1, 1, 1000 / 1400], atol=1e-6)
    y = load_volume(tmp_path / "w.nii.gz", shape=(12, 3, 2), window=(-1000, 400))
    assert y.shape == (1, 12, 3, 2) and y.dtype == np.float32
    assert y.min() >= 0 and y.max() <= 1
    np.testing.assert_allclose(y[0, 0], 0) and np.testing.assert_allclose(y[0, -1], 1000 / 1400)
    z = load_volume(tmp_path / "w.nii.gz")  # min-max
    assert z.min() == 0 and z.max() == 1


def test_class_folders_mixed_shapes(tmp_path):
    shapes = [(20, 18, 5), (17, 25, 9), (30, 22, 3), (16, 16, 12)]
    for c, name in enumerate(("benign", "malignant")):
        (tmp_path / "ct" / name).mkdir(parents=True)
        for i in range(6):
            suffix = ".nii.gz" if i % 2 else ".nii"
            affine = LPS @ np.diag([1 + 0.1 * i, 1, 0.5 + 0.2 * c, 1])
            save(tmp_path / "ct" / name / f"v{i}{suffix}", hu_volume(shapes[(i + c) % 4], i),
                 affine)
    with pytest.raises(PrepError, match="loaded as .*--shape X Y Z"):
        nifti.convert(tmp_path / "o.h5", src=tmp_path / "ct")
    out = tmp_path / "ct.h5"
    assert main(["nifti", "--src", str(tmp_path / "ct"), "--shape", "12", "10", "4",
                 "--window", "-1000", "400", "--val-fraction", "0.25", "--test-fraction",
                 "0.25", "--out", str(out)]) == 0
    info = read_info(out)
    assert info.spatial_shape == (4, 10, 12) and info.channels == 1
    assert info.classes == ["benign", "malignant"] and sum(info.splits.values()) == 12
    prov = json.loads(info.attrs["provenance"])
    entry = next(s for s in prov["sources"] if s["path"] == "malignant/v1.nii.gz")
    assert entry["orientation"] == "LPS" and entry["shape_xyz"] == [30, 22, 3]
    np.testing.assert_allclose(entry["spacing_xyz_mm"], [0.77, 0.7, 1.75], rtol=1e-5)
    with h5py.File(out, "r") as f:
        x = np.concatenate([f[f"{s}/images"][()] for s in ("train", "val", "test")])
    assert x.shape == (12, 1, 4, 10, 12) and x.min() >= 0 and x.max() <= 1


def write_manifest(root, n_patients=30, extra_row=None):
    (root / "image").mkdir(parents=True)
    rows = []
    for p in range(n_patients):
        for k in range(1 + p % 3):
            name = f"image/P{p:03d}_{k}.nii.gz"
            save(root / name, hu_volume((8 + k, 9, 2 + p % 4), p * 10 + k))
            rows.append({"image": name, "label": "malignant" if p % 3 == 0 else "benign",
                         "malignancy": 1 + p % 5, "patient": f"P{p:03d}"})
    if extra_row:
        rows.append(extra_row)
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "label", "malignancy", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


def test_manifest_grouped_by_patient(tmp_path):
    manifest = write_manifest(tmp_path / "lidc")
    out = tmp_path / "g.h5"
    nifti.convert(out, manifest=manifest, group_column="patient", shape_xyz=(8, 8, 4),
                  window=(-1000, 400), split_options=SplitOptions(val_fraction=0.2, seed=5))
    with h5py.File(out, "r") as f:
        groups = {s: f[f"{s}/groups"].asstr()[()] for s in ("train", "val", "test")}
        assert f["train/images"].shape[1:] == (1, 4, 8, 8)
        first, first_id = f["val/images"][0], f["val/ids"].asstr()[0]
    np.testing.assert_array_equal(load_sample(tmp_path / "lidc" / first_id, read_info(out)), first)
    sides = {s: set(g) for s, g in groups.items()}
    assert not (sides["train"] & sides["val"] or sides["train"] & sides["test"]
                or sides["val"] & sides["test"])
    assert sum(len(g) for g in groups.values()) == 60 and len(set.union(*sides.values())) == 30
    prov = json.loads(read_info(out).attrs["provenance"])
    assert prov["manifest"]["path"] == "labels.csv" and prov["options"]["group_column"] == "patient"


def test_manifest_errors(tmp_path, capsys):
    missing = {"image": "image/gone.nii.gz", "label": "benign", "malignancy": 1, "patient": "X"}
    manifest = write_manifest(tmp_path / "a", n_patients=4, extra_row=missing)
    out = tmp_path / "o.h5"
    assert main(["nifti", "--manifest", str(manifest), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a' / 'image' / 'gone.nii.gz'}: listed in {manifest} line 9" in err
    odd = {"image": "image/P000_0.nii.gz", "label": "unsure", "malignancy": 3, "patient": "Y"}
    manifest = write_manifest(tmp_path / "b", n_patients=2, extra_row=odd)
    with pytest.raises(PrepError, match="P000_0.nii.gz: listed twice .*lines 2 and 5"):
        nifti.convert(out, manifest=manifest)
    save(tmp_path / "b" / "odd.nii", hu_volume((4, 4, 2), 0))
    text = manifest.read_text().replace("image/P000_0.nii.gz,unsure", "odd.nii,unsure")
    manifest.write_text(text)
    with pytest.raises(PrepError, match=r"labels.csv line 5: unknown label 'unsure'"):
        nifti.convert(out, manifest=manifest, classes=["benign", "malignant"])
    with pytest.raises(PrepError, match=r"labels.csv: no column\(s\) \['subject'\]"):
        nifti.convert(out, manifest=manifest, group_column="subject")
    assert not out.exists()


def test_cli_truncated_nifti_fails_cleanly(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "lidc", n_patients=4)
    bad = tmp_path / "lidc" / "image" / "P002_1.nii.gz"
    raw = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(raw)[:-40])  # cut off the end of the gzip stream
    out = tmp_path / "lidc.h5"
    result = run_prep("nifti", "--manifest", manifest, "--shape", "8", "8", "4", "--out", out)
    assert_failed(result.returncode, result.stderr, bad, out)
    bad.write_bytes(gzip.compress(raw[:400]))  # a complete gzip of a truncated volume
    status = main(["nifti", "--manifest", str(manifest), "--shape", "8", "8", "4", "--out",
                   str(out)])
    assert_failed(status, capsys.readouterr().err, bad, out)


def test_real_lidc_nodules(tmp_path):
    root = shared_data("lidc-nodules")
    out = tmp_path / "lidc.h5"
    nifti.convert(out, manifest=root / "labels.csv", group_column="patient",
                  shape_xyz=(32, 32, 16), window=(-1000, 400))
    info = read_info(out)
    assert info.classes == ["benign", "malignant"] and info.spatial_shape == (16, 32, 32)
    assert sum(info.splits.values()) == 994 and info.has_groups
    with open(root / "labels.csv", newline="") as f:
        patient_of = {row["image"]: row["patient"] for row in csv.DictReader(f)}
    sides = {}
    with h5py.File(out, "r") as f:
        for split in ("train", "val", "test"):
            x = f[f"{split}/images"][()]
            assert x.shape[1:] == (1, 16, 32, 32) and x.min() >= 0 and x.max() <= 1
            ids, groups = f[f"{split}/ids"].asstr()[()], f[f"{split}/groups"].asstr()[()]
            assert all(patient_of[i] == g for i, g in zip(ids, groups))
            sides[split] = set(groups)
    assert not (sides["train"] & sides["val"] or sides["train"] & sides["test"]
                or sides["val"] & sides["test"])
    assert len(set.union(*sides.values())) == 551
    assert 0.15 < info.splits["test"] / 994 < 0.25 and 0.06 < info.splits["val"] / 994 < 0.14
    prov = json.loads(info.attrs["provenance"])
    assert len(prov["sources"]) == 994
    assert all(len(s["spacing_xyz_mm"]) == 3 and s["shape_xyz"][2] >= 2 for s in prov["sources"])
