"""From the Pareto front to one configuration, with the reasons and the caveats.

Constraints bound the objectives: accuracy as a drop below the baseline in points (hundredths
of the metric: percentage points of accuracy), the others as absolute limits. During a study
they are Optuna constraints (``trial.set_constraint``), so the sampler learns from them;
here they are applied again to the stored measurements, so a recommendation can be asked
for under other limits than the study ran with.

A goal picks among the feasible trials: ``balanced`` takes the knee of the front (the point
nearest the ideal, each objective as a ratio to the baseline), the others the best value of
one objective, ties broken by the rest. There is always an answer: with no feasible trial,
the one nearest to feasibility is returned with what it misses and by how much.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import optuna
from optuna.trial import TrialState

from advisor.errors import AdvisorError
from advisor.objectives import OBJECTIVES

GOALS = ("balanced", "accuracy", "latency", "memory", "size")
_GOAL_OBJECTIVE = {"accuracy": "accuracy", "latency": "latency_ms", "memory": "memory_mib",
                   "size": "size_mib"}
FEW_TRIALS = 10  # below this many completed trials, a recommendation carries a warning
WIDE_SPREAD = 0.2  # (p90 - p10) / median of latency above this is flagged


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


@dataclass
class Recommendation:
    study: str
    goal: str
    constraints: Constraints
    number: int
    params: dict
    metrics: dict
    baseline: dict
    feasible: bool
    why: str
    completed: int
    feasible_count: int
    misses: list[Miss] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    importance: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    result: dict = field(default_factory=dict)

    def ratios(self) -> dict[str, float | None]:
        return {o.name: (self.metrics[o.name] / self.baseline[o.name] if self.baseline.get(o.name) else None)
                for o in OBJECTIVES}


@dataclass
class Candidate:
    number: int
    params: dict
    metrics: dict
    result: dict


def candidates(study: optuna.Study) -> list[Candidate]:
    out = []
    for t in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE]):
        result = t.user_attrs.get("result")
        if result:
            out.append(Candidate(t.number, dict(t.params), dict(result["metrics"]), result))
    return out


def _key(metrics: dict) -> tuple[float, ...]:
    """Every objective as lower-is-better, in the table's order."""
    return tuple(-metrics[o.name] if o.direction == "maximize" else metrics[o.name] for o in OBJECTIVES)


def dominates(a: dict, b: dict) -> bool:
    """Metrics ``a`` are at least as good as ``b`` in every objective and better in one."""
    ka, kb = _key(a), _key(b)
    return all(x <= y for x, y in zip(ka, kb, strict=True)) and ka != kb


def pareto(items: list[Candidate]) -> list[Candidate]:
    return [c for c in items if not any(dominates(o.metrics, c.metrics) for o in items if o is not c)]


def hypervolume(points: list, reference) -> float:
    """Hypervolume of lower-is-better ``points`` inside the box up to ``reference``; points
    outside it add nothing (Optuna's WFG computes it)."""
    from optuna._hypervolume import compute_hypervolume

    ref = np.asarray(reference, dtype=float)
    inside = [p for p in points if np.all(np.asarray(p) < ref)]
    return float(compute_hypervolume(np.array(inside, dtype=float), ref)) if inside else 0.0


def normalized(metrics: dict, baseline: dict) -> list[float]:
    """Each objective as a ratio to the baseline, oriented so lower is better."""
    out = []
    for o in OBJECTIVES:
        value, base = metrics[o.name], baseline[o.name]
        if o.direction == "maximize":
            out.append(base / value if value > 0 else math.inf)
        else:
            out.append(value / base if base > 0 else value)
    return out


def knee(front: list[Candidate], baseline: dict) -> tuple[Candidate, float]:
    """The point of ``front`` nearest the ideal one (the best of each objective on the
    front), in baseline ratios; returns it and its distance."""
    points = [normalized(c.metrics, baseline) for c in front]
    ideal = [min(p[i] for p in points) for i in range(len(OBJECTIVES))]
    distances = [math.dist(p, ideal) for p in points]
    best = min(range(len(front)), key=lambda i: (distances[i], _key(front[i].metrics)))
    return front[best], distances[best]


def best_for(items: list[Candidate], objective: str) -> Candidate:
    """The best value of ``objective``; ties broken by the other objectives in table order."""
    index = [o.name for o in OBJECTIVES].index(objective)

    def key(c: Candidate):
        k = _key(c.metrics)
        return (k[index], *k[:index], *k[index + 1:])

    return min(items, key=key)


def misses(candidate: Candidate, baseline: dict, constraints: Constraints) -> list[Miss]:
    out = []
    values = constraints.values(candidate.metrics, baseline)
    for limit in LIMITS:
        if limit.key in values and values[limit.key] > 0:
            bound = getattr(constraints, limit.key)
            over = values[limit.key]
            out.append(Miss(limit, bound, bound + over, over))
    return out


def feasible(items: list[Candidate], baseline: dict | None, constraints: Constraints) -> list[Candidate]:
    """The candidates that meet ``constraints`` (all of them before a baseline is measured)."""
    if baseline is None:
        return list(items)
    return [c for c in items if not misses(c, baseline, constraints)]


def _shortfall(candidate: Candidate, baseline: dict, constraints: Constraints) -> float:
    """How far from feasible, each miss relative to its limit (the accuracy drop to 1 point
    when the limit is 0)."""
    return sum(m.over / (m.bound or 1.0) for m in misses(candidate, baseline, constraints))


def choose(items: list[Candidate], baseline: dict, constraints: Constraints,
           goal: str) -> tuple[Candidate, bool, str]:
    """The recommended candidate, whether it is feasible, and why it was chosen."""
    if goal not in GOALS:
        raise AdvisorError(f"--goal must be one of {', '.join(GOALS)}; got {goal!r}")
    if not items:
        raise AdvisorError("no completed trial to recommend from")
    meeting = feasible(items, baseline, constraints)
    if not meeting:
        nearest = min(items, key=lambda c: (_shortfall(c, baseline, constraints), _key(c.metrics)))
        return nearest, False, (f"no trial meets the constraints; #{nearest.number} is the nearest "
                                f"to meeting them")
    if goal == "balanced":
        front = pareto(meeting)
        chosen, distance = knee(front, baseline)
        return chosen, True, (f"the knee of the {len(front)}-point front of {len(meeting)} feasible "
                              f"trials: nearest the ideal point (distance {distance:.2f} in "
                              f"ratios to the baseline)")
    objective = _GOAL_OBJECTIVE[goal]
    word = "highest" if objective == "accuracy" else "lowest"
    return best_for(meeting, objective), True, (
        f"the {word} {objective.split('_')[0]} of the {len(meeting)} feasible trials")


def importance(study: optuna.Study, top: int = 3) -> dict[str, list[tuple[str, float]]]:
    """Per objective, the knobs that explain most of its variance (fANOVA), largest first.

    Maximized objectives are negated first: Optuna's evaluators take low values as good.
    Knobs not sampled in every trial (the conditional ones) are left out by Optuna.
    """
    done = [t for t in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])]
    if len(done) < 3:
        return {}
    out = {}
    for i, o in enumerate(OBJECTIVES):
        sign = -1.0 if o.direction == "maximize" else 1.0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = optuna.importance.get_param_importances(
                    study, target=lambda t, i=i, sign=sign: sign * t.values[i],
                    evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (RuntimeError, ValueError):
            continue  # too few distinct values to tell (Optuna says why)
        out[o.name] = [(name, share) for name, share in list(scores.items())[:top] if share > 0]
    return out


def recommend(study: optuna.Study, constraints: Constraints | None = None,
              goal: str = "balanced", with_importance: bool = True) -> Recommendation:
    """The study's recommendation under ``constraints`` (default: the study's own)."""
    attrs = study.user_attrs
    baseline_result = attrs.get("baseline")
    if baseline_result is None:
        raise AdvisorError(f"study {study.study_name!r} has no measured baseline yet; run "
                           f"advisor run --study {study.study_name}")
    baseline = baseline_result["metrics"]
    if constraints is None:
        constraints = Constraints.from_dict(attrs.get("constraints", {}))
    items = candidates(study)
    if not items:
        raise AdvisorError(f"study {study.study_name!r} has no completed trial yet; run "
                           f"advisor run --study {study.study_name} --trials 12")
    chosen, met, why = choose(items, baseline, constraints, goal)
    rec = Recommendation(
        study=study.study_name, goal=goal, constraints=constraints, number=chosen.number,
        params=chosen.params, metrics=chosen.metrics, baseline=baseline, feasible=met,
        why=why, completed=len(items),
        feasible_count=len(feasible(items, baseline, constraints)),
        result=chosen.result)
    if not met:
        rec.misses = misses(chosen, baseline, constraints)
        rec.advice = [f"run more trials: advisor run --study {study.study_name} --trials 20"]
        for m in rec.misses:
            rec.advice.append(f"or loosen {m.limit.flag} to {m.bound + m.over:.3g}")
    rec.warnings = _warnings(rec, baseline_result)
    if with_importance:
        rec.importance = importance(study)
    return rec


def recommend_if_any(study: optuna.Study, constraints: Constraints | None = None,
                     goal: str = "balanced") -> Recommendation | None:
    """:func:`recommend`, or None before the study has a baseline and a completed trial."""
    if not study.user_attrs.get("baseline") or not candidates(study):
        return None
    return recommend(study, constraints, goal)


def _warnings(rec: Recommendation, baseline_result: dict) -> list[str]:
    out = []
    ratios = rec.ratios()
    if ratios["latency_ms"] is not None and ratios["latency_ms"] > 1:
        out.append(f"its latency is {ratios['latency_ms']:.2f}x the baseline's: it is slower to serve")
    b1, base_b1 = rec.result.get("latency_batch1", {}), baseline_result.get("latency_batch1", {})
    if b1.get("median_ms") and base_b1.get("median_ms") and b1["median_ms"] > base_b1["median_ms"]:
        out.append(f"at batch 1 it is {b1['median_ms'] / base_b1['median_ms']:.2f}x slower than the "
                   f"baseline ({b1['median_ms']:.3g} vs {base_b1['median_ms']:.3g} ms)")
    spread = rec.result.get("latency", {}).get("spread", 0.0)
    if spread > WIDE_SPREAD:
        out.append(f"its latency was measured with a wide spread (p10-p90 is {100 * spread:.0f}% of "
                   f"the median): re-measure before relying on it")
    if rec.completed < FEW_TRIALS:
        out.append(f"chosen from only {rec.completed} completed trials; more trials may find better")
    return out
