"""Shared data and model code of the fastkd examples (scikit-learn's bundled 8x8 digits).

Everything here is plain PyTorch; the examples use fastkd only for the distillation losses.
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

# The examples run from a checkout (`python examples/distill_digits.py`): make `fastkd` importable
# from the repository root even when it is not installed, and `_common` from the examples folder.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

NUM_CLASSES = 10
SPLIT_SEED = 0          # the train/test split is fixed; seeds only change inits and batch order
TEST_SIZE = 0.3


def load_digits_split(test_size: float = TEST_SIZE, split_seed: int = SPLIT_SEED):
    """The 1,797 8x8 digits, a fixed stratified train/test split, pixels scaled to [0, 1].

    Returns ``(x_train [N, 64] float32, y_train [N] int64, x_test, y_test)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data, data.target, test_size=test_size, random_state=split_seed,
        stratify=data.target)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)


def labelled_subset(y: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``per_class`` training images of every class (fixed; 0 means all of them)."""
    if per_class <= 0:
        return torch.arange(len(y))
    g = torch.Generator().manual_seed(seed)
    parts = []
    for c in range(int(y.max()) + 1):
        idx = torch.nonzero(y == c).flatten()
        parts.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(parts)


class MLP(nn.Module):
    """``64 -> hidden[0] -> ... -> 10`` with ReLU. ``forward`` returns ``(logits, last_hidden)``:
    the last hidden layer (after its ReLU) is the hint / embedding used by feature and relation KD.
    """

    def __init__(self, hidden=(512, 512), in_dim: int = 64, num_classes: int = NUM_CLASSES,
                 dropout: float = 0.0):
        super().__init__()
        layers, d = [], in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            d = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, num_classes)
        self.feature_dim = d

    def forward(self, x):
        h = self.body(x.flatten(1))
        return self.head(h), h


class SmallCNN(nn.Module):
    """A small convolutional net on the 8x8 images; ``forward`` returns ``(logits, embedding)``."""

    def __init__(self, channels=(16, 32), num_classes: int = NUM_CLASSES, dropout: float = 0.0):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # [c2, 4, 4]
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 16, 128), nn.ReLU())
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(128, num_classes)
        self.feature_dim = 128

    def forward(self, x):
        h = self.fc(self.features(x.view(-1, 1, 8, 8)))
        return self.head(self.drop(h)), h


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Shuffled index batches of ``range(n)`` (the order comes from ``generator`` only)."""
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    logits = model(x)[0]
    model.train(was_training)
    return logits


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, x).argmax(-1) == y).float().mean().item()


def class_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cls: int) -> float:
    mask = y == cls
    return (predict(model, x[mask]).argmax(-1) == cls).float().mean().item()


def train_supervised(model: nn.Module, x, y, *, epochs: int, seed: int, lr: float = 1e-3,
                     weight_decay: float = 1e-4, batch_size: int = 64, progress=None):
    """Plain cross-entropy training with AdamW (used for the teachers)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        for idx in batches(len(x), batch_size, gen):
            loss = F.cross_entropy(model(x[idx])[0], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if progress is not None:
            progress.update(1)
    model.eval()
    return model


def train_mlp_teacher(x, y, *, hidden=(512, 512), epochs: int = 60, seed: int = 0, **kw) -> MLP:
    torch.manual_seed(seed)
    return train_supervised(MLP(hidden, dropout=0.2), x, y, epochs=epochs, seed=seed, **kw)


def train_cnn_teacher(x, y, *, epochs: int = 40, seed: int = 0, **kw) -> SmallCNN:
    torch.manual_seed(seed)
    return train_supervised(SmallCNN(dropout=0.2), x, y, epochs=epochs, seed=seed, **kw)


def limit_threads(n: int = 2) -> None:
    """Small models on a shared CPU: more threads only add overhead."""
    torch.set_num_threads(max(1, min(n, os.cpu_count() or 1)))
