"""What each dashboard panel shows, computed from a study's record: pure functions, no plotly.

Every panel is a dataclass with an ``empty`` reason: when a study has too little for a panel
(two trials, only failures), the page says why instead of drawing an empty frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from advisor import objectives, recommend
from advisor.objectives import OBJECTIVES
from advisor.recommend import Recommendation
from advisor.study.record import Front, StudyRecord

STATUSES = ("front", "dominated", "infeasible", "failed")
# The hypervolume curve's reference point, in cost ratios to the baseline (objectives.cost_ratios):
# twice the baseline's latency, memory and size, half its accuracy. A trial worse than that
# on any objective adds nothing. (The search benchmark uses its own box: bench/search.py.)
REFERENCE_RATIO = 2.0


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
    stopped: list[dict] = field(default_factory=list)  # number, knobs, step, reason: stopped at a rung


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
class Sensitivity:
    """The study's per-layer sensitivity and the recommended trial's per-layer choice."""

    layers: list[dict] = field(default_factory=list)  # name, params, time_share, quant: family -> rise
    units: list[dict] = field(default_factory=list)  # name, ratios: [..], rises: [..]
    chosen: dict = field(default_factory=dict)  # the recommended trial's LayerPlan, as stored
    number: int | None = None
    empty: str = ""


@dataclass
class Context:
    study: str
    hardware: dict
    settings: dict
    constraints: str
    excluded: list[dict]
    workload: dict


def trials(record: StudyRecord, judged: Front, rec: Recommendation | None) -> Trials:
    points, failed, stopped = [], [], []
    for t in record.trials:
        if t.result is not None:
            points.append(Point(t.number, judged.status(t), t.metrics, t.knobs.to_dict()))
        elif t.state == "pruned":
            stopped.append({"number": t.number, "knobs": t.describe(), "step": t.stopped.get("step"),
                            "reason": t.stopped.get("reason", "")})
        elif t.state in ("fail", "running"):
            reason = "running" if t.state == "running" else record.failure_reason(t)
            failed.append({"number": t.number, "knobs": t.describe(), "reason": reason,
                           "phase": t.failure.get("phase", "")})
    empty = "" if points else (f"no completed trial yet ({len(failed)} failed)" if failed
                               else "no trial yet")
    return Trials(points, failed, record.baseline_metrics, rec.number if rec else None, empty,
                  record.serving, stopped)


def hypervolume(record: StudyRecord, judged: Front) -> Hypervolume:
    """Hypervolume of the feasible trials after each completed trial (how the search converged)."""
    reference = (f"{REFERENCE_RATIO:g}x the baseline's latency, memory and size, 1/{REFERENCE_RATIO:g} of "
                 f"its accuracy (objectives as ratios to the baseline)")
    base = record.baseline_metrics
    if not base:
        return Hypervolume([], [], reference, "no baseline measured yet")
    done = record.completed
    if len(done) < 2:
        return Hypervolume([], [], reference, f"{len(done)} completed trial: a curve needs two")
    feasible = {t.number for t in judged.feasible}
    numbers, values, kept = [], [], []
    ref = np.full(len(OBJECTIVES), REFERENCE_RATIO)
    for t in done:
        if t.number in feasible:
            kept.append(objectives.cost_ratios(t.metrics, base, t.result))
        numbers.append(t.number)
        values.append(objectives.hypervolume(kept, ref))
    return Hypervolume(numbers, values, reference)


def importance(rec: Recommendation | None, record: StudyRecord) -> Importance:
    scores = rec.importance if rec and rec.importance else recommend.importance(record, top=5)
    if not scores:
        return Importance({}, "knob importance needs at least 3 completed trials with varied knobs")
    return Importance(scores)


def table(record: StudyRecord, judged: Front) -> list[Row]:
    base = record.baseline_metrics or {}
    rows = []
    for t in record.trials:
        metrics = t.metrics
        state = "infeasible" if judged.status(t) == "infeasible" else t.state
        ratios = {k: v / base[k] for k, v in metrics.items() if base.get(k)}
        reason = record.failure_reason(t) if t.state == "fail" else ""
        if t.state == "pruned":
            state = f"stopped at step {t.stopped.get('step', '?')}"
            reason = t.stopped.get("reason", "")
        if t.warm_from:  # enqueued by a warm start (study/warm.py)
            reason = "; ".join(r for r in (f"warm start: the knobs of {t.warm_from}", reason) if r)
        served = (t.result or {}).get("serving", {})
        serving = {k: served[k] for k in ("p50_ms", "throughput_rps", "overload_share", "saturated")
                   if k in served}
        rows.append(Row(t.number, state, t.describe(), metrics, ratios, reason, serving))
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


def context(record: StudyRecord, judged: Front) -> Context:
    return Context(study=record.name, hardware=record.hardware, settings=record.settings,
                   constraints=judged.constraints.describe(), excluded=record.excluded,
                   workload=record.workload)


def sensitivity(record: StudyRecord, rec: Recommendation | None) -> Sensitivity:
    table = (record.baseline or {}).get("sensitivity")
    if not table:
        return Sensitivity(empty="the study measured no per-layer sensitivity (its space searches no "
                                 "per-layer choice, or it began before them)")
    units = [{"name": u["name"], "ratios": [float(r) for r in u["ratios"]],
              "rises": [at["loss"] for at in u["ratios"].values()]}
             for u in (table.get("pruning") or {}).get("units", [])]
    return Sensitivity(layers=list(table["layers"]), units=units,
                       chosen=dict((rec.result.get("layers") or {}) if rec else {}),
                       number=rec.number if rec else None)
