"""Per-layer choices: which layers a trial's compression spares, from a measured sensitivity.

A study measures each compressible layer once, with the baseline's weights
(``trial/sensitivity.py``): how much the loss on a few training batches rises when that
layer alone is quantized in each offered mode, or pruned at each ratio, and what that saves.
A trial's knobs then decide per layer here, so the choice is a function of the knobs and
that one table:

- ``quant_protect`` (a share of the quantizable parameters): the layers whose quantization
  raised the loss most per parameter stay in the baseline's precision, taken in that order
  while they fit in the share (a size budget: ``quant_protect`` 0.1 keeps at most a tenth
  of the quantized parameters in fp32). A layer whose quantization raised the loss by less
  than ``MATERIAL`` of the baseline's loss is never kept: its precision does not matter.
- ``prune_alloc`` ``sensitivity`` (structured pruning): the global ``prune_ratio`` becomes a
  ratio per unit (an attention module's heads, a channel group) that removes at least as
  many parameters as the uniform ratio does, with the least summed loss rise of the units
  pruned alone: an exact allocation over the measured ratios (a knapsack by dynamic
  programming, see ``allocate``), so a unit where pruning hurts keeps more of its channels.

The choice (:class:`LayerPlan`) is stored with the trial, exported with its configuration and
given back as it is to ``advisor apply``, which therefore needs no sensitivity table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from advisor.errors import AdvisorError
from advisor.techniques.pruning import PruningConfig
from advisor.techniques.quantization import PROTECT_KNOB, QuantizationConfig

BISECTIONS = 12  # halvings of the counted target: within 1/4096 of the units' total
MATERIAL = 0.01  # a loss rise below this share of the baseline's loss is no reason to protect
RESOLUTION = 400  # the allocation counts parameters in steps of 1/RESOLUTION of its target
ROUNDING = 1e-5  # a loss rise within this share of the baseline's loss is rounding, not harm


@dataclass(frozen=True)
class LayerPlan:
    """A trial's per-layer choice: the layers its quantization keeps in full precision, and
    the pruning ratio of each structured pruning unit (empty: the knobs' global choice)."""

    protected: tuple[str, ...] = ()
    prune_ratios: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict:
        return {"protected": list(self.protected), "prune_ratios": dict(self.prune_ratios)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> LayerPlan:
        values = values or {}
        protected = values.get("protected", [])
        if not isinstance(protected, list) or not all(isinstance(n, str) for n in protected):
            raise AdvisorError(f"layers.protected must be a list of layer names; got {protected!r}")
        ratios = values.get("prune_ratios", {}) or {}
        if not isinstance(ratios, dict) or not all(
                isinstance(n, str) and isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 1
                for n, r in ratios.items()):
            raise AdvisorError(f"layers.prune_ratios must map layer names to ratios from 0 to 1; got {ratios!r}")
        return cls(protected=tuple(protected), prune_ratios=tuple((n, float(r)) for n, r in ratios.items()))

    def check(self, model, where: str) -> None:
        """One line naming a layer the plan names and ``model`` lacks (another model's plan)."""
        names = {name for name, _ in model.named_modules()}
        missing = [name for name in (*self.protected, *dict(self.prune_ratios)) if name not in names]
        if missing:
            raise AdvisorError(f"{where}: layers names {missing[0]!r}, which the model does not "
                               f"have; the config was exported for another model")

    def __bool__(self) -> bool:
        return bool(self.protected or self.prune_ratios)


NO_PLAN = LayerPlan()


def plan(quantization: QuantizationConfig, prune: PruningConfig, sensitivity: Mapping[str, Any] | None,
         removes: Callable[[dict[str, float]], int] | None = None) -> LayerPlan:
    """The per-layer choice of a trial with these quantization and pruning configs, from the
    study's ``sensitivity`` table (``trial/sensitivity.py``); ``removes``: see ``allocate``."""
    guided = prune.alloc == "sensitivity" and prune.active
    if not quantization.protect and not guided:
        return NO_PLAN
    if not sensitivity or (guided and not (sensitivity.get("pruning") or {}).get("units")):
        knob = PROTECT_KNOB if quantization.protect else "prune_alloc"
        raise AdvisorError(f"{knob} needs the study's per-layer sensitivity, measured with its "
                           f"baseline; this study has none (it began before per-layer knobs): "
                           f"start a new study with --study NAME")
    protected = protected_layers(sensitivity, quantization.family, quantization.protect) \
        if quantization.protect else ()
    ratios = allocate(sensitivity["pruning"], prune.ratio, removes,
                      floor=ROUNDING * abs(sensitivity["loss"])) if guided else ()
    return LayerPlan(protected=protected, prune_ratios=ratios)


def protected_layers(sensitivity: Mapping[str, Any], family: str, share: float) -> tuple[str, ...]:
    """The layers to keep out of ``family``'s quantization within ``share`` of its layers'
    parameters: highest loss rise per parameter first, each taken if it still fits."""
    rows = [row for row in sensitivity["layers"] if family in row.get("quant", {})]
    budget = share * sum(row["params"] for row in rows)
    floor = MATERIAL * abs(sensitivity["loss"])
    ranked = sorted(rows, key=lambda row: row["quant"][family] / max(row["params"], 1), reverse=True)
    chosen, used = [], 0
    for row in ranked:
        if row["quant"][family] <= floor:
            continue
        if used + row["params"] <= budget:
            chosen.append(row["name"])
            used += row["params"]
    return tuple(sorted(chosen))


def allocate(table: Mapping[str, Any], ratio: float,
             removes: Callable[[dict[str, float]], int] | None = None,
             floor: float = 0.0) -> tuple[tuple[str, float], ...]:
    """A ratio per pruning unit, each one it was measured at (or 0), removing as many
    parameters as the uniform ``ratio`` with the least summed loss rise of the units.

    The units were measured alone: summed, their counts take the weights two coupled units
    share (a conv's input channels and the group feeding it) twice, so an allocation that
    spares one of them removes more than its count says. With ``removes`` (the parameters a
    plan really removes, from pruning a copy) the counted target is bisected until the plan
    removes at least what the uniform ratio does (``table["uniform"]``), and no more than it
    must; without it, the plan matches the uniform ratio's count. A rise up to ``floor``
    counts as none (see ``_cheapest``)."""
    key = f"{ratio:g}"
    counted = sum(unit["ratios"][key]["removed"] for unit in table["units"] if key in unit["ratios"])
    best = _cheapest(table, counted, floor)
    if removes is None or removes(dict(best)) == table["uniform"][key]:
        return best
    need = table["uniform"][key]
    low, high = 0, sum(max(at["removed"] for at in unit["ratios"].values()) for unit in table["units"])
    if removes(dict(best)) < need:
        low = counted
    else:
        high = counted
    for _ in range(BISECTIONS):
        middle = (low + high) // 2
        plan = _cheapest(table, middle, floor)
        if removes(dict(plan)) >= need:
            high, best = middle, plan
        else:
            low = middle
    return best if removes(dict(best)) >= need else _cheapest(table, high, floor)


def _cheapest(table: Mapping[str, Any], target: int, floor: float = 0.0) -> tuple[tuple[str, float], ...]:
    """The measured ratio per unit whose counts sum to ``target`` or more (less 1/RESOLUTION
    of it) with the least summed loss rise, and of those the one removing least: a knapsack,
    by dynamic programming.

    A rise up to ``floor`` (or below zero) counts as none: pruning a unit that does not
    matter moves the loss by rounding alone (a few 1e-9, of either sign, and not the same on
    every CPU), and read as a difference it would pick whichever such ratio rounded lowest,
    past what the target needs."""
    step = max(1, target // RESOLUTION)
    goal = target // step
    # best[removed steps, capped at goal] = (summed loss rise, removed, the ratios so far)
    best: dict[int, tuple[float, int, tuple[float, ...]]] = {0: (0.0, 0, ())}
    for unit in table["units"]:
        choices = [(0.0, 0.0, 0)] + [(float(r), (at["loss"] if at["loss"] > floor else 0.0), at["removed"])
                                     for r, at in unit["ratios"].items()]
        grown: dict[int, tuple[float, int, tuple[float, ...]]] = {}
        for removed, (loss, total, ratios) in best.items():
            for r, rise, count in choices:
                key = min(goal, removed + -(-count // step))
                value = (loss + rise, total + count, (*ratios, r))
                if key not in grown or value[:2] < grown[key][:2]:
                    grown[key] = value
        best = grown
    if goal not in best:  # beyond what the units can remove: each at its highest ratio
        return tuple((unit["name"], max(float(r) for r in unit["ratios"])) for unit in table["units"])
    chosen = best[goal][2]
    return tuple((unit["name"], r) for unit, r in zip(table["units"], chosen, strict=True))
