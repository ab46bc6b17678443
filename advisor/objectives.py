"""The objectives table: the one source of truth for what a trial is scored on.

The study's directions, metric names, the printed tables, the dashboards and the export are
all driven by ``OBJECTIVES``; add an objective here and everything follows. What "better"
means between two measured trials (dominance, the Pareto front, ratios to the baseline,
hypervolume) is defined here too, once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

T = TypeVar("T")


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
        "the workload's metric on the validation set's selection part (even positions), measured "
        "on the deployable model",
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


def told(result: Mapping, baseline: Mapping[str, float]) -> list[float]:
    """The values a trial gives Optuna: its measured objectives, with a batch latency taken on
    the baseline's clock, the paired ratio times the baseline's latency. The sampler then
    learns from what the front reads (a busy machine while one trial ran moves the trial's own
    median, not its ratio); the trial's own median stays in its result."""
    out = values(result["metrics"])
    pair = paired(result, "latency_ms")
    if pair is not None and baseline.get("latency_ms"):
        out[NAMES.index("latency_ms")] = float(baseline["latency_ms"] * pair["ratio"])
    return out


def ratio(value: float, baseline: float) -> float | None:
    """value / baseline, or None where the baseline is zero."""
    return value / baseline if baseline else None


def oriented(metrics: Mapping[str, float]) -> tuple[float, ...]:
    """Every objective as lower-is-better (maximized ones negated), in the table's order."""
    return tuple(-metrics[o.name] if o.direction == "maximize" else metrics[o.name] for o in OBJECTIVES)


def dominates(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Metrics ``a`` are at least as good as ``b`` in every objective and better in one."""
    ka, kb = oriented(a), oriented(b)
    return all(x <= y for x, y in zip(ka, kb, strict=True)) and ka != kb


def pareto(items: list[T], baseline: Mapping[str, float] | None = None) -> list[T]:
    """The items (anything with ``.metrics``, and maybe a ``.result``) no other item dominates;
    with the ``baseline``'s metrics, compared in cost ratios, so a trial's latency is its
    paired ratio where it has one (:func:`costs`)."""
    keys = [costs(c, baseline) for c in items]
    return [c for c, k in zip(items, keys, strict=True)
            if not any(all(x <= y for x, y in zip(o, k, strict=True)) and o != k for o in keys)]


def costs(item, baseline: Mapping[str, float] | None) -> tuple[float, ...]:
    """An item's objectives, lower is better: its cost ratios to ``baseline`` (the paired
    latency ratio where the item's result has one), or without a baseline its metrics oriented."""
    if baseline is None:
        return oriented(item.metrics)
    return tuple(cost_ratios(item.metrics, baseline, getattr(item, "result", None)))


CONFIDENCE = 0.95  # of the paired ratios' bootstrap intervals (``trial/measure.time_paired``)


def paired(result: Mapping | None, name: str) -> Mapping | None:
    """The trial's paired ratio to the baseline for objective ``name`` (``ratio``, ``low``,
    ``high``: timed interleaved with the baseline's model in the trial's own process): its
    batch latency's or, in a serving study, its simulated p99's (``trial/served.paired_p99``).
    None where it has none: the objective is not a latency, or the trial was stored before
    pairing."""
    if not result or name != "latency_ms":
        return None
    return result.get("paired", {}).get("serving_p99" if "serving" in result else "latency")


def cost_ratios(metrics: Mapping[str, float], baseline: Mapping[str, float],
                result: Mapping | None = None) -> list[float]:
    """Each objective as a ratio to the baseline where lower is better: value / baseline
    (the paired ratio, where ``result`` has one), and for a maximized objective
    baseline / value (0.5x the accuracy costs 2.0)."""
    out = []
    for o in OBJECTIVES:
        value, base = metrics[o.name], baseline[o.name]
        pair = paired(result, o.name)
        if pair is not None:
            out.append(pair["ratio"])
        elif o.direction == "maximize":
            out.append(base / value if value > 0 else math.inf)
        else:
            out.append(value / base if base > 0 else value)
    return out


# The box the search's hypervolume is taken in, as ratios to the baseline: 80% of its
# accuracy and twice its latency, memory and size (``advisor bench search``, the warm start).
HYPERVOLUME_BOX = {"accuracy": 0.8, "latency_ms": 2.0, "memory_mib": 2.0, "size_mib": 2.0}


def cost_box() -> dict[str, float]:
    """``HYPERVOLUME_BOX`` as cost ratios (:func:`cost_ratios`: 0.8x the accuracy costs 1.25)."""
    return {o.name: 1 / HYPERVOLUME_BOX[o.name] if o.direction == "maximize" else HYPERVOLUME_BOX[o.name]
            for o in OBJECTIVES}


def hypervolume(points: list, reference) -> float:
    """Hypervolume of lower-is-better ``points`` inside the box up to ``reference``; points
    outside it add nothing (Optuna's WFG computes it)."""
    from optuna._hypervolume import compute_hypervolume

    ref = np.asarray(reference, dtype=float)
    inside = [p for p in points if np.all(np.asarray(p) < ref)]
    return float(compute_hypervolume(np.array(inside, dtype=float), ref)) if inside else 0.0
