"""A subset of a source's samples (cross-fitting folds), addressed by position."""

import torch


class Subset:
    """Positions ``0..len(indices)-1`` of ``base``'s samples ``indices``."""

    def __init__(self, base, indices):
        self.base, self.indices = base, torch.as_tensor(indices, dtype=torch.int64)

    def __len__(self):
        return len(self.indices)

    @property
    def labels(self):
        return self.base.labels[self.indices.to(self.base.labels.device)]

    def epoch_order(self, seed, epoch):
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return torch.randperm(len(self), generator=gen)

    def batches(self, order, batch_size):
        """The base source's batches of ``indices[order]`` (sample ids are the base's)."""
        return self.base.batches(self.indices[order], batch_size)
