"""The fine-tune schedule of every trial: AdamW at a searched peak learning rate, a linear
warm-up over the first 10% of steps, then cosine decay to zero (``torch.optim.lr_scheduler``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KNOB = "lr"
DEFAULT_LR = 1e-3


@dataclass(frozen=True)
class ScheduleConfig:
    lr: float = DEFAULT_LR  # the peak learning rate

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{KNOB} must be a positive float; got {self.lr!r}")


def options(lr: float) -> tuple[tuple[float, float], list]:
    """The searched range around the baseline's ``lr``: 0.1x to 3x, log-uniform."""
    return (lr / 10, lr * 3), []


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 10% of steps, then cosine decay to zero."""
    warm = max(1, round(0.1 * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
