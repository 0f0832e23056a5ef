"""Global decisions from local ones: majority vote, averaged probabilities, the coarse DNN.

All functions take the gathered local decisions as an array ``probs`` of shape (S, N, K):
S subdomains, N samples, K classes (softmax probabilities of each local CNN).
"""

import numpy as np
import torch
import torch.nn.functional as F

from ddmpi.models.cnn import CoarseDNN

EPS = 1e-6


def majority_vote(probs):
    """Class chosen by most local CNNs; ties go to the tied class with the largest summed prob."""
    s, n, k = probs.shape
    votes = np.zeros((n, k))
    np.add.at(votes, (np.arange(n)[None, :].repeat(s, 0), probs.argmax(2)), 1.0)
    tie_break = probs.sum(0) / (s + 1.0)  # < 1: only decides between equal vote counts
    return (votes + tie_break).argmax(1)


def average_probabilities(probs):
    """Mean of the local probabilities, (N, K)."""
    return probs.mean(0)


def coarse_features(probs, inputs="log"):
    """Input of the coarse DNN: the local decisions concatenated per sample, (N, S*K)."""
    x = np.log(probs + EPS) if inputs == "log" else probs
    return np.ascontiguousarray(x.transpose(1, 0, 2).reshape(probs.shape[1], -1), np.float32)


def train_coarse(train_probs, train_labels, cfg, *, seed, val_probs=None, val_labels=None,
                 device="cpu"):
    """Train the coarse DNN on local decisions; return ``(model, history)``.

    ``cfg`` is a :class:`~ddmpi.config.CoarseConfig`. ``val_probs``/``val_labels``, when given,
    are only evaluated each epoch for the history (never trained on here).
    """
    torch.manual_seed(seed)
    s, _, k = train_probs.shape
    model = CoarseDNN(s * k, k, hidden=tuple(cfg.hidden), dropout=cfg.dropout).to(device)
    x = torch.from_numpy(coarse_features(train_probs, cfg.inputs)).to(device)
    y = torch.as_tensor(train_labels, dtype=torch.int64, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(y), generator=gen).split(cfg.batch_size):
            idx = idx.to(device)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        scheduler.step()
        record = {"epoch": epoch + 1, "train_loss": total / len(y)}
        if val_probs is not None:
            record["val_accuracy"] = accuracy(coarse_predict(model, val_probs, cfg.inputs,
                                                             device).argmax(1), val_labels)
        history.append(record)
    return model, history


@torch.no_grad()
def coarse_predict(model, probs, inputs="log", device="cpu"):
    """Global class probabilities (N, K) of the coarse DNN."""
    model.eval()
    x = torch.from_numpy(coarse_features(probs, inputs)).to(device)
    return torch.softmax(model(x), dim=1).cpu().numpy()


def accuracy(predictions, labels):
    return float((np.asarray(predictions) == np.asarray(labels)).mean())


def confusion_matrix(predictions, labels, num_classes):
    """(K, K) counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def per_class_accuracy(matrix):
    """Recall of every class from a confusion matrix (NaN for a class with no samples)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(matrix) / matrix.sum(1)


def class_results(predictions, labels, classes):
    """Test accuracy, per-class accuracy and confusion matrix of predicted class indices."""
    matrix = confusion_matrix(predictions, labels, len(classes))
    return {"test_accuracy": accuracy(predictions, labels),
            "per_class_accuracy": dict(zip(classes, per_class_accuracy(matrix))),
            "confusion_matrix": matrix}
