"""One typed record of a stored study: what the screens, the recommendation and the export read.

A study lives in Optuna's storage as trials plus user attributes the advisor writes (each
trial's ``result`` or ``failure``; the study's ``baseline``, ``settings``, ``constraints``,
``hardware``, ``workload`` and ``space``). This module is their schema: the ``write_*``
functions write them and :meth:`StudyRecord.of` reads them back, by name, here and nowhere
else; :meth:`StudyRecord.front` applies constraints and finds the feasible Pareto front once
for whoever shows or uses it.
"""

from __future__ import annotations

import datetime as dt
import functools
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from advisor import objectives
from advisor.constraints import Constraints
from advisor.knobs import Knobs


@dataclass(frozen=True)
class TrialRecord:
    """One trial: its knobs as sampled, and its measurements or why it has none."""

    number: int
    state: str  # "complete", "fail", "running", "waiting" or "pruned"
    params: dict
    result: dict | None = None  # a completed trial's measurements (``result["metrics"]``: the objectives)
    failure: dict = field(default_factory=dict)  # a failed trial's reason, phase and log tail
    completed_at: dt.datetime | None = None
    retried_from: int | None = None  # the trial whose worker died and whose knobs this one retries
    seconds: float = 0.0  # from start to completion (0 while it runs)
    rungs: tuple[dict, ...] = ()  # its points at the rungs it reached (``rungs.Point.to_dict``)
    stopped: dict = field(default_factory=dict)  # a pruned trial's {"step", "reason", "by"}
    partial: dict = field(default_factory=dict)  # what a stopped trial measured
    warm_from: str | None = None  # "study#number": the earlier study's trial a warm start enqueued

    @property
    def values(self) -> list[float]:
        """The objective values, in the study's order (empty without measurements)."""
        return objectives.values(self.metrics) if self.result else []

    @property
    def metrics(self) -> dict:
        return self.result["metrics"] if self.result else {}

    @property
    def knobs(self) -> Knobs:
        """Every knob's value, the ones the trial did not sample at their defaults."""
        return Knobs.from_dict(self.params)

    def describe(self) -> str:
        try:
            return self.knobs.describe()
        except (ValueError, TypeError):  # params of a trial not written by this advisor
            return ", ".join(f"{k}={v}" for k, v in self.params.items())


@dataclass(frozen=True)
class Front:
    """A study judged under some constraints: the trials that meet them, and their front."""

    constraints: Constraints
    feasible: list[TrialRecord]
    front: list[TrialRecord]  # most accurate first

    @functools.cached_property
    def _numbers(self) -> tuple[set[int], set[int]]:
        return {t.number for t in self.feasible}, {t.number for t in self.front}

    def status(self, trial: TrialRecord) -> str:
        """"front", "dominated", "infeasible", "stopped" (early, at a rung) or "failed"
        (anything else not completed)."""
        feasible, front = self._numbers
        if trial.state == "pruned":
            return "stopped"
        if trial.result is None:
            return "failed"
        if trial.number not in feasible:
            return "infeasible"
        return "front" if trial.number in front else "dominated"


@dataclass(frozen=True)
class StudyRecord:
    name: str
    directions: tuple[str, ...]
    trials: tuple[TrialRecord, ...]
    baseline: dict | None  # the baseline's measurements (``baseline["metrics"]``), once measured
    settings: dict
    constraints: Constraints  # the study's own; a report may judge it under others
    hardware: dict
    workload: dict
    space: dict
    frozen: tuple[FrozenTrial, ...] = field(default=(), repr=False)  # for Optuna's importance
    _fronts: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, study: optuna.Study | StudyRecord) -> StudyRecord:
        """The record of ``study`` (a record is returned as it is)."""
        if isinstance(study, StudyRecord):
            return study
        attrs = study.user_attrs
        frozen = tuple(study.get_trials(deepcopy=False))
        with warnings.catch_warnings():
            # Optuna's heartbeat retries are an experimental API: its note is not the user's.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
            trials = tuple(
                TrialRecord(number=t.number, state=t.state.name.lower(), params=dict(t.params),
                            result=t.user_attrs.get("result") if t.state == TrialState.COMPLETE else None,
                            failure=dict(t.user_attrs.get("failure", {})), completed_at=t.datetime_complete,
                            retried_from=retried(t), seconds=t.duration.total_seconds() if t.duration else 0.0,
                            rungs=tuple(t.user_attrs.get("rungs", ())),
                            stopped=dict(t.user_attrs.get("stopped", {})),
                            partial=dict(t.user_attrs.get("partial", {})),
                            warm_from=t.user_attrs.get("warm_start"))
                for t in frozen)
        return cls(name=study.study_name, directions=tuple(d.name.lower() for d in study.directions),
                   trials=trials, baseline=attrs.get("baseline"), settings=dict(attrs.get("settings", {})),
                   constraints=Constraints.from_dict(attrs.get("constraints", {})),
                   hardware=dict(attrs.get("hardware", {})), workload=dict(attrs.get("workload", {})),
                   space=dict(attrs.get("space", {})), frozen=frozen)

    @property
    def baseline_metrics(self) -> dict | None:
        return self.baseline["metrics"] if self.baseline else None

    @property
    def completed(self) -> list[TrialRecord]:
        """The completed trials with measurements, in trial order."""
        return [t for t in self.trials if t.result is not None]

    @property
    def warm(self) -> list[TrialRecord]:
        """The trials a warm start enqueued (study/warm.py), in trial order."""
        return [t for t in self.trials if t.warm_from]

    @property
    def failed(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.state == "fail"]

    @property
    def stopped(self) -> list[TrialRecord]:
        """Trials the rung rule stopped early (stored as pruned), in trial order."""
        return [t for t in self.trials if t.state == "pruned"]

    @property
    def serving(self) -> dict | None:
        """The load of a serving study (rate, requests, deadline), None for the others."""
        if not self.settings.get("serving_rate"):
            return None
        return {k: self.settings[k] for k in ("serving_rate", "serving_requests", "serving_deadline_ms")}

    @property
    def excluded(self) -> list[dict]:
        return list(self.space.get("excluded", []))

    def trial(self, number: int) -> TrialRecord:
        return next(t for t in self.trials if t.number == number)

    def front(self, constraints: Constraints | None = None) -> Front:
        """The trials meeting ``constraints`` (default: the study's own; all of them before a
        baseline is measured) and their Pareto front, most accurate first."""
        constraints = constraints or self.constraints
        if constraints not in self._fronts:  # the report, the recommendation and the dashboard share it
            base = self.baseline_metrics
            feasible = [t for t in self.completed if base is None or not constraints.misses(t.metrics, base)]
            front = sorted(objectives.pareto(feasible, base),
                           key=lambda t: (-t.metrics["accuracy"], t.metrics["latency_ms"]))
            self._fronts[constraints] = Front(constraints, feasible, front)
        return self._fronts[constraints]

    def failure_reason(self, trial: TrialRecord) -> str:
        """Why a trial failed: what its process reported, or, for a trial whose worker died,
        that its heartbeat stopped (and which trial retried its knobs)."""
        reason = trial.failure.get("reason")
        if reason:
            return reason
        retry = next((t.number for t in self.trials if t.number > trial.number
                      and t.retried_from == trial.number), None)
        if retry is not None:
            return f"its worker stopped sending heartbeats (killed or lost); retried as #{retry}"
        return "no reason recorded (its worker stopped without reporting one: killed, or lost)"

    def optuna_study(self) -> optuna.Study:
        """The trials in an in-memory Optuna study, for Optuna's own analyses."""
        study = optuna.create_study(directions=list(self.directions), study_name=self.name)
        study.add_trials(self.frozen)
        return study


@dataclass(frozen=True)
class StudySummary:
    """A line about one study of a storage, read without loading its trials' measurements."""

    name: str
    model: str | None
    device: str | None
    counts: dict[str, int]  # trials per state: "complete", "pruned", "fail", "running"
    baseline_accuracy: float | None

    @classmethod
    def all(cls, rdb: optuna.storages.BaseStorage) -> list[StudySummary]:
        out = []
        for summary in rdb.get_all_studies():
            attrs = summary.user_attrs
            trials = rdb.get_all_trials(summary._study_id, deepcopy=False)
            counts = {state.name.lower(): sum(1 for t in trials if t.state == state)
                      for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
            out.append(cls(summary.study_name, attrs.get("workload", {}).get("model"),
                           attrs.get("hardware", {}).get("device"), counts,
                           attrs.get("baseline", {}).get("metrics", {}).get("accuracy")))
        return out


# -- writing the record (the trial loop, the baseline, a new study) ----------------------------

def write_setup(study: optuna.Study, *, info: dict, settings: dict, constraints: Constraints,
                hardware: dict, space: dict, version: dict) -> None:
    """What a new study records once: who made it, the workload, how it measures, its limits,
    the machine and the search space (a resumed run compares them: :func:`setup_of`)."""
    study.set_user_attr("advisor", version)
    study.set_user_attr("workload", info)
    study.set_user_attr("settings", settings)
    study.set_user_attr("constraints", constraints.to_dict())
    study.set_user_attr("hardware", hardware)
    study.set_user_attr("space", space)
    study.set_user_attr("objectives", [{"name": o.name, "direction": o.direction, "unit": o.unit}
                                       for o in objectives.OBJECTIVES])


class Setup(NamedTuple):
    """What :func:`write_setup` recorded, for a resumed run to compare with its own."""

    made_by: dict | None  # {"version", "format"}; None: the study was not made by the advisor
    workload: dict
    settings: dict | None
    constraints: dict | None
    hardware: dict
    space: dict | None


def setup_of(study: optuna.Study) -> Setup:
    attrs = study.user_attrs
    return Setup(attrs.get("advisor"), attrs.get("workload", {}), attrs.get("settings"),
                 attrs.get("constraints"), attrs.get("hardware", {}), attrs.get("space"))


def write_warm_start(study: optuna.Study, origins: list[str]) -> None:
    """The earlier studies' trials ("study#number") a new study enqueued first (study/warm.py)."""
    study.set_user_attr("warm_start", origins)


def write_baseline(study: optuna.Study, baseline: dict) -> None:
    study.set_user_attr("baseline", baseline)


def baseline_of(study: optuna.Study) -> dict | None:
    return study.user_attrs.get("baseline")


def write_result(trial: optuna.Trial, result: dict) -> None:
    trial.set_user_attr("result", result)
    # The paired ratios also stand on their own, for plain Optuna readers (optuna-dashboard).
    for key, paired in result.get("paired", {}).items():
        trial.set_user_attr(f"{key}_ratio", {k: paired[k] for k in ("ratio", "low", "high")})


def write_rung(trial: optuna.Trial, point: dict) -> None:
    """A trial's point at a rung (``rungs.Point.to_dict``), after the ones before it: every
    worker's rung rule reads them from the storage."""
    stored = trial.storage.get_trial_user_attrs(trial._trial_id).get("rungs", [])
    trial.set_user_attr("rungs", [*stored, point])


def write_stopped(trial: optuna.Trial, decision: dict) -> None:
    """Why the rung rule stopped the trial: ``{"step", "reason", "by"}``."""
    trial.set_user_attr("stopped", decision)


def write_partial(trial: optuna.Trial, measured: dict, wall_s: float) -> None:
    """What a stopped trial measured before it stopped (its cheap objectives, its phases)."""
    trial.set_user_attr("partial", {**measured, "wall_s": wall_s})


def write_failure(trial: optuna.Trial, reason: str, phase: str, log_tail: str, wall_s: float) -> None:
    trial.set_user_attr("failure", {"reason": reason, "phase": phase, "log_tail": log_tail[-4000:],
                                    "wall_s": wall_s})


def write_worker(trial: optuna.Trial, slot: dict) -> None:
    """Which local worker (and cores) ran the trial, when a run has several."""
    trial.set_user_attr("worker", slot)
