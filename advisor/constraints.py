"""Constraints: the limits a recommended configuration must meet, one row per objective.

``LIMITS`` ties each limit to its objective, its command-line flag and its unit; the CLI's
flags, the study's stored constraints, Optuna's constraint values, the recommendation's
misses and the exported file all read it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from advisor.errors import AdvisorError


@dataclass(frozen=True)
class Limit:
    key: str  # the constraint's name in Optuna and in the exported file
    flag: str
    objective: str
    unit: str


LIMITS = (
    Limit("max_accuracy_drop", "--max-accuracy-drop", "accuracy", "points"),
    Limit("max_latency_ms", "--max-latency-ms", "latency_ms", "ms"),
    Limit("max_memory_mb", "--max-memory-mb", "memory_mib", "MiB"),
    Limit("max_size_mb", "--max-size-mb", "size_mib", "MiB"),
)


@dataclass(frozen=True)
class Constraints:
    """Limits a recommended configuration must meet (None: no limit)."""

    max_accuracy_drop: float | None = 1.0  # points below the baseline's metric
    max_latency_ms: float | None = None
    max_memory_mb: float | None = None  # MiB, like every memory figure advisor prints
    max_size_mb: float | None = None  # MiB

    def __post_init__(self) -> None:
        for limit in LIMITS:
            value = getattr(self, limit.key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AdvisorError(f"{limit.flag} must be a number; got {value!r}")
            low_ok = value >= 0 if limit.key == "max_accuracy_drop" else value > 0
            if not low_ok:
                bound = ">= 0" if limit.key == "max_accuracy_drop" else "> 0"
                raise AdvisorError(f"{limit.flag} must be {bound}; got {value!r}")

    def values(self, metrics: dict, baseline: dict) -> dict[str, float]:
        """Optuna constraint values: <= 0 where the limit is met, else by how much it is not."""
        out = {}
        for limit in LIMITS:
            bound = getattr(self, limit.key)
            if bound is None:
                continue
            if limit.key == "max_accuracy_drop":
                # Rounded: 0.9 - 0.89 is 1.0000000000000009 points, and must meet a 1-point limit.
                drop = round(100.0 * (baseline["accuracy"] - metrics["accuracy"]), 9)
                out[limit.key] = drop - bound
            else:
                out[limit.key] = metrics[limit.objective] - bound
        return out

    def misses(self, metrics: dict, baseline: dict) -> list[Miss]:
        """The limits ``metrics`` miss against ``baseline``, each with by how much."""
        out = []
        for key, over in self.values(metrics, baseline).items():
            if over > 0:
                limit = next(limit for limit in LIMITS if limit.key == key)
                bound = getattr(self, key)
                out.append(Miss(limit, bound, bound + over, over))
        return out

    def describe(self) -> str:
        parts = []
        for limit in LIMITS:
            bound = getattr(self, limit.key)
            if bound is not None:
                name = "accuracy drop" if limit.key == "max_accuracy_drop" else limit.objective.split("_")[0]
                unit = "point" if limit.unit == "points" and bound == 1 else limit.unit
                parts.append(f"{name} <= {bound:g} {unit}")
        return ", ".join(parts) or "none"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Constraints:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class Miss:
    limit: Limit
    bound: float
    value: float  # the measured value in the limit's unit (accuracy: the drop in points)
    over: float  # by how much the limit is missed

    def describe(self) -> str:
        if self.limit.key == "max_accuracy_drop":
            return (f"accuracy drops {self.value:.2f} points, {self.over:.2f} more than "
                    f"{self.limit.flag} {self.bound:g} allows")
        return (f"{self.limit.objective.split('_')[0]} {self.value:.3g} {self.limit.unit} exceeds "
                f"{self.limit.flag} {self.bound:g} by {self.over:.3g} {self.limit.unit} "
                f"({100 * self.over / self.bound:.0f}%)")
