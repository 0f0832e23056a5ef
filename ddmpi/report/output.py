"""Outputs of a run for people: metrics.json, PNG plots and the printed results table."""

import json
import math

import numpy as np

from ddmpi.data.atomic import atomic_path, write_text


def write_metrics(path, metrics):
    """Write ``metrics`` as indented JSON, atomically (numpy values converted)."""
    write_text(path, json.dumps(metrics, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_arrays(path, arrays):
    """``{name: array}`` as one .npz file, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def results_table(accuracies, title="test accuracy"):
    """A short fixed-width table of ``{name: accuracy}``, best first."""
    width = max(len(name) for name in accuracies)
    lines = [f"{'combiner':<{width}}  {title}", f"{'-' * width}  {'-' * len(title)}"]
    for name, acc in sorted(accuracies.items(), key=lambda item: -item[1]):
        lines.append(f"{name:<{width}}  {100 * acc:6.2f} %")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_training_curves(path, histories, model="local CNNs"):
    """Validation accuracy and training loss per epoch of ``model``: one line per entry of
    ``histories`` (per subdomain for the local CNNs)."""
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for sub, history in sorted(histories.items()):
        epochs = [r["epoch"] for r in history]
        ax_acc.plot(epochs, [r["val_accuracy"] for r in history], marker=".", label=str(sub))
        ax_loss.plot(epochs, [r["train_loss"] for r in history], marker=".", label=str(sub))
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title=f"{model}: validation")
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log",
                title=f"{model}: training loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize="small", ncol=max(1, math.ceil(len(histories) / 8)))
    _save(fig, path)
    plt.close(fig)


def plot_accuracy_by_combiner(path, accuracies, local_accuracies=None):
    """Bar chart of the global test accuracy of every combiner (and each local CNN)."""
    plt = _pyplot()
    names = list(accuracies)
    values = [100 * accuracies[n] for n in names]
    if local_accuracies:
        names += [f"local {s}" for s in sorted(local_accuracies)]
        values += [100 * local_accuracies[s] for s in sorted(local_accuracies)]
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(names) + 2), 4))
    colors = ["tab:blue"] * len(accuracies) + ["tab:gray"] * (len(names) - len(accuracies))
    bars = ax.bar(names, values, color=colors)
    ax.bar_label(bars, fmt="%.2f", fontsize="small")
    low = min(values)
    ax.set(ylabel="test accuracy (%)", ylim=(max(0, low - 5), 100.5),
           title="test accuracy by combiner")
    ax.tick_params(axis="x", rotation=45)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_confusion(path, matrix, classes, title):
    """Confusion matrix (rows: true class, columns: predicted) as an image with counts."""
    plt = _pyplot()
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * k, 0.8 + 0.5 * k))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=90 if k > 10 else 0)
    ax.set_yticks(range(k), classes)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize="x-small",
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    _save(fig, path)
    plt.close(fig)
