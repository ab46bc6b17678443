"""Pareto-aware early stopping: the rung rule that decides whether a running trial goes on.

A trial's fine-tune is cut at rungs (``RUNGS``: fractions of ``--trial-steps``). Before the
first rung a trial whose deployable model is eager has measured what its structure alone
decides (the cheap objectives: its latency paired with the baseline's, and its size; a
compiled one measures them at the end, as building it twice would compile it twice); at each
rung it measures accuracy on the selection data with the weights it has so far. The study
then compares that point with every other trial's point at the same rung (completed,
stopped or still running, from any worker: the points are stored with the trials) and the
trial either goes on or stops (:func:`decide`).

A completed trial's points carry the costs its end measured where it had none at the rung
(:func:`peers`). A trial with none at a rung takes those of the latest completed trial that
deploys the same structure (:func:`same_structure`, ``compress.structure``: the same pruned
shapes, quantization, compile mode deployed, autocast and batcher, other weights; a weight's
value changes neither a kernel's time nor its bytes), and its point names that trial
(``costs_from``), as does a stop's reason.

- **Dominated beyond a margin.** It stops when at least ``Rule.dominators`` other trials at
  the same rung beat it by the margins: at least ``Rule.accuracy_points`` more accurate, or
  as accurate and cheaper by ``Rule.cost_margin`` in a cost, and never costlier. Only a
  trial that has measured its cheap costs can be stopped so, and only by trials that have
  measured them too: a cost not measured may be where it beats everyone, so a trial is
  never stopped on a guess. Memory is measured last (its
  window changes how the C library allocates for the rest of the process), so it is not in
  the point; a trial is only stopped by trials whose memory-saving training knobs
  (:func:`lightness`: half precision, accumulation, checkpointing) save at least as much as
  its own. Nothing stops before
  ``Rule.min_peers`` other trials have reached the rung.
- **Outside a constraint.** It stops when its accuracy at the rung is below the baseline's by
  more than ``--max-accuracy-drop`` plus the most any completed trial that was as far behind
  at that rung (or further; within ``Rule.accuracy_points``) gained by its end
  (``Rule.default_gain`` points until ``Rule.min_history`` such trials have completed), or
  when a cheap objective already misses a hard limit (size exactly; latency by more than
  ``Rule.cost_margin``).

Only what this module returns decides; the trial loop (``loop.py``) stores the points and
the decision, and tells Optuna a stopped trial as pruned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from advisor.constraints import Constraints
from advisor.errors import AdvisorError
from advisor.knobs import Knobs
from advisor.techniques.layers import LayerPlan
from advisor.trial import compress

RUNGS = (0.25, 0.5)  # fractions of --trial-steps where a trial's accuracy is compared

# The cheap objectives a rung point may carry, as cost ratios to the baseline (lower is better).
CHEAP = ("latency_ms", "size_mib")


def rung_steps(trial_steps: int, warmup_steps: int = 0) -> tuple[int, ...]:
    """The optimizer steps after which a trial of ``trial_steps`` reports (each past the
    warm-up and before the end; duplicates dropped)."""
    steps = sorted({round(f * trial_steps) for f in RUNGS})
    return tuple(s for s in steps if warmup_steps < s < trial_steps)


@dataclass(frozen=True)
class Rule:
    accuracy_points: float = 1.0  # a dominating trial is this many points more accurate...
    cost_margin: float = 0.05  # ...and this share cheaper in each cost it knows
    dominators: int = 2  # trials that must dominate it
    min_peers: int = 4  # other trials at the rung before anything stops
    default_gain: float = 10.0  # points a trial may still gain after a rung, before history says
    min_history: int = 3  # completed trials with rung points before their gains are used


@dataclass(frozen=True)
class Point:
    """One trial at one rung: its accuracy then and the cost ratios it has measured."""

    number: int
    step: int
    accuracy: float
    costs: Mapping[str, float] = field(default_factory=dict)  # CHEAP name -> ratio to the baseline
    light: tuple[float, ...] = ()  # lightness(knobs): what its training knobs do for memory
    costs_from: int | None = None  # the completed trial of the same structure whose costs these are

    def to_dict(self) -> dict:
        return {"step": self.step, "accuracy": self.accuracy, "costs": dict(self.costs), "light": list(self.light),
                **({"costs_from": self.costs_from} if self.costs_from is not None else {})}

    @classmethod
    def from_dict(cls, number: int, values: Mapping) -> Point:
        return cls(number, int(values["step"]), float(values["accuracy"]), dict(values.get("costs", {})),
                   tuple(values.get("light", ())), values.get("costs_from"))

    def with_costs(self, costs: Mapping[str, float], source: int) -> Point:
        """This point with the cheap costs it lacks lent by trial ``source`` (its own kept)."""
        return replace(self, costs={**costs, **self.costs}, costs_from=source)

    def ended(self, costs: Mapping[str, float]) -> Point:
        """This point once its trial has completed and its end measured ``costs``: those, for
        what it had not measured itself by the rung (and over any another trial lent it)."""
        own = self.costs if self.costs_from is None else {}
        return replace(self, costs={**costs, **own}, costs_from=None)


def lightness(knobs: Knobs) -> tuple[float, ...]:
    """What the knobs that exist to save training memory do, each higher = saves more: half
    precision, accumulation steps, the share of blocks checkpointed. (Pruning saves memory
    too, and shows in size; a teacher or QAT's observers cost some, the model's state.)"""
    every = knobs.checkpoint_every
    return (float(knobs.precision != "fp32"), float(knobs.accumulation), 1.0 / every if every else 0.0)


@dataclass(frozen=True)
class Decision:
    stop: bool
    reason: str = ""
    by: tuple[int, ...] = ()  # the trials that dominate it (when that is why it stops)


def final_costs(result: Mapping, baseline: Mapping[str, float]) -> dict[str, float]:
    """A completed trial's cheap costs as its end measured them, as a rung point carries them:
    its latency objective's paired ratio (in a serving study, the p99's) and its size over the
    baseline's."""
    paired = result.get("paired", {})
    pair = paired.get("serving_p99") if "serving" in result else paired.get("latency")
    out = {"latency_ms": pair["ratio"]} if pair else {}
    size = result["metrics"].get("size_mib")
    if size is not None and baseline.get("size_mib"):
        out["size_mib"] = size / baseline["size_mib"]
    return out


def peers(trials: Iterable, step: int,
          baseline: Mapping[str, float]) -> tuple[list[Point], list[tuple[float, float]]]:
    """From a study's trials (Optuna's frozen trials): every stored point at ``step``, and for
    each completed trial, its accuracy there and how much its final accuracy gained on it. A
    completed trial's point has the cheap costs its end measured where it had not measured
    them by the rung (a compiled deployable is timed at the end): the same model's costs."""
    points, gains = [], []
    for t in trials:
        result = t.user_attrs.get("result") if t.state.name == "COMPLETE" else None
        for values in t.user_attrs.get("rungs", ()):
            if values["step"] != step:
                continue
            point = Point.from_dict(t.number, values)
            points.append(point.ended(final_costs(result, baseline)) if result else point)
            if result:
                gains.append((values["accuracy"], result["metrics"]["accuracy"] - values["accuracy"]))
    return points, gains


def same_structure(trials: Iterable, knobs: Knobs, device: str,
                   plan: LayerPlan | None = None) -> tuple[int, dict] | None:
    """The latest completed trial (its number and result) that deploys the same structure as
    ``knobs`` with per-layer ``plan`` on ``device`` (``compress.structure``; a completed
    trial's plan is in its result): the same program with other weights, so the same kernel
    times and weights' bytes. What a trial that has not measured its cheap costs by a rung
    (a compiled deployable, timed at its end) is judged with; ``None`` when there is none."""
    key = compress.structure(knobs, device, plan)
    found = None
    for t in trials:
        result = t.user_attrs.get("result") if t.state.name == "COMPLETE" else None
        if result and (found is None or t.number > found[0]):
            try:
                theirs = LayerPlan.from_dict(result.get("layers")) if plan is not None else None
                same = compress.structure(Knobs.from_dict(t.params), device, theirs) == key
            except (TypeError, ValueError, AdvisorError):  # params or a plan not written by this advisor
                continue
            if same:
                found = (t.number, result)
    return found


def dominates_by_margin(a: Point, b: Point, rule: Rule) -> bool:
    """``a`` beats ``b`` by the margins: ``b`` has measured every cheap cost (one it has not
    may be where it beats everyone), ``a`` has too and is no costlier in any, saves at least
    as much memory by its knobs, and is either ``Rule.accuracy_points`` more accurate, or as
    accurate and ``Rule.cost_margin`` cheaper in one cost."""
    if a.light and b.light and any(x < y for x, y in zip(a.light, b.light, strict=True)):
        return False
    if any(name not in b.costs for name in CHEAP):
        return False  # what ``b`` has not measured may be where it beats everyone
    shared = list(CHEAP)
    if any(name not in a.costs or a.costs[name] > b.costs[name] for name in shared):
        return False
    points = (a.accuracy - b.accuracy) * 100
    if points >= rule.accuracy_points:
        return True
    cheaper = any(a.costs[name] <= b.costs[name] * (1 - rule.cost_margin) for name in shared)
    return points > -rule.accuracy_points and cheaper and a.accuracy >= b.accuracy


def decide(point: Point, peers: Iterable[Point], *, baseline: Mapping[str, float], constraints: Constraints,
           measured: Mapping[str, float] = {}, gains: Iterable[tuple[float, float]] = (),
           rule: Rule = Rule()) -> Decision:
    """Whether the trial at ``point`` stops. ``peers``: the other trials' points at the same
    rung; ``baseline``: the baseline's metrics; ``measured``: the trial's cheap objectives as
    values (``latency_ms``, its own; ``size_mib``), for the hard limits; ``gains``: each
    completed trial's accuracy at this rung and how much it rose from there to its end."""
    limit = constraints.max_accuracy_drop
    if limit is not None:
        # What trials as far behind at this rung gained by their end: one near the baseline
        # here has little left to gain, one far behind (pruned hard) may recover more.
        behind = [gain for accuracy, gain in gains if accuracy <= point.accuracy + rule.accuracy_points / 100]
        known = len(behind) >= rule.min_history
        slack = max(0.0, max(behind) * 100 if known else rule.default_gain)
        drop = (baseline["accuracy"] - point.accuracy) * 100
        if drop > limit + slack:
            allowing = (f"the {slack:.1f} points that trials as far behind gained after this step" if known
                        else f"{slack:.1f} points of recovery (the allowance until {rule.min_history} trials "
                             f"as far behind have completed)")
            return Decision(True, f"accuracy {point.accuracy:.4g} at step {point.step} is {drop:.1f} points "
                                  f"below the baseline: past --max-accuracy-drop {limit:g} even "
                                  f"allowing {allowing}")
    source = (f"; its latency and size as #{point.costs_from}, of the same deployed structure, measured them"
              if point.costs_from is not None else "")
    hard = (("size_mib", "max_size_mb", "MiB", 0.0), ("latency_ms", "max_latency_ms", "ms", rule.cost_margin))
    for name, key, unit, margin in hard:
        bound = getattr(constraints, key)
        if bound is not None and name in measured and measured[name] > bound * (1 + margin):
            return Decision(True, f"its {name.split('_')[0]}, {measured[name]:.3g} {unit}, already misses "
                                  f"--{key.replace('_', '-')} {bound:g}{source}")
    peers = [p for p in peers if p.number != point.number and p.step == point.step]
    if len(peers) < rule.min_peers:
        return Decision(False)
    by = tuple(sorted(p.number for p in peers if dominates_by_margin(p, point, rule)))
    if len(by) >= rule.dominators:
        return Decision(True, f"{len(by)} trials ({', '.join(f'#{n}' for n in by)}) beat it at step "
                              f"{point.step} by the margins ({rule.accuracy_points:g} points of accuracy, "
                              f"or as accurate and {rule.cost_margin:.0%} cheaper), with training knobs "
                              f"that save at least as much memory{source}", by)
    return Decision(False)
