"""``ddmpi predict``: classify new images with a trained run directory: CNN-DNN, coherent
CNN-DNN or global CNN (``ddmpi train``, ``ddmpi compare``).

CNN-DNN: each rank evaluates the local CNNs of its subdomains (any number of ranks: those
beyond the number of subdomains idle); rank 0 gathers the decisions, applies the combiner and
writes the predictions (and, for a labelled HDF5 split, the metrics).
Global CNN: each rank evaluates a share of the images with the one model; rank 0 gathers them.
"""

import csv
import io
import sys
from pathlib import Path

import numpy as np
import torch

from ddmpi.coarse.dnn import build_coarse, combine
from ddmpi.config import load_config
from ddmpi.data.atomic import write_text
from ddmpi.data.decomposition import Decomposition
from ddmpi.data.inputs import load_inputs
from ddmpi.data.schema import DatasetError
from ddmpi.models.cnn import build_cnn
from ddmpi.parallel.layout import assign_evaluation
from ddmpi.report.stats import classification_metrics
from ddmpi.strategies.rundir import coarse_path, global_path, local_path, read_json
from ddmpi.training.checkpoint import load_checkpoint


def _local_model(run_dir, sub):
    state = load_checkpoint(local_path(run_dir, sub))
    return _built(local_path(run_dir, sub), state, (state or {}).get("best_model"), "local")


def _global_model(run_dir):
    """The global CNN's best state (kept in its resumable trainer state once finished)."""
    state = load_checkpoint(global_path(run_dir))
    best = state["best"]["state"] if (state or {}).get("finished") else None
    return _built(global_path(run_dir), state, best, "global")


def _built(path, state, weights, kind):
    if weights is None:
        raise DatasetError(f"{path}: missing or unfinished {kind} checkpoint")
    model = build_cnn(**state["model_config"])
    model.load_state_dict(weights)
    return model.eval()


def _probabilities(model, x):
    return torch.cat([torch.softmax(model(b), 1) for b in x.split(512)]).numpy()


@torch.no_grad()
def predict(run_dir, inputs, world, split="test", combiner="chosen"):
    """``(probabilities (N, K) on rank 0 / None, ids, labels or None)``."""
    run_dir = Path(run_dir)
    dataset_file = run_dir / "dataset.json"
    if not dataset_file.exists():
        raise DatasetError(f"{dataset_file}: missing; is {run_dir} a finished ddmpi run?")
    dataset = read_json(dataset_file)
    is_global = global_path(run_dir).exists()
    if is_global and combiner != "chosen":
        raise DatasetError(f"{run_dir}: a global-model run (one CNN on whole images, "
                           f"checkpoints/global.pt); --combiner {combiner} applies to CNN-DNN "
                           f"runs only")
    images, ids, labels = load_inputs(inputs, dataset, split)
    shape = (1, -1) + (1,) * (images.ndim - 2)
    images = ((images - np.reshape(np.float32(dataset["mean"]), shape))
              / np.reshape(np.float32(dataset["std"]), shape))
    if is_global:
        return _predict_global(run_dir, images, world), ids, labels
    return _predict_decomposed(run_dir, images, world, dataset, combiner), ids, labels


def _predict_global(run_dir, images, world):
    """The global CNN's probabilities on rank 0 (None elsewhere), rows shared by the ranks."""
    x = torch.from_numpy(np.ascontiguousarray(images[world.row_share(len(images))]))
    return world.gatherv_rows(_probabilities(_global_model(run_dir), x))


def _predict_decomposed(run_dir, images, world, dataset, combiner):
    """The combined probabilities of the local CNNs on rank 0 (None elsewhere)."""
    config = load_config(run_dir / "config.yaml")
    decomposition = Decomposition(tuple(dataset["spatial_shape"]), config.decomposition.grid,
                                  config.decomposition.overlap)
    local = {}
    for sub in assign_evaluation(decomposition.num_subdomains, world.size)[world.rank]:
        x = torch.from_numpy(np.ascontiguousarray(decomposition.extract(images, sub)))
        local[sub] = _probabilities(_local_model(run_dir, sub), x)
    probs = world.gather_decisions(local, decomposition.num_subdomains)
    if world.rank != 0:
        return None
    state = load_checkpoint(coarse_path(run_dir))
    if state is None:
        raise DatasetError(f"{coarse_path(run_dir)}: missing coarse checkpoint")
    name = state["chosen"] if combiner == "chosen" else combiner
    coarse = build_coarse(state["model_config"])
    coarse.load_state_dict(state["model"])
    return combine(name, coarse, probs)


def write_predictions(stream, probs, ids, classes):
    """CSV: id, predicted class, then one probability column per class."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["id", "prediction"] + [f"p_{c}" for c in classes])
    for name, p in zip(ids, probs):
        writer.writerow([name, classes[int(p.argmax())]] + [f"{v:.6f}" for v in p])


def main(args, world):
    """Entry of ``ddmpi predict``."""
    probs, ids, labels = predict(args.run_dir, args.inputs, world, args.split, args.combiner)
    if world.rank != 0:
        return
    classes = read_json(Path(args.run_dir) / "dataset.json")["classes"]
    buffer = io.StringIO()
    write_predictions(buffer, probs, ids, classes)
    if args.out:
        write_text(args.out, buffer.getvalue())
        print(f"wrote {len(ids)} predictions to {args.out}")
    else:
        sys.stdout.write(buffer.getvalue())
    if labels is not None:
        m = classification_metrics(probs, labels, classes)
        print(f"accuracy {100 * m['accuracy']:.2f} %, balanced accuracy "
              f"{100 * m['balanced_accuracy']:.2f} %, ROC AUC {m['roc_auc']:.4f}, majority-class "
              f"rate {100 * m['majority_class_rate']:.2f} % ({len(labels)} labelled samples)",
              file=sys.stderr if not args.out else sys.stdout)
