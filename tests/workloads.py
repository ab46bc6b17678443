"""Tiny workloads for the tests: every input and output form of the contract, and faults.

Imported by trial processes as ``workloads:<function>`` (pytest puts ``tests/`` on the
import path), so every build function here is a module-level function.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import advisor

FEATURES, CLASSES = 8, 3


def blobs(n: int = 120, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian clusters: learnable in a few steps, so accuracy means something."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    centers = torch.randn(CLASSES, FEATURES, generator=g) * 3
    return centers[y] + torch.randn(n, FEATURES, generator=g), y


class MLP(nn.Module):
    def __init__(self, features: int = FEATURES, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(features, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def data() -> tuple[TensorDataset, TensorDataset]:
    x, y = blobs()
    return TensorDataset(x[:96], y[:96]), TensorDataset(x[96:], y[96:])


def _workload(model: nn.Module, train, val, **kw) -> advisor.Workload:
    return advisor.Workload(model=model, train=train, val=val, batch_size=16, **kw)


def tensor_mlp() -> advisor.Workload:
    torch.manual_seed(0)
    return _workload(MLP(), *data(), name="tensor-mlp")


def trained_mlp() -> advisor.Workload:
    """A trained model: its checkpoint is the one ``ADVISOR_TEST_CHECKPOINT`` seeds."""
    torch.manual_seed(int(os.environ.get("ADVISOR_TEST_CHECKPOINT", "0")))
    return _workload(MLP(), *data(), name="trained-mlp", trained=True)


def bare_mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP()


# -- tuple inputs: model(*x) -------------------------------------------------------------------

class PairDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return (self.x[i, :4], self.x[i, 4:]), self.y[i]


class PairMLP(MLP):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.cat([a, b], dim=-1))


def tuple_mlp() -> advisor.Workload:
    torch.manual_seed(0)
    x, y = blobs()
    return _workload(PairMLP(), PairDataset(x[:96], y[:96]), PairDataset(x[96:], y[96:]))


# -- dict inputs: model(**x), Hugging Face style outputs -----------------------------------------

@dataclass
class Output:
    logits: torch.Tensor


class DictDataset(PairDataset):
    def __getitem__(self, i: int):
        return {"features": self.x[i], "scale": torch.tensor([1.0])}, self.y[i]


class DictMLP(MLP):
    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> Output:
        return Output(logits=super().forward(features * scale))


class DictOutputMLP(MLP):
    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> dict:
        return {"logits": super().forward(features * scale), "hidden": features}


def dict_mlp() -> advisor.Workload:
    torch.manual_seed(0)
    x, y = blobs()
    return _workload(DictMLP(), DictDataset(x[:96], y[:96]), DictDataset(x[96:], y[96:]))


def dict_output_mlp() -> advisor.Workload:
    torch.manual_seed(0)
    x, y = blobs()
    return _workload(DictOutputMLP(), DictDataset(x[:96], y[:96]), DictDataset(x[96:], y[96:]))


# -- what pickling cannot carry: trial processes build again ---------------------------------------

def lambda_loss() -> advisor.Workload:
    torch.manual_seed(0)
    return _workload(MLP(), *data(), loss=lambda out, y: nn.functional.cross_entropy(out, y))


# -- faults, triggered by the micro-batch size (batch 16 / accumulation) ---------------------------

class FaultyMLP(MLP):
    """Trains normally at micro-batch 16; raises at 8, aborts at 4, hangs at 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            n = x.shape[0]
            if n == 8:
                raise RuntimeError("injected fault at micro-batch 8")
            if n == 4:
                os.abort()
            if n == 2:
                time.sleep(3600)
        return super().forward(x)


class UnstableMLP(MLP):
    """Trains normally at micro-batch 16; its loss is NaN at 8; it allocates 4 GiB at 4."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training and x.shape[0] == 8:
            return out * float("nan")
        if self.training and x.shape[0] == 4:
            self.hog = torch.ones(1024 ** 3)  # 4 GiB: past any --trial-memory-mb a test sets
        return out


class HangWhenFlagged(MLP):
    """Hangs at micro-batch 8 while a file ``hang.flag`` exists in the working directory."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        while self.training and x.shape[0] == 8 and os.path.exists("hang.flag"):
            time.sleep(0.1)
        return super().forward(x)


def hang_when_flagged() -> advisor.Workload:
    torch.manual_seed(0)
    return _workload(HangWhenFlagged(), *data(), name="hang-when-flagged")


def unstable() -> advisor.Workload:
    torch.manual_seed(0)
    return _workload(UnstableMLP(), *data(), name="unstable")


def faulty() -> advisor.Workload:
    torch.manual_seed(0)
    return _workload(FaultyMLP(), *data(), name="faulty")


# -- bad input ------------------------------------------------------------------------------------

def raises() -> advisor.Workload:
    raise ValueError("cannot find the weights")


def returns_list() -> list:
    return [1, 2]


def wrong_shapes() -> advisor.Workload:
    return _workload(MLP(features=5), *data())


def string_metric() -> advisor.Workload:
    return _workload(MLP(), *data(), metric=_say_good)


def _say_good(outputs: torch.Tensor, targets: torch.Tensor) -> str:
    return "good"


# -- compression: a tiny CNN, and models the compression libraries cannot take ---------------------

class TinyCNN(nn.Module):
    """Two convolutions and a linear head on 8x8 images: what int8-static and pruning act on."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(width * 4, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def images(n: int = 96, seed: int = 0) -> TensorDataset:
    x, y = blobs(n, seed)
    return TensorDataset(x.repeat(1, 8).reshape(n, 1, 8, 8), y)


def tiny_cnn() -> advisor.Workload:
    torch.manual_seed(0)
    return _workload(TinyCNN(), images(96), images(32, seed=1), name="tiny-cnn")


class HardCodedReshape(nn.Module):
    """Its forward assumes 16 channels: Torch-Pruning removes channels, the reshape breaks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.head = nn.Linear(16 * 64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).reshape(x.shape[0], 16 * 64))


def hard_coded_reshape() -> advisor.Workload:
    torch.manual_seed(0)
    return _workload(HardCodedReshape(), images(96), images(32, seed=1), name="reshape")


class DataDependentMLP(MLP):
    """Branches on its input's values, which torch.export (and so PT2E) cannot capture."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 2
        return super().forward(x)


class WideMLP(MLP):
    """Linear layers wide enough for int4 groups (128) and 2:4 sparse kernels (64)."""

    FEATURES = 128

    def __init__(self) -> None:
        super().__init__(features=self.FEATURES, width=256, depth=3)


def wide_mlp() -> advisor.Workload:
    torch.manual_seed(0)
    x, y = blobs(160)
    x = x.repeat(1, WideMLP.FEATURES // FEATURES)
    return advisor.Workload(model=WideMLP(), train=TensorDataset(x[:128], y[:128]),
                            val=TensorDataset(x[128:], y[128:]), batch_size=32, name="wide-mlp")
