"""Knowledge distillation: the study's baseline teaches the trial's (pruned, quantized) model.

Loss: ``alpha * KL(softmax(teacher / T) || softmax(student / T)) * T^2 + (1 - alpha) * task``.
The ``T^2`` keeps the soft term's gradients on the task loss's scale as ``T`` grows (Hinton
et al., 2015). The teacher runs once per micro-batch without gradients, inside the timed
training step, so its cost is charged to the trial's throughput and memory.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

KNOBS = ("distill_alpha", "distill_temperature")
MAX_TEMPERATURE = 8.0
ALPHA_RANGE = (0.0, 1.0, 0.1)  # (low, high, step) the space samples
TEMPERATURE_RANGE = (1.0, MAX_TEMPERATURE, 0.5)


@dataclass(frozen=True)
class DistillationConfig:
    alpha: float = 0.0  # weight of the distillation term; 0 turns distillation off
    temperature: float = 4.0

    def __post_init__(self) -> None:
        for name, value, low, high in (("distill_alpha", self.alpha, 0.0, 1.0),
                                       ("distill_temperature", self.temperature, 1.0, MAX_TEMPERATURE)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or not low <= value <= high:
                raise ValueError(f"{name} must be a number from {low:g} to {high:g}; got {value!r}")

    @property
    def active(self) -> bool:
        return self.alpha > 0

    def label(self, sep: str = "/") -> str:
        return f"T{self.temperature:g}{sep}a{self.alpha:g}" if self.active else "off"


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(teacher/T) || softmax(student/T)) * T^2`` over the last dimension,
    averaged over every other position (samples, and tokens for sequence outputs)."""
    log_p_student = torch.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = torch.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return kl.mean() * temperature ** 2


def combine(config: DistillationConfig, task_loss: torch.Tensor, student: torch.Tensor,
            teacher: torch.Tensor) -> torch.Tensor:
    """The trial's training loss with distillation mixed in (the task loss when off)."""
    if not config.active:
        return task_loss
    return config.alpha * soft_loss(student, teacher, config.temperature) + (1 - config.alpha) * task_loss


def teacher(model: nn.Module, config: DistillationConfig) -> nn.Module | None:
    """A frozen copy of ``model`` (the baseline, before any compression), or None when off."""
    if not config.active:
        return None
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen
