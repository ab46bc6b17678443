"""The default workload: a small residual CNN on scikit-learn's bundled digits images.

Real data with no download (1,797 8x8 grey images of handwritten digits, 10 classes), split
80/20 with a fixed seed. It is what ``advisor run`` measures without ``--model``, and the
example to copy: ``advisor run --model advisor.examples.digits:build``.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import advisor


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class DigitsCNN(nn.Module):
    """Stem, ``depth`` residual blocks (the stages checkpointing picks), pooled linear head."""

    def __init__(self, width: int = 32, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(depth)))
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(width * 16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, val): 80/20 split of the digits, pixels scaled to [0, 1]."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    train, val = order[:cut], order[cut:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


def build(width: int = 32, depth: int = 3) -> advisor.Workload:
    torch.manual_seed(0)
    train, val = datasets()
    return advisor.Workload(model=DigitsCNN(width, depth), train=train, val=val,
                            batch_size=64, name="digits-cnn")
