"""Gradient accumulation: micro-batches of batch_size / steps, one optimizer step per batch.

The effective batch stays the workload's ``batch_size`` whatever the choice, so accuracy
comparisons across choices are fair; each micro-batch's loss is divided by ``steps`` so the
accumulated gradient equals the full batch's mean gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from advisor.techniques import Exclusion

KNOB = "accumulation"
CANDIDATES = (1, 2, 4, 8)


@dataclass(frozen=True)
class AccumulationConfig:
    steps: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"{KNOB} must be a positive integer; got {self.steps!r}")

    def micro_batch(self, batch_size: int) -> int:
        if batch_size % self.steps:
            raise ValueError(
                f"{KNOB} {self.steps} does not divide the batch size {batch_size}; "
                f"choose one of {[s for s in CANDIDATES if batch_size % s == 0]}")
        return batch_size // self.steps


def options(batch_size: int) -> tuple[list[int], list[Exclusion]]:
    offered = [s for s in CANDIDATES if batch_size % s == 0]
    excluded = [Exclusion(KNOB, s, f"does not divide the batch size {batch_size}")
                for s in CANDIDATES if batch_size % s]
    return offered, excluded
