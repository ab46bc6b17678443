"""The objectives table: the one source of truth for what a trial is scored on.

The study's directions, metric names, the printed tables and (later) dashboards and export
are all driven by ``OBJECTIVES``; add an objective here and everything follows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Objective:
    name: str
    direction: Literal["minimize", "maximize"]
    unit: str
    label: str
    description: str


OBJECTIVES: tuple[Objective, ...] = (
    Objective(
        "accuracy", "maximize", "", "accuracy",
        "the workload's metric on the full validation set, measured on the deployable model",
    ),
    Objective(
        "latency_ms", "minimize", "ms", "latency",
        "median time per batch of the deployable model at the serving batch size",
    ),
    Objective(
        "memory_mib", "minimize", "MiB", "memory",
        "training footprint: model and optimizer state plus the measured transient peak "
        "of a training step",
    ),
    Objective(
        "size_mib", "minimize", "MiB", "size",
        "bytes of the serialized deployable model",
    ),
)

NAMES: tuple[str, ...] = tuple(o.name for o in OBJECTIVES)
DIRECTIONS: list[str] = [o.direction for o in OBJECTIVES]


def values(metrics: Mapping[str, float]) -> list[float]:
    """The objective values of a measured trial, in the study's order."""
    return [float(metrics[name]) for name in NAMES]


def ratio(value: float, baseline: float) -> float | None:
    """value / baseline, or None where the baseline is zero."""
    return value / baseline if baseline else None
