"""``ddmpi predict``: classify new images with a trained run directory.

Ownership: as in training, each rank of ``comm`` evaluates the local CNNs of the subdomains
:func:`ddmpi.parallel.mapping.assign_subdomains` gives it (all of them in a single process); the local
decisions are gathered to rank 0, which applies the chosen combiner and writes the predictions.
"""

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from data_prep.images import load_image
from data_prep.nifti import is_nifti, load_volume
from ddmpi.coarse import combiners
from ddmpi.training.checkpoint import load_checkpoint
from ddmpi.config import load_config
from ddmpi.data.decomposition import Decomposition
from ddmpi.parallel.gather import gather_decisions
from ddmpi.training.loop import TensorSource, predict_proba
from ddmpi.parallel.mapping import assign_subdomains
from ddmpi.models.cnn import CoarseDNN, build_cnn
from ddmpi.data.schema import DatasetError, open_h5, read_info

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp", ".tif", ".tiff", ".gif"}


def load_inputs(inputs, dataset, split):
    """Images in [0, 1] as (N, C, *spatial) float32 plus an id per image.

    ``inputs``: one ddmpi HDF5 file (its ``split`` is read), or image/NIfTI files, which are
    preprocessed exactly as the training data set's converter did (size, colour mode, HU window,
    target shape, from ``dataset["preprocessing"]``).
    """
    first = Path(inputs[0])
    if len(inputs) == 1 and first.suffix in (".h5", ".hdf5"):
        info = read_info(first)
        if info.spatial_shape != tuple(dataset["spatial_shape"]) or info.channels != dataset[
                "channels"]:
            raise DatasetError(f"{first}: images {info.channels}x{info.spatial_shape} do not "
                               f"match the trained run's {dataset['channels']}x"
                               f"{tuple(dataset['spatial_shape'])}")
        with open_h5(first) as f:
            if split not in f:
                raise DatasetError(f"{first}: no split {split!r}")
            ids = (f[split]["ids"].asstr()[()] if "ids" in f[split]
                   else [f"{split}:{i}" for i in range(f[split]["labels"].shape[0])])
            return f[split]["images"][()], list(ids)
    prep = dataset.get("preprocessing", {})
    images = []
    for name in inputs:
        path = Path(name)
        if not path.is_file():
            raise DatasetError(f"{path}: input file not found")
        if is_nifti(path):
            images.append(load_volume(path, tuple(dataset["spatial_shape"]), prep.get("window")))
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            mode = "rgb" if dataset["channels"] == 3 else "grey"
            images.append(load_image(path, tuple(dataset["spatial_shape"]), mode))
        else:
            raise DatasetError(f"{path}: unsupported input type (expected .h5, an image file or "
                               f"a NIfTI volume)")
    return np.stack(images).astype(np.float32), [str(p) for p in inputs]


def predict(run_dir, inputs, comm, split="test", combiner="cnn_dnn"):
    """Class probabilities (N, K) on rank 0 (None elsewhere) and the input ids."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    dataset_file = run_dir / "dataset.json"
    if not dataset_file.exists():
        raise DatasetError(f"{dataset_file}: missing; is {run_dir} a finished ddmpi run?")
    dataset = json.loads(dataset_file.read_text())
    decomposition = Decomposition(tuple(dataset["spatial_shape"]), config.decomposition.grid,
                                  config.decomposition.overlap)
    images, ids = load_inputs(inputs, dataset, split)
    shape = (-1, len(dataset["mean"])) + (1,) * decomposition.ndim
    mean = np.reshape(np.asarray(dataset["mean"], np.float32), shape)
    images = (images - mean) / np.reshape(np.asarray(dataset["std"], np.float32), shape)
    owned = assign_subdomains(decomposition.num_subdomains, comm.size)[comm.rank]
    local = {}
    for sub in owned:
        path = run_dir / "checkpoints" / f"local_{sub:03d}.pt"
        state = load_checkpoint(path)
        if state is None or "best_model" not in state:
            raise DatasetError(f"{path}: missing or unfinished local checkpoint")
        model = build_cnn(**state["model_config"])
        model.load_state_dict(state["best_model"])
        x = torch.from_numpy(np.ascontiguousarray(decomposition.extract(images, sub)))
        local[sub] = predict_proba(model, TensorSource(x, torch.zeros(len(x))), torch.device("cpu"))
    probs = gather_decisions(comm, local, decomposition.num_subdomains)
    if comm.rank != 0:
        return None, ids
    if combiner == "majority_vote":
        votes = combiners.majority_vote(probs)
        return np.eye(probs.shape[2], dtype=np.float32)[votes], ids
    if combiner == "average_probabilities":
        return combiners.average_probabilities(probs), ids
    coarse_state = load_checkpoint(run_dir / "checkpoints" / "coarse.pt")
    if coarse_state is None:
        raise DatasetError(f"{run_dir / 'checkpoints' / 'coarse.pt'}: missing coarse DNN")
    coarse = CoarseDNN(coarse_state["in_features"], coarse_state["num_classes"],
                       hidden=tuple(config.coarse.hidden), dropout=config.coarse.dropout)
    coarse.load_state_dict(coarse_state["model"])
    return combiners.coarse_predict(coarse, probs, config.coarse.inputs), ids


def write_predictions(stream, probs, ids, classes):
    """CSV: id, predicted class, then one probability column per class."""
    writer = csv.writer(stream)
    writer.writerow(["id", "prediction"] + [f"p_{c}" for c in classes])
    for name, p in zip(ids, probs):
        writer.writerow([name, classes[int(p.argmax())]] + [f"{v:.6f}" for v in p])


def main(args, comm):
    """Entry of ``ddmpi predict`` (arguments parsed by :mod:`ddmpi.cli`)."""
    probs, ids = predict(args.run_dir, args.inputs, comm, args.split, args.combiner)
    if comm.rank != 0:
        return
    classes = json.loads((Path(args.run_dir) / "dataset.json").read_text())["classes"]
    if args.out:
        from ddmpi.data.atomic import write_text

        buffer = io.StringIO()
        write_predictions(buffer, probs, ids, classes)
        write_text(args.out, buffer.getvalue())
        print(f"wrote {len(ids)} predictions to {args.out}")
    else:
        write_predictions(sys.stdout, probs, ids, classes)
