"""What each dashboard panel shows, computed from a stored study: pure functions, no plotly.

Every panel is a dataclass with an ``empty`` reason: when a study has too little for a panel
(two trials, only failures), the page says why instead of drawing an empty frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from advisor import recommend
from advisor.objectives import OBJECTIVES
from advisor.recommend import Constraints, Recommendation
from advisor.report import failure_reason
from advisor.space import Knobs

STATUSES = ("front", "dominated", "infeasible", "failed")
# Hypervolume reference point, in ratios to the baseline oriented lower-is-better: twice the
# baseline's latency, memory and size, half its accuracy. A trial worse than that on any
# objective adds nothing.
REFERENCE = 2.0


@dataclass
class Point:
    number: int
    status: str  # one of STATUSES
    metrics: dict
    knobs: dict


@dataclass
class Trials:
    """Every trial with its status, for the scatter matrix and parallel coordinates."""

    points: list[Point]
    failed: list[dict]  # number, knobs, reason, phase
    baseline: dict | None
    recommended: int | None
    empty: str = ""
    serving: dict | None = None  # the study's serving load (rate, requests, deadline), if any


@dataclass
class Hypervolume:
    numbers: list[int]  # trial numbers in completion order
    values: list[float]  # hypervolume of the feasible trials up to each
    reference: str
    empty: str = ""


@dataclass
class Importance:
    per_objective: dict[str, list[tuple[str, float]]]
    empty: str = ""


@dataclass
class Row:
    number: int
    state: str
    knobs: str
    metrics: dict  # objective -> value (absent for failed trials)
    ratios: dict
    reason: str
    serving: dict = field(default_factory=dict)  # p50, throughput, overload under the serving load


@dataclass
class Breakdown:
    """Where the recommended trial's time and memory went, and its top operators."""

    number: int | None
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    memory: dict[str, float] = field(default_factory=dict)  # MiB per part
    operators: dict[str, list[dict]] = field(default_factory=dict)  # train / inference
    empty: str = ""


@dataclass
class Context:
    study: str
    hardware: dict
    settings: dict
    constraints: str
    excluded: list[dict]
    workload: dict


def status_of(trial: FrozenTrial, front: set[int], feasible: set[int]) -> str:
    if trial.state != TrialState.COMPLETE:
        return "failed"
    if trial.number not in feasible:
        return "infeasible"
    return "front" if trial.number in front else "dominated"


def trials(study: optuna.Study, constraints: Constraints, rec: Recommendation | None) -> Trials:
    baseline = study.user_attrs.get("baseline")
    items = recommend.candidates(study)
    base_metrics = baseline["metrics"] if baseline else None
    feasible = recommend.feasible(items, base_metrics, constraints)
    front = {c.number for c in recommend.pareto(feasible)}
    feasible_numbers = {c.number for c in feasible}
    points, failed = [], []
    all_trials = study.get_trials(deepcopy=False)
    for t in all_trials:
        if t.state == TrialState.COMPLETE and "result" in t.user_attrs:
            points.append(Point(t.number, status_of(t, front, feasible_numbers),
                                dict(t.user_attrs["result"]["metrics"]),
                                Knobs.from_dict(t.params).to_dict()))
        elif t.state in (TrialState.FAIL, TrialState.RUNNING):
            failure = t.user_attrs.get("failure", {})
            reason = "running" if t.state == TrialState.RUNNING else failure_reason(t, all_trials)
            failed.append({"number": t.number, "knobs": _describe(t.params), "reason": reason,
                           "phase": failure.get("phase", "")})
    empty = "" if points else (f"no completed trial yet ({len(failed)} failed)" if failed
                               else "no trial yet")
    return Trials(points, failed, base_metrics, rec.number if rec else None, empty,
                  serving_load(study))


def serving_load(study: optuna.Study) -> dict | None:
    settings = study.user_attrs.get("settings", {})
    if not settings.get("serving_rate"):
        return None
    return {k: settings[k] for k in ("serving_rate", "serving_requests", "serving_deadline_ms")}


def _describe(params: dict) -> str:
    try:
        return Knobs.from_dict(params).describe()
    except ValueError:
        return ", ".join(f"{k}={v}" for k, v in params.items())


def hypervolume(study: optuna.Study, constraints: Constraints) -> Hypervolume:
    """Hypervolume of the feasible trials after each completed trial (how the search converged)."""
    reference = (f"{REFERENCE:g}x the baseline's latency, memory and size, 1/{REFERENCE:g} of its "
                 f"accuracy (objectives as ratios to the baseline)")
    baseline = study.user_attrs.get("baseline")
    if not baseline:
        return Hypervolume([], [], reference, "no baseline measured yet")
    base = baseline["metrics"]
    done = sorted(recommend.candidates(study), key=lambda c: c.number)
    if len(done) < 2:
        return Hypervolume([], [], reference, f"{len(done)} completed trial: a curve needs two")
    numbers, values, kept = [], [], []
    ref = np.full(len(OBJECTIVES), REFERENCE)
    for c in done:
        if not recommend.misses(c, base, constraints):
            kept.append(recommend.normalized(c.metrics, base))
        numbers.append(c.number)
        values.append(recommend.hypervolume(kept, ref))
    return Hypervolume(numbers, values, reference)


def importance(rec: Recommendation | None, study: optuna.Study) -> Importance:
    scores = rec.importance if rec and rec.importance else recommend.importance(study, top=5)
    if not scores:
        return Importance({}, "knob importance needs at least 3 completed trials with varied knobs")
    return Importance(scores)


def table(study: optuna.Study, constraints: Constraints) -> list[Row]:
    baseline = study.user_attrs.get("baseline")
    base = baseline["metrics"] if baseline else {}
    feasible_numbers = {c.number for c in recommend.feasible(recommend.candidates(study),
                                                             base or None, constraints)}
    rows = []
    all_trials = study.get_trials(deepcopy=False)
    for t in all_trials:
        result = t.user_attrs.get("result")
        metrics = dict(result["metrics"]) if t.state == TrialState.COMPLETE and result else {}
        state = t.state.name.lower()
        if metrics and t.number not in feasible_numbers:
            state = "infeasible"
        ratios = {k: v / base[k] for k, v in metrics.items() if base.get(k)}
        reason = failure_reason(t, all_trials) if t.state == TrialState.FAIL else ""
        served = (result or {}).get("serving", {}) if metrics else {}
        serving = {k: served[k] for k in ("p50_ms", "throughput_rps", "overload_share", "saturated")
                   if k in served}
        rows.append(Row(t.number, state, _describe(t.params), metrics, ratios, reason, serving))
    return rows


def breakdown(rec: Recommendation | None) -> Breakdown:
    if rec is None:
        return Breakdown(None, empty="no recommendation: no completed trial")
    result = rec.result
    memory = result.get("memory", {})
    parts = {"model and optimizer state": memory.get("state_mib", 0.0),
             "transient peak of a training step": memory.get("transient_mib", 0.0)}
    if memory.get("graph_pool_mib"):
        parts["of which CUDA-graph pools"] = memory["graph_pool_mib"]
    return Breakdown(rec.number, phases=dict(result.get("phases", {})), memory=parts,
                     operators=dict(result.get("profile", {})))


def context(study: optuna.Study, constraints: Constraints) -> Context:
    attrs = study.user_attrs
    return Context(study=study.study_name, hardware=dict(attrs.get("hardware", {})),
                   settings=dict(attrs.get("settings", {})), constraints=constraints.describe(),
                   excluded=list(attrs.get("space", {}).get("excluded", [])),
                   workload=dict(attrs.get("workload", {})))
