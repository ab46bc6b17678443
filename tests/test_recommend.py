"""Constraints, goals and the explained recommendation, on studies with known fronts."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from advisor import objectives, recommend, report
from advisor.constraints import Constraints
from advisor.errors import AdvisorError
from advisor.study import TrialRecord

BASELINE = {"accuracy": 0.9, "latency_ms": 10.0, "memory_mib": 100.0, "size_mib": 10.0}


def result(metrics: dict, spread: float = 0.05, batch1: float = 1.0) -> dict:
    return {"metrics": metrics, "latency": {"spread": spread, "median_ms": metrics["latency_ms"]},
            "latency_batch1": {"median_ms": batch1}}


# A: smallest; B: fastest; C: the balanced one; D: dominated by C.
FRONT = {
    "A": {"accuracy": 0.9, "latency_ms": 10.0, "memory_mib": 100.0, "size_mib": 1.0},
    "B": {"accuracy": 0.9, "latency_ms": 1.0, "memory_mib": 100.0, "size_mib": 10.0},
    "C": {"accuracy": 0.895, "latency_ms": 3.0, "memory_mib": 30.0, "size_mib": 3.0},
    "D": {"accuracy": 0.89, "latency_ms": 4.0, "memory_mib": 40.0, "size_mib": 4.0},
}


def fixture_study(points: dict, constraints: Constraints | None = None, *, extra: int = 0,
                  spread: float = 0.05, batch1: float = 1.0) -> optuna.Study:
    """A study as advisor stores one: objectives, the result attribute, the baseline."""
    study = optuna.create_study(directions=objectives.DIRECTIONS, study_name="fixture")
    study.set_user_attr("baseline", {"metrics": BASELINE, "knobs": {}, **result(BASELINE)})
    study.set_user_attr("constraints", (constraints or Constraints()).to_dict())
    names = list(points) + [f"filler{i}" for i in range(extra)]
    for name in names:
        metrics = points.get(name, FRONT["D"])
        study.add_trial(optuna.trial.create_trial(
            params={"quantization": "none"},
            distributions={"quantization": CategoricalDistribution(["none"])},
            values=objectives.values(metrics),
            user_attrs={"result": result(metrics, spread, batch1), "label": name}))
    return study


def label(study: optuna.Study, rec: recommend.Recommendation) -> str:
    return study.trials[rec.number].user_attrs["label"]


def test_the_knee_of_a_hand_made_front():
    items = [TrialRecord(i, "complete", {}, {"metrics": m}) for i, m in enumerate(FRONT.values())]
    front = recommend.pareto(items)
    assert [c.number for c in front] == [0, 1, 2], "D is dominated by C"
    chosen, distance = recommend.knee(front, BASELINE)
    assert chosen.number == 2
    # C in baseline ratios is (0.9/0.895, 0.3, 0.3, 0.3); the ideal is (1, 0.1, 0.3, 0.1).
    assert distance == pytest.approx(((0.9 / 0.895 - 1) ** 2 + 0.2 ** 2 + 0.2 ** 2) ** 0.5)


@pytest.mark.parametrize("goal, expected", [
    ("balanced", "C"), ("latency", "B"), ("size", "A"), ("memory", "C"),
    ("accuracy", "B"),  # A and B tie on accuracy; B's latency breaks the tie
])
def test_each_goal_picks_its_trial(goal, expected):
    study = fixture_study(FRONT, extra=10)
    rec = recommend.recommend(study, goal=goal, with_importance=False)
    assert rec.feasible and label(study, rec) == expected
    assert rec.feasible_count == 4 + 10


def test_constraints_remove_trials_before_the_goal_applies():
    study = fixture_study(FRONT, extra=10)
    rec = recommend.recommend(study, Constraints(max_accuracy_drop=0.4), with_importance=False)
    # C and D lose 0.5 and 1 point: the knee is now taken among A and B.
    assert rec.feasible and label(study, rec) in ("A", "B") and rec.feasible_count == 2
    rec = recommend.recommend(study, Constraints(max_size_mb=2.0), goal="latency", with_importance=False)
    assert label(study, rec) == "A"


def test_with_no_feasible_trial_the_nearest_is_recommended_with_what_it_misses():
    study = fixture_study(FRONT, extra=10)
    rec = recommend.recommend(study, Constraints(max_latency_ms=0.5), with_importance=False)
    assert not rec.feasible and label(study, rec) == "B" and rec.feasible_count == 0
    assert [m.describe() for m in rec.misses] == [
        "latency 1 ms exceeds --max-latency-ms 0.5 by 0.5 ms (100%)"]
    assert any("--trials" in a for a in rec.advice)
    assert "or loosen --max-latency-ms to 1" in rec.advice
    text = report.render_recommendation(rec)
    assert text.startswith("Nearest to the constraints (no trial meets them)")
    rec = recommend.recommend(study, Constraints(max_accuracy_drop=0.0, max_size_mb=0.5),
                              with_importance=False)
    assert not rec.feasible
    assert {m.limit.key for m in rec.misses} == {"max_size_mb"}, "A and B lose nothing"


def test_warnings_for_slow_noisy_or_thinly_supported_recommendations():
    slower = {"accuracy": 0.9, "latency_ms": 12.0, "memory_mib": 50.0, "size_mib": 5.0}
    study = fixture_study({"S": slower}, spread=0.4, batch1=2.0)
    rec = recommend.recommend(study, goal="memory", with_importance=False)
    text = " | ".join(rec.warnings)
    assert "latency is 1.20x the baseline's" in text
    assert "at batch 1 it is 2.00x slower" in text
    assert "wide spread (p10-p90 is 40% of the median)" in text
    assert "only 1 completed trials" in text
    quiet = recommend.recommend(fixture_study(FRONT, extra=10), goal="latency", with_importance=False)
    assert quiet.warnings == []


def pair(ratio: float, low: float, high: float) -> dict:
    return {"ratio": ratio, "low": low, "high": high, "rounds": 20, "ms": 1.0, "reference_ms": 1.0}


def with_pairs(metrics: dict, latency: dict, batch1: dict | None = None) -> dict:
    return {**result(metrics), "paired": {"latency": latency, "latency_batch1": batch1 or latency}}


def test_the_front_and_the_goals_read_paired_latency_ratios_over_absolute_times():
    # P ran while the machine was busy: 8 ms absolute, yet timed beside the baseline it is
    # 0.5x. Q ran on a quiet machine: 6 ms absolute, 0.6x paired. Otherwise equal.
    base = {"accuracy": 0.9, "memory_mib": 50.0, "size_mib": 5.0}
    p = TrialRecord(0, "complete", {}, with_pairs({**base, "latency_ms": 8.0}, pair(0.5, 0.48, 0.52)))
    q = TrialRecord(1, "complete", {}, with_pairs({**base, "latency_ms": 6.0}, pair(0.6, 0.58, 0.62)))
    assert recommend.pareto([p, q], BASELINE) == [p], "paired, P dominates Q"
    assert recommend.pareto([p, q]) == [q], "absolute, Q would have won"
    assert recommend.best_for([p, q], "latency_ms", BASELINE) is p
    assert objectives.cost_ratios(p.metrics, BASELINE, p.result)[1] == 0.5


def test_slower_warnings_fire_only_when_the_paired_interval_says_so():
    metrics = {"accuracy": 0.9, "latency_ms": 12.0, "memory_mib": 50.0, "size_mib": 5.0}

    def warnings(latency: dict, batch1: dict) -> str:
        study = optuna.create_study(directions=objectives.DIRECTIONS, study_name="paired")
        study.set_user_attr("baseline", {"metrics": BASELINE, "knobs": {}, **result(BASELINE)})
        study.set_user_attr("constraints", Constraints().to_dict())
        study.add_trial(optuna.trial.create_trial(
            params={"quantization": "none"}, distributions={"quantization": CategoricalDistribution(["none"])},
            values=objectives.values(metrics), user_attrs={"result": with_pairs(metrics, latency, batch1)}))
        rec = recommend.recommend(study, goal="memory", with_importance=False)
        shown = report.render_recommendation(rec)
        assert f"({latency['ratio']:.2f}x, {latency['low']:.2f}-{latency['high']:.2f})" in shown
        return " | ".join(rec.warnings)

    unsure = warnings(pair(1.2, 0.95, 1.4), pair(1.1, 0.9, 1.3))  # 12 ms against 10: not sure
    assert "slower to serve" not in unsure and "at batch 1" not in unsure
    assert "its latency ratio's 95% interval 0.95-1.40x is 38% of the ratio: re-measure" in unsure
    assert "wide spread" not in unsure, "the absolute times' spread is not what the ratio rests on"
    sure = warnings(pair(1.2, 1.1, 1.3), pair(2.0, 1.8, 2.2))
    assert "its latency is 1.20x the baseline's (95% interval 1.10-1.30x" in sure
    assert "at batch 1 it is 2.00x slower than the baseline (95% interval 1.80-2.20x" in sure


def test_the_recommendation_reports_its_accuracy_on_the_part_it_was_not_chosen_on():
    study = optuna.create_study(directions=objectives.DIRECTIONS, study_name="confirmed")
    base = {"metrics": BASELINE, "knobs": {}, **result(BASELINE),
            "confirmation": {"accuracy": 0.88, "samples": [180, 180]}}
    study.set_user_attr("baseline", base)
    study.set_user_attr("constraints", Constraints().to_dict())
    metrics = FRONT["C"]
    study.add_trial(optuna.trial.create_trial(
        params={"quantization": "none"}, distributions={"quantization": CategoricalDistribution(["none"])},
        values=objectives.values(metrics),
        user_attrs={"result": {**result(metrics), "confirmation": {"accuracy": 0.87, "samples": [180, 180]}}}))
    rec = recommend.recommend(study, with_importance=False)
    assert rec.confirmation == {"accuracy": 0.87, "baseline": 0.88, "samples": [180, 180], "per_sample": True}
    shown = report.render_recommendation(rec)
    assert ("confirmed on the 180 validation samples no choice was made on (the accuracy above is on "
            "the other 180, where one sample is 0.56 points): 0.87 (-1.00 points against the "
            "baseline's 0.88 there)") in shown
    # Per-token accuracy (a language model's): a point is not a sample.
    rec.result["confirmation"]["per_sample"] = False
    assert "(the accuracy above is on the other 180): 0.87" in report.render_recommendation(rec)


def test_importance_names_the_knob_that_moves_each_objective():
    study = optuna.create_study(directions=objectives.DIRECTIONS)
    study.set_user_attr("baseline", {"metrics": BASELINE, "knobs": {}, **result(BASELINE)})
    dist = {"quantization": CategoricalDistribution(["none", "int8-static"]),
            "accumulation": CategoricalDistribution([1, 2])}
    for i in range(16):
        quant, acc = ("none", "int8-static")[i % 2], (1, 2)[(i // 2) % 2]
        metrics = {"accuracy": 0.9 - 0.001 * (i % 3), "latency_ms": 5.0,
                   "memory_mib": 50.0 + 10 * acc, "size_mib": 10.0 if quant == "none" else 3.0}
        study.add_trial(optuna.trial.create_trial(
            params={"quantization": quant, "accumulation": acc}, distributions=dist,
            values=objectives.values(metrics), user_attrs={"result": result(metrics)}))
    scores = recommend.importance(study)
    assert scores["size_mib"][0][0] == "quantization"
    assert scores["memory_mib"][0][0] == "accumulation"


def test_constraint_values_are_optunas_sign_convention():
    c = Constraints(max_accuracy_drop=1.0, max_latency_ms=5.0)
    values = c.values({"accuracy": 0.885, "latency_ms": 4.0, "memory_mib": 1, "size_mib": 1}, BASELINE)
    assert values == pytest.approx({"max_accuracy_drop": 0.5, "max_latency_ms": -1.0})
    with pytest.raises(AdvisorError, match="--max-latency-ms must be > 0; got -1"):
        Constraints(max_latency_ms=-1)
    with pytest.raises(AdvisorError, match="--max-accuracy-drop must be a number; got 'a lot'"):
        Constraints(max_accuracy_drop="a lot")
    with pytest.raises(AdvisorError, match="--goal must be one of balanced"):
        recommend.choose([TrialRecord(0, "complete", {}, {"metrics": BASELINE})], BASELINE, c, "cheapest")
