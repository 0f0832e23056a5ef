"""The coarse DNN: averaged local log-probabilities plus a learned, zero-initialised correction.

``logits = sum_s w_s log p_s + correction(x)`` with ``w_s = 1/S`` at the start and the last layer
of the correction MLP set to zero, so an untrained model *is* the averaged-log-probability
combiner (:func:`~ddmpi.coarse.combiners.average_log_probabilities`, the normalised geometric
mean of the local probabilities; its argmax can differ from averaged probabilities, which
punish a class less when one subdomain gives it almost no probability). ``skip=False`` gives
the plain dense network of the CNN-DNN papers. Training holds out a seeded, stratified part of
the decisions it is given for early stopping and for choosing between the coarse model,
averaged probabilities and majority vote, drawn from the decisions the local CNNs did not train
on (val, out-of-fold) whenever at least two are; it never sees test data.
"""

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from torch import nn

from ddmpi.coarse.combiners import (
    EPS,
    average_log_probabilities,
    average_probabilities,
    vote_shares,
)

# the combiners evaluated; averaged log-probabilities, the coarse model's untrained start, is
# reported (what training the coarse model adds) but never chosen (_choose)
COMBINERS = ("cnn_dnn", "average_log_probabilities", "average_probabilities", "majority_vote")


class CoarseNet(nn.Module):
    """Coarse model on (N, S*K) features; returns logits (N, K).

    ``config`` holds every argument, so ``build_coarse(model.config)`` rebuilds it.
    """

    def __init__(self, num_subdomains, num_classes, hidden=(64,), dropout=0.0, inputs="log",
                 skip=True):
        super().__init__()
        if inputs not in ("log", "prob"):
            raise ValueError(f"inputs must be 'log' or 'prob', got {inputs!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        s, k = int(num_subdomains), int(num_classes)
        if s < 1 or k < 1:
            raise ValueError(f"need num_subdomains, num_classes >= 1, got {s}, {k}")
        hidden = [int(h) for h in hidden]
        self.config = {"num_subdomains": s, "num_classes": k, "hidden": hidden,
                       "dropout": float(dropout), "inputs": inputs, "skip": bool(skip)}
        layers, width = [], s * k
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        last = nn.Linear(width, k)
        if skip:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.skip_weight = nn.Parameter(torch.full((s,), 1.0 / s))
        else:
            self.register_parameter("skip_weight", None)
        self.mlp = nn.Sequential(*layers, last)

    def forward(self, x):
        out = self.mlp(x)
        if self.skip_weight is None:
            return out
        s, k = self.config["num_subdomains"], self.config["num_classes"]
        log_p = x if self.config["inputs"] == "log" else torch.log(x + EPS)
        return out + torch.einsum("nsk,s->nk", log_p.view(-1, s, k), self.skip_weight)


def build_coarse(config):
    """A fresh :class:`CoarseNet` from its ``config`` dict (load a state dict into it)."""
    return CoarseNet(**config)


def coarse_model(num_subdomains, num_classes, cfg):
    """The untrained :class:`CoarseNet` of a :class:`~ddmpi.config.CoarseConfig` ``cfg``."""
    return CoarseNet(num_subdomains, num_classes, cfg.hidden, cfg.dropout, cfg.inputs, cfg.skip)


def features(probs, inputs="log"):
    """Local decisions (S, N, K) concatenated per sample: float32 tensor (N, S*K)."""
    probs = np.asarray(probs, dtype=np.float32)
    x = np.log(probs + np.float32(EPS)) if inputs == "log" else probs
    return torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2).reshape(probs.shape[1], -1)))


@dataclass
class CoarseFit:
    """A trained coarse model with its curves, holdout evidence and the chosen combiner."""
    model: CoarseNet
    history: list = field(default_factory=list)
    best_epoch: int = 0
    holdout: dict = field(default_factory=dict)
    chosen: str = "cnn_dnn"


def stratified_holdout(labels, fraction, seed):
    """Seeded stratified holdout indices: never empty nor all; keeps a training sample per class."""
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        raise ValueError(f"need at least 2 samples to hold some out, got {n}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    cap = np.maximum(counts - 1, 0)
    if cap.sum() == 0:                   # every class a singleton: holding one out is unavoidable
        cap = counts.copy()
    target = min(max(1, int(round(fraction * n))), int(cap.sum()), n - 1)
    quota = fraction * counts
    take = np.minimum(np.floor(quota).astype(int), cap)
    tie = rng.permutation(len(classes))  # random order among equal remainders
    while take.sum() < target:
        open_ = np.flatnonzero(take < cap)
        best = open_[np.lexsort((tie[open_], -(quota[open_] - take[open_])))[0]]
        take[best] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def holdout_indices(labels, honest, fraction, seed):
    """Stratified holdout indices, drawn from the ``honest`` decisions (boolean mask: samples
    the local CNNs did not train on) when at least two are, else from all."""
    labels = np.asarray(labels)
    pool = np.arange(len(labels))
    if honest is not None and np.count_nonzero(honest) >= 2:
        pool = np.flatnonzero(honest)
    return pool[stratified_holdout(labels[pool], fraction, seed)]


def _scores(p, labels):
    """Accuracy, mean negative log-likelihood and per-sample correctness of probabilities."""
    labels = np.asarray(labels)
    nll = -np.log(np.maximum(p[np.arange(len(labels)), labels], EPS)).mean()
    right = p.argmax(1) == labels
    return {"accuracy": float(right.mean()), "nll": float(nll), "right": right}


def _choose(scores, fallback, alpha=0.05):
    """The combiner to use and the evidence: the coarse model, unless the better cheap
    combiner is right significantly more often on the holdout (one-sided exact sign test on
    the samples where exactly one of the two is right, p < ``alpha``)."""
    if not fallback:
        return "cnn_dnn", None
    cheap = max(("average_probabilities", "majority_vote"),
                key=lambda c: (scores[c]["accuracy"], c == "average_probabilities"))
    mine, theirs = scores["cnn_dnn"]["right"], scores[cheap]["right"]
    b, c = int(np.sum(theirs & ~mine)), int(np.sum(~theirs & mine))
    p = binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
    test = {"against": cheap, "cheap_only_right": b, "coarse_only_right": c,
            "p_value": float(p)}
    return (cheap if p < alpha else "cnn_dnn"), test


def _nll(model, x, y):
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def _epoch(model, optimizer, x, y, batch_size, gen):
    """One pass over the training part in shuffled batches; mean training loss."""
    model.train()
    total = 0.0
    for idx in torch.randperm(len(y), generator=gen).split(batch_size):
        idx = idx.to(x.device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / len(y)


def _fit(model, x, y, hold, cfg, seed):
    """AdamW with early stopping on the holdout NLL; best state loaded; (history, best_epoch)."""
    train = torch.as_tensor(np.setdiff1d(np.arange(len(y)), hold), device=x.device)
    hold = torch.as_tensor(hold, device=x.device)
    decay = [p for n, p in model.named_parameters() if n != "skip_weight"]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if model.skip_weight is not None:    # decaying it would pull the skip path to uniform
        groups.append({"params": [model.skip_weight], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    xt, yt, xh, yh = x[train], y[train], x[hold], y[hold]

    def record(epoch, train_loss):
        model.eval()
        with torch.no_grad():
            logits = model(xh)
        return {"epoch": epoch, "train_loss": train_loss,
                "holdout_loss": F.cross_entropy(logits, yh).item(),
                "holdout_accuracy": (logits.argmax(1) == yh).double().mean().item()}

    history = [record(0, _nll(model, xt, yt))]
    best_epoch, best_state = 0, copy.deepcopy(model.state_dict())
    for epoch in range(1, cfg.epochs + 1):
        history.append(record(epoch, _epoch(model, optimizer, xt, yt, cfg.batch_size, gen)))
        if history[-1]["holdout_loss"] < history[best_epoch]["holdout_loss"]:
            best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return history, best_epoch


def train_coarse(probs, labels, cfg, *, seed, device="cpu", honest=None):
    """Train the coarse model on local decisions (S, N, K) and choose the combiner to use.

    ``cfg`` is a :class:`~ddmpi.config.CoarseConfig`; its holdout part, drawn from the
    ``honest`` decisions (mask, see :func:`holdout_indices`), drives early stopping and the
    choice (returned as evidence in ``CoarseFit.holdout``).
    """
    probs = np.asarray(probs, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    s, n, k = probs.shape
    if labels.shape != (n,):
        raise ValueError(f"labels of shape {labels.shape} do not match {n} decisions")
    hold = holdout_indices(labels, honest, cfg.holdout_fraction, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = coarse_model(s, k, cfg).to(device)
        x = features(probs, cfg.inputs).to(device)
        y = torch.from_numpy(labels).to(device)
        history, best_epoch = _fit(model, x, y, hold, cfg, seed)
    hp, hy = probs[:, hold], labels[hold]
    scores = {"cnn_dnn": _scores(predict_coarse(model, hp, device), hy),
              **{name: _scores(combine(name, model, hp), hy) for name in COMBINERS[1:]}}
    chosen, test = _choose(scores, cfg.fallback)
    holdout = {"indices": hold.tolist(), "fallback_test": test,
               "honest": bool(honest is not None and np.all(np.asarray(honest)[hold])),
               **{name: {k: v for k, v in sc.items() if k != "right"}
                  for name, sc in scores.items()}}
    return CoarseFit(model, history, best_epoch, holdout, chosen)


@torch.no_grad()
def predict_coarse(model, probs, device="cpu"):
    """Global class probabilities (N, K) of the coarse model, numpy."""
    model.eval()
    x = features(probs, model.config["inputs"]).to(device)
    return torch.softmax(model(x).double(), dim=1).cpu().numpy()


def combine(name, model, probs, device="cpu"):
    """Global class probabilities (N, K) of combiner ``name`` on local decisions (S, N, K)."""
    if name == "cnn_dnn":
        return predict_coarse(model, probs, device)
    if name == "average_log_probabilities":
        return average_log_probabilities(probs)
    if name == "average_probabilities":
        return average_probabilities(np.asarray(probs))
    if name == "majority_vote":
        return vote_shares(probs)
    raise ValueError(f"unknown combiner {name!r} (one of {', '.join(COMBINERS)})")
