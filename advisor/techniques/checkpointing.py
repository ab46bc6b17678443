"""Gradient checkpointing: recompute every k-th block's activations in the backward pass.

Blocks are found generically: the children of the model's largest ``nn.Sequential`` or
``nn.ModuleList`` (by parameter count), else its top-level children. A checkpointed block
runs under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` only while
training with gradients on, so inference of the deployable model is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from advisor.techniques import Exclusion

KNOB = "checkpoint_every"
CANDIDATES = (1, 2, 4, 8)


@dataclass(frozen=True)
class CheckpointConfig:
    """``every=0``: off; ``every=k``: blocks 0, k, 2k, ... are checkpointed (k=1: all)."""

    every: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"{KNOB} must be 0 (off) or a positive integer; got {self.every!r}")

    def label(self) -> str:
        return "off" if self.every == 0 else f"1/{self.every}"


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The model's repeated stages: ``(path, blocks)``; ``("", [])`` when it has none."""
    containers = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) >= 2
    ]
    if containers:
        name, container = max(containers, key=lambda nm: (_params(nm[1]), len(nm[1])))
        return name or "(model)", list(container)
    children = list(model.named_children())
    if len(children) >= 2:
        return "(top-level children)", [m for _, m in children]
    return "", []


def apply(model: nn.Module, config: CheckpointConfig) -> int:
    """Checkpoint every ``config.every``-th block in place; returns how many were wrapped.

    Apply it last, after any copy of the model: it replaces the blocks' bound ``forward``.
    """
    if config.every == 0:
        return 0
    _, blocks = find_blocks(model)
    wrapped = 0
    for i, block in enumerate(blocks):
        if i % config.every == 0:
            _wrap(block)
            wrapped += 1
    return wrapped


def _wrap(block: nn.Module) -> None:
    forward = block.forward

    def checkpointed_forward(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    checkpointed_forward.advisor_checkpoint = True
    block.forward = checkpointed_forward


def remove(model: nn.Module) -> None:
    """Undo :func:`apply` (on a deep copy, whose wrapped forwards still call the original)."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if getattr(forward, "advisor_checkpoint", False):
            del module.forward


def options(model: nn.Module) -> tuple[list[int], list[Exclusion]]:
    path, blocks = find_blocks(model)
    if not blocks:
        return [0], [Exclusion(KNOB, "any", "the model has no repeated blocks to checkpoint")]
    offered = [0] + [k for k in CANDIDATES if k <= len(blocks)]
    excluded = [Exclusion(KNOB, k, f"{path} has only {len(blocks)} blocks")
                for k in CANDIDATES if k > len(blocks)]
    return offered, excluded
