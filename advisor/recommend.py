"""From the Pareto front to one configuration, with the reasons and the caveats.

Constraints (``constraints.py``) bound the objectives: accuracy as a drop below the baseline
in points (hundredths of the metric: percentage points of accuracy), the others as absolute
limits. During a study they are Optuna constraints (``trial.set_constraint``), so the
sampler learns from them; here they are applied again to the stored measurements (the
study's record, ``study/record.py``), so a recommendation can be asked for under other
limits than the study ran with.

A goal picks among the feasible trials: ``balanced`` takes the knee of the front (the point
nearest the ideal, each objective as a ratio to the baseline), the others the best value of
one objective, ties broken by the rest. There is always an answer: with no feasible trial,
the one nearest to feasibility is returned with what it misses and by how much.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from advisor.constraints import Constraints, Miss
from advisor.errors import AdvisorError
from advisor.objectives import CONFIDENCE, OBJECTIVES, cost_ratios, costs, oriented, paired, pareto
from advisor.study.record import Front, StudyRecord, TrialRecord

GOALS = ("balanced", "accuracy", "latency", "memory", "size")
_GOAL_OBJECTIVE = {"accuracy": "accuracy", "latency": "latency_ms", "memory": "memory_mib",
                   "size": "size_mib"}
FEW_TRIALS = 10  # below this many completed trials, a recommendation carries a warning
WIDE_SPREAD = 0.2  # (p90 - p10) / median of latency above this is flagged


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
    baseline_result: dict = field(default_factory=dict)

    @property
    def confirmation(self) -> dict | None:
        """The chosen trial's and the baseline's accuracy on the validation part no choice
        was made on, with the two parts' sizes; None for trials stored before the split."""
        mine, base = self.result.get("confirmation"), self.baseline_result.get("confirmation")
        if not mine or not base or mine["accuracy"] is None or base["accuracy"] is None:
            return None
        return {"accuracy": mine["accuracy"], "baseline": base["accuracy"], "samples": mine["samples"],
                "per_sample": mine.get("per_sample", True)}

    def ratios(self) -> dict[str, float | None]:
        """Each objective over the baseline's: the paired ratio where the trial has one."""
        out = {}
        for o in OBJECTIVES:
            pair = paired(self.result, o.name)
            out[o.name] = pair["ratio"] if pair is not None else (
                self.metrics[o.name] / self.baseline[o.name] if self.baseline.get(o.name) else None)
        return out


def knee(front: list[TrialRecord], baseline: dict) -> tuple[TrialRecord, float]:
    """The point of ``front`` nearest the ideal one (the best of each objective on the
    front), in baseline ratios; returns it and its distance."""
    points = [cost_ratios(c.metrics, baseline, c.result) for c in front]
    ideal = [min(p[i] for p in points) for i in range(len(OBJECTIVES))]
    distances = [math.dist(p, ideal) for p in points]
    best = min(range(len(front)), key=lambda i: (distances[i], oriented(front[i].metrics)))
    return front[best], distances[best]


def best_for(items: list[TrialRecord], objective: str, baseline: dict | None = None) -> TrialRecord:
    """The best value of ``objective`` (with the ``baseline``, in cost ratios: a paired latency
    ratio where a trial has one); ties broken by the other objectives in table order."""
    index = [o.name for o in OBJECTIVES].index(objective)

    def key(c: TrialRecord):
        k = costs(c, baseline)
        return (k[index], *k[:index], *k[index + 1:])

    return min(items, key=key)


def _shortfall(candidate: TrialRecord, baseline: dict, constraints: Constraints) -> float:
    """How far from feasible, each miss relative to its limit (the accuracy drop to 1 point
    when the limit is 0)."""
    return sum(m.over / (m.bound or 1.0) for m in constraints.misses(candidate.metrics, baseline))


def choose(items: list[TrialRecord], baseline: dict, constraints: Constraints, goal: str,
           judged: Front | None = None) -> tuple[TrialRecord, bool, str]:
    """The recommended trial, whether it is feasible, and why it was chosen; ``judged`` (the
    ``items`` that meet ``constraints``, and their front) when the caller has it already."""
    if goal not in GOALS:
        raise AdvisorError(f"--goal must be one of {', '.join(GOALS)}; got {goal!r}")
    if not items:
        raise AdvisorError("no completed trial to recommend from")
    meeting = judged.feasible if judged else [c for c in items if not constraints.misses(c.metrics, baseline)]
    if not meeting:
        nearest = min(items, key=lambda c: (_shortfall(c, baseline, constraints), oriented(c.metrics)))
        return nearest, False, (f"no trial meets the constraints; #{nearest.number} is the nearest "
                                f"to meeting them")
    if goal == "balanced":
        front = judged.front if judged else pareto(meeting, baseline)
        chosen, distance = knee(front, baseline)
        return chosen, True, (f"the knee of the {len(front)}-point front of {len(meeting)} feasible "
                              f"trials: nearest the ideal point (distance {distance:.2f} in "
                              f"ratios to the baseline)")
    objective = _GOAL_OBJECTIVE[goal]
    word = "highest" if objective == "accuracy" else "lowest"
    return best_for(meeting, objective, baseline), True, (
        f"the {word} {objective.split('_')[0]} of the {len(meeting)} feasible trials")


def importance(study: optuna.Study | StudyRecord, top: int = 3) -> dict[str, list[tuple[str, float]]]:
    """Per objective, the knobs that explain most of its variance (fANOVA), largest first.

    Maximized objectives are negated first: Optuna's evaluators take low values as good.
    Knobs not sampled in every trial (the conditional ones) are left out by Optuna.
    """
    if isinstance(study, StudyRecord):
        completed = sum(t.state == "complete" for t in study.trials)
    else:
        completed = len(study.get_trials(deepcopy=False, states=[TrialState.COMPLETE]))
    if completed < 3:
        return {}
    analysed = study.optuna_study() if isinstance(study, StudyRecord) else study
    out = {}
    for i, o in enumerate(OBJECTIVES):
        sign = -1.0 if o.direction == "maximize" else 1.0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = optuna.importance.get_param_importances(
                    analysed, target=lambda t, i=i, sign=sign: sign * t.values[i],
                    evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (RuntimeError, ValueError):
            continue  # too few distinct values to tell (Optuna says why)
        out[o.name] = [(name, share) for name, share in list(scores.items())[:top] if share > 0]
    return out


def recommend(study: optuna.Study | StudyRecord, constraints: Constraints | None = None,
              goal: str = "balanced", with_importance: bool = True) -> Recommendation:
    """The study's recommendation under ``constraints`` (default: the study's own)."""
    record = StudyRecord.of(study)
    if record.baseline is None:
        raise AdvisorError(f"study {record.name!r} has no measured baseline yet; run "
                           f"advisor run --study {record.name}")
    baseline = record.baseline["metrics"]
    judged = record.front(constraints)
    items = record.completed
    if not items:
        raise AdvisorError(f"study {record.name!r} has no completed trial yet; run "
                           f"advisor run --study {record.name} --trials 12")
    chosen, met, why = choose(items, baseline, judged.constraints, goal, judged)
    rec = Recommendation(
        study=record.name, goal=goal, constraints=judged.constraints, number=chosen.number,
        params=chosen.params, metrics=chosen.metrics, baseline=baseline, feasible=met,
        why=why, completed=len(items), feasible_count=len(judged.feasible), result=chosen.result,
        baseline_result=record.baseline)
    if not met:
        rec.misses = judged.constraints.misses(chosen.metrics, baseline)
        rec.advice = [f"run more trials: advisor run --study {record.name} --trials 20"]
        for m in rec.misses:
            rec.advice.append(f"or loosen {m.limit.flag} to {m.bound + m.over:.3g}")
    rec.warnings = _warnings(rec, record.baseline)
    if with_importance:
        rec.importance = importance(study)
    return rec


def recommend_if_any(study: optuna.Study | StudyRecord, constraints: Constraints | None = None,
                     goal: str = "balanced") -> Recommendation | None:
    """:func:`recommend`, or None before the study has a baseline and a completed trial."""
    record = StudyRecord.of(study)
    if not record.baseline or not record.completed:
        return None
    return recommend(record, constraints, goal)


def _warnings(rec: Recommendation, baseline_result: dict) -> list[str]:
    out = []
    pair = paired(rec.result, "latency_ms")
    if pair is not None:
        # Paired: slower only when the whole confidence interval says so.
        if pair["low"] > 1:
            out.append(f"its latency is {pair['ratio']:.2f}x the baseline's ({_interval(pair)}, timed "
                       f"interleaved with it): it is slower to serve")
    elif (r := rec.ratios()["latency_ms"]) is not None and r > 1:
        out.append(f"its latency is {r:.2f}x the baseline's: it is slower to serve")
    b1, base_b1 = rec.result.get("latency_batch1", {}), baseline_result.get("latency_batch1", {})
    pair_b1 = rec.result.get("paired", {}).get("latency_batch1")
    if pair_b1 is not None:
        if pair_b1["low"] > 1:
            out.append(f"at batch 1 it is {pair_b1['ratio']:.2f}x slower than the baseline "
                       f"({_interval(pair_b1)}, timed interleaved with it)")
    elif b1.get("median_ms") and base_b1.get("median_ms") and b1["median_ms"] > base_b1["median_ms"]:
        out.append(f"at batch 1 it is {b1['median_ms'] / base_b1['median_ms']:.2f}x slower than the "
                   f"baseline ({b1['median_ms']:.3g} vs {base_b1['median_ms']:.3g} ms)")
    if pair is not None:
        # What the ratio rests on is its interval, not the spread of the absolute times (a
        # busy machine widens that, and pairing cancels it).
        width = (pair["high"] - pair["low"]) / pair["ratio"] if pair["ratio"] else 0.0
        if width > WIDE_SPREAD:
            out.append(f"its latency ratio's {_interval(pair)} is {100 * width:.0f}% of the ratio: "
                       f"re-measure before relying on it")
    elif (spread := rec.result.get("latency", {}).get("spread", 0.0)) > WIDE_SPREAD:
        out.append(f"its latency was measured with a wide spread (p10-p90 is {100 * spread:.0f}% of "
                   f"the median): re-measure before relying on it")
    if rec.completed < FEW_TRIALS:
        out.append(f"chosen from only {rec.completed} completed trials; more trials may find better")
    return out


def _interval(pair) -> str:
    return f"{100 * CONFIDENCE:.0f}% interval {pair['low']:.2f}-{pair['high']:.2f}x"
